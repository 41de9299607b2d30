"""Neuron attribution per language: which MLP neurons and attention heads carry a fact in
each language, which are specific to one language and which are shared (issue 6).

* :mod:`~analysis.neurons.attribution` -- the registry of attribution methods (each declaring
  its scope and needs); per-prompt methods: integrated gradients, attribution patching;
  important sets.
* :mod:`~analysis.neurons.activation` -- streamed activation statistics per language and
  language-specific neurons by activation-probability entropy (LAPE, Tang et al. 2024).
* :mod:`~analysis.neurons.sharing` -- overlap of languages' sets, unit classification.
* :mod:`~analysis.neurons.ablation` -- ablation checks and the ablation matrix.
* :mod:`~analysis.neurons.config` -- the neuron stage's settings and its saved result.

Importing this package registers the built-in methods (``ig``, ``atp``, ``lape``).
"""

from analysis.neurons import activation, attribution  # noqa: F401  (register the built-ins)
