"""Generated tokens/s of the hf and vllm rollout backends, side by side in one run.

Same model, prompts (token ids) and sampling parameters for both.  Each
backend's generator (the one the ``rollout`` stage uses) is built once, warmed
up on one batch, then timed over all batches; model load and engine start are
reported apart (``startup_s``), not in the rate.  Prints one JSON object per
backend (``backend``, ``samples``, ``tokens``, ``seconds``, ``tokens_per_s``,
``startup_s``) and then one with ``ratio_vllm_over_hf``.  A backend that
cannot run here is reported with its error instead.

    python bench/rollout.py                                   # CPU, tiny model (hidden 128)
    python bench/rollout.py --device cuda --hidden 896 --layers 24 --backends hf
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from fdivctl import tiny
from fdivctl.errors import UserError
from fdivctl.generation.hf import HFGenerator
from fdivctl.generation.sampling import SamplingOptions
from fdivctl.generation.vllm_backend import VLLMGenerator
from fdivctl.io.checkpoints import load_causal_lm


def build(backend: str, model_dir: Path, tokenizer, dtype: str, device: str):
    if backend == "vllm":
        return VLLMGenerator(model_dir, tokenizer, dtype)
    return HFGenerator(load_causal_lm(model_dir, dtype, device), tokenizer)


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
        loaded = AutoTokenizer.from_pretrained(tmp / "model")
        lines = tiny.corpus(args.prompts, seed=1)
        prompts = [loaded(line.split(". The")[0] + ".")["input_ids"] for line in lines]
        batches = [prompts[b : b + args.batch_size] for b in range(0, len(prompts), args.batch_size)]
        sampling = SamplingOptions(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0)
        results = {}
        for backend in args.backends.split(","):
            try:
                start = time.perf_counter()
                generator = build(backend, tmp / "model", loaded, args.dtype, args.device)
                generator.generate(batches[0], sampling, seed=0)
                startup = time.perf_counter() - start
            except UserError as err:
                print(json.dumps({"backend": backend, "error": str(err)}), flush=True)
                continue
            start = time.perf_counter()
            outputs = [c for b, batch in enumerate(batches) for per in generator.generate(batch, sampling, b) for c in per]
            seconds = time.perf_counter() - start
            tokens = sum(len(c.token_ids) for c in outputs)
            results[backend] = {
                "backend": backend,
                "device": args.device,
                "model": {"hidden": args.hidden, "layers": args.layers},
                "samples": len(outputs),
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "startup_s": startup,
            }
            del generator
            print(json.dumps(results[backend]), flush=True)
        if "hf" in results and "vllm" in results:
            ratio = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
            print(json.dumps({"ratio_vllm_over_hf": ratio}), flush=True)


if __name__ == "__main__":
    main()
