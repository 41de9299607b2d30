"""Provenance recorded with every saved artifact: versions, git commit, stable hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

#: Distributions whose versions are recorded with every artifact.
RECORDED_PACKAGES: tuple[str, ...] = (
    "mlake",
    "torch",
    "transformers",
    "transformer-lens",
    "nnsight",
    "tokenizers",
    "scikit-learn",
    "numpy",
)


def package_versions(names: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (missing distributions are left out)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


@cache
def git_commit() -> str | None:
    """The commit of the mlake checkout in use, with ``+dirty`` when it has local changes.

    ``None`` when mlake is not run from a git checkout.
    """
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short hex digest of a JSON-serialisable object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def provenance() -> dict[str, Any]:
    """Versions and git commit, for a ``meta.json``."""
    return {"versions": package_versions(), "git_commit": git_commit()}
