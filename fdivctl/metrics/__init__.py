"""Evaluation metrics on scored samples: pass@k, maj@k, diversity, calibration, forgetting."""
