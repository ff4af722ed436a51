"""Generated tokens/s of the hf and vllm rollout backends, side by side in one run.

Same model, prompts and sampling parameters for both; each backend runs the
real ``rollout`` stage twice (the first run warms up: model load, engine
start, compilation) and the second is timed.  Prints one JSON object per
backend (``backend``, ``samples``, ``tokens``, ``seconds``, ``tokens_per_s``)
and then one with ``ratio_vllm_over_hf``.  A backend that cannot run here is
reported with its error instead.

    python bench/rollout.py                                   # CPU, tiny model (hidden 128)
    python bench/rollout.py --device cuda --hidden 896 --layers 24 --backends hf
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fdivctl import tiny
from fdivctl.errors import UserError
from fdivctl.generation.sampling import SamplingOptions
from fdivctl.stages.rollout import RolloutOptions, run_rollout


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = tiny.train_tokenizer(tmp / "tok")
        tiny.make_model(tmp / "model", tokenizer, hidden=args.hidden, layers=args.layers, vocab_size=args.vocab)
        prompts = tmp / "prompts.parquet"
        lines = tiny.corpus(args.prompts, seed=1)
        pq.write_table(pa.table({"prompt_id": [f"q{i}" for i in range(args.prompts)],
                                 "prompt": [line.split(". The")[0] + "." for line in lines]}), prompts)
        sampling = SamplingOptions(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
        results = {}
        for backend in args.backends.split(","):
            opts = RolloutOptions(sampling=sampling, backend=backend, batch_size=args.batch_size,
                                  dtype=args.dtype, device=args.device)
            try:
                run_rollout(tmp / "model", prompts, tmp / f"warm-{backend}.parquet", opts)
                start = time.perf_counter()
                summary = run_rollout(tmp / "model", prompts, tmp / f"{backend}.parquet", opts)
                seconds = time.perf_counter() - start
            except UserError as err:
                print(json.dumps({"backend": backend, "error": str(err)}), flush=True)
                continue
            results[backend] = {
                "backend": backend,
                "device": args.device,
                "model": {"hidden": args.hidden, "layers": args.layers},
                "samples": summary["samples_generated"],
                "tokens": summary["tokens_generated"],
                "seconds": seconds,
                "tokens_per_s": summary["tokens_generated"] / seconds,
            }
            print(json.dumps(results[backend]), flush=True)
        if "hf" in results and "vllm" in results:
            ratio = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
            print(json.dumps({"ratio_vllm_over_hf": ratio}), flush=True)


if __name__ == "__main__":
    main()
