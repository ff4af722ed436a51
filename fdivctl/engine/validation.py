"""Input checks of the loss engine: one ValueError naming the argument and shapes."""

from __future__ import annotations

import torch

from fdivctl.engine.finite import all_finite
from fdivctl.engine.targets import Target


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """h ``[N, H]`` and W ``[V, H]`` of one floating dtype and device; bias ``[V]``; all finite."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {_shape(hidden)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {_shape(weight)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden {_shape(hidden)} and weight {_shape(weight)} disagree on H "
            f"({hidden.shape[1]} vs {weight.shape[1]}); weight must be [V, H]"
        )
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} and weight dtype {weight.dtype} must be one floating dtype")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight on {weight.device}")
    if bias is not None and _shape(bias) != (weight.shape[0],):
        raise ValueError(f"bias has shape {_shape(bias)}; expected [{weight.shape[0]}]")
    for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if tensor is not None and not all_finite(tensor):
            raise ValueError(f"{name} {_shape(tensor)} contains NaN or inf")


def check_per_token(name: str, tensor: torch.Tensor | None, n_tokens: int) -> None:
    """A per-token vector must be ``[N]``."""
    if tensor is not None and _shape(tensor) != (n_tokens,):
        raise ValueError(f"{name} has shape {_shape(tensor)}; expected [{n_tokens}]")


def check_token_ids(token_ids: torch.Tensor | None, n_tokens: int, vocab_size: int) -> None:
    if token_ids is None:
        return
    check_per_token("token_ids", token_ids, n_tokens)
    if token_ids.is_floating_point() or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab_size):
        raise ValueError(
            f"token_ids out of range [0, {vocab_size}): min {int(token_ids.min())}, max {int(token_ids.max())}"
        )


def check_weights(weights: torch.Tensor | None, n_tokens: int) -> None:
    if weights is None:
        return
    check_per_token("weights", weights, n_tokens)
    if not all_finite(weights):
        raise ValueError(f"weights {_shape(weights)} contain NaN or inf")


def check_target(target: Target | None, n_tokens: int, vocab_size: int) -> None:
    if target is None:
        return
    if not isinstance(target, Target):
        raise ValueError(
            f"target must be a FullLogits, TeacherHead, TeacherMixture or TopK target, got {type(target).__name__}"
        )
    target.validate(n_tokens, vocab_size)


def check_scalars(temperature: float, chunk_size: int | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
