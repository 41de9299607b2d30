"""Where the MLaKE data lives, which releases exist, and how to fetch them.

The data directory is resolved in this order:

1. an explicit ``--data-dir`` (``data_dir`` argument);
2. the ``MLAKE_DATA`` environment variable;
3. ``../shared/mlake`` next to the repository root (the folder that holds ``pyproject.toml``),
   then ``./mlake_data`` under the current directory (where ``mlake data fetch`` writes by
   default).

The data directory holds one sub-folder per release (``v2024-11``, ``v2024-04``), each with the
upstream ``dataset/`` tree of the public repository Hi-archers/MLaKE at a fixed commit.

A folder in a release's layout may hold other languages too (``single_hop/es_qa.json`` and
``multi_hop/{old,new}_es_qa.json``): the languages are those whose files are present
(:meth:`Release.languages`).  Such a folder is other data than the release as published
(its content hash differs), which :func:`data_suffix` and run keys then name.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlake_core.errors import ConfigError, DataError
from mlake_core.languages import LANGUAGES

ENV_VAR = "MLAKE_DATA"
UPSTREAM_REPO = "Hi-archers/MLaKE"


@dataclass(frozen=True)
class Release:
    """One published release of MLaKE and its file layout (relative to ``dataset/``), and
    the content hash of its files as published (:func:`content_sha256`): run keys name the
    content only when a copy differs from it (an edited copy never reuses the published
    data's results, and runs on the published data keep their keys)."""

    name: str
    commit: str
    single_hop_qa: str  # with {lang}
    single_hop_mcqa: str | None
    multi_hop_qa: str  # with {kind} in {old,new} and {lang}
    multi_hop_mcqa: str | None
    published_sha256: str = ""

    @property
    def patterns(self) -> tuple[str, ...]:
        """The release's file patterns (with ``{lang}``, and ``{kind}`` for multi-hop)."""
        return tuple(
            p
            for p in (
                self.single_hop_qa,
                self.single_hop_mcqa,
                self.multi_hop_qa,
                self.multi_hop_mcqa,
            )
            if p
        )

    def languages(self, base: Path) -> tuple[str, ...]:
        """The languages with at least one file of the release's layout under ``base``
        (its ``dataset/`` folder): MLaKE's five first, in matrix order, then any other
        well-formed code (:data:`~mlake_core.languages.CODE_PATTERN`) in alphabetical
        order.  A language present must have all its files; loading checks that."""
        found: set[str] = set()
        for pattern in self.patterns:
            glob = pattern.replace("{kind}", "*").replace("{lang}", "*")
            regex = re.compile(
                re.escape(pattern)
                .replace(r"\{kind\}", "(?:old|new)")
                .replace(r"\{lang\}", r"(?P<lang>[a-z]{2,3}(?:-[A-Za-z0-9]+)?)")
            )
            for path in base.glob(glob):
                m = regex.fullmatch(path.relative_to(base).as_posix())
                if m and path.is_file():
                    found.add(m["lang"])
        five = [lang for lang in LANGUAGES if lang in found]
        return (*five, *sorted(found - set(five)))

    def files(self, base: Path, langs: Sequence[str] | None = None) -> list[Path]:
        """The release's files under ``base`` (its ``dataset/`` folder) that exist, in a
        fixed order: every language's single-hop and multi-hop files, pattern by pattern,
        language by language (``langs``; default the languages present,
        :meth:`languages`), so the published releases hash as published."""
        out: list[Path] = []
        for pattern in (
            self.single_hop_qa,
            self.single_hop_mcqa,
            self.multi_hop_qa,
            self.multi_hop_mcqa,
        ):
            for lang in self.languages(base) if langs is None else langs:
                for kind in ("old", "new"):
                    path = base / pattern.format(lang=lang, kind=kind) if pattern else None
                    if path is not None and path.is_file() and path not in out:
                        out.append(path)
        return out


RELEASES: dict[str, Release] = {
    "v2024-11": Release(
        name="v2024-11",
        commit="40b6a3c",
        single_hop_qa="single_hop/{lang}_qa.json",
        single_hop_mcqa=None,
        multi_hop_qa="multi_hop/{kind}_{lang}_qa.json",
        multi_hop_mcqa=None,
        published_sha256="3ad3b25a59411730a2a1b5afe47c08acbdb6d22e3313c95cea44b0fc289180ad",
    ),
    "v2024-04": Release(
        name="v2024-04",
        commit="26c167d",
        single_hop_qa="single_hop/qa/{lang}_qa.json",
        single_hop_mcqa="single_hop/mcqa/{lang}_mcqa.json",
        multi_hop_qa="multi_hop/qa/{kind}_{lang}_qa.json",
        multi_hop_mcqa="multi_hop/mcqa/{kind}_{lang}_mcqa.json",
        published_sha256="cde373b4dc758d63b447174bcf1b63edf294cbe0256954018e77b843f53d9211",
    ),
}
DEFAULT_VERSION = "v2024-11"


def repo_root() -> Path:
    """The repository root (the folder holding ``pyproject.toml``) of this checkout."""
    return Path(__file__).resolve().parents[2]


def default_candidates() -> list[Path]:
    """Default data folders, in the order they are tried."""
    return [repo_root().parent / "shared" / "mlake", Path.cwd() / "mlake_data"]


def content_sha256(base: Path, release: Release) -> str:
    """SHA-256 over the release's files under ``base`` (each one's path relative to ``base``
    and its bytes): what a run's results depend on."""
    digest = hashlib.sha256()
    for path in release.files(base):
        digest.update(path.relative_to(base).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def data_suffix(data_dir: str | os.PathLike[str] | None, version: str) -> str:
    """``""`` when the data under ``data_dir`` is release ``version`` as published, else a
    short content tag (``-data1a2b3c4d``) for names of things built from it (a trained
    mlake-tiny): an edited copy never reuses what was built from other data."""
    release = get_release(version)
    digest = content_sha256(release_dir(resolve_data_dir(data_dir), version), release)
    return "" if digest == release.published_sha256 else f"-data{digest[:8]}"


def folder_languages(
    data_dir: str | os.PathLike[str] | None, version: str
) -> tuple[str, ...] | None:
    """The languages of release ``version``'s folder under ``data_dir``
    (:meth:`Release.languages`), or ``None`` when the folder is not found or holds none
    (loading it then reports why)."""
    try:
        found = get_release(version).languages(release_dir(resolve_data_dir(data_dir), version))
    except DataError:
        return None
    return found or None


def get_release(version: str) -> Release:
    """Look a release up by name, with an error listing the known ones."""
    try:
        return RELEASES[version]
    except KeyError:
        raise ConfigError(
            f"unknown MLaKE version {version!r}; known versions: {', '.join(RELEASES)}"
        ) from None


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Find the MLaKE data directory (see the module docstring for the order).

    Raises:
        DataError: when an explicitly given folder does not exist, or nothing is found.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"--data-dir {path}: no such directory")
        return path
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"{ENV_VAR}={env}: no such directory")
        return path
    for cand in default_candidates():
        if cand.is_dir():
            return cand
    tried = ", ".join(str(c) for c in default_candidates())
    raise DataError(
        f"MLaKE data not found (tried {tried}). Pass --data-dir, set {ENV_VAR}, "
        "or download it with `mlake data fetch`."
    )


def release_dir(root: Path, version: str) -> Path:
    """The ``dataset/`` folder of one release under the data directory."""
    get_release(version)
    path = root / version / "dataset"
    if not path.is_dir():
        raise DataError(
            f"{path}: release {version} not found under data directory {root} "
            f"(expected {root}/{version}/dataset/; `mlake data fetch --version {version}` "
            "downloads it)"
        )
    return path


def archive_url(release: Release) -> str:
    """The public download address of a release's source archive."""
    return f"https://codeload.github.com/{UPSTREAM_REPO}/tar.gz/{release.commit}"


def fetch_release(version: str, dest: Path, timeout: float = 60.0, force: bool = False) -> Path:
    """Download one release from the public repository into ``dest/<version>/dataset``.

    The archive of the pinned commit is downloaded to memory, its ``dataset/`` tree is
    extracted into a temporary folder and renamed into place, so an interrupted download
    never leaves a half-written release behind.

    Raises:
        DataError: on network failure (with the address tried) or an unexpected archive.
    """
    release = get_release(version)
    target = dest / version / "dataset"
    if target.is_dir() and not force:
        return target
    url = archive_url(release)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            payload = resp.read()
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as err:
        raise DataError(
            f"could not download MLaKE {version} from {url}: {err}. Without internet, copy the "
            f"release's dataset/ folder to {target} or point {ENV_VAR} at a folder that has it."
        ) from None
    created = not (dest / version).exists()
    (dest / version).mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=dest / version) as tmp:
            try:
                with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
                    members = [m for m in tar.getmembers() if "/dataset/" in f"{m.name}/"]
                    if not members:
                        raise DataError(f"{url}: archive has no dataset/ folder")
                    tar.extractall(tmp, members=members, filter="data")
            except (tarfile.TarError, EOFError, OSError) as err:
                raise DataError(f"{url}: not a valid release archive ({err})") from None
            roots = list(Path(tmp).glob("*/dataset"))
            if len(roots) != 1:
                raise DataError(f"{url}: unexpected archive layout")
            if target.exists():
                shutil.rmtree(target)
            roots[0].rename(target)
    except DataError:
        if created:  # leave no empty release folder behind
            shutil.rmtree(dest / version, ignore_errors=True)
        raise
    return target
