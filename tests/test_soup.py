"""``fdivctl soup`` (SALSA's reference model): weights, compatibility, atomic output."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from cli_runner import run_cli
from fdivctl import tiny
from fdivctl.io.checkpoints import load_causal_lm


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("soup")
    for name, seed, hidden in (("a", 1, 64), ("b", 2, 64), ("c", 3, 64), ("wide", 4, 128)):
        tiny.make_model(root / name, tokenizer, seed=seed, hidden=hidden, layers=1)
    # the shapes of "a", other meanings: two 32-wide heads instead of one 64-wide, or the head tied to the embedding
    base = json.loads((root / "a" / "config.json").read_text())
    for name, change in (("heads", {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32}),
                         ("tied", {"tie_word_embeddings": True})):
        Qwen2ForCausalLM(Qwen2Config(**{**base, **change})).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def test_soup_is_the_weighted_average(models, tmp_path):
    out = tmp_path / "ref"
    done = run_cli("soup", models / "a", models / "b", models / "c", "-o", out, "--weights", "1,2,1", check=True)
    summary = json.loads(done.stdout)
    assert [m["weight"] for m in summary["models"]] == [0.25, 0.5, 0.25]
    a, b, c, soup = (load_file(d / "model.safetensors") for d in (models / "a", models / "b", models / "c", out))
    assert soup.keys() == a.keys()
    for name in a:
        torch.testing.assert_close(soup[name], 0.25 * a[name] + 0.5 * b[name] + 0.25 * c[name], rtol=0, atol=1e-6)
    assert load_causal_lm(out, device="cpu").config.hidden_size == 64  # an ordinary model directory
    assert json.loads((out / "soup.json").read_text())["models"][1]["path"] == str(models / "b")


def test_uniform_by_default(models, tmp_path):
    run_cli("soup", models / "a", models / "b", "-o", tmp_path / "ref", check=True)
    a, b, soup = (load_file(d / "model.safetensors") for d in (models / "a", models / "b", tmp_path / "ref"))
    name = next(iter(a))
    torch.testing.assert_close(soup[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["wide"], "wide has hidden_size = 128"),
    (["heads"], "heads has num_attention_heads = 2"),
    (["tied"], "tied has tie_word_embeddings = True"),
    (["b", "--weights", "1"], "--weights has 1 numbers for 2 models"),
    (["b", "--weights", "1,-1"], "must be 2 finite non-negative numbers"),
    (["b", "--weights", "inf,1"], "must be 2 finite non-negative numbers"),
    (["b", "--weights", "x,y"], "expected comma-separated numbers"),
])
def test_bad_input_is_one_line_and_exit_2(models, tmp_path, args, message):
    out = tmp_path / "ref"
    done = run_cli("soup", models / "a", *[models / a if a in ("b", "wide", "heads", "tied") else a for a in args],
                   "-o", out)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists() and not any(tmp_path.iterdir())


def test_one_model_or_existing_output_is_refused(models, tmp_path):
    assert "at least two models" in run_cli("soup", models / "a", "-o", tmp_path / "r").stderr
    (tmp_path / "r").mkdir()
    done = run_cli("soup", models / "a", models / "b", "-o", tmp_path / "r")
    assert done.returncode == 2 and "exists" in done.stderr


def test_a_soup_is_a_reference_model_for_train(task, scored_rollouts, tmp_path):
    """SALSA: the soup is an ordinary model directory that ``train --ref-model`` reads. A soup weighted 1 : 0 is the
    policy itself (divergence 0 at the first step); an even soup with the random initialization is not."""
    from artifacts import staged_run

    regularized = ["--divergence", "rkl", "--div-estimator", "full", "--div-coef", "0.1", "--max-steps", 1]
    for name, weights in (("self", "1,0"), ("even", "1,1")):
        run_cli("soup", task / "sft", task / "random", "-o", tmp_path / name, "--weights", weights, check=True)
    same = staged_run(task, scored_rollouts, tmp_path / "on-self", "--ref-model", tmp_path / "self", *regularized)
    even = staged_run(task, scored_rollouts, tmp_path / "on-even", "--ref-model", tmp_path / "even", *regularized)
    assert same[0]["divergence"] == pytest.approx(0.0, abs=1e-6)
    assert even[0]["divergence"] > 1e-3
