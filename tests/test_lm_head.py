"""Models whose logits are not their head's output: the engine reproduces each model's own logits, or refuses.

Before: every stage computed ``h Wᵀ + b`` and ignored a model's logit transform, so a Gemma 2 student or teacher
(soft cap), a Cohere or Granite model (scale) was trained on another distribution than it samples from, silently.
"""

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from artifacts import read_jsonl
from cli_runner import run_cli
from conftest import write_sequences

from fdivctl import engine
from fdivctl.errors import UserError
from fdivctl.io.lm_head import LMHead, LogitMap, logit_map
from fdivctl.io.logit_store import LogitStore
from fdivctl.io.sequences import Sequences

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
    batch = {"input_ids": ids, "batch_index": torch.arange(2).repeat_interleave(8),
             "position": torch.arange(8).repeat(2)}
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


@pytest.mark.parametrize("kind", ["qwen2", "gemma2"])
def test_a_right_padded_batch_gives_each_row_what_it_alone_gives(kind):
    """The decoder runs on the padded batch without an attention mask (LMHead.hidden): the scored positions' hidden
    states, and the gradients of a loss on them, equal those of each sequence run alone, unpadded."""
    g = torch.Generator().manual_seed(2)
    lengths = [(3, 9), (5, 2), (1, 14), (4, 6)]  # (prompt, completion) tokens: rows padded by up to 9 positions
    seqs = Sequences([f"p{i}" for i in range(4)], [0] * 4,
                     [torch.randint(3, VOCAB, (p,), generator=g).numpy() for p, _ in lengths],
                     [torch.randint(3, VOCAB, (c,), generator=g).numpy() for _, c in lengths], None)
    weights = torch.rand(sum(c for _, c in lengths), generator=g)

    def loss_and_grads(decoder, hidden):
        loss = (hidden.pow(2).sum(-1) * weights).sum()
        return loss.detach(), torch.autograd.grad(loss, list(decoder.parameters()))

    model = _model(kind).train()  # dropout 0: train mode only to check the backward of the padded forward
    lm = LMHead.of(model, kind)
    batch = seqs.batch(list(range(4)), pad_id=1)
    padded = lm.hidden(batch)
    loss, grads = loss_and_grads(lm.decoder, padded)
    alone = torch.cat([lm.hidden(seqs.batch([r], pad_id=1)) for r in range(4)])
    loss_alone, grads_alone = loss_and_grads(lm.decoder, alone)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_alone, rtol=1e-5, atol=1e-5)
    for mine, want in zip(grads, grads_alone, strict=True):
        torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-5)


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


def _saved(model, like, out):
    """``model`` saved with the tokenizer of the model directory ``like``."""
    shutil.copytree(like, out)
    (out / "model.safetensors").unlink()
    model.save_pretrained(out)
    return out


def test_distill_trains_a_soft_capped_student_on_its_own_distribution(tmp_path, tiny_teacher):
    """distill --loss ce on a Gemma 2 student: the first step's loss is the model's own token NLL."""
    student = _saved(_model("gemma2", seed=4), tiny_teacher, tmp_path / "student")
    data = write_sequences(tmp_path / "data.parquet", 300, 4, 5, 7, seed=6)
    log = tmp_path / "log.jsonl"
    done = run_cli("distill", student, tmp_path / "out", "--data", data, "--loss", "ce", "--max-steps", 1,
                   "--batch-size", 4, "--device", "cpu", "--log-jsonl", log)
    assert done.returncode == 0, done.stderr
    model, nll, tokens = _model("gemma2", seed=4), 0.0, 0
    for row in pq.read_table(data).to_pylist():
        prompt, completion = row["prompt_token_ids"], row["completion_token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
        nll -= torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).sum().item()
        tokens += len(completion)
    assert read_jsonl(log)[0]["ce"] == pytest.approx(nll / tokens, rel=1e-4)


def test_rl_on_a_soft_capped_policy_recomputes_the_samplers_log_probs(tmp_path, tiny_teacher):
    """rollout samples a Gemma 2 policy through its own (capped) logits; train recomputes the same log-probs, so the
    first PPO pass starts at ratio 1 and clips nothing."""
    policy = _saved(_model("gemma2", seed=7), tiny_teacher, tmp_path / "policy")
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["Compute 1 + 2.", "Compute 2 + 2."],
                             "answer": ["3", "4"]}), prompts)
    run_cli("rollout", policy, prompts, tmp_path / "r.parquet", "--n", 4, "--max-new-tokens", 6, "--device", "cpu",
            check=True)
    run_cli("score", tmp_path / "r.parquet", tmp_path / "s.parquet", "--verifier", "regex", "--pattern", "[0-4]",
            "--workers", 1, check=True)
    log = tmp_path / "log.jsonl"
    run_cli("train", policy, tmp_path / "out", "--rollouts", tmp_path / "s.parquet", "--ppo-epochs", 1,
            "--device", "cpu", "--log-jsonl", log, check=True)
    first = read_jsonl(log)[0]
    assert first["logprob_gap"] < 1e-4 and first["clip_frac"] == 0
