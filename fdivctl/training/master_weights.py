"""fp32 master weights for a model whose trainable parameters are bf16 or fp16.

A model loaded in bf16 (``--dtype auto`` on CUDA keeps a bf16 checkpoint's dtype) and updated in place
loses most of AdamW's steps: at the learning rates RL and distillation use (1e-6 … 1e-5) a step moves a
weight by about the learning rate, far below bf16's spacing near a typical weight (2⁻⁸ · 0.02 ≈ 8e-5), so
the sum rounds back to the old value — measured on 1000 weights of scale 0.02 after 100 AdamW steps at lr
1e-6: 98 % unchanged, the mean moved by 2 % of what fp32 moves it.  As in mixed-precision training
(Micikevicius et al. 2018, "Mixed Precision Training", §3.1) the optimizer updates fp32 copies of those
parameters and each step rounds them into the model; the forward and backward passes keep the model's
dtype.  Cost: 4 bytes per such parameter for the copy, and AdamW's moments in fp32 (8 bytes, as for an fp32
model).  fp16 gets no loss scaling here: its gradients can underflow, so prefer bf16.

Under torchrun the parameters FSDP shards are DTensors; their copies are DTensors with the same placement,
so each rank keeps fp32 copies of its own shards only.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeights:
    """The parameters AdamW updates for ``model``: an fp32 copy of each trainable bf16/fp16 parameter, the
    parameter itself otherwise; :attr:`module` holds them under the model's parameter names (what the
    optimizer state is saved and loaded by)."""

    def __init__(self, model: torch.nn.Module):
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        self.copies: dict[str, torch.nn.Parameter] = {}  # the fp32 copies by parameter name (saved, loaded in place)
        self.module = torch.nn.Module()
        self.params: list[torch.nn.Parameter] = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if param.dtype in LOW_PRECISION:
                master = torch.nn.Parameter(param.detach().float().clone())
                self.pairs.append((param, master))
                self.copies[name] = master
            else:
                master = param
            self.params.append(master)
            _register(self.module, name, master)

    @staticmethod
    def needed(model: torch.nn.Module) -> bool:
        """Whether any trainable parameter of ``model`` is bf16 or fp16."""
        return any(p.requires_grad and p.dtype in LOW_PRECISION for p in model.parameters())

    @torch.no_grad()
    def take_grads(self) -> None:
        """Move each low-precision parameter's gradient to its copy, in fp32 (the model's is freed)."""
        for param, master in self.pairs:
            master.grad = None if param.grad is None else param.grad.float()
            param.grad = None

    @torch.no_grad()
    def to_model(self) -> None:
        """Round the updated copies into the model's parameters."""
        for param, master in self.pairs:
            param.copy_(master)


def _register(root: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    """``param`` as ``root``'s parameter ``name`` (dotted: the submodules are made on the way)."""
    *path, leaf = name.split(".")
    module = root
    for part in path:
        if part not in module._modules:
            module.add_module(part, torch.nn.Module())
        module = module._modules[part]
    module.register_parameter(leaf, param)
