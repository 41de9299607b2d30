"""A pipeline run folder's manifest: per stage its status, times and run folders."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import field
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class StageRecord:
    """One stage's entry in ``manifest.json``."""

    status: str  # complete, skipped, failed, interrupted, running
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process's CPU time (all threads): the cost on a quiet machine
    runs: dict[str, str] = field(default_factory=dict)  # label -> run folder
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, {})}


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", "utf-8")
    tmp.replace(path)


def read_manifest(out: str | os.PathLike[str]) -> dict[str, Any]:
    """A pipeline run folder's ``manifest.json``.

    Raises:
        DataError: no manifest there (not a pipeline run folder).
    """
    from mlake_core.errors import DataError

    path = Path(out) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{out}: no manifest.json; give a run folder of `mlake pipeline`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON ({err})") from None
    for entry in (manifest.get("stages") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("runs"), dict):
            entry["runs"] = {k: _locate(v, Path(out)) for k, v in entry["runs"].items()}
    return manifest


def _locate(run: str, out: Path) -> str:
    """A run folder named in the manifest, found from the working directory now.

    The pipeline names its runs as it opened them: relative to the directory it ran in
    (``runs/pipeline/<name>/store/...``).  Read from another directory (``mlake figures
    /elsewhere/runs/pipeline/<name>``), such a path is found under one of the run folder's
    ancestors (the directory the pipeline ran in); a path that exists as given, or that is
    found nowhere, is returned as it is.
    """
    given = Path(run)
    if given.is_absolute() or given.exists():
        return run
    for base in out.resolve().parents:
        if (base / given).exists():
            return str(base / given)
    return run
