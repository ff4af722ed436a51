"""Models whose logits are not their head's output: the engine reproduces each model's own logits, or refuses.

Before: every stage computed ``h Wᵀ + b`` and ignored a model's logit transform, so a Gemma 2 student or teacher
(soft cap), a Cohere or Granite model (scale) was trained on another distribution than it samples from, silently.
"""

import shutil

import pyarrow.parquet as pq
import pytest
import torch
import transformers
from cli_runner import run_cli
from conftest import write_sequences

from fdivctl import engine
from fdivctl.errors import UserError
from fdivctl.io.lm_head import LMHead, LogitMap, logit_map
from fdivctl.io.logit_store import LogitStore

VOCAB = 320  # the tiny tokenizer's model vocabulary (tests/conftest.py)
_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)


def _model(kind: str, seed: int = 0):
    """A random model of ``kind`` with logits of a few units, so that a transform changes them."""
    torch.manual_seed(seed)
    if kind == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**_SIZES, final_logit_softcapping=2.0,
                                                                         attn_implementation="eager"))
    elif kind == "cohere":
        model = transformers.CohereForCausalLM(transformers.CohereConfig(**_SIZES, logit_scale=0.25))
    elif kind == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(**_SIZES, logits_scaling=4.0))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_SIZES))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model.eval()


@pytest.mark.parametrize("kind, expected", [
    ("qwen2", LogitMap()),
    ("gemma2", LogitMap(softcap=2.0)),
    ("cohere", LogitMap(scale=0.25)),
    ("granite", LogitMap(scale=0.25)),  # Granite divides by logits_scaling
])
def test_the_engine_gives_each_models_own_log_probs(kind, expected):
    model = _model(kind)
    assert logit_map(model, kind) == expected
    lm = LMHead.of(model, kind)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "batch_index": torch.arange(2).repeat_interleave(8), "position": torch.arange(8).repeat(2)}
    tokens = ids[:, 1:].reshape(-1)
    with torch.no_grad():
        own = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float() / 0.7, -1).reshape(-1, VOCAB)
        ours = engine.token_outputs(lm.hidden(batch), lm.weight, bias=lm.bias, token_ids=tokens, temperature=0.7,
                                    softcap=lm.softcap).logprob
        plain = engine.token_outputs(model.get_decoder()(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 64),
                                     lm.weight, token_ids=tokens, temperature=0.7).logprob
    want = own.gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    if expected != LogitMap():  # the head's plain output is another distribution: what the stages used before
        assert (plain - want).abs().max() > 0.1


def test_a_model_whose_logits_match_no_known_transform_is_refused():
    """A Cohere model whose config says another scale than the one its forward applies."""
    model = _model("cohere")
    model.config.logit_scale = 0.5  # the model keeps multiplying by the 0.25 it was built with
    with pytest.raises(UserError, match="teacher: its logits are not its head's output"):
        logit_map(model, "teacher")


def test_teacher_logits_stores_a_soft_capped_teachers_own_distribution(tmp_path, tiny_teacher):
    teacher = tmp_path / "gemma2"
    shutil.copytree(tiny_teacher, teacher)
    (teacher / "model.safetensors").unlink()
    model = _model("gemma2", seed=3)
    model.save_pretrained(teacher)
    seqs = write_sequences(tmp_path / "seqs.parquet", 300, 4, 5, 7, seed=2)
    done = run_cli("teacher-logits", teacher, seqs, tmp_path / "store", "--k", 8, "--dtype", "fp32",
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr
    store = LogitStore(tmp_path / "store")
    for row in pq.read_table(seqs).to_pylist():
        got = store.sequence(row["prompt_id"], row["sample_idx"])
        prompt, completion = row["prompt_token_ids"], row["completion_token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
        log_p = torch.log_softmax(logits, -1)
        torch.testing.assert_close(got.logprobs, log_p.topk(8, -1).values, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.token_logprob, log_p.gather(-1, torch.tensor(completion)[:, None])[:, 0],
                                   rtol=1e-4, atol=1e-4)
