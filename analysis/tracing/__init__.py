"""Causal tracing (Meng et al. 2022), per language.

* :mod:`~analysis.tracing.causal` -- corrupt the subject, restore one site at a time, read the
  answer's probability (:func:`~analysis.tracing.causal.trace_prompt`, :class:`FactTrace`).
* :mod:`~analysis.tracing.summary` -- effect maps by position class, per-language summaries,
  profile similarity and the recommended edit layer (:class:`TracingResult`).
"""
