"""Weights and controllers that change over training (METHODS.md; DESIGN.md layer ``schedules/``)."""
