"""A model soup: the weighted average of checkpoints of one architecture (SALSA's reference).

``θ_soup = Σ_i w_i θ_i`` with ``w_i ≥ 0``, ``Σ_i w_i = 1``, parameter by
parameter, accumulated in fp32 (seed: "SALSA: Soup-based Alignment Learning for
Stronger Adaptation in RLHF", which uses the average of independently
fine-tuned SFT models as the KL reference in place of one SFT model;
METHODS.md §2.1).  The result is an ordinary ``save_pretrained`` directory
(``train --ref-model SOUP``), with the first input's config, tokenizer and
dtype, and a ``soup.json`` naming every input, its content hash and weight.

Memory: one model plus one fp32 copy of its parameters; the inputs are loaded
one after another.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from fdivctl.engine.targets import normalize_weights
from fdivctl.errors import UserError, storage_failures_named
from fdivctl.io.atomic import check_output_dir, write_json
from fdivctl.io.checkpoints import load_causal_lm, load_tokenizer
from fdivctl.io.hashing import model_hash, tokenizer_hash


def soup_weights(weights: list[float] | None, n_models: int) -> list[float]:
    """The normalized weights (uniform when not given); UserError unless ``n_models`` non-negative numbers
    with a positive sum."""
    if n_models < 2:
        raise UserError(f"soup needs at least two models, got {n_models}")
    if weights is None:
        return [1.0 / n_models] * n_models
    if len(weights) != n_models:
        raise UserError(f"--weights has {len(weights)} numbers for {n_models} models")
    try:
        return normalize_weights(weights, n_models)
    except ValueError as err:
        raise UserError(f"--weights: {err}") from None


# config fields that decide what the weights mean: equal shapes with another head count, tying or RoPE base are
# another function of the same numbers, and their average is no model of either
STRUCTURE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "tie_word_embeddings", "hidden_act", "rms_norm_eps", "layer_norm_eps",
             "rope_theta", "rope_parameters", "rope_scaling", "attention_bias", "mlp_bias", "n_embd", "n_layer",
             "n_head", "n_inner", "activation_function", "layer_norm_epsilon")


def _check_compatible(first, first_dir: Path, other, other_dir: Path) -> None:
    a, b = first.config, other.config
    if (a.model_type, a.architectures) != (b.model_type, b.architectures):
        raise UserError(f"{other_dir} is a {b.model_type} {b.architectures}, {first_dir} a {a.model_type} "
                        f"{a.architectures}: a soup needs one architecture")
    da, db = a.to_dict(), b.to_dict()
    differing = [key for key in STRUCTURE if da.get(key) != db.get(key)]
    if differing:
        key = differing[0]
        raise UserError(f"{other_dir} has {key} = {db.get(key)!r}, {first_dir} {da.get(key)!r}: a soup needs one "
                        "architecture")
    shapes_a = {k: tuple(v.shape) for k, v in first.state_dict().items()}
    shapes_b = {k: tuple(v.shape) for k, v in other.state_dict().items()}
    if shapes_a != shapes_b:
        name = sorted(set(shapes_a) ^ set(shapes_b)) or [k for k in shapes_a if shapes_a[k] != shapes_b[k]]
        raise UserError(f"{other_dir} and {first_dir} differ at parameter {name[0]} "
                        f"({shapes_b.get(name[0])} vs {shapes_a.get(name[0])}): a soup needs one architecture")


def run_soup(models: list[Path], out: Path, weights: list[float] | None = None) -> dict:
    """Average ``models`` with ``weights`` into the model directory ``out`` (written atomically)."""
    weights = soup_weights(weights, len(models))
    if out.exists():
        raise UserError(f"{out} exists: choose a new directory for the soup")
    check_output_dir(out)
    base = load_causal_lm(models[0], device="cpu", role="soup input")
    tokenizer = load_tokenizer(models[0], role="soup input")
    vocab_hash = tokenizer_hash(tokenizer)
    params = base.state_dict()
    total = {name: tensor.float() * weights[0] for name, tensor in params.items()}
    for path, weight in zip(models[1:], weights[1:]):
        if tokenizer_hash(load_tokenizer(path, role="soup input")) != vocab_hash:
            raise UserError(f"{path} has a different tokenizer from {models[0]}: a soup needs one vocabulary")
        other = load_causal_lm(path, device="cpu", role="soup input")
        _check_compatible(base, models[0], other, path)
        for name, tensor in other.state_dict().items():
            total[name].add_(tensor.float(), alpha=weight)
        del other
    with torch.no_grad():
        for name, tensor in params.items():
            tensor.copy_(total[name].to(tensor.dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with storage_failures_named(out):
            base.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            summary = {
                "models": [{"path": str(p), "model_hash": model_hash(p), "weight": w} for p, w in zip(models, weights)],
                "tokenizer_hash": vocab_hash,
                "parameters": sum(t.numel() for t in params.values()),
            }
            write_json(tmp / "soup.json", summary)
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"soup": str(out), **summary}
