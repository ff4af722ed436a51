"""The optimization loop shared by ``train`` and ``distill``: optimizer, schedule, checkpoints, resume."""
