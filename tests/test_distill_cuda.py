"""distill on a GPU: each loss's first-step value on CUDA equals the CPU's (fp32), from an online teacher and from a
logit store (the Triton top-k path); on-policy and LoRA runs complete.

Skipped where no CUDA device is present (CI); run on a lent accelerator.
"""

import json

import pytest
import torch
from cli_runner import run_cli
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


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher, data):
    out = tmp_path_factory.mktemp("store") / "logits"
    run_cli("teacher-logits", tiny_teacher, data, out, "--k", 16, "--device", "cpu", check=True)
    return out


@pytest.mark.parametrize("loss", ["fkl", "jsd"])
@pytest.mark.parametrize("tail", ["tail", "renormalize"])
def test_offline_store_loss_and_gradients_on_cuda_equal_the_cpu(loss, tail, student, data, store):
    """Offline distillation from a top-16 store: on CUDA the head's row work takes the Triton top-k path (the k
    ids gathered, the rest of each row summed and differentiated by the row kernels), on the CPU the PyTorch one."""
    results = {}
    for device in ("cpu", "cuda"):
        opts = DistillOptions(loss=loss, device=device, dtype="fp32", tail=tail, loop=LoopOptions(batch_size=8))
        model, _, _, loss_fn = prepare_distill(student, data, opts, logits=store)
        value, _ = loss_fn(list(range(8)))
        grads = torch.autograd.grad(value, [p for p in model.parameters() if p.requires_grad])
        results[device] = (float(value), [g.detach().double().cpu() for g in grads])
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=2e-4, abs=1e-6)
    for ours, ref in zip(results["cuda"][1], results["cpu"][1]):
        assert float((ours - ref).norm()) <= 1e-3 * float(ref.norm()) + 1e-7


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
