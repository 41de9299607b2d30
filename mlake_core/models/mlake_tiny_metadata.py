"""The metadata file of a mlake-tiny folder (``mlake_tiny.json``) and its reader.

Its own module, below both :mod:`mlake_core.models.loading` and the
:mod:`mlake_core.models.mlake_tiny` package: loading reads a trained model's longest training
sequence from it (``max_positions``) while training builds models with loading's helpers, so
neither may import the other for it.  The file is written by
:func:`mlake_core.models.mlake_tiny.train.train_tiny`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlake_core.models.prompting import PromptTemplate, get_template

#: Name of the metadata file written next to the weights.
METADATA_FILE = "mlake_tiny.json"


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``mlake_tiny.json`` of a model folder, or ``None`` for other models."""
    meta = Path(path) / METADATA_FILE
    if not meta.is_file():
        return None
    with meta.open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def resolve_template(model: str | os.PathLike[str]) -> PromptTemplate | None:
    """The prompt template a model was trained with (mlake-tiny folders), else ``None``."""
    meta = read_metadata(model) if Path(model).is_dir() else None
    if not meta:
        return None
    return get_template(str(meta["config"]["template"]))
