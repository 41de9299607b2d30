"""The techniques: pure analyses, one module (or package) per technique.

* :mod:`analysis.tracing` -- causal tracing (Meng et al. 2022) and its per-language summary.
* :mod:`analysis.neurons` -- neuron attribution (IG, AtP, LAPE), important sets, sharing
  between languages, ablation.
* :mod:`analysis.transfer` -- evaluation of an edit in every language (efficacy, transfer,
  generalization, locality, portability) and the saved transfer rows.
* :mod:`analysis.relate` -- the statistics relating sharing to transfer;
  :mod:`analysis.relate_result` its result.

Each analysis takes an adapter, inputs, a config (and an explicit generator) and returns a
result object that saves and loads itself; no printing, plotting, global seeding or run-folder
bookkeeping happens here (the stages in :mod:`mlake.stages` do that).  This layer imports only
the library (:mod:`mlake_core`).
"""
