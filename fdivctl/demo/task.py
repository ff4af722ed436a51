"""``digitsum``: write a target as a sum of a given number of digits — a verifiable task with many answers.

Prompt ``"3 digits sum 14:"``, a correct completion any ``a+b+c`` with digits
1–9 summing to 14 (``5+4+5``, ``9+1+4``, …: 60 ordered answers).  Two-digit
prompts have up to 9 answers, three-digit ones up to 61 — so pass@k and the
number of distinct correct answers can grow with k, and a policy that
collapses onto a few answers shows it.

Split, deterministic: in domain are the targets the policy is trained on;
out of domain are held-out targets of the same form (every third target of
each length), never seen in SFT or RL — generalisation to them is what a
narrowed policy loses first.  Rows carry ``terms``, ``target``, ``answer``
(one example answer, for reference) and ``domain`` (``in`` / ``out``).
"""

from __future__ import annotations

import itertools
import random
import re

TERMS = (2, 3)
_FORM = re.compile(r"^\s*([1-9](?:\s*\+\s*[1-9])*)\s*$")


def prompt_text(terms: int, target: int) -> str:
    return f"{terms} digits sum {target}:"


def solutions(terms: int, target: int) -> list[str]:
    """Every correct answer, as ``a+b(+c)`` text."""
    return ["+".join(map(str, combo)) for combo in itertools.product(range(1, 10), repeat=terms)
            if sum(combo) == target]


def prompts() -> list[dict]:
    """All prompts of the task, with their domain (held-out targets: every fifth per length, ``out``)."""
    rows = []
    for terms in TERMS:
        targets = [t for t in range(terms, 9 * terms + 1) if len(solutions(terms, t)) >= 2]
        for position, target in enumerate(targets):
            rows.append({
                "prompt_id": f"d{terms}-t{target}",
                "prompt": prompt_text(terms, target),
                "terms": terms,
                "target": target,
                "answer": solutions(terms, target)[0],
                "domain": "out" if position % 3 == 1 else "in",
            })
    return rows


def sft_rows(prompt_rows: list[dict], per_prompt: int, eos: str, seed: int) -> list[dict]:
    """Diverse correct demonstrations: ``per_prompt`` answers drawn uniformly from each prompt's solutions."""
    rng = random.Random(seed)
    rows = []
    for row in prompt_rows:
        answers = solutions(row["terms"], row["target"])
        for i in range(per_prompt):
            rows.append({"prompt_id": row["prompt_id"], "sample_idx": i, "prompt": row["prompt"],
                         "completion": " " + rng.choice(answers) + eos})
    return rows


def verify(completion: str, row: dict) -> float:
    """1.0 when ``completion`` is ``terms`` digits 1–9 joined by ``+`` that sum to ``target``, else 0.0.

    A ``python:fdivctl.demo.task:verify`` verifier for ``fdivctl score``.
    """
    match = _FORM.match(completion or "")
    if not match:
        return 0.0
    digits = [int(d) for d in re.findall(r"[1-9]", match.group(1))]
    return float(len(digits) == int(row["terms"]) and sum(digits) == int(row["target"]))
