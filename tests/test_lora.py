"""--lora-r: adapters train, the checkpoint is a merged model plus a peft adapter, resume is exact."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_runner import run_cli
from conftest import write_sequences
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fdivctl.stages.distill import DistillOptions, run_distill
from fdivctl.training.loop import LoopOptions
from fdivctl.training.lora import LoraOptions, add_adapters, merged_state_dict


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_teacher):
    vocab = len(AutoTokenizer.from_pretrained(tiny_teacher))
    return write_sequences(tmp_path_factory.mktemp("data") / "seqs.parquet", vocab, 8, 5, 7, seed=4)


def _opts(tmp_path, steps, **loop):
    defaults = dict(lr=1e-2, lr_schedule="cosine", batch_size=4, max_steps=steps, log_jsonl=tmp_path / "log.jsonl",
                    lora=LoraOptions(r=4))
    return DistillOptions(loss="jsd", device="cpu", loop=LoopOptions(**{**defaults, **loop}))


def test_merged_state_dict_is_w0_plus_scaled_ba(student):
    """LoRA eq. 3 by hand: W = W₀ + (α/r)·B A on one projection."""
    model = AutoModelForCausalLM.from_pretrained(student)
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    add_adapters(model, LoraOptions(r=2, alpha=3.0))
    layer = model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    merged = merged_state_dict(model)["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(merged, w0 + 1.5 * b @ a)
    assert not any(".lora_" in k or "base_layer" in k for k in merged_state_dict(model))


def test_distill_with_lora_trains_adapters_only_and_saves_merged_and_adapter(tmp_path, student, data, tiny_teacher):
    out = tmp_path / "out"
    summary = run_distill(student, out, data, _opts(tmp_path, steps=4), teacher=tiny_teacher)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert summary["steps"] == 4 and losses[-1] < losses[0]
    base = load_file(student / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(base)
    moved = [k for k in base if not torch.equal(base[k], merged[k])]
    # the adapters sit on the decoder's linear layers only: embeddings and norms are untouched
    assert moved and all(k.endswith("proj.weight") for k in moved)
    ids = torch.randint(3, 100, (2, 9))
    trained = AutoModelForCausalLM.from_pretrained(out)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), out / "adapter")
    torch.testing.assert_close(trained(ids).logits, with_adapter(ids).logits, atol=1e-5, rtol=0)


def test_lora_resume_equals_an_uninterrupted_run(tmp_path, student, data, tiny_teacher):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_distill(student, straight, data, _opts(tmp_path, steps=4, save_every=2), teacher=tiny_teacher)

    def stop_after_two(step, total, figures):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_distill(student, resumed, data, _opts(tmp_path, steps=4, save_every=2), teacher=tiny_teacher,
                    on_step=stop_after_two)
    refused = run_cli("distill", student, resumed, "--data", data, "--teacher", tiny_teacher, "--device", "cpu",
                      "--resume")
    assert refused.returncode == 2 and "loop.lora.r: 4 → 0" in refused.stderr, refused.stderr
    run_distill(student, resumed, data, _opts(tmp_path, steps=4, save_every=2, resume=True), teacher=tiny_teacher)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = load_file(straight / name), load_file(resumed / name)
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0)


def test_cli_train_sft_with_lora_and_bad_rank(tmp_path, student, tokenizer_dir):
    pairs = tmp_path / "sft.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["1+1=", "2+2="], "completion": ["2", "4"]}), pairs)
    out = tmp_path / "sft"
    done = run_cli("train", student, out, "--algo", "sft", "--data", pairs, "--lora-r", 2, "--lr", 1e-2,
                   "--batch-size", 2, "--max-steps", 2, "--grad-checkpointing", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert (out / "adapter" / "adapter_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(out)
    bad = run_cli("train", student, tmp_path / "bad", "--algo", "sft", "--data", pairs, "--lora-r", -1,
                  "--device", "cpu")
    assert bad.returncode == 2 and "--lora-r must be ≥ 0" in bad.stderr
