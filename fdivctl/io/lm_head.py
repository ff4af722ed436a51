"""A causal LM's head as the chunked engine computes it: the decoder's last hidden state ``h``, the output
embedding ``W`` (and bias ``b``), and how the model turns ``u = h Wᵀ + b`` into its logits ``z``.

Most models' logits are ``u``.  Some transform it after the head, and an engine that skipped the transform
would train on another distribution than the model samples from (the rollout's log-probs and the engine's
would disagree, and a distillation would pull toward the wrong target):

* a scale, ``z = s·u``: Cohere's ``logit_scale`` (s = 1/16), Granite's ``logits_scaling`` (z = u / s),
  HyperCLOVA X's ``logits_scaling`` (z = s·u).  The same name means ÷ in one model and × in another, so the
  config only proposes s and 1/s;
* a soft cap, ``z = c·tanh(u/c)``: Gemma 2's ``final_logit_softcapping`` (c = 30; Gemma Team, "Gemma 2:
  Improving Open Language Models at a Practical Size", 2024, §2), also Gemma 3n's and VaultGemma's.

:func:`logit_map` finds which transform a model applies by running it once on a few tokens and comparing
its own logits with each candidate applied to ``u``; a model whose logits match none is refused rather than
trained on a guess.  A scale is folded into the hidden state (``s·u = (s·h) Wᵀ`` without a bias); the soft
cap goes to the engine (``softcap=`` of :func:`fdivctl.engine.divergence_loss` and the others).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from fdivctl.engine.matmul import soft_cap_
from fdivctl.errors import UserError
from fdivctl.io.checkpoints import text_config

#: config attributes that scale the logits, in one direction or the other
SCALE_ATTRIBUTES = ("logit_scale", "logits_scaling", "output_multiplier")
SOFTCAP_ATTRIBUTE = "final_logit_softcapping"
_PROBE_TOKENS = 8
_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LogitMap:
    """``z = softcap(scale · u)``, ``softcap(x) = c·tanh(x/c)`` when ``softcap`` is set."""

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        z = u * self.scale
        soft_cap_(z, self.softcap)
        return z


def candidate_maps(config) -> list[LogitMap]:
    """The transforms ``config`` could mean: its soft cap with each proposed scale (1, s, 1/s)."""
    config = text_config(config)
    cap = getattr(config, SOFTCAP_ATTRIBUTE, None)
    cap = float(cap) if isinstance(cap, int | float) and cap > 0 else None
    scales = [1.0]
    for name in SCALE_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 and value != 1:
            scales += [float(value), 1.0 / float(value)]
    return [LogitMap(scale, cap) for scale in scales]


@torch.no_grad()
def logit_map(model, role: str = "model") -> LogitMap:
    """How ``model`` maps ``u = h Wᵀ + b`` to its logits, found on a probe of a few tokens (cached per model).

    Raises :class:`UserError` when no candidate reproduces the model's own logits, or when a scale would have
    to be folded into a head with a bias.  A model with non-finite logits on the probe gets its config's first
    candidate unchecked."""
    if model in _MAPS:
        return _MAPS[model]
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    vocab = weight.shape[0]
    ids = (torch.arange(1, _PROBE_TOKENS + 1, device=weight.device) * 7919 % vocab).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids).logits.float()
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    finally:
        model.train(was_training)
    u = torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    candidates = candidate_maps(model.config)
    if not (torch.isfinite(logits).all() and torch.isfinite(u).all()):
        # non-finite weights: nothing to compare; the run's own checks stop at its first non-finite loss
        return candidates[0]
    # the model's own head may run in bf16: its logits carry ~2⁻⁸ relative rounding, the candidates differ by far more
    tolerance = 2e-2 * (1.0 + logits.abs().max().item())
    errors = {m: (logits - m.apply(u)).abs().max().item() for m in candidates}
    found, error = min(errors.items(), key=lambda item: item[1])
    if not error <= tolerance:
        raise UserError(f"{role}: its logits are not its head's output h·Wᵀ (+ b) under any transform fdivctl knows "
                        f"(a scale from {', '.join(SCALE_ATTRIBUTES)}, a soft cap from {SOFTCAP_ATTRIBUTE}; the "
                        f"closest differs by {error:.3g}): the engine would train on another distribution than the "
                        "model's")
    if found.scale != 1.0 and bias is not None:
        raise UserError(f"{role}: its logits are scaled (×{found.scale:g}) after a head with a bias; fdivctl folds "
                        "a scale into the hidden state, which a bias does not allow")
    _MAPS[model] = found
    return found


@dataclass
class LMHead:
    """A model's decoder and head as the engine reads them: :meth:`hidden` gives the scored tokens' hidden states
    with the model's logit scale folded in, :attr:`weight`/:attr:`bias`/:attr:`softcap` the rest of ``z``."""

    decoder: torch.nn.Module
    head: torch.nn.Module
    logit_map: LogitMap

    @classmethod
    def of(cls, model, role: str = "model") -> LMHead:
        return cls(model.get_decoder(), model.get_output_embeddings(), logit_map(model, role))

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.head, "bias", None)

    @property
    def softcap(self) -> float | None:
        return self.logit_map.softcap

    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[N, H]`` final hidden states (× the logit scale) at the positions that predict the batch's scored
        tokens (:meth:`fdivctl.io.sequences.Sequences.batch`).

        The decoder runs without an attention mask.  The batch is right-padded, and in a causal decoder the
        state at position t depends only on positions ≤ t, all real tokens of the row when t is.  So every
        position read here gets what the unpadded sequence alone would give it; the padded positions are never
        read, and in training they carry no gradient.  Without the mask the attention is plain causal: no
        ``[B, 1, L, L]`` mask is built and SDPA may take its fused causal kernel.  Nor does the decoder build a
        key/value cache, which a teacher-forced pass never reads (it would hold every layer's keys and values
        until the forward returns).  (transformers still reads the position ids on the host once per forward, to
        rule out packed sequences, as it read the padding mask before.)
        """
        out = self.decoder(input_ids=batch["input_ids"], use_cache=False)
        hidden = out.last_hidden_state[batch["batch_index"], batch["position"]]
        return hidden if self.logit_map.scale == 1.0 else hidden * self.logit_map.scale
