"""Stages: an analysis bound to the results store, one module per stage.

Every stage takes a :class:`~mlake.stages.context.StageContext` (model, data, facts,
languages, template, results store, run settings), its own config and the results of the
stages it reads; opens its run folder keyed by everything that determines the result;
computes what is not saved yet (fact by fact, so a stopped run resumes) with a pure analysis
from :mod:`analysis` or :mod:`probes`; and returns the result object.

* :mod:`~mlake.stages.context` -- the context, result keys, run folders.
* :mod:`~mlake.stages.knowledge`, :mod:`~mlake.stages.tracing`,
  :mod:`~mlake.stages.transfer`, :mod:`~mlake.stages.neurons`, :mod:`~mlake.stages.probes`
  -- the per-model stages.
* :mod:`~mlake.stages.relate` -- the relation stage, which reads the others' saved runs.
"""
