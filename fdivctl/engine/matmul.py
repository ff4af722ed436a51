"""Matmuls of the lm_head with an fp32 (or fp64) result, whatever the input dtype.

DESIGN.md: rounding bf16 logits before the fp32 cast gave 4–23 % gradient
error in a well-known fused-loss library, so each chunk's logits are produced
directly in fp32: on CUDA with ``torch.mm(..., out_dtype=torch.float32)`` over
bf16/fp16 operands (fp32 accumulation inside the GEMM), elsewhere by upcasting
the operands (the weight once per call, the hidden chunk per chunk).  Weight
gradients accumulate in fp32 across chunks and are cast once at the end.
"""

from __future__ import annotations

import functools
import math

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


@functools.cache
def native_fp32_output(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` operands here."""
    if dtype not in LOW_PRECISION or device_type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True


def matmul_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the chunk matmuls will read it: unchanged, or upcast once to fp32."""
    if weight.dtype in LOW_PRECISION and not native_fp32_output(weight.device.type, weight.dtype):
        return weight.float()
    return weight


def linear_fp32(
    x: torch.Tensor, weight_mm: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight_mm.T (+ bias)`` with an fp32 result (fp64 when the operands are fp64)."""
    if weight_mm.dtype in LOW_PRECISION:
        out = torch.mm(x.to(weight_mm.dtype), weight_mm.T, out_dtype=torch.float32)
    else:
        out = x.to(weight_mm.dtype) @ weight_mm.T
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


def check_softcap(cap: float | None, name: str = "softcap") -> None:
    """A soft cap is None or a positive finite number (ValueError naming ``name`` otherwise)."""
    if cap is not None and not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"{name} must be a positive number, got {cap}")


def soft_cap_(logits: torch.Tensor, cap: float | None, slope: bool = False) -> torch.Tensor | None:
    """``z = c·tanh(u/c)`` in place over the head's output ``u`` (a model's final-logit soft cap, ``c`` =
    ``final_logit_softcapping``: Gemma Team, "Gemma 2", 2024, §2; nothing when ``cap`` is None).  With ``slope``
    returns ``dz/du = 1 − tanh²(u/c)`` (``[c, V]``), which the caller multiplies into ``∂L/∂z`` to get ``∂L/∂u``
    for the backward matmuls; else None."""
    if cap is None:
        return None
    tanh = logits.div_(cap).tanh_()
    derivative = 1 - tanh * tanh if slope else None
    tanh.mul_(cap)
    return derivative


def input_grad(grad_logits: torch.Tensor, weight_mm: torch.Tensor, out: torch.Tensor) -> None:
    """``out = grad_logits @ W`` — the gradient of ``linear_fp32``'s input — in ``out``'s dtype.

    Low-precision weights read the gradient rounded to their dtype, with fp32
    accumulation inside the GEMM, as every fused-loss kernel does.  The GEMM
    writes into ``out`` when it is already in the weight's dtype (no copy).
    """
    g = grad_logits.to(weight_mm.dtype)
    if out.dtype == weight_mm.dtype and out.is_contiguous():
        torch.mm(g, weight_mm, out=out)
    else:
        out.copy_(g @ weight_mm)


def accumulate_weight_grad(grad_weight_acc: torch.Tensor, grad_logits: torch.Tensor, x: torch.Tensor) -> None:
    """Add ``grad_logitsᵀ x`` (``[V, H]``) into ``grad_weight_acc`` in place.

    The accumulator is fp32, or the weight's own low precision when the caller
    chose it; the operands are read in the accumulator's matmul dtype
    (``grad_logits``' own: bf16 for a bf16 head).
    """
    g = grad_logits
    x_mm = x.to(g.dtype)
    if g.dtype in LOW_PRECISION and grad_weight_acc.dtype == torch.float32:
        # in place, fp32 result: no [V, H] temporary
        torch.addmm(grad_weight_acc, g.T, x_mm, out_dtype=torch.float32, out=grad_weight_acc)
    else:
        grad_weight_acc.addmm_(g.T, x_mm)
