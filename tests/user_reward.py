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
