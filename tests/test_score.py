"""score: verifiers (math, exact, regex, sql, python, trl) and the parallel, time-limited pool."""

import hashlib
import json
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fdivctl.io.tables import provenance, write_table
from fdivctl.rewards.math_answer import extract_answer, verify_math
from fdivctl.rewards.sql_exec import verify_sql
from cli_runner import ctrl_c_reaches_it, run_cli

MATH_CASES = [
    # (completion, gold, correct)
    ("So the result is \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True),
    ("\\boxed{\\tfrac{3}{4}}", "\\frac{3}{4}", True),
    ("The answer is 1,234.", "1234", True),
    ("The answer is 1,234,567", "1234567", True),
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{50\\%}", "0.5", True),
    ("\\boxed{12.5\\%}", "0.125", True),
    ("x = \\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
    ("first 3 then 17 and finally 42", "42", True),
    ("\\boxed{\\boxed{7}}", "7", True),
    ("\\boxed{ 3.0 }", "3", True),
    ("\\boxed{\\text{(A)}}", "(A)", True),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", True),
    ("\\boxed{-\\frac{1}{3}}", "-1/3", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{\\left(1, 2\\right)}", "(1,2)", True),
    ("$\\boxed{\\$5}$", "5", True),
    ("\\boxed{\\frac12}", "0.5", True),
    ("\\boxed{0.3333333333}", "1/3", True),  # within the relative tolerance 1e-6
    ("\\boxed{0.333}", "1/3", False),
    ("\\boxed{2x}", "x*2", True),
    ("The answer is $-4$.", "-4", True),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", True),
    ("\\boxed{3}", "4", False),
    ("no numbers here", "5", False),
    ("\\boxed{1/0}", "1", False),
    ("\\boxed{x+1}", "x+2", False),
    ("\\boxed{\\frac{1}{3}}", "0.33", False),
    ("\\boxed{25\\%}", "0.3", False),
    ("The answer is 12. Later I say 13", "12", True),
    ("\\boxed{\\sqrt{2}}", "1.41421356237", False),
    ("\\boxed{(1, 2)}", "(2, 1)", False),
    ("\\boxed{-5}", "5", False),
    ("\\boxed{1{,}000}", "1000", False),
]


@pytest.mark.parametrize("completion, gold, correct", MATH_CASES)
def test_math_answers(completion, gold, correct):
    ok, verdict = verify_math(completion, gold)
    assert ok is correct, verdict


def test_boxed_extraction_honours_nested_braces():
    assert extract_answer("\\boxed{1} then \\boxed{\\frac{a}{b^{2}}} end") == "\\frac{a}{b^{2}}"
    assert extract_answer("\\boxed{unclosed") == "unclosed" or extract_answer("\\boxed{unclosed") is None


@pytest.fixture
def database(tmp_path):
    path = tmp_path / "shop.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE items(id INTEGER, name TEXT, price REAL);"
        "INSERT INTO items VALUES (1,'pen',1.5),(2,'ink',3.0),(3,'pad',2.0),(4,'pen',1.5);"
    )
    conn.commit()
    conn.close()
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sql_execution_match_is_a_multiset_comparison(database):
    gold = "SELECT name FROM items WHERE price < 2"
    assert verify_sql("```sql\nSELECT name FROM items WHERE price <= 1.5;\n```", gold, str(database))[0]
    assert not verify_sql("SELECT DISTINCT name FROM items WHERE price < 2", gold, str(database))[0]
    assert verify_sql("SELECT name FROM items WHERE id IN (4, 1)", gold, str(database))[0]
    ok, verdict = verify_sql("SELECT nme FROM items", gold, str(database))
    assert not ok and "no such column" in verdict


@pytest.mark.parametrize(
    "attack",
    ["DROP TABLE items", "INSERT INTO items VALUES (9,'x',0)", "UPDATE items SET price = 0",
     "DELETE FROM items", "ATTACH DATABASE 'x.db' AS x", "PRAGMA query_only = OFF; DELETE FROM items"],
)
def test_sql_writes_cannot_change_the_database(database, attack):
    before = _digest(database)
    ok, verdict = verify_sql(attack, "SELECT 1", str(database))
    assert not ok and "failed" in verdict
    assert _digest(database) == before


def test_sql_timeout(database):
    slow = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    )
    ok, verdict = verify_sql(slow, "SELECT 1", str(database), time_limit=0.5)
    assert not ok and "timeout" in verdict


def _cli(*args):
    return run_cli(*args)


def _rollouts(path, completions, answers, prompt_ids=None, extra=None):
    n = len(completions)
    columns = {
        "prompt_id": prompt_ids or [f"p{i // 2}" for i in range(n)],
        "sample_idx": pa.array([i % 2 for i in range(n)], pa.int64()),
        "completion": completions,
        "answer": answers,
        **(extra or {}),
    }
    write_table(path, pa.table(columns), {"tokenizer_hash": "abc"})
    return path


def test_score_cli_math_adds_columns_and_pass_rate(tmp_path):
    src = _rollouts(
        tmp_path / "r.parquet",
        ["\\boxed{4}", "\\boxed{5}", "The answer is 9", "\\boxed{9}"],
        ["4", "4", "9", "9"],
    )
    done = _cli("score", src, tmp_path / "s.parquet", "--verifier", "math", "--workers", 2)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column("correct").to_pylist() == [True, False, True, True]
    assert table.column("reward").type == pa.float32()
    assert table.column("pass_rate").to_pylist() == [0.5, 0.5, 1.0, 1.0]
    assert table.column("sample_idx").to_pylist() == [0, 1, 0, 1]  # carried columns kept
    record = provenance(tmp_path / "s.parquet")
    assert record["tokenizer_hash"] == "abc" and record["scored_by"]["verifier"] == "math"


def test_score_cli_sql_with_db_column(tmp_path, database):
    src = _rollouts(
        tmp_path / "r.parquet",
        ["SELECT name FROM items WHERE price > 2", "DROP TABLE items"],
        ["SELECT name FROM items WHERE price = 3.0"] * 2,
        extra={"db_path": [str(database)] * 2},
    )
    before = _digest(database)
    assert _cli("score", src, tmp_path / "s.parquet", "--verifier", "sql").returncode == 0
    assert pq.read_table(tmp_path / "s.parquet").column("correct").to_pylist() == [True, False]
    assert _digest(database) == before
    # a time limit that cuts off every query (was: accepted, and every completion scored 0)
    done = _cli("score", src, tmp_path / "z.parquet", "--verifier", "sql", "--sql-timeout", "0")
    assert done.returncode == 2 and "--sql-timeout must be > 0 seconds, got 0" in done.stderr, done.stderr
    assert not (tmp_path / "z.parquet").exists()


def test_exact_regex_and_user_function(tmp_path):
    src = _rollouts(tmp_path / "r.parquet", ["yes", " yes ", "abc123"], ["yes", "no", "3"], prompt_ids=["a", "b", "c"])
    assert _cli("score", src, tmp_path / "e.parquet", "--verifier", "exact").returncode == 0
    assert pq.read_table(tmp_path / "e.parquet").column("correct").to_pylist() == [True, False, False]
    assert _cli("score", src, tmp_path / "x.parquet", "--verifier", "regex", "--pattern", r"\d+$").returncode == 0
    assert pq.read_table(tmp_path / "x.parquet").column("correct").to_pylist() == [False, False, True]
    done = _cli("score", src, tmp_path / "u.parquet", "--verifier", "python:user_reward:length_reward")
    assert done.returncode == 0, done.stderr
    assert pq.read_table(tmp_path / "u.parquet").column("reward").to_pylist() == [1.0, 1.0, 0.0]


def test_a_user_verifier_reads_list_columns_but_not_the_token_ids(tmp_path):
    """Code RL keeps each prompt's test cases in a list column: the user function gets it (was: only scalar
    columns were sent, so such a verifier could not run), and not the per-token columns."""
    src = _rollouts(tmp_path / "r.parquet", ["assert f(1) == 2", "nothing"], ["", ""], prompt_ids=["a", "b"],
                    extra={"tests": [["f(1)", "== 2"], ["f(1)", "f(2)"]],
                           "completion_token_ids": pa.array([[1, 2], [3]], pa.list_(pa.int32())),
                           "completion_logprobs": pa.array([[-0.1, -0.2], [-0.3]], pa.list_(pa.float32()))})
    done = _cli("score", src, tmp_path / "s.parquet", "--verifier", "python:user_reward:passes_tests")
    assert done.returncode == 0, done.stderr
    assert pq.read_table(tmp_path / "s.parquet").column("reward").to_pylist() == [1.0, 0.0]


def test_a_trl_reward_function_runs_as_it_is(tmp_path):
    """--verifier trl:MODULE:FUNC takes a reward function written for TRL's GRPOTrainer unchanged (was: only
    f(completion, row)): keyword lists of one completion, the dataset's columns, the token ids; None where it
    does not apply scores 0; an async function is awaited; a list of the wrong length fails the row."""
    src = _rollouts(tmp_path / "r.parquet", ["yes", "no", "<think>a</think>b"], ["yes", "", "b"],
                    prompt_ids=["a", "b", "c"],
                    extra={"prompt": ["Say yes", "Say no", "Say b"],
                           "completion_token_ids": pa.array([[5, 6], [7], []], pa.list_(pa.int32()))})
    rewards = {}
    for func in ("trl_reads_its_arguments", "trl_none_when_no_answer", "trl_async_reward", "trl_format_reward",
                 "trl_wrong_count"):
        done = _cli("score", src, tmp_path / f"{func}.parquet", "--verifier", f"trl:user_reward:{func}")
        assert done.returncode == 0, done.stderr
        table = pq.read_table(tmp_path / f"{func}.parquet")
        rewards[func] = [round(r, 4) for r in table.column("reward").to_pylist()]
        if func == "trl_none_when_no_answer":
            assert table.column("verdict").to_pylist()[1].endswith("→ None (not applicable: 0)")
        if func == "trl_wrong_count":
            assert all("one reward (a number or None) per completion" in v for v in table.column("verdict").to_pylist())
    assert rewards["trl_reads_its_arguments"] == [1.52, 0.01, 0.5]  # exact + 0.5·(prompt is "Say <answer>") + 0.01·ids
    assert rewards["trl_none_when_no_answer"] == [1.0, 0.0, 0.0]
    assert rewards["trl_async_reward"] == [3.0, 2.0, 17.0]  # a NumPy array of rewards, from an async function
    assert rewards["trl_format_reward"] == [0.0, 0.0, 1.0]
    assert rewards["trl_wrong_count"] == [0.0, 0.0, 0.0]


def test_a_trl_reward_function_gets_a_chat_row_in_trl_conversational_form(tmp_path):
    """A row with messages (a chat prompt) reaches the function as TRL's conversational batch: the prompt's
    messages, the reply as [{'role': 'assistant', 'content': …}]; summed with a built-in verifier."""
    src = _rollouts(tmp_path / "r.parquet", ["<think>x</think>\\boxed{4}", "\\boxed{4}"], ["4", "4"],
                    prompt_ids=["a", "b"], extra={"messages": [[{"role": "user", "content": "2+2?"}]] * 2})
    done = _cli("score", src, tmp_path / "s.parquet", "--verifier", "math", "--verifier",
                "trl:user_reward:trl_format_reward", "--reward-weights", "1,0.5")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column("reward").to_pylist() == [1.5, 1.0]
    assert table.column("correct").to_pylist() == [True, True]
    done = _cli("score", src, tmp_path / "t.parquet", "--verifier", "trl:user_reward")
    assert done.returncode == 2 and "expected trl:MODULE:FUNC" in done.stderr, done.stderr


def test_the_gold_answer_may_live_in_another_column(tmp_path):
    """--answer-column solution: datasets that keep the gold answer elsewhere (was: only an answer column)."""
    src = tmp_path / "r.parquet"
    write_table(src, pa.table({"prompt_id": ["a", "b"], "completion": ["\\boxed{4}", "\\boxed{5}"],
                               "solution": ["4", "4"]}), {})
    done = _cli("score", src, tmp_path / "s.parquet", "--answer-column", "solution")
    assert done.returncode == 0, done.stderr
    assert pq.read_table(tmp_path / "s.parquet").column("correct").to_pylist() == [True, False]
    assert provenance(tmp_path / "s.parquet")["scored_by"]["answer_column"] == "solution"
    done = _cli("score", src, tmp_path / "t.parquet")
    assert done.returncode == 2 and "missing column" in done.stderr and "'answer'" in done.stderr, done.stderr


def test_pathological_rows_cannot_hang_the_run(tmp_path):
    src = _rollouts(tmp_path / "r.parquet", ["x", "y"], ["1", "1"], prompt_ids=["a", "b"])
    done = _cli("score", src, tmp_path / "s.parquet", "--verifier", "python:user_reward:slow_reward", "--timeout", 1)
    assert done.returncode == 0
    assert pq.read_table(tmp_path / "s.parquet").column("verdict").to_pylist() == ["verifier failed: timeout after 1s"] * 2
    assert json.loads(done.stdout.splitlines()[-1])["verifier_failures"] == 2
    assert "warning: 2 of 2 rows scored 0 because their verification failed" in done.stderr


def test_a_non_finite_reward_is_a_failed_verification(tmp_path):
    src = _rollouts(tmp_path / "r.parquet", ["x", "y"], ["1", "1"], prompt_ids=["a", "b"])
    done = _cli("score", src, tmp_path / "s.parquet", "--verifier", "python:user_reward:nan_reward")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column("reward").to_pylist() == [0.0, 0.0]
    assert all(v.startswith("verifier failed: ValueError") and "finite" in v for v in table.column("verdict").to_pylist())
    summary = json.loads(done.stdout.splitlines()[-1])  # valid JSON: no NaN in it
    assert summary["verifier_failures"] == 2 and summary["mean_reward"] == 0.0
    assert "(the verdict column says why; first: row 0: verifier failed: ValueError" in done.stderr


def test_huge_and_deeply_nested_completions(tmp_path):
    nested = "\\boxed{" * 5000 + "1" + "}" * 5000
    huge = "1 + " * 200_000 + "\\boxed{2}"
    src = _rollouts(tmp_path / "r.parquet", [nested, huge, "\\boxed{(((((" * 200], ["1", "2", "3"], prompt_ids=["a", "b", "c"])
    done = _cli("score", src, tmp_path / "s.parquet", "--timeout", 5)
    assert done.returncode == 0, done.stderr
    assert pq.read_table(tmp_path / "s.parquet").column("correct").to_pylist()[1] is True


def test_several_verifiers_sum_their_weighted_rewards_and_the_first_decides_correct(tmp_path):
    """Correctness plus a shaping reward, as R1-style recipes train with (TRL's reward_funcs + reward_weights):
    reward = Σ w_i r_i, correct and pass_rate from the first verifier, each part's verdict kept."""
    src = _rollouts(tmp_path / "r.parquet", ["\\boxed{4}", "the answer is \\boxed{4}", "\\boxed{5}", "5"],
                    ["4", "4", "4", "4"])
    done = _cli("score", src, tmp_path / "s.parquet", "--verifier", "math", "--verifier",
                "python:user_reward:length_reward", "--reward-weights", "1,0.25")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column("correct").to_pylist() == [True, True, False, False]
    # length_reward: 1 for a completion of at most 3 characters
    assert table.column("reward").to_pylist() == [1.0, 1.0, 0.0, 0.25]
    assert table.column("pass_rate").to_pylist() == [1.0, 1.0, 0.0, 0.0]
    assert table.column("verdict").to_pylist()[3].startswith("1×[") and " | 0.25×[" in table.column(
        "verdict").to_pylist()[3]
    scored_by = provenance(tmp_path / "s.parquet")["scored_by"]
    assert scored_by["verifier"] == "math+python" and scored_by["weights"] == [1.0, 0.25]
    single = _cli("score", src, tmp_path / "one.parquet", "--verifier", "math")
    assert single.returncode == 0 and provenance(tmp_path / "one.parquet")["scored_by"]["verifier"] == "math"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--verifier", "nope"], "unknown verifier 'nope'"),
        (["--verifier", "python:no_such_module:f"], "cannot import"),
        (["--verifier", "regex", "--pattern", "("], "not a valid regular expression"),
        (["--verifier", "math", "--verifier", "exact", "--reward-weights", "1"],
         "--reward-weights '1': 2 finite numbers, one per --verifier"),
        (["--verifier", "math", "--reward-weights", "x"], "comma-separated numbers, one per --verifier"),
    ],
)
def test_bad_verifier_options(tmp_path, args, message):
    src = _rollouts(tmp_path / "r.parquet", ["a"], ["a"], prompt_ids=["a"])
    done = _cli("score", src, tmp_path / "s.parquet", *args)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "s.parquet").exists()


def test_bad_input_files(tmp_path):
    pq.write_table(pa.table({"prompt_id": ["a"], "completion": ["x"]}), tmp_path / "noanswer.parquet")
    done = _cli("score", tmp_path / "noanswer.parquet", tmp_path / "s.parquet")
    assert done.returncode == 2 and "missing column 'answer'" in done.stderr
    (tmp_path / "junk.parquet").write_text("not parquet")
    done = _cli("score", tmp_path / "junk.parquet", tmp_path / "s.parquet")
    assert done.returncode == 2 and "not a readable Parquet file" in done.stderr
    assert not (tmp_path / "s.parquet").exists()


def test_an_interrupted_score_resumes_from_its_saved_parts(tmp_path):
    """Each --part-rows part is saved as it finishes: Ctrl-C in the third part keeps the first two, --resume
    verifies only the rest, and the output equals an uninterrupted run's (before: an interrupt lost every row)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    n = 7
    rollouts = tmp_path / "r.parquet"
    pq.write_table(pa.table({"prompt_id": [f"p{i // 2}" for i in range(n)], "sample_idx": [i % 2 for i in range(n)],
                             "completion": ["x" * i for i in range(n)], "interrupt": [i == 5 for i in range(n)],
                             "marker": [str(tmp_path / "interrupted")] * n}), rollouts)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}

    def score(out, *extra):
        return subprocess.run([sys.executable, "-m", "fdivctl", "score", str(rollouts), str(out), "--verifier",
                               "python:user_reward:interrupt_once", "--workers", "1", "--part-rows", "2", *extra],
                              capture_output=True, text=True, env=env, timeout=120, preexec_fn=ctrl_c_reaches_it)

    out, parts = tmp_path / "s.parquet", tmp_path / "s.parquet.parts"
    interrupted = score(out)
    assert interrupted.returncode == 130 and "fdivctl: interrupted" in interrupted.stderr and not out.exists()
    assert "Traceback" not in interrupted.stderr
    assert sorted(p.name for p in parts.glob("part-*")) == ["part-000000.parquet", "part-000001.parquet"]
    refused = score(out)
    assert refused.returncode == 2 and "holds an interrupted run: pass --resume" in refused.stderr
    other = score(out, "--resume", "--timeout", "5")
    assert other.returncode == 2 and "holds an interrupted run with other settings" in other.stderr
    resumed = score(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not parts.exists()
    straight = score(tmp_path / "straight.parquet")  # the marker exists now: no interrupt
    assert straight.returncode == 0, straight.stderr
    columns = ["reward", "correct", "verdict", "pass_rate"]
    assert pq.read_table(out).select(columns).equals(pq.read_table(tmp_path / "straight.parquet").select(columns))
    assert pq.read_table(out).column("reward").to_pylist() == [float(i % 2) for i in range(n)]


@pytest.mark.parametrize("command", [
    ["train", "{model}", "{out}", "--prompts", "{prompts}", "--verifier", "math", "--iterations", 1, "--group-size", 2],
    ["train", "{model}", "{out}", "--algo", "dph", "--partition", "--partition-dir", "{out}", "--prompts", "{prompts}",
     "--verifier", "math"],
    ["eval", "{out}", "--model", "{model}", "--prompts", "{prompts}", "--verifier", "exact"],
])
def test_sampling_then_scoring_refuses_prompts_the_verifier_cannot_read_before_sampling(tmp_path, tiny_teacher,
                                                                                      command):
    """Before: online train sampled a whole iteration, then failed on its own rollouts file's missing 'answer'."""
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["Compute 1 + 1.", "Compute 2 + 2."]}), prompts)
    out = tmp_path / "out"
    args = [str(a).format(model=tiny_teacher, out=out, prompts=prompts) for a in command]
    done = run_cli(*args, "--device", "cpu")
    assert done.returncode == 2 and f"{prompts}: missing column 'answer' (--verifier" in done.stderr, done.stderr
    assert not out.exists()
