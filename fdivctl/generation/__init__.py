"""Rollout backends: ``hf`` (transformers ``generate``) and ``vllm``; one schema."""
