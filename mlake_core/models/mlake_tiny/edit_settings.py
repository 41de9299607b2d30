"""The edit-method settings a trained mlake-tiny takes (:func:`recommended_edit_settings`).

The settings themselves are data on each variant (:attr:`.variants.Variant.edit_settings`);
this module reads a model folder's recorded config to pick them and fill in its edit site.
"""

from __future__ import annotations

import os

from mlake_core.models.mlake_tiny.variants import variant_of
from mlake_core.models.mlake_tiny_metadata import read_metadata


def recommended_edit_settings(path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """The edit-method settings the mlake-tiny model in ``path`` takes, as ``{method: {field:
    value}}`` in ``--set`` form.

    ``mlake edit transfer`` applies them under ``--layer`` and ``--set``, the pipeline under
    the fields its config sets.  The default mlake-tiny (and any model trained without
    interchange) takes FT at layer 0 with ``lr`` 0.01, 100 steps and ``max_rel_norm`` 0.3;
    a model trained with interchange (mlake-tiny-editable) takes ROME, MEMIT and FT at the
    block where it reads its subject (see :data:`.variants.VARIANTS`).

    Returns:
        The settings; ``{}`` for a folder that is not a mlake-tiny (no ``mlake_tiny.json``)
        or whose metadata records no training config.
    """
    meta = read_metadata(path)
    config = (meta or {}).get("config")
    if not config:
        return {}
    site = int(config.get("route_layer", 2)) - 1
    where = {"site": str(site), "through_site": f"0-{site}" if site else "0"}
    return {
        method: {name: value.format(**where) for name, value in settings.items()}
        for method, settings in variant_of(config).edit_settings.items()
    }
