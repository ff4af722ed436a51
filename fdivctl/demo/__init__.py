"""The built-in quickstart: a verifiable task with many correct answers, and the pipeline that runs on it."""
