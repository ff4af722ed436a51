"""A user reward function, loaded by `--verifier python:user_reward:FUNC` in the tests."""


def length_reward(completion: str, row: dict) -> float:
    return 1.0 if len(completion.strip()) <= 3 else 0.0


def slow_reward(completion: str, row: dict) -> float:
    import time

    time.sleep(60)
    return 1.0


def raises_on_odd(completion: str, row: dict) -> float:
    if row.get("sample_idx", 0) % 2:
        raise ValueError("this verifier fails on odd samples")
    return 1.0


def nan_reward(completion: str, row: dict) -> float:
    return float("nan")


def interrupt_once(completion: str, row: dict) -> float:
    """Ctrl-C to the scoring process at the row flagged ``interrupt``, the first time (a marker file remembers)."""
    import os
    import signal
    import time
    from pathlib import Path

    if row.get("interrupt") and not Path(row["marker"]).exists():
        Path(row["marker"]).touch()
        os.kill(os.getppid(), signal.SIGINT)
        time.sleep(30)
    return float(len(completion) % 2)


def passes_tests(completion: str, row: dict) -> float:
    """The share of the row's ``tests`` (a list column, as code-RL data stores test cases) the completion contains;
    fails if the verifier was sent the rollout's token ids."""
    if "completion_token_ids" in row or "completion_logprobs" in row:
        raise ValueError("a user verifier was sent the per-token columns")
    return sum(test in completion for test in row["tests"]) / len(row["tests"])


# TRL reward functions, written as for trl.GRPOTrainer(reward_funcs=[...]), loaded by `--verifier trl:user_reward:FUNC`


def trl_format_reward(completions, **kwargs):
    """TRL's documentation example: 1 when the completion is wrapped in <think>…</think>, conversational or not."""
    import re

    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if re.match(r"^<think>.*?</think>", t, re.DOTALL) else 0.0 for t in texts]


def trl_reads_its_arguments(prompts, completions, completion_ids, answer, trainer_state, log_metric, **kwargs):
    """Checks TRL's calling convention: one-element lists, the dataset's columns as keywords, the token ids."""
    assert len(prompts) == len(completions) == len(completion_ids) == len(answer) == 1 and trainer_state is None
    log_metric("seen", 1.0)
    reward = float(completions[0].strip() == answer[0]) + 0.5 * (prompts[0] == "Say " + answer[0])
    return [reward + 0.01 * len(completion_ids[0] or [])]


def trl_none_when_no_answer(completions, answer, **kwargs):
    """None where the function does not apply (TRL: left out of the sum)."""
    return [None if a == "" else float(c == a) for c, a in zip(completions, answer)]


async def trl_async_reward(completions, **kwargs):
    import numpy as np

    return np.array([float(len(c)) for c in completions])  # any sequence of rewards, as TRL takes


def trl_wrong_count(completions, **kwargs):
    return [1.0, 2.0]


def char_count_reward(completion: str, row: dict) -> float:
    """A real-valued reward: the completion's length in characters (ties are rare, unlike 0/1)."""
    return float(len(completion))
