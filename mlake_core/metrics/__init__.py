"""Measurements on models: what a model knows (:mod:`~mlake_core.metrics.knowledge`)."""
