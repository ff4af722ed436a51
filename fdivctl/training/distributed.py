"""Several processes (torchrun) training one model: FSDP2 over the decoder layers, the data split by rank.

``torchrun --nproc-per-node N -m fdivctl distill …`` (or ``train``) starts N
processes; each finds its rank in the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins
one process group: NCCL on GPUs, gloo on CPUs (``--dist-backend``).

* The model: each decoder layer is one FSDP2 group (``fully_shard``: its
  parameters are sharded over the ranks as DTensors, all-gathered for its
  forward and backward, gradients reduce-scattered and averaged).  On a GPU
  the layers compute in bf16 with fp32 gradient reduction
  (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``).  The
  embedding, final norm and output head stay whole on every rank (the loss
  engine multiplies by the head's weight directly, outside any forward); their
  gradients are all-reduced and averaged here.
* The data: every optimizer step takes the same global examples as a single
  process (``--batch-size`` × ``--grad-accum`` rows, DESIGN.md's data order);
  rank r takes rows r, r + N, … of each micro-batch, so ``--batch-size`` must
  be a multiple of N.  The gradients are averaged over ranks; a loss that is a
  mean over tokens (distill) is weighed by each rank's tokens in the step's
  mean over all ranks' tokens (:class:`fdivctl.training.loop.StepTokenMean`),
  so the update is one process's whatever the ranks' token counts; a mean
  over examples (fdpo) needs nothing, the ranks holding equal example counts.
* Checkpoints: the model's full state dict is gathered to rank 0
  (``torch.distributed.checkpoint.state_dict`` with ``full_state_dict``,
  offloaded to the CPU), which writes the ordinary ``save_pretrained``
  directory, so rank 0 needs CPU memory for the weights alone.  The optimizer
  state is not gathered: each rank writes its shard with
  ``torch.distributed.checkpoint`` (:func:`save_optimizer`), keyed by
  parameter name with the global shapes recorded, so a run resumes on any
  number of processes, one included, each rank reading only its slices.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from fdivctl.errors import UserError

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE > 1) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    """Rank 0, or a single process: the one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def init_world(backend: str = "auto", device: str = "auto") -> World:
    """Join the process group torchrun describes (once); a single process gets ``World()``.

    On CUDA each process takes the GPU of its local rank as its current device.
    """
    if backend not in BACKENDS:
        raise UserError(f"--dist-backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if not launched():
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    on_cuda = torch.cuda.is_available() and device != "cpu"
    if backend == "auto":
        backend = "nccl" if on_cuda else "gloo"
    if backend == "nccl" and not on_cuda:
        raise UserError("--dist-backend nccl needs CUDA devices: use gloo on CPUs")
    if on_cuda:
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(group_backend(backend))
    return world


def group_backend(backend: str) -> str:
    """The process group's backend for ``--dist-backend`` nccl or gloo.  NCCL carries CUDA tensors only, and the
    loop's small collectives (figures, token counts) are CPU tensors: with nccl those go through gloo in the same
    group (PyTorch's per-device backend string)."""
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def env_shard() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, (0, 1) without it; the process takes its local GPU."""
    if not launched():
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def current() -> World:
    if not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def shard(model, world: World) -> None:
    """FSDP2 on each decoder layer (bf16 compute / fp32 reduction on CUDA); the rest stays whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world.size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def average_replicated_grads(params: list[torch.Tensor], world: World) -> None:
    """All-reduce and average the gradients of the parameters FSDP does not hold (head, embedding, norm)."""
    if not world.distributed:
        return
    for p in params:
        if p.grad is not None and not _is_sharded(p.grad):
            dist.all_reduce(p.grad)
            p.grad.div_(world.size)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, world: World) -> torch.Tensor:
    """``clip_grad_norm_`` over sharded (DTensor) and whole gradients: ‖g‖₂ of the full model's gradient."""
    if not world.distributed:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    whole = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        if _is_sharded(g):
            sharded += g.to_local().double().pow(2).sum()
        else:
            whole += g.double().pow(2).sum()
    dist.all_reduce(sharded)
    norm = (sharded + whole).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return norm


def all_finite(loss: torch.Tensor, world: World) -> bool:
    """Whether every rank's loss is finite (so all ranks stop together, none waits in a collective)."""
    finite = torch.tensor([float(torch.isfinite(loss).all())], device=loss.device)
    if world.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def mean_figures(figures: dict[str, float], world: World) -> dict[str, float]:
    """The ranks' figures averaged (``tokens`` summed)."""
    if not world.distributed or not figures:
        return figures
    keys = sorted(figures)
    values = torch.tensor([figures[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) if k == "tokens" else float(v) / world.size for k, v in zip(keys, values)}


def model_state(model) -> dict:
    """The full model state dict on the CPU, gathered from the shards (a collective; rank 0 gets it, the others an
    empty dict)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextmanager
def _single_process_is_meant():
    """Silence the warning ``torch.distributed.checkpoint`` prints on every call without a process group: one
    process is a supported run here, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_optimizer(model, optimizer, path: Path) -> None:
    """Write the optimizer state to ``path`` with ``torch.distributed.checkpoint`` (a collective under torchrun).

    Each rank writes only its own shard of the sharded parameters' state (no gather); the state of the whole
    parameters (head, embedding, norm) is written once.  The entries are keyed by parameter name and the
    metadata records every tensor's global shape, so :func:`load_optimizer` reads it back on any number of
    processes, one included.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with _single_process_is_meant():
        dcp.save(state, checkpoint_id=path, no_dist=not dist.is_initialized())


def load_optimizer(model, optimizer, path: Path) -> None:
    """Restore the state :func:`save_optimizer` wrote, resharded to this run's processes (each rank reads its
    slices; a collective under torchrun)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the layout to read into
    with _single_process_is_meant():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write named tensors (whole or DTensor shards) with ``torch.distributed.checkpoint``, as
    :func:`save_optimizer` writes the optimizer state (a collective under torchrun)."""
    import torch.distributed.checkpoint as dcp

    with _single_process_is_meant():
        dcp.save({"tensors": tensors}, checkpoint_id=path, no_dist=not dist.is_initialized())


def load_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Read what :func:`save_tensors` wrote into ``tensors`` in place, resharded to this run's processes."""
    import torch.distributed.checkpoint as dcp

    with _single_process_is_meant():
        dcp.load({"tensors": tensors}, checkpoint_id=path, no_dist=not dist.is_initialized())


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """Restore an optimizer state that a checkpoint older than :func:`save_optimizer` stored whole in
    ``state.pt`` (full, keyed by parameter name; each rank keeps its slices)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def sum_over_ranks(value: float, world: World) -> float:
    """``value`` summed over every rank (a collective; the value itself in one process)."""
    if not world.distributed:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item())


def gather_objects(value, world: World) -> list:
    """Every rank's ``value``, in rank order, on every rank (picklable objects; a collective)."""
    if not world.distributed:
        return [value]
    values = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def broadcast_object(value, world: World):
    """Rank 0's ``value`` on every rank (a collective; the other ranks pass anything)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def end_worker(code: int) -> NoReturn:
    """End a torchrun worker with exit status ``code``: leave the process group, run the exit hooks and flush while
    the interpreter is whole, then ``os._exit`` without interpreter finalization.

    Why not a plain exit: once a module was ``fully_shard``-ed, the process group stays referenced after
    ``destroy_process_group`` (measured with torch 2.13: the gloo worker threads outlive destroy, the module and
    ``gc.collect()``; the holder is inside torch), so it is torn down during finalization, where a worker thread that still needs the GIL is ended by
    ``pthread_exit`` and the process aborts ("terminate called without an active exception"; seen in CI on
    rank 1 of 2-process runs). Every file this program writes is closed by then; nothing is left to finalize."""
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()  # a live engine (vLLM) ends through its finalizers, as in a normal exit
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
