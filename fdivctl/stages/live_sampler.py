"""Sampling from a policy that is being trained, with its current weights.

Used by the online ``train`` loop and by on-policy ``distill``.  With the
``hf`` backend the model itself generates (switched to eval mode for the
call); with ``vllm`` an engine is started from the run's starting weights and
reloaded from the model's state dict (LoRA adapters merged) whenever the optimizer step has changed
since its last call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fdivctl.generation.hf import HFGenerator
from fdivctl.generation.sampling import Completion, SamplingOptions
from fdivctl.generation.vllm_backend import VLLMGenerator
from fdivctl.stages.rollout import resolve_backend
from fdivctl.training.lora import merged_state_dict

#: ``generate(prompt token ids, sampling, seed) → completions per prompt``
Generate = Callable[[list[list[int]], SamplingOptions, int], list[list[Completion]]]


def live_generator(model, tokenizer, start: Path, backend: str, dtype: str, device: str,
                   current_step: Callable[[], int]) -> Generate:
    """A ``generate`` that always samples from the current weights of ``model``.

    ``start`` is the checkpoint the weights were loaded from (the vLLM engine's
    first weights); ``current_step()`` tells when they have changed.
    """
    if resolve_backend(backend, device) == "hf":
        hf = HFGenerator(model, tokenizer)

        def generate_hf(prompts, sampling, seed):
            model.eval()
            try:
                return hf.generate(prompts, sampling, seed)
            finally:
                model.train()

        return generate_hf
    engine = VLLMGenerator(start, tokenizer, dtype)
    synced = {"step": current_step()}

    def generate_vllm(prompts, sampling, seed):
        if synced["step"] != current_step():
            engine.load_weights(merged_state_dict(model))
            synced["step"] = current_step()
        return engine.generate(prompts, sampling, seed)

    return generate_vllm
