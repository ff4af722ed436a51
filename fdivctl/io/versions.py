"""The versions of fdivctl, Python and the libraries whose numerics decide a run's figures.

The same seeded script can give different models and samples under another torch or transformers (random
initialisation, kernels, sampling code), so every file fdivctl writes records them beside its provenance.  (Not
every difference is theirs: the tiny demo model and tokenizer are bit-identical under transformers 5.19.0 and
5.24.0, checked by sha1 of the state dict and vocabulary.)
"""

from __future__ import annotations

import platform
from functools import cache
from importlib import metadata

from fdivctl import __version__

#: the distributions recorded when installed (vllm and triton only where present)
LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pyarrow", "vllm", "triton")


@cache
def library_versions() -> dict[str, str]:
    """``{"fdivctl": …, "python": …, "torch": …, …}`` of this process, without importing any library."""
    versions = {"fdivctl": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
