"""Memory and batch-size plans for a model shape, computed without its weights.

A model's shape comes from its config alone: :func:`shape_from_config` builds the model on
the ``meta`` device (no memory), resolves every site of its architecture's site table
(:mod:`~mlake_core.models.sites`) and reads the widths off the modules, exactly as the loader
reads them off a loaded checkpoint.  :func:`plan_model` then answers, for one device of a
given memory and a dtype:

* the weights' memory (parameters x bytes per number);
* per stage, the activation memory of one row and the rows per pass mlake will choose;
* whether the model needs several devices, and how many at least.

The plan is what runs because it calls the stages' own batch-size functions
(``analysis.tracing.causal.rows_per_pass``, ``analysis.neurons.attribution.grad_rows_per_pass``,
:func:`~mlake_core.models.adapter.pass_bytes`, the key-statistics batch of
:func:`~mlake_core.editing.covariance.key_second_moment`) on a stand-in of the loaded model
(:class:`PlannedModel`: the same ``info``, ``dtype``, ``device`` and widths), with
:func:`~mlake_core.models.adapter.free_bytes` answering the memory the device would have free
once the weights are loaded (:func:`~mlake_core.models.adapter.assume_free_bytes`).  The two
analysis functions live above this package and editing beside it, so the caller passes them
in (``batchers``, ``key_statistics``; ``mlake models plan`` and ``benchmarks/gpu_check.py``
do).  The activation memory of one row
is the amount those functions charge per row: with a budget of ``B`` bytes they choose
``floor(fraction * B / row)`` rows, so at a huge budget ``row = fraction * B / rows``.
Integrated gradients' rows are planned as they run at its default ``positions="last"``: the
last token, continuing the cached keys and values of the others (``grad_rows_per_pass``'s
default ``past_tokens``).  Causal tracing's rows continue the corrupted run's keys and values
of the tokens before the restored one, so what a row holds depends on where the subject is,
which a plan does not know: the plan takes the worst case over every restored token of a
prompt of ``n_tokens`` tokens (``rows_per_pass``'s default ``past_tokens=None``: the row
charged most, its copy of the cached keys and values and the extended cache in every block
counted, ``analysis.tracing.causal.tracing_row_bytes``); the tracer sizes each real pass from
the rows it holds, within the same budget.  :class:`TensorPeak` measures what a pass holds.

What the plan leaves out: CUDA's own context (about 0.5 GiB per device), the allocator's
fragmentation, and the optimiser state of an edit (ROME's delta is one ``d_model`` vector).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mlake_core.errors import ConfigError
from mlake_core.models.adapter import BosPolicy, ModelInfo, assume_free_bytes, pass_bytes
from mlake_core.models.sites import ArchitectureSpec, all_sites, get_spec, parse_site

GIB = 2**30

#: A stage's batch-size function: ``(model, n_tokens) -> rows per pass``.
BatchFn = Callable[[Any, int], int]

#: Prompt length the plan assumes by default: an MLaKE question with its answer and BOS.
DEFAULT_TOKENS = 32

#: The budget at which a batch-size function's charge per row is read off (bytes).
_HUGE = 2**60


@dataclass(frozen=True)
class ModelShape:
    """Everything about a model's shape that memory depends on.

    Attributes:
        name: what the user named.
        architecture: ``config.model_type``.
        n_layers: blocks.
        d_model: residual stream width.
        d_mlp: MLP hidden width (``mlp_post``).
        n_heads: attention heads.
        n_kv_heads: key/value heads (fewer than ``n_heads`` under grouped-query attention).
        d_head: width of one head's output in ``attn_z``.
        d_vocab: logits width.
        n_params: parameters (a tied embedding counted once).
        tied_embeddings: whether the unembedding is the embedding tensor.
        positional: ``learned``, ``rotary`` or ``alibi``.
        rope: the config's rope parameters (scaling type and factor), ``None`` without rope.
        sliding_window: the sliding layers' window, ``None`` without sliding layers.
        sliding_layers: which layers slide.
        max_positions: the config's position limit.
        site_widths: the width of every site kind, read off the modules.
    """

    name: str
    architecture: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_vocab: int
    n_params: int
    tied_embeddings: bool
    positional: str
    rope: dict[str, Any] | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    max_positions: int | None = None
    site_widths: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = asdict(self)
        out["sliding_layers"] = list(self.sliding_layers)
        out["site_widths"] = dict(self.site_widths)
        return out


def _port_width(module: Any, port: str) -> int | None:
    """Width of a module's input or output when the module itself says (a linear
    projection, GPT-2's Conv1D, an embedding, a norm); ``None`` for a block."""
    if isinstance(module, torch.nn.Linear):
        return int(module.in_features if port == "input" else module.out_features)
    if isinstance(module, torch.nn.Embedding):
        return int(module.embedding_dim) if port == "output" else None
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:  # weight [in, out]
        return int(weight.shape[0] if port == "input" else weight.shape[1])
    if weight is not None and weight.ndim == 1:  # a norm: output width = its gain's width
        return int(weight.shape[0])
    return None


def resolve_sites(hf_model: Any, spec: ArchitectureSpec, n_layers: int) -> dict[str, int]:
    """The width of every site of the model (``embed``, ``resid_pre.0``, ...), each site's
    module found through the site table.  Blocks (``resid_pre`` / ``resid_post``) are
    ``d_model`` wide by definition; their first norm's width is checked instead.

    Raises:
        ConfigError: a site whose module does not exist, or whose width contradicts another.
    """
    d_model = int(hf_model.config.hidden_size)
    widths: dict[str, int] = {}
    for name in all_sites(n_layers):
        site = parse_site(name, n_layers)
        where = spec.sites[site.kind]
        path = where.path(site.layer if site.kind != "embed" else None)
        try:
            module = hf_model.get_submodule(path)
        except AttributeError:
            raise ConfigError(
                f"{spec.model_type}: site {name} names module {path!r}, which the model "
                "does not have"
            ) from None
        width = _port_width(module, where.port)
        if width is None:  # a block: check its first norm instead
            norm = module.get_submodule(spec.ln1)
            width = _port_width(norm, "output") or d_model
        widths[name] = width
    return widths


def shape_from_config(config: Any, name: str) -> ModelShape:
    """The shape of a model from its config, by building it on the ``meta`` device.

    Raises:
        ConfigError: an unsupported architecture or config value, or a site that does not
            resolve.
    """
    from mlake_core.models.catalog import meta_model
    from mlake_core.models.loading import _check_config

    spec = get_spec(config.model_type, source=name)
    _check_config(spec, config, name)
    model = meta_model(config)
    n_layers = len(model.get_submodule(spec.layers))
    widths = resolve_sites(model, spec, n_layers)
    n_heads = int(config.num_attention_heads)
    embed, unembed = model.get_input_embeddings(), model.get_output_embeddings()
    window = spec.sliding_window(config)
    rope = getattr(config, "rope_parameters", None)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    return ModelShape(
        name=name,
        architecture=spec.model_type,
        n_layers=n_layers,
        d_model=int(config.hidden_size),
        d_mlp=widths["mlp_post.0"],
        n_heads=n_heads,
        n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
        d_head=widths["attn_z.0"] // n_heads,
        d_vocab=int(unembed.weight.shape[0]),
        n_params=sum(p.numel() for p in model.parameters()),
        tied_embeddings=unembed.weight is embed.weight,
        positional=spec.positional,
        rope=dict(rope) if isinstance(rope, Mapping) else None,
        sliding_window=window,
        sliding_layers=spec.sliding_layers(config) if window is not None else (),
        max_positions=int(max_pos) if max_pos else None,
        site_widths={k: widths[f"{k}.0" if k != "embed" else k] for k in spec.sites},
    )


class PlannedModel:
    """A stand-in for a loaded model, for the stages' batch-size functions: the
    :class:`~mlake_core.models.adapter.ModelInfo`, dtype, device and widths an adapter of
    this shape would have, and nothing to run."""

    def __init__(self, shape: ModelShape, dtype: str, device: str) -> None:
        from mlake_core.models.loading import resolve_dtype

        self.shape = shape
        self.dtype_name = dtype
        self.dtype: torch.dtype = resolve_dtype(dtype)
        self.device = torch.device(device)
        self.d_model = shape.d_model
        self.d_mlp = shape.d_mlp
        self.n_layers = shape.n_layers
        self.spec = get_spec(shape.architecture)
        #: Numbers per position in one block's key cache (as the adapter's ``kv_width``).
        self.kv_width = shape.n_kv_heads * shape.d_head
        self.info = ModelInfo(
            model_id=shape.name,
            revision=None,
            commit_hash=None,
            architecture=shape.architecture,
            backend="planned",
            dtype=dtype,
            device=str(self.device),
            n_layers=shape.n_layers,
            d_model=shape.d_model,
            d_mlp=shape.d_mlp,
            d_vocab=shape.d_vocab,
            parallel_attn_mlp=False,
            positional=shape.positional,
            bos=BosPolicy(None, None, False, False, False),
            n_heads=shape.n_heads,
            d_head=shape.d_head,
            max_positions=shape.max_positions,
            tied_embeddings=shape.tied_embeddings,
            sliding_window=shape.sliding_window,
            sliding_layers=shape.sliding_layers,
        )


@dataclass(frozen=True)
class StagePlan:
    """One stage's memory and batch size.

    Attributes:
        stage: the stage.
        chooser: the function that chooses its rows per pass.
        tokens: tokens per row.
        row_bytes: activation memory of one row, as that function counts it.
        rows: rows per pass mlake will choose.
        device_bytes: ``rows * row_bytes``.
        host_bytes: memory the stage holds outside the device (ROME's key statistics
            accumulate in float64 on the CPU).
    """

    stage: str
    chooser: str
    tokens: int
    row_bytes: int
    rows: int
    device_bytes: int
    host_bytes: int = 0


@dataclass(frozen=True)
class ModelPlan:
    """The plan for one model on one kind of device (see the module docstring).

    Attributes:
        shape: the model's shape.
        dtype: weights' and activations' dtype.
        device: ``cuda`` or ``cpu``.
        device_memory: memory of one device, bytes.
        weights_bytes: parameters x bytes per number.
        devices_needed: devices the weights and one row of the hungriest stage need at least.
        free_bytes: memory left on a device for activations, weights loaded (split evenly
            over ``devices_needed`` devices).
        stages: per stage.
    """

    shape: ModelShape
    dtype: str
    device: str
    device_memory: int
    weights_bytes: int
    devices_needed: int
    free_bytes: int
    stages: tuple[StagePlan, ...]

    @property
    def several_devices(self) -> bool:
        """Whether the model needs more than one device."""
        return self.devices_needed > 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "model": self.shape.name,
            "dtype": self.dtype,
            "device": self.device,
            "device_memory_bytes": self.device_memory,
            "weights_bytes": self.weights_bytes,
            "devices_needed": self.devices_needed,
            "several_devices": self.several_devices,
            "free_bytes_per_device": self.free_bytes,
            "stages": [asdict(s) for s in self.stages],
            "shape": self.shape.to_dict(),
        }


def row_bytes(batcher: BatchFn, model: PlannedModel, n_tokens: int) -> int:
    """What ``batcher`` charges for one row of ``n_tokens`` tokens on a device like
    ``model``'s, read off its answer at a huge budget (module docstring)."""
    fraction = inspect.signature(batcher).parameters.get("fraction")
    frac = float(fraction.default) if fraction is not None else 1.0
    # On a CUDA device the functions spend the whole budget (their CPU branch caps it); the
    # charge per row is the same on both.
    huge = PlannedModel(model.shape, model.dtype_name, "cuda")
    with assume_free_bytes(_HUGE):
        rows = batcher(huge, n_tokens)
    return max(1, round(frac * _HUGE / rows))


def plan_model(
    shape: ModelShape,
    *,
    batchers: Mapping[str, BatchFn],
    key_statistics: tuple[int, int],
    dtype: str = "bfloat16",
    device: str = "cuda",
    device_memory: int = 80 * GIB,
    n_tokens: int = DEFAULT_TOKENS,
    forward_rows: int = 32,
) -> ModelPlan:
    """Plan ``shape`` on devices of ``device_memory`` bytes.

    Args:
        shape: from :func:`shape_from_config`.
        batchers: the stages' own batch-size functions, by stage: ``"tracing"``
            (``rows_per_pass``) and ``"attribution (IG)"`` (``grad_rows_per_pass``).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``cuda`` or ``cpu``.
        device_memory: memory of one device, bytes.
        n_tokens: tokens per prompt.
        forward_rows: rows per plain forward pass (the run's ``--batch-size``).
        key_statistics: ``(documents per pass, tokens per document)`` of the key statistics
            (:func:`~mlake_core.editing.covariance.key_second_moment`'s ``batch_size`` and
            ``max_len``; the caller reads them, as editing sits beside this package).

    Raises:
        ConfigError: a non-positive memory or token count, an unknown dtype.
    """
    if device_memory <= 0 or n_tokens < 1:
        raise ConfigError("the plan needs a positive device memory and at least one token")
    model = PlannedModel(shape, dtype, device)
    bytes_per = max(1, torch.finfo(model.dtype).bits // 8)
    weights = shape.n_params * bytes_per
    docs, doc_tokens = key_statistics
    # The least a device must hold beyond the weights: one row of the hungriest stage.
    one_row = max(
        [pass_bytes(model.info, n_tokens), pass_bytes(model.info, doc_tokens)]
        + [row_bytes(fn, model, n_tokens) for fn in batchers.values()]
    )
    devices = max(1, math.ceil((weights + one_row) / device_memory))
    free = max(0, device_memory - math.ceil(weights / devices))
    stages = [
        StagePlan(
            "forward (knowledge, evaluation)",
            "--batch-size; check_fits refuses a prompt whose pass_bytes exceed free memory",
            n_tokens,
            pass_bytes(model.info, n_tokens),
            forward_rows,
            forward_rows * pass_bytes(model.info, n_tokens),
        )
    ]
    with assume_free_bytes(free):
        for stage, fn in batchers.items():
            rows = fn(model, n_tokens)
            per_row = row_bytes(fn, model, n_tokens)
            stages.append(StagePlan(stage, fn.__name__, n_tokens, per_row, rows, rows * per_row))
    per_doc = pass_bytes(model.info, doc_tokens)
    stages.append(
        StagePlan(
            "ROME/MEMIT key statistics",
            "key_second_moment(batch_size, max_len) defaults",
            doc_tokens,
            per_doc,
            docs,
            docs * per_doc,
            host_bytes=2 * shape.d_mlp * shape.d_mlp * 8,
        )
    )
    return ModelPlan(
        shape=shape,
        dtype=dtype,
        device=device,
        device_memory=device_memory,
        weights_bytes=weights,
        devices_needed=devices,
        free_bytes=free,
        stages=tuple(stages),
    )


class TensorPeak:
    """The peak bytes of tensor storage that work inside the block allocates and holds at
    once, counted exactly (not sampled): every tensor an operator returns is recorded by its
    storage (a ``TorchDispatchMode``) and forgotten when the storage is freed.  Storage that
    existed before the block (weights, caches passed in) is not counted, nor are views of it
    (an output sharing an input's storage); a view counts once.
    For checking a plan's memory against what a pass holds (tests, ``benchmarks``), on any
    device, in the same process.

    Attributes:
        peak: the most bytes held at once since the block began.
        live: bytes held now (allocated in the block and not yet freed).
    """

    def __init__(self) -> None:
        self.peak = 0
        self.live = 0
        self._sizes: dict[tuple[str, int], int] = {}
        self._mode: Any = None

    def _freed(self, key: tuple[str, int]) -> None:
        self.live -= self._sizes.pop(key, 0)

    def _record(self, out: Any, inputs: Any) -> None:
        import weakref

        from torch.utils._pytree import tree_flatten

        def key_of(t: torch.Tensor) -> tuple[str, int]:
            return (str(t.device), t.untyped_storage().data_ptr())

        # An output sharing an input's storage (a view, such as a weight's transpose, or an
        # in-place result) allocates nothing.
        given = {
            key_of(t)
            for t in tree_flatten(inputs)[0]
            if isinstance(t, torch.Tensor) and not t.is_meta
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            key = key_of(t)
            if key[1] == 0 or key in self._sizes or key in given:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)

    def __enter__(self) -> TensorPeak:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counter._record(out, (args, kwargs))
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str) -> int:
    """``80GiB``, ``80G``, ``40gb``, ``512MiB`` or a byte count -> bytes (binary units).

    Raises:
        ConfigError: naming ``--gpu-memory``.
    """
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(
            f"--gpu-memory {text!r}: expected a positive size such as 80GiB, 40G or 512MiB"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2)])
