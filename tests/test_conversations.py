"""Multi-turn conversations (a ``messages`` column) as sequences: one row per assistant reply.

Before: train --algo sft, distill and teacher-logits refused a messages table ("needs prompt_token_ids + …"), and
train --algo fdpo conversational preference pairs.
"""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_runner import run_cli
from conftest import with_chat_template
from transformers import AutoModelForCausalLM, AutoTokenizer

from fdivctl.errors import UserError
from fdivctl.io.conversations import preference_pairs
from fdivctl.io.logit_store import LogitStore
from fdivctl.io.prompts import encode_prompt
from fdivctl.io.sequences import load_sequences, read_sequences

#: a template with an end-of-turn (the tokenizer's EOS) and a generation prompt ending in a newline, as instruct
#: models' templates have (Qwen2's "<|im_start|>assistant\n")
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>\n{% endif %}")

CHATS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Compute 1 + 2."},
     {"role": "assistant", "content": "The answer is 3."}, {"role": "user", "content": "And 3 * 4?"},
     {"role": "assistant", "content": "The answer is 12."}],
    [{"role": "user", "content": "Compute 5 - 1."}, {"role": "assistant", "content": "4"}],
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_teacher):
    return with_chat_template(tiny_teacher, tmp_path_factory.mktemp("chat") / "model", TEMPLATE)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.parquet"
    pq.write_table(pa.table({"prompt_id": ["c1", "c2"], "messages": CHATS, "pass_rate": [0.25, 0.75]}), path)
    return path


def test_each_reply_is_a_row_prompted_by_the_conversation_before_it(chat_model, chats):
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    table, seqs = read_sequences(chats, tokenizer)
    assert list(zip(seqs.prompt_ids, seqs.sample_idx)) == [("c1", 0), ("c1", 1), ("c2", 0)]
    assert table.column("pass_rate").to_pylist() == [0.25, 0.25, 0.75] and len(table) == len(seqs)
    for row, (chat, reply_at) in enumerate([(CHATS[0], 2), (CHATS[0], 4), (CHATS[1], 1)]):
        _, prompt = encode_prompt(tokenizer, {"messages": chat[:reply_at]}, chat=True)  # as rollout encodes it
        assert seqs.prompt_tokens[row].tolist() == prompt
        assert tokenizer.decode(seqs.completion_tokens[row]) == f"{chat[reply_at]['content']}<|eos|>\n"
        assert table.column("turn_ids")[row].as_py() == [seqs.sample_idx[row]] * len(seqs.completion_tokens[row])


def test_the_replies_log_probs_are_those_of_the_whole_conversation(chat_model, chats):
    """Each row's completion, scored after its prompt, has the log-probs the same tokens have in one forward pass
    over the whole conversation (TRL's assistant-only loss): nothing of a later turn leaks into a reply's row."""
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    seqs = load_sequences(chats, tokenizer)

    def logprobs(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0, :-1].log_softmax(-1)
        return logits.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]

    whole = seqs.prompt_tokens[1].tolist() + seqs.completion_tokens[1].tolist()  # the last row of c1: all of it
    every = logprobs(whole)
    for row in (0, 1):
        prompt, reply = seqs.prompt_tokens[row].tolist(), seqs.completion_tokens[row].tolist()
        assert whole[: len(prompt) + len(reply)] == prompt + reply  # the reply sits in the conversation there
        alone = logprobs(prompt + reply)[len(prompt) - 1 :]
        assert torch.allclose(alone, every[len(prompt) - 1 : len(prompt) - 1 + len(reply)], atol=1e-5)


def test_sft_teacher_logits_and_distill_read_a_messages_table(tmp_path, chat_model, chats):
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    sft = run_cli("train", chat_model, tmp_path / "sft", "--algo", "sft", "--data", chats, "--batch-size", 3,
                  "--max-steps", 2, "--device", "cpu")
    assert sft.returncode == 0, sft.stderr
    store = tmp_path / "store"
    run_cli("teacher-logits", chat_model, chats, store, "--k", 4, "--device", "cpu", check=True)
    seqs = load_sequences(chats, tokenizer)
    assert LogitStore(store).sequence("c1", 1).token_ids.tolist() == seqs.completion_tokens[1].tolist()
    done = run_cli("distill", chat_model, tmp_path / "kd", "--logits", store, "--data", chats, "--loss", "jsd",
                   "--batch-size", 3, "--max-steps", 1, "--prompt-weighting", "paced", "--depth-curriculum",
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("messages, extra, message", [
    ([[{"role": "user", "content": "hi"}]], {}, "row 0 (prompt_id '0') has no assistant message"),
    ([[{"role": "assistant", "content": "hi"}]], {}, "opens with an assistant message"),
    ([[{"role": "user"}]], {}, "messages must be a non-empty list of {role, content} messages"),
    ([CHATS[1]], {"sample_idx": [0]}, "drop the sample_idx column"),
])
def test_bad_conversations_are_refused_naming_the_row(tmp_path, chat_model, messages, extra, message):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"messages": messages, **extra}), path)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{")):
        load_sequences(path, AutoTokenizer.from_pretrained(chat_model))


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path, tiny_teacher, chats):
    done = run_cli("train", tiny_teacher, tmp_path / "sft", "--algo", "sft", "--data", chats, "--device", "cpu")
    assert done.returncode == 2 and "rendered with the tokenizer's chat template, and the tokenizer has none" in \
        done.stderr, done.stderr


def test_a_template_that_refuses_the_messages_is_one_line(tmp_path, chat_model, chats):
    """Mistral's and Llama 2's templates raise on a system turn: one line naming the row (was: jinja2's traceback),
    in rollout as in training."""
    strict = with_chat_template(chat_model, tmp_path / "strict", "{% for m in messages %}{% if m['role'] == 'system' %}"
                                "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + TEMPLATE)
    message = "the tokenizer's chat template refused these messages: TemplateError: System role not supported"
    done = run_cli("train", strict, tmp_path / "sft", "--algo", "sft", "--data", chats, "--device", "cpu")
    assert done.returncode == 2 and "prompt_id 'c1'" in done.stderr and message in done.stderr, done.stderr
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": ["c1"], "messages": [CHATS[0][:2]]}), prompts)
    done = run_cli("rollout", strict, prompts, tmp_path / "r.parquet", "--device", "cpu")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


PROMPT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Compute 1 + 2."}]
GOOD, BAD = [{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "4"}]


def test_conversational_preference_pairs_in_both_trl_layouts(tmp_path, chat_model):
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    explicit = pa.table({"prompt": [PROMPT], "chosen": [GOOD], "rejected": [BAD]})
    implicit = pa.table({"chosen": [PROMPT + GOOD], "rejected": [PROMPT + BAD]})
    mixed = pa.table({"prompt": ["Compute 1 + 2."], "chosen": ["3"], "rejected": [BAD]})
    pairs = preference_pairs(explicit, tmp_path, tokenizer)
    assert preference_pairs(implicit, tmp_path, tokenizer) == pairs  # the shared opening messages are the prompt
    _, prompt = encode_prompt(tokenizer, {"messages": PROMPT}, chat=True)
    assert pairs["chosen"][0] == [prompt] == pairs["rejected"][0]
    assert [tokenizer.decode(ids) for ids in (pairs["chosen"][1][0], pairs["rejected"][1][0])] == ["3<|eos|>\n",
                                                                                                  "4<|eos|>\n"]
    one_user = preference_pairs(mixed, tmp_path, tokenizer)  # text: one user message, one assistant message
    assert one_user["chosen"] == preference_pairs(pa.table({"prompt": [PROMPT[1:]], "chosen": [GOOD],
                                                            "rejected": [BAD]}), tmp_path, tokenizer)["chosen"]
    for table, message in ((pa.table({"chosen": [GOOD], "rejected": [BAD]}), "share no prompt: give a prompt"),
                           (pa.table({"chosen": [PROMPT + GOOD], "rejected": [PROMPT + GOOD]}),
                            "the chosen response has no message after the prompt")):
        with pytest.raises(UserError, match=message):
            preference_pairs(table, tmp_path, tokenizer)


def test_fdpo_trains_on_conversational_pairs(tmp_path, chat_model):
    """The first step of f-DPO (rkl) from the reference has loss log 2 and rewards 0, as for text pairs."""
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"chosen": [PROMPT + GOOD, CHATS[1]],
                             "rejected": [PROMPT + BAD, CHATS[1][:1] + [{"role": "assistant", "content": "5"}]]}),
                   pairs)
    log = tmp_path / "log.jsonl"
    done = run_cli("train", chat_model, tmp_path / "dpo", "--algo", "fdpo", "--pairs", pairs, "--batch-size", 2,
                   "--max-steps", 1, "--device", "cpu", "--log-jsonl", log)
    assert done.returncode == 0, done.stderr
    first = json.loads(log.read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["chosen_reward"] == pytest.approx(0.0)


def test_prompt_completion_messages_read_row_for_row(tmp_path, chat_model, chats):
    """TRL's conversational prompt-completion layout: the same tokens as the reply of a messages table."""
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    path = tmp_path / "pc.parquet"
    pq.write_table(pa.table({"prompt_id": ["c2", "c2"], "sample_idx": [0, 1],
                             "prompt": ["Compute 5 - 1.", "Compute 5 - 1."], "completion": [CHATS[1][1:]] * 2}), path)
    table, seqs = read_sequences(path, tokenizer)
    reply = load_sequences(chats, tokenizer)  # its row 2: c2's one reply
    assert list(zip(seqs.prompt_ids, seqs.sample_idx)) == [("c2", 0), ("c2", 1)]
    for row in (0, 1):  # text as the prompt is one user message
        assert seqs.prompt_tokens[row].tolist() == reply.prompt_tokens[2].tolist()
        assert seqs.completion_tokens[row].tolist() == reply.completion_tokens[2].tolist()
    assert "prompt" not in table.column_names
    done = run_cli("train", chat_model, tmp_path / "sft", "--algo", "sft", "--data", path, "--max-steps", 1,
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr


def test_a_prompt_of_messages_is_sampled_through_the_template(tmp_path, chat_model):
    """TRL's conversational prompts (a prompt column of messages) for rollout and online RL (before: 'the prompt
    is not text but list')."""
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    assert encode_prompt(tokenizer, {"prompt": PROMPT}, chat=False) == encode_prompt(tokenizer, {"messages": PROMPT},
                                                                                      chat=False)
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": [PROMPT]}), prompts)
    out = tmp_path / "r.parquet"
    done = run_cli("rollout", chat_model, prompts, out, "--max-new-tokens", 4, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert pq.read_table(out).column("prompt_token_ids")[0].as_py() == encode_prompt(tokenizer, {"messages": PROMPT},
                                                                                      chat=False)[1]


def test_eval_model_samples_a_chat_model_through_its_template(tmp_path, chat_model):
    """eval --model --chat encodes plain prompts as rollout --chat does (before: eval had no --chat, so a chat model
    was evaluated on raw text prompts)."""
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": ["Compute 1 + 2."], "answer": ["3"]}), prompts)
    done = run_cli("eval", tmp_path / "out", "--model", chat_model, "--prompts", prompts, "--n", 2, "--k", "1,2",
                   "--max-new-tokens", 4, "--chat", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    scored = pq.read_table(tmp_path / "out" / f"{chat_model.name}.scored.parquet")
    assert scored.column("prompt_token_ids")[0].as_py() == encode_prompt(tokenizer, {"prompt": "Compute 1 + 2."},
                                                                         chat=True)[1]


def test_expanding_conversations_reports_its_progress_and_the_bar_shows_it(tmp_path, chat_model):
    """A million replies take minutes to render and tokenize before the first step: the work reports each block
    of replies (was: no sign of life), and the CLI's progress bar gives it a bar with its own unit."""
    from fdivctl import activity
    from fdivctl.cli.progress import progress_bar
    from fdivctl.io.conversations import expand

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    reports = []
    with activity.listening(lambda *report: reports.append(report)):
        table = expand(pa.table({"messages": CHATS * 2000}), tmp_path, tokenizer)  # 3 replies per 2 conversations
    assert table.num_rows == 6000
    assert reports == [("chat template", "replies", 4096, 6000), ("chat template", "replies", 6000, 6000)]
    with progress_bar("distill", "steps") as progress:
        activity.report("chat template", "replies", 10, 20)
        activity.report("chat template", "replies", 20, 20)
    (task,) = [t for t in progress.tasks if t.description == "chat template"]
    assert (task.completed, task.total, task.fields["unit"]) == (20, 20, "replies")
    activity.report("chat template", "replies", 1, 1)  # outside a bar nothing listens


#: renders the functions a row offers and an assistant's tool calls, as tool-calling templates (Qwen2.5's) do
TOOL_TEMPLATE = ("{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}{% for m in messages %}<{{ m['role'] }}>"
                 "\n{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% else %}{{ m['content'] }}{% endif %}<|eos|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<assistant>\n{% endif %}")
ADD = {"type": "function", "function": {"name": "add", "parameters": {"properties": {"a": {"type": "integer"}}}}}
NEG = {"type": "function", "function": {"name": "neg", "parameters": {"properties": {"b": {"type": "integer"}}}}}
CALL = [{"type": "function", "function": {"name": "add", "arguments": {"a": 2}}}]
TOOL_CHATS = [[{"role": "user", "content": "Add 2."}, {"role": "assistant", "content": None, "tool_calls": CALL},
               {"role": "tool", "content": "4"}, {"role": "assistant", "content": "It is 4."}],
              [{"role": "user", "content": "Negate 1."}, {"role": "assistant", "content": "-1"}]]


def test_a_tools_column_reaches_the_template_without_parquets_null_fields(tmp_path, chat_model):
    """TRL's tool-calling layout: each row's tools go to the template with its messages, and the null fields Parquet
    gives every struct (row 0's schema holds row 1's parameter b, every message a tool_calls) are dropped; tools as
    JSON text read the same.  Before: the tools were never rendered (the model was trained on calls to functions it
    was never shown), and a message whose content is null beside its tool calls was refused."""
    tokenizer = AutoTokenizer.from_pretrained(with_chat_template(chat_model, tmp_path / "tools", TOOL_TEMPLATE))
    table = pa.table({"messages": TOOL_CHATS, "tools": [[ADD], [NEG]]})
    assert table.column("tools").to_pylist()[0][0]["function"]["parameters"]["properties"]["b"] is None  # padded
    assert table.column("messages").to_pylist()[1][0]["tool_calls"] is None
    seqs = load_sequences(_write(tmp_path / "a.parquet", table), tokenizer)
    assert seqs.prompt_ids == ["0", "0", "1"]  # one sequence per assistant reply
    tools = '<tools>[{"type": "function", "function": {"name": "add", "parameters": {"properties": {"a": {"type": ' \
            '"integer"}}}}}]</tools>\n'
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert seqs.prompt_tokens[0].tolist() == ids(tools + "<user>\nAdd 2.<|eos|>\n<assistant>\n")
    call = '[{"type": "function", "function": {"name": "add", "arguments": {"a": 2}}}]'
    assert seqs.completion_tokens[0].tolist() == ids(call + "<|eos|>\n")
    as_text = table.set_column(1, "tools", pa.array(['[{"type": "function", "function": {"name": "add", "parameters":'
                                                     ' {"properties": {"a": {"type": "integer"}}}}}]', None]))
    again = load_sequences(_write(tmp_path / "b.parquet", as_text), tokenizer)
    assert [x.tolist() for x in again.prompt_tokens[:2]] == [x.tolist() for x in seqs.prompt_tokens[:2]]
    assert "<tools>" not in tokenizer.decode(again.prompt_tokens[2].tolist())  # row 1 has no tools now
    with pytest.raises(UserError, match=r"row 0 \(prompt_id '0'\): its tools are not JSON"):
        load_sequences(_write(tmp_path / "c.parquet", table.set_column(1, "tools", pa.array(["[{", None]))),
                       tokenizer)
    with pytest.raises(UserError, match="prompt_id 'p': its tools reach the model through the chat template"):
        encode_prompt(tokenizer, {"prompt_id": "p", "prompt": "Add 2.", "tools": [ADD]}, chat=False)
    text, _ = encode_prompt(tokenizer, {"prompt_id": "p", "prompt": "Add 2.", "tools": [ADD]}, chat=True)
    assert text == tools + "<user>\nAdd 2.<|eos|>\n<assistant>\n"


def _write(path, table):
    pq.write_table(table, path)
    return path


def test_messages_stored_as_json_text_read_as_the_messages_themselves(tmp_path, chat_model):
    """Some datasets store each conversation as JSON text: the same sequences as the list (was: refused as "not a
    list of messages"), in training data as in sampled prompts; text that is not JSON names its row."""
    import json as json_

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    listed = load_sequences(_write(tmp_path / "list.parquet", pa.table({"messages": CHATS})), tokenizer)
    text = load_sequences(_write(tmp_path / "text.parquet",
                                 pa.table({"messages": [json_.dumps(chat) for chat in CHATS]})), tokenizer)
    assert [x.tolist() for x in text.prompt_tokens] == [x.tolist() for x in listed.prompt_tokens]
    assert [x.tolist() for x in text.completion_tokens] == [x.tolist() for x in listed.completion_tokens]
    prompt = CHATS[1][:1]
    assert encode_prompt(tokenizer, {"prompt_id": "p", "messages": json_.dumps(prompt)}, chat=False) == \
        encode_prompt(tokenizer, {"prompt_id": "p", "messages": prompt}, chat=False)
    with pytest.raises(UserError, match=r"row 1 \(prompt_id '1'\): its messages are text but not JSON"):
        load_sequences(_write(tmp_path / "bad.parquet", pa.table({"messages": [json_.dumps(CHATS[0]), "[{"]})),
                       tokenizer)
