"""mlake core, the library (the bottom layer): data, models, metrics, editing methods, the
results store, configs and registries.

* :mod:`mlake_core.data` -- MLaKE files -> :class:`~mlake_core.data.Fact` with one
  :class:`~mlake_core.data.FactView` per language; the one fact selection.
* :mod:`mlake_core.models` -- site tables per architecture, the TransformerLens and nnsight
  backends, loading, mlake-tiny.
* :mod:`mlake_core.metrics` -- what a model knows.
* :mod:`mlake_core.editing` -- editing methods, one module each, registered where defined.
* :mod:`mlake_core.results` -- the results store.
* :mod:`mlake_core.configs` -- the one coercion of settings into config dataclasses;
  :mod:`mlake_core.registry` -- the registry helper.

Nothing here imports the techniques (:mod:`analysis`, :mod:`probes`), the figures or the
application (:mod:`mlake`); ``lint-imports`` checks it.
"""

__version__ = "0.1.0"
