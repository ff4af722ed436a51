"""--chat on text prompt/completion tables: the prompts go through the chat template as rollout --chat encodes them.

Before: train --algo sft|fdpo and distill read text tables plainly whatever --chat said (train's help promised the
template), so a model was trained on prompts unlike those it was then sampled with.
"""


import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runner import run_cli
from conftest import with_chat_template
from transformers import AutoTokenizer

from fdivctl.errors import UserError
from fdivctl.io.logit_store import LogitStore
from fdivctl.io.prompts import TEMPLATE_DATE, encode_prompt
from fdivctl.io.sequences import sequences_from_table

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_teacher):
    return with_chat_template(tiny_teacher, tmp_path_factory.mktemp("chat") / "model", TEMPLATE)


@pytest.fixture(scope="module")
def text_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "sft.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["Compute 1 + 2.", "Compute 3 * 4."],
                             "completion": [" 3", " 12"]}), path)
    return path


def test_chat_encodes_text_prompts_as_rollout_does_and_refuses_token_ids(tmp_path, chat_model, text_table):
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    seqs = sequences_from_table(pq.read_table(text_table), text_table, tokenizer, chat=True)
    text, ids = encode_prompt(tokenizer, {"prompt": "Compute 1 + 2."}, chat=True)
    assert text == "[user] Compute 1 + 2.\n[assistant] " and seqs.prompt_tokens[0].tolist() == ids
    plain = sequences_from_table(pq.read_table(text_table), text_table, tokenizer)
    assert plain.prompt_tokens[0].tolist() == tokenizer("Compute 1 + 2.")["input_ids"] != ids
    ids_table = pa.table({"prompt_token_ids": [[5, 6]], "completion_token_ids": [[7]]})
    with pytest.raises(UserError, match="--chat wraps text prompts .* holds token ids"):
        sequences_from_table(ids_table, tmp_path, tokenizer, chat=True)


def test_a_store_and_its_distillation_agree_on_chat(tmp_path, chat_model, text_table):
    store = tmp_path / "store"
    run_cli("teacher-logits", chat_model, text_table, store, "--k", 4, "--chat", "--include-prompt", "--device", "cpu",
            check=True)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    _, prompt = encode_prompt(tokenizer, {"prompt": "Compute 1 + 2."}, chat=True)
    completion = tokenizer(" 3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert LogitStore(store).sequence("a", 0).token_ids.tolist() == prompt[1:] + completion  # scored from token 2
    plain = run_cli("teacher-logits", chat_model, text_table, tmp_path / "plain", "--k", 4, "--device", "cpu")
    assert plain.returncode == 0, plain.stderr
    common = ["--data", text_table, "--max-steps", 1, "--device", "cpu"]
    done = run_cli("distill", chat_model, tmp_path / "a", "--logits", store, *common)
    assert done.returncode == 2 and "was made with --chat" in done.stderr, done.stderr
    done = run_cli("distill", chat_model, tmp_path / "b", "--logits", tmp_path / "plain", "--chat", *common)
    assert done.returncode == 2 and "was made without --chat" in done.stderr, done.stderr
    run_cli("distill", chat_model, tmp_path / "c", "--logits", store, "--chat", *common, check=True)


def test_train_applies_chat_to_text_tables_and_refuses_it_for_rollouts(tmp_path, chat_model, tiny_teacher, text_table):
    common = ["--max-steps", 1, "--device", "cpu"]
    run_cli("train", chat_model, tmp_path / "sft", "--algo", "sft", "--data", text_table, "--chat", *common,
            check=True)
    # the template is applied: a tokenizer without one is refused
    done = run_cli("train", tiny_teacher, tmp_path / "no", "--algo", "sft", "--data", text_table, "--chat", *common)
    assert done.returncode == 2 and "the tokenizer has no chat template" in done.stderr, done.stderr
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["Compute 1 + 2."], "chosen": [" 3"], "rejected": [" 4"]}), pairs)
    done = run_cli("train", tiny_teacher, tmp_path / "fdpo", "--algo", "fdpo", "--pairs", pairs, "--chat", *common)
    assert done.returncode == 2 and "the tokenizer has no chat template" in done.stderr, done.stderr
    run_cli("train", chat_model, tmp_path / "fdpo", "--algo", "fdpo", "--pairs", pairs, "--chat", *common, check=True)
    done = run_cli("train", chat_model, tmp_path / "rl", "--rollouts", pairs, "--chat", *common)
    assert done.returncode == 2 and "--rollouts holds token ids" in done.stderr, done.stderr


def test_online_chat_runs_encode_text_replay_tables_the_same_way(chat_model, text_table):
    """RECAP's replayed text tables take the online run's --chat (token-id replays keep their own encoding)."""
    from fdivctl.io.checkpoints import model_limits
    from fdivctl.io.hashing import tokenizer_hash
    from fdivctl.stages.rl_options import RLOptions
    from fdivctl.stages.train_rl import _replay

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    opts = RLOptions(replay=[text_table])
    limits = model_limits((chat_model, "policy"))
    replay = _replay(tokenizer, tokenizer_hash(tokenizer), limits, opts, chat=True)
    _, prompt = encode_prompt(tokenizer, {"prompt": "Compute 1 + 2."}, chat=True)
    assert replay.sets[0].prompt_tokens[0].tolist() == prompt
    plain = _replay(tokenizer, tokenizer_hash(tokenizer), limits, opts, chat=False)
    assert plain.sets[0].prompt_tokens[0].tolist() == tokenizer("Compute 1 + 2.")["input_ids"]


# Llama 3.2's date logic, verbatim: today's date when the renderer offers strftime_now
DATED = ('{%- if not date_string is defined %}{%- if strftime_now is defined %}'
         '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
         '{%- endif %}{%- endif %}Today Date: {{ date_string }}\n' + TEMPLATE)


def test_a_template_that_writes_the_date_renders_the_same_on_any_day(tmp_path, tiny_teacher):
    """Before, such a template wrote today's date, so the same messages were other prompt tokens the next day: a
    logit store made on one day was refused for the data it was made from on the next."""
    tokenizer = AutoTokenizer.from_pretrained(with_chat_template(tiny_teacher, tmp_path / "dated", DATED))
    text, ids = encode_prompt(tokenizer, {"prompt": "Compute 1 + 2."}, chat=True)
    assert text == "Today Date: 26 Jul 2024\n[user] Compute 1 + 2.\n[assistant] "
    assert TEMPLATE_DATE.strftime("%d %b %Y") == "26 Jul 2024"
    assert "Today Date: 26 Jul 2024" not in tokenizer.apply_chat_template([{"role": "user", "content": "x"}],
                                                                           tokenize=False)  # the clock's date
