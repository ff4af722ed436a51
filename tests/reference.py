"""Brute-force float64 references, written from the textbook formulas on probabilities.

Independent of fdivctl's log-space implementation on purpose: the tests
compare the two.
"""

from __future__ import annotations

import torch


def reference_divergence(name: str, params: dict, log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """D(q‖p) per row from float64 log-probabilities over the last dimension."""
    q, p = log_q.exp(), log_p.exp()

    def kl(a, b):
        return (a * (a.log() - b.log())).nansum(-1)

    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        b = params.get("beta", 0.5)
        m = b * p + (1 - b) * q
        return b * kl(p, m) + (1 - b) * kl(q, m)
    if name == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "hellinger":
        return 1 - (p * q).sqrt().sum(-1)
    if name == "alpha":
        a = params.get("alpha", 0.5)
        return (1 - (p**a * q ** (1 - a)).sum(-1)) / (a * (1 - a))
    if name == "skl":
        lam = params.get("lam", 0.1)
        return kl(p, lam * p + (1 - lam) * q)
    if name == "srkl":
        lam = params.get("lam", 0.1)
        return kl(q, lam * q + (1 - lam) * p)
    raise KeyError(name)


def reference_full(name, params, student_logits, target_logits, temperature=1.0):
    ls = torch.log_softmax(student_logits.double() / temperature, -1)
    lt = torch.log_softmax(target_logits.double() / temperature, -1)
    return reference_divergence(name, params, ls, lt)


def reference_topk(name, params, student_logits, ids, logprobs, log_tail, tail, temperature=1.0):
    """The k+1-bucket / renormalized / ignore forms, by explicit probabilities."""
    log_q = torch.log_softmax(student_logits.double() / temperature, -1)
    q_top = log_q.gather(-1, ids.long()).exp()
    p_top = logprobs.double().exp()
    if tail == "tail":
        q = torch.cat((q_top, (1 - q_top.sum(-1, keepdim=True)).clamp_min(0)), -1)
        p = torch.cat((p_top, log_tail.double().exp().unsqueeze(-1)), -1)
    elif tail == "renormalize":
        q = q_top / q_top.sum(-1, keepdim=True)
        p = p_top / p_top.sum(-1, keepdim=True)
    else:
        # "ignore": the divergence's summands p f(q/p) over the k ids, unnormalized.
        from fdivctl import divergences

        d = divergences.get(name, **params)
        return d.pointwise(q_top.log(), p_top.log()).sum(-1)
    return reference_divergence(name, params, q.log(), p.log())


# Every registry entry with a non-default parameter where it has one.
ENTRIES = [
    ("fkl", {}),
    ("rkl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.2}),
    ("tv", {}),
    ("hellinger", {}),
    ("alpha", {"alpha": 0.3}),
    ("skl", {"lam": 0.1}),
    ("srkl", {"lam": 0.25}),
]


def entry_id(entry) -> str:
    name, params = entry
    return name + "".join(f"-{k}{v}" for k, v in params.items())
