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
