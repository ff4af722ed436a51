"""Sampling from a policy that is being trained, with its current weights.

Used by the online ``train`` loop and by on-policy ``distill``.  In one
process with the ``hf`` backend the model itself generates (switched to eval
mode for the call).  Otherwise a sampler holds its own copy of the weights —
a vLLM engine, or under torchrun an unsharded transformers copy — started
from the run's starting checkpoint and reloaded whenever the optimizer step
has changed since its last call: from the model's state dict in one process, and
under torchrun from the full state dict gathered from the FSDP shards (a
collective every rank joins), which rank 0 alone loads into its sampler and
samples with; LoRA adapters are merged into it either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fdivctl.generation.hf import HFGenerator
from fdivctl.generation.sampling import Completion, SamplingOptions
from fdivctl.generation.vllm_backend import VLLMGenerator
from fdivctl.io.checkpoints import load_causal_lm
from fdivctl.stages.rollout import resolve_backend
from fdivctl.training import distributed
from fdivctl.training.lora import merged_state_dict

#: ``generate(prompt token ids, sampling, seed) → completions per prompt`` (None on ranks other than 0)
Generate = Callable[[list[list[int]], SamplingOptions, int], list[list[Completion]] | None]


def live_generator(model, tokenizer, start: Path, backend: str, dtype: str, device: str,
                   current_step: Callable[[], int], world: distributed.World | None = None,
                   context: int | None = None) -> Generate:
    """A ``generate`` that always samples from the current weights of ``model``.

    ``start`` is the checkpoint the weights were loaded from (the sampler's
    first weights); ``current_step()`` tells when they have changed.  Under
    torchrun (``world``) every rank calls ``generate``; rank 0 gets the
    completions, the others None.  ``context`` bounds prompt + completion
    (the run's tightest model, e.g. a teacher with a shorter context than the
    student; default: the sampled model's own).
    """
    world = world or distributed.World()
    backend = resolve_backend(backend, device)
    if backend == "hf" and not world.distributed:
        hf = HFGenerator(model, tokenizer, context)

        def generate_hf(prompts, sampling, seed):
            model.eval()
            try:
                return hf.generate(prompts, sampling, seed)
            finally:
                model.train()

        return generate_hf
    sampler = None
    if world.main and backend == "vllm":
        if world.distributed:
            # vLLM forks its engine process by default; a fork of this rank would inherit its open connections to
            # the other ranks' process group, so the engine is spawned instead
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        sampler = VLLMGenerator(start, tokenizer, dtype, max_model_len=context)
    elif world.main:
        sampler = HFGenerator(load_causal_lm(start, dtype, device, "sampler"), tokenizer, context)
    synced = {"step": current_step()}

    def generate_synced(prompts, sampling, seed):
        if synced["step"] != current_step():
            gathered = distributed.model_state(model) if world.distributed else None  # on rank 0 alone
            if sampler is not None:
                sampler.load_weights(merged_state_dict(model, gathered))
            synced["step"] = current_step()
        return sampler.generate(prompts, sampling, seed) if sampler is not None else None

    return generate_synced
