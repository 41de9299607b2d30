"""Load a Hugging Face causal LM behind a :class:`~mlake_core.models.adapter.ModelAdapter`.

:func:`load_adapter` takes a local folder, a hub id, a packaged model's name
(``gemma-3-270m``) or a GGUF file (the last two are dequantized once into a folder in
mlake's cache, :mod:`~mlake_core.models.gguf_weights`, then loaded like any folder), checks
that the architecture is one of :data:`~mlake_core.models.sites.ARCHITECTURES`, loads
safetensors weights (never pickles) with eager attention (TransformerLens needs it for
attention patterns; nnsight gets the same so both backends compute the same numbers), reads
the BOS policy off the tokenizer and wraps the model in the requested backend.  Every
expected failure -- a missing folder, a hub id that is not in the local cache while offline,
an unsupported architecture, a bad option -- is a :class:`~mlake_core.errors.ConfigError`
whose message names the option or file and what to do (a truncated GGUF file: a
:class:`~mlake_core.errors.DataError`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mlake_core.errors import ConfigError
from mlake_core.models.adapter import BaseAdapter, BosPolicy, ModelInfo, architecture_facts
from mlake_core.models.gguf_weights import PACKAGED_MODELS, resolve_gguf
from mlake_core.models.mlake_tiny_metadata import read_metadata
from mlake_core.models.sites import ARCHITECTURES, ArchitectureSpec, get_spec
from mlake_core.provenance import package_versions

#: Backends accepted by ``load_adapter(backend=...)`` / ``--backend``.
BACKENDS: tuple[str, ...] = ("tlens", "nnsight")

#: Accepted ``dtype`` names (``--dtype``) and the torch dtype of each.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_BACKEND_PACKAGES = {"tlens": "transformer-lens", "nnsight": "nnsight"}


def resolve_device(device: str) -> str:
    """Turn ``--device`` into a torch device string.

    ``"auto"`` is ``"cuda"`` when CUDA is available, else ``"cpu"``.

    Raises:
        ConfigError: for an unparsable device, or CUDA asked for but not available.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"--device {device!r} is not a torch device ({err})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: CUDA is not available; use --device cpu or auto")
    return str(parsed)


def resolve_dtype(dtype: str) -> torch.dtype:
    """Turn ``--dtype`` into a torch dtype.

    Raises:
        ConfigError: for a name not in :data:`DTYPES`.
    """
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(
            f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}"
        ) from None


#: The share of the first GPU's free memory the weights may take before ``--device auto``
#: spreads the model over several GPUs (the rest is left to activations).
WEIGHTS_SHARE = 0.8


def device_map_needed(
    weight_bytes: int, gpu_free: Sequence[int], share: float = WEIGHTS_SHARE
) -> bool:
    """Whether ``--device auto`` loads the model with ``device_map="auto"`` (accelerate puts
    consecutive layers on consecutive GPUs): there are several GPUs and the weights take more
    than ``share`` of the first one's free memory (``gpu_free``: free bytes per GPU)."""
    return len(gpu_free) >= 2 and weight_bytes > share * gpu_free[0]


def weight_bytes(config: Any, dtype: torch.dtype) -> int:
    """The bytes of a model's weights in ``dtype`` (a tied tensor counted once), from its
    config: the model is built on the ``meta`` device, no weight is read."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    return int(n_params) * torch.empty((), dtype=dtype).element_size()


def _auto_device_map(config: Any, dtype: torch.dtype) -> str | None:
    """``"auto"`` when :func:`device_map_needed` says so for this machine's GPUs, else
    ``None`` (one device)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    from mlake_core.models.adapter import free_bytes

    free = [free_bytes(torch.device("cuda", i)) or 0 for i in range(torch.cuda.device_count())]
    return "auto" if device_map_needed(weight_bytes(config, dtype), free) else None


def input_device(hf_model: Any) -> torch.device:
    """Where a model's inputs go: the token embedding's device (the first device of a device
    map; for an embedding accelerate keeps offloaded, its hook's execution device)."""
    embed = hf_model.get_input_embeddings()
    execution = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
    if execution is not None:
        return torch.device(f"cuda:{execution}" if isinstance(execution, int) else execution)
    return embed.weight.device


@contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """Silence transformers' progress bars ("Loading weights") for the duration of a block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return value.strip().lower() in {"1", "true", "yes", "on"}


#: Seconds to wait for the hub's (or the proxy's) TCP connection before calling it unreachable.
HUB_CONNECT_TIMEOUT = 3.0


def hub_unreachable(timeout: float = HUB_CONNECT_TIMEOUT) -> str | None:
    """Why the Hugging Face hub cannot be reached from here (``None``: it can).

    One TCP connection to the hub's host (``HF_ENDPOINT``), or to the HTTPS proxy the
    environment names, with a short timeout.  Without it an unknown or uncached hub id spent
    about 30 s in HTTP retries on a machine with no network before its error.
    """
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    default_ports = {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080, "socks4": 1080}
    try:
        hub = urlsplit(constants.ENDPOINT)
        host = hub.hostname or ""
        port = hub.port or default_ports.get(hub.scheme, 443)
        proxies = urllib.request.getproxies()
        proxy = proxies.get(hub.scheme or "https") or proxies.get("all")
        if proxy and not urllib.request.proxy_bypass(host):
            target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            host = target.hostname or ""
            port = target.port or default_ports.get(target.scheme, 80)
    except ValueError:  # a malformed endpoint or proxy: let the download itself report it
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        what = err.strerror or str(err) or type(err).__name__
        return f"{host}:{port}: {what}"


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _how_to_provide(model: str) -> str:
    return (
        "Provide the weights in one of two ways: (1) pass --model /path/to/folder holding "
        "config.json, *.safetensors and the tokenizer files (on a machine with network access: "
        f"`hf download {model} --local-dir FOLDER`); or (2) fill the Hugging Face "
        f"cache (set HF_HOME to a folder whose hub/ holds models--{model.replace('/', '--')}; "
        f"the cache in use is {_hf_cache_dir()}) and set HF_HUB_OFFLINE=1."
    )


def _resolve_source(model: str) -> tuple[str, bool]:
    """``(what to pass to from_pretrained, is a local folder)``."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"--model folder {str(path)!r} has no config.json; it must hold a Hugging Face "
                "checkpoint (config.json, *.safetensors, tokenizer files)"
            )
        return str(path), True
    if path.exists():
        raise ConfigError(
            f"--model {model!r} is a file but not a GGUF file; pass the folder that holds "
            "config.json, or a .gguf file"
        )
    if model.startswith(("/", ".", "~")) or model.count("/") > 1 or not model.strip():
        raise ConfigError(
            f"--model folder {model!r} does not exist (packaged models: "
            f"{', '.join(PACKAGED_MODELS.names())})"
        )
    return model, False


def _load_config(
    source: str,
    model: str,
    *,
    is_local: bool,
    revision: str | None,
    local_files_only: bool,
    trust_remote_code: bool,
    unreachable: str | None = None,
) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source,
            revision=revision,
            local_files_only=local_files_only,
            trust_remote_code=trust_remote_code,
        )
    except OSError as err:
        if is_local:
            raise ConfigError(f"cannot read config.json of --model {model!r}: {err}") from None
        if unreachable:
            why = f"the hub is unreachable ({unreachable}), so nothing can be downloaded"
        elif local_files_only:
            why = "running offline (HF_HUB_OFFLINE=1), so nothing is downloaded"
        else:
            why = (
                "could not download it from the hub (no network, or no such repository or revision)"
            )
        raise ConfigError(
            f"--model {model!r} is not a local folder and not in the local Hugging Face cache; "
            f"{why}. {_how_to_provide(model)}"
        ) from None
    except ValueError as err:
        hint = (
            " If the checkpoint ships its own modelling code and you trust it, pass "
            "--trust-remote-code."
            if "trust_remote_code" in str(err)
            else ""
        )
        raise ConfigError(
            f"cannot load the config of --model {model!r}: {err}.{hint} "
            f"Supported architectures: {', '.join(ARCHITECTURES)}"
        ) from None


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of the cached snapshot a hub id resolved to (``None`` if unknown)."""
    import re

    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(found, str):
        return None
    match = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", found)
    return match.group(1) if match else None


def _check_config(spec: ArchitectureSpec, config: Any, model: str) -> None:
    for attr, (bad_value, what) in spec.unsupported_config.items():
        if getattr(config, attr, None) == bad_value:
            raise ConfigError(
                f"--model {model!r}: config.json sets {attr}={bad_value!r} ({what}), "
                f"which mlake's {spec.model_type} site table does not support"
            )
    for attr, value in spec.config_overrides.items():
        setattr(config, attr, value)


def _max_positions(config: Any, folder: str | None) -> int | None:
    """The longest sequence the model is made for (:attr:`ModelInfo.max_positions`): a
    mlake-tiny model's longest training sequence, else the config's position table size."""
    if folder is not None:
        meta = read_metadata(folder)
        trained = (meta or {}).get("config", {}).get("max_len")
        if isinstance(trained, int) and trained > 0:
            return trained
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _d_mlp(hf_model: torch.nn.Module, spec: ArchitectureSpec, kind: str = "mlp_post") -> int:
    """Input width of the projection whose input is site ``kind`` (``mlp_post``: the MLP
    down projection; ``attn_z``: the attention output projection)."""
    down: Any = hf_model.get_submodule(spec.sites[kind].path(0))
    width = getattr(down, "in_features", None)
    if width is None:  # transformers' Conv1D (GPT-2) stores its weight [in, out]
        width = down.weight.shape[0]
    return int(width)


def load_adapter(
    model: str,
    backend: str = "tlens",
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
    progress: Callable[[str], None] | None = None,
    device_map: str | Mapping[str, Any] | None = None,
    offload_folder: str | None = None,
) -> BaseAdapter:
    """Load a causal LM and wrap it in a backend.

    Args:
        model: a local folder (``config.json``, ``*.safetensors``, tokenizer files), a
            Hugging Face hub id, a packaged model's name
            (:data:`~mlake_core.models.gguf_weights.PACKAGED_MODELS`: ``gemma-3-270m``) or a
            GGUF file; the last two are converted into mlake's cache the first time
            (:func:`~mlake_core.models.gguf_weights.resolve_gguf`).
        backend: ``"tlens"`` (TransformerLens ``TransformerBridge``) or ``"nnsight"``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        trust_remote_code: allow modelling code shipped with the checkpoint.
        revision: hub branch, tag or commit (hub ids only).
        local_files_only: never touch the network; default: the ``HF_HUB_OFFLINE`` environment
            variable.
        progress: receives a line before a first (slow) GGUF conversion; default: stderr.
        device_map: an accelerate device map (``"auto"``, or module path -> ``"cuda:N"``,
            ``"cpu"`` or ``"disk"``) instead of one device.  ``device="auto"`` chooses
            ``"auto"`` itself on a machine with several GPUs when the weights take more than
            :data:`WEIGHTS_SHARE` of the first one's free memory
            (:func:`device_map_needed`).  Each layer then computes on its own device;
            patches, read-outs and edit terms follow it, and what the adapter returns is on
            the inputs' device (:attr:`ModelInfo.device`).
        offload_folder: where a device map's ``"disk"`` layers are kept.

    Returns:
        The adapter; ``adapter.info`` records model id, revision and commit hash, architecture,
        backend, dtype, device, shapes and BOS policy, and for GGUF weights the file's SHA256
        and quantization type.

    Raises:
        ConfigError: for an unknown backend, dtype or device; a missing folder; a hub id that
            cannot be found (the message says how to provide weights); an unsupported
            architecture (the message lists the supported ones); checkpoints without
            safetensors weights; a packaged model whose package is not installed; a GGUF file
            of an unsupported architecture or quantization type.
        DataError: a GGUF file that is truncated or corrupt.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if backend not in BACKENDS:
        raise ConfigError(
            f"--backend {backend!r} is not known; choose one of {', '.join(BACKENDS)}"
        )
    torch_dtype = resolve_dtype(dtype)
    device_name = resolve_device(device)
    gguf = resolve_gguf(model, progress=progress)
    if gguf is not None:
        source, is_local = str(gguf.folder), True
    else:
        source, is_local = _resolve_source(model)
    offline = _offline() if local_files_only is None else local_files_only
    unreachable = None if offline or is_local else hub_unreachable()
    offline = offline or unreachable is not None  # the local cache only, without retries
    if is_local and revision is not None:
        raise ConfigError(
            f"--revision {revision!r} applies to hub ids only, and --model {model!r} is a folder"
        )
    config = _load_config(
        source,
        model,
        is_local=is_local,
        revision=revision,
        local_files_only=offline,
        trust_remote_code=trust_remote_code,
        unreachable=unreachable,
    )
    spec = get_spec(config.model_type, source=f"--model {model!r}")
    _check_config(spec, config, model)
    common: dict[str, Any] = {
        "revision": revision,
        "local_files_only": offline,
        "trust_remote_code": trust_remote_code,
    }
    if device_map is None and device == "auto":
        device_map = _auto_device_map(config, torch_dtype)
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement = {"device_map": device_map}
        if offload_folder is not None:
            placement["offload_folder"] = offload_folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the tokenizer of --model {model!r}: {err}") from None
    hf_model: Any
    try:
        with quiet_hf_progress():
            hf_model = AutoModelForCausalLM.from_pretrained(
                source,
                config=config,
                dtype=torch_dtype,
                attn_implementation="eager",
                use_safetensors=True,
                **placement,
                **common,
            )
    except OSError as err:
        raise ConfigError(
            f"cannot load safetensors weights of --model {model!r} ({err}). mlake loads only "
            "*.safetensors files; convert a pytorch_model.bin checkpoint you trust by loading it "
            "with transformers and calling `model.save_pretrained(folder)` (transformers 5 "
            "writes safetensors)"
        ) from None
    except Exception as err:  # a truncated, empty or malformed weight file
        if "safetensor" not in type(err).__name__.lower() and "header" not in str(err).lower():
            raise
        raise ConfigError(
            f"--model {model!r}: the weight file {_weight_files(source)} cannot be read "
            f"({type(err).__name__}: {err}); it is truncated or damaged: download or convert "
            "it again"
        ) from None
    if device_map is None:
        hf_model = hf_model.to(device_name)
    hf_model = hf_model.eval()
    _check_finite(hf_model, tokenizer, model, source)
    info = ModelInfo(
        model_id=model,
        revision=revision,
        commit_hash=None if is_local else _cached_commit(source, revision),
        architecture=spec.model_type,
        backend=backend,
        dtype=dtype,
        device=str(input_device(hf_model)),
        n_layers=len(hf_model.get_submodule(spec.layers)),
        d_model=int(config.hidden_size),
        d_mlp=_d_mlp(hf_model, spec),
        d_vocab=int(hf_model.get_output_embeddings().weight.shape[0]),
        parallel_attn_mlp=spec.is_parallel(config),
        positional=spec.positional,
        bos=BosPolicy.from_tokenizer(tokenizer),
        trust_remote_code=trust_remote_code,
        versions=package_versions(("torch", "transformers", _BACKEND_PACKAGES[backend])),
        n_heads=int(config.num_attention_heads),
        d_head=_d_mlp(hf_model, spec, "attn_z") // int(config.num_attention_heads),
        max_positions=_max_positions(config, source if is_local else None),
        **architecture_facts(spec, config, hf_model),
        gguf_sha256=gguf.sha256 if gguf is not None else None,
        quantization=gguf.quantization if gguf is not None else None,
    )
    if backend == "tlens":
        from mlake_core.models.tlens_backend import TLensAdapter

        return TLensAdapter(hf_model, tokenizer, spec, info)
    from mlake_core.models.nnsight_backend import NNsightAdapter

    return NNsightAdapter(hf_model, tokenizer, spec, info)


def _weight_files(source: str) -> str:
    """The safetensors files of a local model folder (for messages), else the source."""
    folder = Path(source)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return ", ".join(str(f) for f in files) if files else source


def _check_finite(hf_model: Any, tokenizer: Any, model: str, source: str) -> None:
    """Refuse a model whose logits on a short probe input are not finite (NaN or infinite
    weights would otherwise run and report nothing known, and tracing a NaN noise level),
    naming the weight file and the first parameters that are not finite.

    Raises:
        ConfigError: naming the file.
    """
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"][:, :8]
    if ids.shape[1] == 0:
        return
    with torch.no_grad():
        logits = hf_model(input_ids=ids.to(input_device(hf_model))).logits
    if bool(torch.isfinite(logits).all()):
        return
    bad = [n for n, p in hf_model.named_parameters() if not bool(torch.isfinite(p).all())]
    which = f"non-finite values in {', '.join(bad[:3])}" + (
        f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    )
    raise ConfigError(
        f"--model {model!r}: the weights in {_weight_files(source)} give non-finite logits "
        f"({which if bad else 'the weights are finite, their computation overflows'}); "
        "the file is damaged or was saved from a diverged training"
    )
