"""mlake core: the MLaKE data layer, model adapters, metrics, editing and the results store.

The package is organised one concept per module (see ``DESIGN.md`` in the shared folder):
``mlake_core.data`` turns the MLaKE json files into :class:`~mlake_core.data.Fact` objects with
one :class:`~mlake_core.data.FactView` per language; later stages (models, analyses, probes,
figures) consume those views.
"""

__version__ = "0.1.0"
