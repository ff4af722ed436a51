"""The ``hf`` backend: batched ``model.generate`` with left padding.

Per generated token the recorded log-prob is ``log_softmax(logits / T)[y_t]``
from the model's raw logits (before top-k / top-p truncation), i.e. the
log-prob a teacher-forced forward pass of the same model at temperature T
gives; with T = 0 (greedy) it is taken at T = 1.  A logits processor records
it during generation, holding one step's ``[B, V]`` log-probs at a time (not
every step's logits, which would be T·B·V).  A sequence stops at EOS or
when its text contains a stop string; its tokens up to and including the
stopping token are kept (``finish_reason = "stop"``), else ``"length"``: at
``max_new_tokens`` or where prompt + completion fill the model's context
(:func:`~fdivctl.generation.sampling.completion_budgets`; the positions past it
are generated with the batch and dropped, and attention is causal, so what is
kept does not depend on them).
"""

from __future__ import annotations

import logging

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from fdivctl.generation.sampling import Completion, SamplingOptions, completion_budgets
from fdivctl.io.checkpoints import context_length

# transformers warns once the padded batch is wider than the context; each row's own positions (from the attention
# mask) stay within its budget, so the warning is about tokens this backend drops
logging.getLogger("transformers.generation.stopping_criteria").addFilter(
    lambda record: "exceeded the model's predefined maximum length" not in record.getMessage())


class SampledLogprobs(LogitsProcessor):
    """Records ``log_softmax(raw / T)`` of each sampled token; leaves the scores unchanged.

    At step t it keeps the step's log-probs; at step t+1 ``input_ids`` ends with
    the token sampled at t, which it looks up.  :meth:`finish` takes the last one.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, tokens[:, None]).squeeze(-1))

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """``[B, steps]`` log-probs, given the final sequences."""
        self._take(sequences[:, -1])
        self.previous = None
        return torch.stack(self.steps, dim=1) if self.steps else sequences.new_zeros((len(sequences), 0), dtype=torch.float)


class HFGenerator:
    def __init__(self, model, tokenizer, context: int | None = None):
        """``context`` bounds prompt + completion (default: the model's own, from its config)."""
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.context = context or context_length(model.config)

    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the model's weights with ``state_dict`` (its own parameter names; every one of them)."""
        self.model.load_state_dict(state_dict, strict=True)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], opts: SamplingOptions, seed: int) -> list[list[Completion]]:
        """``opts.n`` completions for each prompt (token ids), reproducible for a given ``seed``."""
        device = self.model.device
        budgets = completion_budgets(prompts, opts.max_new_tokens, self.context)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p) :] = 1
        greedy = opts.temperature == 0
        recorder = SampledLogprobs(1.0 if greedy else opts.temperature)
        kwargs = dict(
            do_sample=not greedy,
            max_new_tokens=max(budgets),
            num_return_sequences=opts.n,
            logits_processor=LogitsProcessorList([recorder]),
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
        )
        if not greedy:
            kwargs.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k or None)
        if opts.stop:
            kwargs.update(stop_strings=opts.stop, tokenizer=self.tokenizer)
        torch.manual_seed(seed)
        sequences = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        new_tokens = sequences[:, width:]
        logprobs = recorder.finish(sequences).cpu()
        completions = [self._completion(new_tokens[i, : budgets[i // opts.n]].tolist(), logprobs[i].tolist(), opts)
                       for i in range(len(new_tokens))]
        return [completions[i * opts.n : (i + 1) * opts.n] for i in range(len(prompts))]

    def _completion(self, tokens: list[int], logprobs: list[float], opts: SamplingOptions) -> Completion:
        end, reason = len(tokens), "length"
        for t, token in enumerate(tokens):
            if token in self.eos_ids:
                end, reason = t + 1, "stop"
                break
            if opts.stop and any(s in self.tokenizer.decode(tokens[: t + 1]) for s in opts.stop):
                end, reason = t + 1, "stop"
                break
        kept = tokens[:end]
        return Completion(kept, logprobs[:end], self.tokenizer.decode(kept, skip_special_tokens=True), reason)
