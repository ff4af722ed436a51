"""Verifiers: completion (+ its row) → reward, correct, verdict."""
