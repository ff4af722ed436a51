"""Rollout backends: ``hf`` (transformers ``generate``); ``vllm`` is planned."""
