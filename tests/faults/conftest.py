"""Fixtures of the fault tests: a small tmpfs mounted for one test (a full disk, a read-only
file system), where the test has the right to mount one.

Mounting needs root (CAP_SYS_ADMIN); elsewhere, as in CI, a test asking for a tmpfs is
skipped with the reason, and its variant with an injected ``OSError`` runs instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@dataclass(frozen=True)
class Tmpfs:
    """A mounted tmpfs (see :func:`tmpfs`)."""

    path: Path

    def remount(self, options: str) -> None:
        """Remount with ``options`` (``ro``, ``size=64m``)."""
        done = _mount("-o", f"remount,{options}", str(self.path))
        if done.returncode:
            pytest.fail(f"mount -o remount,{options} {self.path}: {done.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int | str], Tmpfs]]:
    """Mounts a tmpfs of the size given (bytes, or ``"64m"``) in the test's temporary folder,
    unmounted at teardown; the test is skipped, saying why, where mounting is not
    permitted."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command here: the injected-error variant stands in")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root: the injected-error variant stands in")
    mounted: list[Path] = []

    def mount(size: int | str) -> Tmpfs:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        done = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where))
        if done.returncode:
            pytest.skip(
                f"mounting a tmpfs is not permitted here ({done.stderr.strip()}): the "
                "injected-error variant stands in"
            )
        mounted.append(where)
        return Tmpfs(where)

    yield mount
    for where in reversed(mounted):
        done = subprocess.run(["umount", str(where)], capture_output=True, check=False)
        if done.returncode:  # still busy: detach it now, freed when the last user goes
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
