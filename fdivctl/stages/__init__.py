"""Stages: each command's work as an importable function (the CLI only wires options)."""
