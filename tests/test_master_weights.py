"""A bf16 model trains through fp32 master weights: it moves as the fp32 run does, and resumes exactly.

Before: AdamW updated the bf16 parameters in place, and at small learning rates most steps rounded away.
"""

import torch
from cli_runner import run_cli
from conftest import write_sequences
from safetensors.torch import load_file

from fdivctl.training.master_weights import MasterWeights


def test_adamw_steps_below_bf16_resolution_accumulate_in_the_copies():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    start = model.weight.detach().float().clone()
    in_place = torch.nn.Parameter(model.weight.detach().clone())  # the old way: AdamW on the bf16 weights
    plain = torch.optim.AdamW([in_place], lr=1e-6, weight_decay=0.0)
    for _ in range(100):
        in_place.sum().backward()
        plain.step()
        plain.zero_grad()
    assert float((in_place.detach().float() == start).float().mean()) > 0.9  # the steps rounded away (but near 0)
    masters = MasterWeights(model)
    assert [p.dtype for p in masters.params] == [torch.float32] and list(masters.copies) == ["weight"]
    optimizer = torch.optim.AdamW(masters.params, lr=1e-6, weight_decay=0.0)
    for _ in range(100):
        model.weight.sum().backward()  # every gradient is 1: AdamW moves each weight by -lr per step
        masters.take_grads()
        assert model.weight.grad is None and masters.params[0].grad.dtype == torch.float32
        optimizer.step()
        masters.to_model()
        optimizer.zero_grad()
    moved = masters.params[0].detach() - start
    torch.testing.assert_close(moved, torch.full_like(moved, -1e-4), rtol=1e-2, atol=0)  # fp32 rounding
    # the model holds the copies rounded to bf16: where -1e-4 crossed a rounding boundary it moved
    torch.testing.assert_close(model.weight.detach().float(), masters.params[0].detach().to(torch.bfloat16).float())
    assert int((model.weight.detach().float() != start).sum()) > 500


def _moved(directory, start) -> torch.Tensor:
    end = load_file(directory / "model.safetensors")
    return torch.cat([(end[k].float() - start[k].to(end[k].dtype).float()).flatten() for k in sorted(start)])


def test_bf16_distillation_moves_like_fp32_and_resumes_exactly(tmp_path, student, tiny_teacher):
    data = write_sequences(tmp_path / "data.parquet", 200, 16, 4, 12, seed=0)
    common = ["--teacher", tiny_teacher, "--data", data, "--lr", "1e-5", "--lr-schedule", "constant",
              "--batch-size", 4, "--device", "cpu"]
    for dtype in ("fp32", "bf16"):
        run_cli("distill", student, tmp_path / dtype, *common, "--dtype", dtype, "--max-steps", 20, check=True)
    start = load_file(student / "model.safetensors")
    fp32, bf16 = _moved(tmp_path / "fp32", start), _moved(tmp_path / "bf16", start)
    assert load_file(tmp_path / "bf16" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    cosine = float(torch.nn.functional.cosine_similarity(fp32, bf16, dim=0))
    ratio = float(bf16.norm() / fp32.norm())
    assert cosine > 0.9 and 0.8 < ratio < 1.25, (cosine, ratio)  # in-place bf16 updates: ratio ≈ 0.2 here
    # the fp32 copies are saved with the checkpoint: 12 + 8 steps equal 20
    run_cli("distill", student, tmp_path / "resumed", *common, "--dtype", "bf16", "--max-steps", 12, check=True)
    assert (tmp_path / "resumed" / "fdivctl_state" / "master").is_dir()
    run_cli("distill", student, tmp_path / "resumed", *common, "--dtype", "bf16", "--max-steps", 20, "--resume",
            check=True)
    whole, resumed = load_file(tmp_path / "bf16" / "model.safetensors"), load_file(tmp_path / "resumed" /
                                                                                    "model.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
