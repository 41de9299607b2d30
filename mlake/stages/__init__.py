"""Stages: an analysis bound to the results store (one module per stage)."""
