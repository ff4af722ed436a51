"""Host-side work per head chunk of one GRPO step: the operations fdivctl dispatches, counted.

On a GPU every non-view operation is a kernel launch the host must issue; when
a chunk's launches take the host longer than the device takes to run them, the
device waits (the H200 profile of ``train_step.py``: 87 ms of wall time for ~69
ms of device work).  This counts them on any machine: the step of
``train_step.py``'s fdivctl variant (GRPO, the closed-form reverse KL to the
reference), with the engine's Triton path run by Triton's CPU interpreter, and
every ATen operation inside the sweep counted by a dispatch mode — the two
Triton kernels' own (interpreter) operations left out.  Prints one JSON object:
``chunks``, ``launches_per_chunk`` (non-view operations: GEMMs, elementwise,
reductions, copies), ``ops_per_chunk`` (views too: host work without a launch)
and ``host_syncs_per_step`` (``.item()``-like reads: each waits for the device).

    python bench/chunk_launches.py                  # 512 tokens in chunks of 16
    PYTHONPATH=/path/to/other/checkout python bench/chunk_launches.py   # another version of fdivctl, same count
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import train_step  # noqa: E402  (bench/, beside this script)

import fdivctl  # noqa: E402
from fdivctl.engine import fused, sweep, triton_chunk  # noqa: E402
from fdivctl.io.lm_head import LMHead  # noqa: E402
from fdivctl.stages.signals import FrozenModel  # noqa: E402

VIEWS = {"slice", "select", "detach", "expand", "permute", "t", "view", "unsqueeze", "squeeze", "transpose", "alias",
         "as_strided", "lift_fresh", "_reshape_alias", "unbind"}


class _Counter(TorchDispatchMode):
    """Counts operations dispatched inside the sweep (``where`` says), outside the Triton kernels."""

    def __init__(self):
        super().__init__()
        self.where = []
        self.sweep_ops: collections.Counter = collections.Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.syncs += 1
        if self.where[-1:] == ["sweep"]:
            self.sweep_ops[name] += 1
        return func(*args, **(kwargs or {}))

    def inside(self, place: str, fn):
        def wrapped(*a, **k):
            self.where.append(place)
            try:
                return fn(*a, **k)
            finally:
                self.where.pop()

        return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="completion tokens of the step (8 responses)")
    parser.add_argument("--chunk-size", type=int, default=16, help="rows per head chunk")
    parser.add_argument("--quick", action="store_true", help="the default: already a small CPU shape (seconds)")
    args = parser.parse_args()
    shape = dict(hidden=128, layers=1, vocab=512, length=args.tokens // train_step.GROUP)
    device = torch.device("cpu")
    policy = train_step._model(shape, torch.float32, device, 0).train()
    reference = train_step._model(shape, torch.float32, device, 1).requires_grad_(False)
    data = train_step._batch(shape, 2)
    step = train_step._fdivctl(policy, FrozenModel(LMHead.of(reference, "reference")), data, device,
                               args.chunk_size, kernel="triton")
    step()  # warm-up
    counter = _Counter()
    fused.sweep = counter.inside("sweep", sweep.sweep)
    triton_chunk.chunk_stats = counter.inside("kernel", triton_chunk.chunk_stats)
    triton_chunk.chunk_grad = counter.inside("kernel", triton_chunk.chunk_grad)
    policy.zero_grad(set_to_none=True)
    with counter:
        step()
    chunks = -(-int(data.lengths.sum()) // args.chunk_size)
    launches = {k: v for k, v in counter.sweep_ops.items() if k not in VIEWS}
    print(json.dumps({"fdivctl": str(Path(fdivctl.__file__).parent), "tokens": int(data.lengths.sum()), "chunk_size": args.chunk_size, "chunks": chunks,
                      "launches_per_chunk": sum(launches.values()) / chunks,
                      "ops_per_chunk": sum(counter.sweep_ops.values()) / chunks,
                      "host_syncs_per_step": counter.syncs,
                      "launches": dict(sorted(launches.items(), key=lambda kv: -kv[1]))}))


if __name__ == "__main__":
    main()
