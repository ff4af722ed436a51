"""The divergence registry (METHODS.md §1).

>>> from fdivctl import divergences
>>> divergences.names()
['fkl', 'rkl', 'jsd', 'tv', 'hellinger', 'alpha', 'skl', 'srkl']
>>> jsd = divergences.get("jsd", beta=0.5)
>>> per_token = jsd.token_divergence(student_logits, teacher_logits)   # doctest: +SKIP
"""

from fdivctl.divergences.base import Divergence
from fdivctl.divergences.estimators import estimator_names, sample_divergence, sample_kl
from fdivctl.divergences.registry import get, names, param_defaults, parse

__all__ = [
    "Divergence",
    "estimator_names",
    "get",
    "names",
    "param_defaults",
    "parse",
    "sample_divergence",
    "sample_kl",
]
