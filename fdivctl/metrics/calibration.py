"""Expected calibration error (Guo et al. 2017, "On Calibration of Modern Neural
Networks", arXiv 1706.04599, Eq. 3): ``Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|`` over
equal-width confidence bins (f-DPO reports it)."""

from __future__ import annotations

import numpy as np


def expected_calibration_error(confidence, correct, bins: int = 10) -> float:
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return 0.0
    if (conf < 0).any() or (conf > 1).any() or np.isnan(conf).any():
        raise ValueError("confidence must lie in [0, 1]")
    index = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            ece += in_bin.mean() * abs(hit[in_bin].mean() - conf[in_bin].mean())
    return float(ece)
