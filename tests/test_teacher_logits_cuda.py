"""teacher-logits on a GPU: the store a CUDA teacher writes (pinned per-batch copies, Triton summary, several
shards written in the background) holds what the CPU's holds.

Skipped where no CUDA device is present (CI); run on a lent accelerator.
"""

import pytest
import torch
from conftest import write_sequences
from transformers import AutoTokenizer

from fdivctl.io.logit_store import LogitStore, verify_store
from fdivctl.stages.teacher_logits import TeacherLogitsOptions, run_teacher_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_cuda_store_equals_the_cpu_store(tmp_path, tiny_teacher):
    vocab = len(AutoTokenizer.from_pretrained(tiny_teacher))
    seqs = write_sequences(tmp_path / "seqs.parquet", vocab, 40, 6, 30, seed=4)
    stores = {}
    torch.backends.cuda.enable_cudnn_sdp(True)  # as a fresh process has it (an earlier test's load turned it off)
    for device in ("cpu", "cuda"):
        opts = TeacherLogitsOptions(k=16, temperature=1.3, dtype="fp32", batch_size=3, max_tokens_per_shard=200,
                                    device=device, model_dtype="fp32")
        summary = run_teacher_logits(tiny_teacher, seqs, tmp_path / device, opts)
        assert summary["complete"] and summary["shards_total"] > 2
        # a teacher loaded on CUDA leaves cuDNN out of attention: no execution plan per new batch shape
        assert torch.backends.cuda.cudnn_sdp_enabled() == (device == "cpu")
        assert verify_store(tmp_path / device) == []
        stores[device] = LogitStore(tmp_path / device)
    cpu, cuda = stores["cpu"], stores["cuda"]
    assert len(cpu) == len(cuda) == 40
    for i in range(40):
        a, b = cpu.sequence(f"p{i}", 0), cuda.sequence(f"p{i}", 0)
        assert torch.equal(a.token_ids, b.token_ids)
        for name in ("logprobs", "log_tail", "token_logprob"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=2e-4, rtol=1e-4)
        if len(a.ids):
            assert (a.ids == b.ids).float().mean() > 0.98  # near-ties may swap
