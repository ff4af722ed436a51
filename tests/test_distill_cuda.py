"""distill on a GPU: each loss's first-step value on CUDA equals the CPU's (fp32), on-policy and LoRA runs complete.

Skipped where no CUDA device is present (CI); run on a lent accelerator.
"""

import json

import pytest
import torch
from conftest import write_sequences
from transformers import AutoTokenizer

from fdivctl.stages.distill import (
    DistillOptions,
    OnPolicyOptions,
    prepare_distill,
    run_distill,
)
from fdivctl.training.loop import LoopOptions
from fdivctl.training.lora import LoraOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_teacher):
    """Sequences that are also prompts (a text ``prompt`` column) for the on-policy run."""
    vocab = len(AutoTokenizer.from_pretrained(tiny_teacher))
    prompts = ["2 digits sum 9:", "the cat", "a b c", "hello", "7 + 8 =", "x", "3 4", "ok"]
    return write_sequences(tmp_path_factory.mktemp("data") / "seqs.parquet", vocab, 8, 5, 9, seed=3, prompt=prompts)


@pytest.mark.parametrize("loss", ["fkl", "jsd", "pld", "sinkhorn:batch=16", "bdkd", "ce"])
def test_first_loss_on_cuda_equals_cpu(loss, student, data, tiny_teacher):
    values = {}
    for device in ("cpu", "cuda"):
        opts = DistillOptions(loss=loss, device=device, dtype="fp32", loop=LoopOptions(batch_size=8))
        _, _, _, loss_fn = prepare_distill(student, data, opts, teacher=None if loss == "ce" else tiny_teacher)
        values[device] = float(loss_fn(list(range(8)))[0])
    assert values["cuda"] == pytest.approx(values["cpu"], rel=2e-4, abs=1e-6)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_on_policy_vopd_with_lora_runs_on_cuda(tmp_path, dtype, student, data, tiny_teacher):
    log = tmp_path / "log.jsonl"
    loop = LoopOptions(lr=1e-3, batch_size=4, max_steps=3, log_jsonl=log, lora=LoraOptions(r=4),
                       grad_checkpointing=True)
    opts = DistillOptions(device="cuda", dtype=dtype, loop=loop,
                          on_policy=OnPolicyOptions(samples_per_prompt=2, max_new_tokens=8, baseline="vopd"))
    summary = run_distill(student, tmp_path / "out", data, opts, teacher=tiny_teacher)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert summary["steps"] == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
