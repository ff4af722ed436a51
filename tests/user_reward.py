"""A user reward function, loaded by `--verifier python:user_reward:FUNC` in the tests."""


def length_reward(completion: str, row: dict) -> float:
    return 1.0 if len(completion.strip()) <= 3 else 0.0


def slow_reward(completion: str, row: dict) -> float:
    import time

    time.sleep(60)
    return 1.0
