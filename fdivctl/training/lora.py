"""LoRA adapters on a model being trained, through peft (the optional ``lora`` extra).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
eq. 3) keeps each adapted weight ``W₀ ∈ R^{d×k}`` frozen and trains
``W = W₀ + (α/r)·B A`` with ``A ∈ R^{r×k}`` (random init), ``B ∈ R^{d×r}``
(zero init, so training starts at ``W₀``).  Here the adapters go on every
linear layer of the decoder (peft's ``all-linear``: attention and MLP
projections, not the output head), and ``α`` defaults to ``2r``.

The adapters are injected into the model object in place (no wrapper), so the
loss engine, generation and evaluation see the same module tree.  A checkpoint
holds the *merged* weights (``W₀ + (α/r)BA``) as an ordinary ``save_pretrained``
directory — every later stage loads it like any model — plus the adapter
alone under ``adapter/`` (a standard peft adapter directory:
``PeftModel.from_pretrained(base, OUT/adapter)``).  Resuming loads the base
model again and the adapter from ``adapter/``, so the frozen weights never
accumulate rounding from merges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fdivctl.errors import UserError

ADAPTER_DIR = "adapter"
#: key prefix of a PeftModel's saved adapter (our adapters sit in the bare model, one level up)
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraOptions:
    r: int = 0  # 0: train every weight (no adapters)
    alpha: float | None = None  # None: 2r
    dropout: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def check(self) -> None:
        if self.r < 0 or (self.alpha is not None and not self.alpha > 0) or not 0 <= self.dropout < 1:
            raise UserError("--lora-r must be ≥ 0, --lora-alpha > 0 and --lora-dropout in [0, 1)")


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("--lora-r needs peft: pip install 'fdivctl[lora]'") from None
    return peft


def weights_to_load(base: Path, resume_from: Path | None, lora: LoraOptions) -> Path:
    """The checkpoint a run starts from: under LoRA always the base (the adapter is restored on top)."""
    if lora.enabled or resume_from is None:
        return base
    return resume_from


def add_adapters(model, lora: LoraOptions, resume_from: Path | None = None, seed: int = 0):
    """Inject trainable LoRA adapters into ``model`` in place and freeze everything else.

    ``A`` is drawn from a generator seeded with ``seed`` (the same run starts the
    same way); with ``resume_from`` the adapter weights of that checkpoint are loaded.
    """
    lora.check()
    peft = _peft()
    if resume_from is not None and not (Path(resume_from) / ADAPTER_DIR).is_dir():
        raise UserError(f"{resume_from} was trained without --lora-r: resume it without adapters")
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha if lora.alpha is not None else 2 * lora.r,
                             lora_dropout=lora.dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    model.fdivctl_lora_config = config
    if resume_from is not None:
        from safetensors.torch import load_file

        saved = load_file(str(Path(resume_from) / ADAPTER_DIR / "adapter_model.safetensors"))
        saved = {k.removeprefix(PEFT_PREFIX): v for k, v in saved.items()}
        result = peft.set_peft_model_state_dict(model, saved)
        if result.unexpected_keys:
            raise UserError(f"{resume_from}/{ADAPTER_DIR}: adapter does not fit this model ("
                            f"{len(result.unexpected_keys)} unexpected tensors): was it trained with another --lora-r?")
    return model


def has_adapters(model) -> bool:
    return hasattr(model, "fdivctl_lora_config")


def check_resume(out: Path, lora: LoraOptions) -> None:
    """Refuse to resume a full fine-tuning run with adapters (the other way is refused by :func:`add_adapters`)."""
    if lora.enabled:
        return
    if (Path(out) / ADAPTER_DIR).is_dir():
        raise UserError(f"{out} was trained with LoRA adapters: resume it with the same --lora-r")


@torch.no_grad()
def merged_state_dict(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict in its original architecture's names, each adapted weight merged.

    ``W = W₀ + (α/r)·B A`` (LoRA eq. 3, the product in fp32, cast to W₀'s dtype); without adapters the state
    as it is.  ``state`` — the full state dict gathered from FSDP shards under torchrun — replaces
    ``model.state_dict()``.
    """
    state = model.state_dict() if state is None else state
    if not has_adapters(model):
        return state
    from peft.tuners.lora import LoraLayer

    merged = {name: value for name, value in state.items() if ".lora_" not in name}
    for prefix, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = merged.pop(f"{prefix}.base_layer.weight")
        a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
        merged[f"{prefix}.weight"] = weight + (b.float() @ a.float() * module.scaling["default"]).to(weight.dtype)
        if f"{prefix}.base_layer.bias" in merged:
            merged[f"{prefix}.bias"] = merged.pop(f"{prefix}.base_layer.bias")
    return merged


def save_pretrained(model, path: Path, state_dict: dict | None = None) -> None:
    """``save_pretrained`` of the merged model; with adapters, the adapter alone under ``path/adapter``.

    ``state_dict`` (the full state gathered under torchrun) is what to write instead of the model's own
    parameters.
    """
    if not has_adapters(model):
        model.save_pretrained(path, state_dict=state_dict)
        return
    from safetensors.torch import save_file

    peft = _peft()
    model.save_pretrained(path, state_dict=merged_state_dict(model, state_dict))
    adapter = Path(path) / ADAPTER_DIR
    adapter.mkdir()
    model.fdivctl_lora_config.save_pretrained(str(adapter))
    tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu()
               for k, v in peft.get_peft_model_state_dict(model, state_dict).items()}
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
