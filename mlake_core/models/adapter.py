"""The :class:`ModelAdapter` protocol and what every backend shares.

An adapter wraps one Hugging Face causal LM behind one small interface, whatever library does
the hooking underneath (TransformerLens' ``TransformerBridge`` in
:mod:`~mlake_core.models.tlens_backend`, nnsight in :mod:`~mlake_core.models.nnsight_backend`).
Analyses take a ``ModelAdapter`` and speak only in canonical site names
(:mod:`~mlake_core.models.sites`), so the same analysis runs on either backend and on every
supported architecture.

Four operations, all on a padded :class:`TokenBatch`:

* :meth:`ModelAdapter.forward` -- logits.
* :meth:`ModelAdapter.run_with_cache` -- logits plus the activations at any sites.
* :meth:`ModelAdapter.run_with_patches` -- logits after replacing a site's activation at given
  (row, position) pairs by given values (activation patching, Vig et al. 2020; Meng et al.
  2022 use it on embeddings with noise for causal tracing).  Every row has its own positions
  and values (:class:`Patch`).
* :meth:`ModelAdapter.gradients` -- the gradient of a scalar function of the logits with respect
  to the activations at any sites (attribution patching, integrated gradients).

A run can also be continued without recomputing its tokens: :meth:`ModelAdapter.run_with_past`
returns the attention keys and values of every position (:class:`PastKeyValues`, cropped and
row-indexed at will), and ``run_with_patches(..., past=...)`` runs only new tokens after them
(causal tracing runs each restoration from the restored token on).

Ablations (:class:`UnitPatch`: fixed values for some neurons or heads at every position) can
also stand for a whole block of work, generation included: ``with adapter.intervening([...])``.

Each backend implements one private primitive, ``_run``, that performs a forward pass reading
and patching sites; the public operations are built on it here (the TransformerLens
``patching.py`` pattern: one generic function, specialisations built from it).

Padding: a batch may be padded on either side.  Attention never looks at padding, and models
that take ``position_ids`` get ids counted from each row's first real token, so every real
token's activations equal those of the same sequence run alone (ndif-team/nnsight#672).
Activations at padding positions are meaningless; positions always index the padded tensor.

BOS: the :class:`BosPolicy` is read from the tokenizer at load time (does it prepend a BOS
itself, is there a BOS token at all) and recorded in :attr:`ModelAdapter.info`;
:meth:`BaseAdapter.encode` follows it.  mlake prepends BOS exactly when the tokenizer would
(Llama); it never adds one the tokenizer does not (BLOOM with a prepended BOS gives nonsense,
TransformerLens#774; Qwen has no BOS at all).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mlake_core.errors import ConfigError
from mlake_core.models.sites import (
    ArchitectureSpec,
    Site,
    all_sites,
    execution_order,
    parse_site,
)

PaddingSide = Literal["left", "right"]

# Shape-annotated tensor types (jaxtyping), named once so signatures stay readable.
TokenIds = Int[Tensor, "batch pos"]
PerRow = Int[Tensor, " batch"]
Logits = Float[Tensor, "batch pos vocab"]
Activation = Float[Tensor, "batch pos width"]
Indices = Int[Tensor, " n"]
Vectors = Float[Tensor, "n width"]
Scalar = Float[Tensor, ""]

#: A scalar function of the logits ``[batch, pos, vocab]``, differentiated by
#: :meth:`ModelAdapter.gradients`.
Metric = Callable[[Logits], Scalar]


@dataclass(frozen=True, eq=False)
class TokenBatch:
    """A padded batch of token id sequences.

    Attributes:
        input_ids: token ids; padding positions hold the pad id.
        attention_mask: 1 for real tokens, 0 for padding.  Each row is one contiguous run of
            real tokens, with padding only on :attr:`padding_side`.
        padding_side: where the padding is.
    """

    input_ids: TokenIds
    attention_mask: TokenIds
    padding_side: PaddingSide = "left"

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                "input_ids and attention_mask must both be [batch, pos]; got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}"
            )
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {self.padding_side!r}")
        mask = self.attention_mask
        if bool((mask.sum(-1) == 0).any()):
            raise ValueError("every row of a TokenBatch needs at least one real token")
        # Contiguous: the mask changes value at most once, in the right direction.
        steps = mask.diff(dim=-1)
        wrong = steps < 0 if self.padding_side == "left" else steps > 0
        if bool(wrong.any()):
            raise ValueError(
                f"attention_mask is not {self.padding_side}-padded (padding must be on one "
                "side of each row only)"
            )

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Sequence[int]],
        pad_token_id: int,
        padding_side: PaddingSide = "left",
        device: str | torch.device | None = None,
    ) -> TokenBatch:
        """Pad token id sequences into a batch.

        Args:
            sequences: one list of token ids per row (each non-empty).
            pad_token_id: id written at padding positions (they are masked, so any valid id).
            padding_side: where to pad.
            device: where to put the tensors.
        """
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("from_sequences needs at least one row and no empty rows")
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            start = width - len(seq) if padding_side == "left" else 0
            ids[row, start : start + len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, start : start + len(seq)] = 1
        return cls(ids.to(device), mask.to(device), padding_side)

    @property
    def shape(self) -> tuple[int, int]:
        """``(batch, pos)``."""
        return (int(self.input_ids.shape[0]), int(self.input_ids.shape[1]))

    @property
    def lengths(self) -> PerRow:
        """Number of real tokens per row."""
        return self.attention_mask.sum(-1)

    @property
    def position_ids(self) -> TokenIds:
        """Position of each token counted from its row's first real token (0 on padding)."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def first_index(self) -> PerRow:
        """Padded index of each row's first real token."""
        return self.attention_mask.long().argmax(-1)

    @property
    def last_index(self) -> PerRow:
        """Padded index of each row's last real token (where next-token logits are read)."""
        return self.first_index + self.lengths - 1

    def padded_index(self, row: int, token: int) -> int:
        """Padded position of the ``token``-th real token (0-based; negative from the end)."""
        length = int(self.lengths[row])
        if not -length <= token < length:
            raise IndexError(f"row {row} has {length} tokens; no token {token}")
        return int(self.first_index[row]) + (token % length)

    def sequences(self) -> list[list[int]]:
        """The real token ids of each row, padding removed."""
        return [
            self.input_ids[row][self.attention_mask[row].bool()].tolist()
            for row in range(self.shape[0])
        ]

    def to(self, device: str | torch.device) -> TokenBatch:
        """The same batch on ``device``."""
        return TokenBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.padding_side
        )


@dataclass(frozen=True, eq=False)
class Patch:
    """Replace a site's activation at some (row, position) pairs by given values.

    ``activation[rows[i], positions[i]] = values[i]`` for every ``i``: each batch row has its
    own positions and values, and a row may have none.

    Attributes:
        site: canonical site name, e.g. ``"mlp_post.3"``.
        rows: batch row of each replacement, ``[n]``.
        positions: padded position of each replacement, ``[n]``.
        values: the new activation vectors, ``[n, width]`` (width is ``d_model``, or ``d_mlp``
            for ``mlp_post``).
    """

    site: str
    rows: Indices
    positions: Indices
    values: Vectors

    def __post_init__(self) -> None:
        n = self.rows.shape[0]
        if (
            self.rows.ndim != 1
            or self.positions.shape != (n,)
            or self.values.ndim != 2
            or self.values.shape[0] != n
        ):
            raise ValueError(
                f"patch of {self.site!r}: rows and positions must be [n] and values [n, width]; "
                f"got {tuple(self.rows.shape)}, {tuple(self.positions.shape)}, "
                f"{tuple(self.values.shape)}"
            )

    @classmethod
    def per_row(
        cls,
        site: str,
        positions: Sequence[Sequence[int]],
        values: Sequence[Vectors],
    ) -> Patch:
        """A patch given row by row.

        Args:
            site: canonical site name.
            positions: for each batch row, the padded positions to replace (may be empty).
            values: for each batch row, ``[len(positions[row]), width]`` new values.
        """
        if len(positions) != len(values):
            raise ValueError("per_row: one entry of positions and of values per batch row")
        rows = [r for r, pos in enumerate(positions) for _ in pos]
        flat = [p for pos in positions for p in pos]
        parts = [v for v, pos in zip(values, positions, strict=True) if len(pos)]
        width = values[0].shape[-1] if len(values) else 0
        stacked = torch.cat(parts) if parts else torch.zeros(0, width)
        return cls(
            site,
            torch.as_tensor(rows, dtype=torch.long),
            torch.as_tensor(flat, dtype=torch.long),
            stacked,
        )

    @classmethod
    def from_activation(
        cls,
        site: str,
        source: Activation,
        positions: Sequence[Sequence[int]],
        source_rows: Sequence[int] | None = None,
    ) -> Patch:
        """Copy values from a cached activation (clean-to-corrupted patching).

        Args:
            site: canonical site name.
            source: an activation of the same site, e.g. from a clean run.
            positions: for each target row, the padded positions to replace; the value comes
                from the same position of the source.
            source_rows: for each target row, which source row to copy from (default: the
                same row).  ``[0] * batch`` copies a single clean row into every corrupted
                row, as in ROME's causal tracing.
        """
        src = list(range(len(positions))) if source_rows is None else list(source_rows)
        if len(src) != len(positions):
            raise ValueError("from_activation: one source row per target row")
        values = [source[src[r], list(pos)] for r, pos in enumerate(positions)]
        return cls.per_row(site, positions, values)


@dataclass(frozen=True, eq=False)
class UnitPatch:
    """Set some units (columns) of a site to fixed values at every row and position.

    ``activation[..., units[i]] = values[i]``: the ablation of neurons (``mlp_post``) or of
    heads (the head's ``d_head`` columns of ``attn_z``), zero or mean.  It does not depend on
    the batch's shape, so it can stand for a whole block of work
    (:meth:`BaseAdapter.intervening`), generation included.

    Attributes:
        site: canonical site name.
        units: column indices, ``[k]``.
        values: the value of each column, ``[k]``.
    """

    site: str
    units: Indices
    values: Float[Tensor, " k"]

    def __post_init__(self) -> None:
        if self.units.ndim != 1 or self.values.shape != self.units.shape:
            raise ValueError(
                f"unit patch of {self.site!r}: units and values must both be [k]; got "
                f"{tuple(self.units.shape)} and {tuple(self.values.shape)}"
            )

    @classmethod
    def zero(cls, site: str, units: Sequence[int] | Indices) -> UnitPatch:
        """Zero-ablation of ``units``."""
        idx = torch.as_tensor(units, dtype=torch.long).reshape(-1)
        return cls(site, idx, torch.zeros(idx.shape[0]))


def apply_patches(activation: Activation, patches: Sequence[Patch | UnitPatch]) -> Activation:
    """Return ``activation`` with the patches written in (out of place; autograd-safe).

    Later patches win where two touch the same entry.
    """
    out = activation.clone()
    for patch in patches:
        if isinstance(patch, UnitPatch):
            units = patch.units.to(out.device)
            if units.numel() and int(units.max()) >= out.shape[-1]:
                raise IndexError(
                    f"unit patch of {patch.site!r} indexes column {int(units.max())}; the "
                    f"activation has width {out.shape[-1]}"
                )
            out[..., units] = patch.values.to(device=out.device, dtype=out.dtype)
            continue
        if patch.values.shape[1] != out.shape[-1]:
            raise ValueError(
                f"patch of {patch.site!r} has width {patch.values.shape[1]}, "
                f"the activation has width {out.shape[-1]}"
            )
        rows = patch.rows.to(out.device)
        positions = patch.positions.to(out.device)
        if rows.numel() and (
            int(rows.max()) >= out.shape[0] or int(positions.max()) >= out.shape[1]
        ):
            raise IndexError(
                f"patch of {patch.site!r} indexes outside the batch {tuple(out.shape[:2])}"
            )
        out[rows, positions] = patch.values.to(device=out.device, dtype=out.dtype)
    return out


@dataclass(frozen=True, eq=False)
class OutputDelta:
    """A change of one linear module's weight (and bias) applied as a term added to the
    module's output, instead of written into the weights: ``y = W x + b`` becomes
    ``y + ΔW x + Δb``, exactly what ``(W + ΔW) x + (b + Δb)`` gives (up to rounding).

    Weight edits (ROME, MEMIT, FT) can be evaluated this way without writing a parameter
    (:meth:`BaseAdapter.adding`; :mod:`mlake_core.editing.intervention` builds these from an
    edit): on a read-only backend (nnsight's remote execution) the term is part of the trace.

    Attributes:
        path: the module's Hugging Face path (an attention or MLP output projection: the
            module whose input is the ``attn_z`` or ``mlp_post`` site).
        weight: ``ΔW`` as ``[out, in]`` whatever the module stores (GPT-2's ``Conv1D``
            stores ``[in, out]``; the caller transposes), or ``None``.
        bias: ``Δb``, ``[out]``, or ``None``.
        factors: ``ΔW = left @ right`` (``[out, r]``, ``[r, in]``) in place of ``weight`` for
            a low-rank change (ROME, MEMIT): ``(x right^T) left^T`` is added, which costs
            ``r (in + out)`` per position instead of ``in * out`` and is what a remote
            request carries.
    """

    path: str
    weight: Float[Tensor, "out inp"] | None = None
    bias: Float[Tensor, " out"] | None = None
    factors: tuple[Float[Tensor, "out r"], Float[Tensor, "r inp"]] | None = None

    def __post_init__(self) -> None:
        if self.weight is None and self.bias is None and self.factors is None:
            raise ValueError(f"output delta of {self.path!r}: neither a weight nor a bias change")
        if self.weight is not None and self.factors is not None:
            raise ValueError(f"output delta of {self.path!r}: a weight change or factors, not both")
        if self.weight is not None and self.weight.ndim != 2:
            raise ValueError(f"output delta of {self.path!r}: the weight change must be 2-D")
        if self.factors is not None:
            left, right = self.factors
            if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
                raise ValueError(
                    f"output delta of {self.path!r}: factors must be [out, r] and [r, in]; got "
                    f"{tuple(left.shape)} and {tuple(right.shape)}"
                )
        out_width = (
            self.weight.shape[0]
            if self.weight is not None
            else self.factors[0].shape[0]
            if self.factors is not None
            else None
        )
        if self.bias is not None and out_width is not None and self.bias.shape != (out_width,):
            raise ValueError(
                f"output delta of {self.path!r}: bias {tuple(self.bias.shape)} does not match "
                f"the output width {out_width}"
            )

    def added(self, inputs: Activation) -> Activation:
        """The term added to the module's output for ``inputs`` (``[..., in]``), on the
        inputs' device and in their dtype (so it follows a layer placed on another device)."""
        out: Tensor | None = None
        if self.weight is not None:
            out = inputs @ self.weight.to(device=inputs.device, dtype=inputs.dtype).T
        if self.factors is not None:
            left, right = (f.to(device=inputs.device, dtype=inputs.dtype) for f in self.factors)
            out = (inputs @ right.T) @ left.T
        if self.bias is not None:
            bias = self.bias.to(device=inputs.device, dtype=inputs.dtype)
            out = bias.expand(*inputs.shape[:-1], -1) if out is None else out + bias
        assert out is not None
        return out


@dataclass(frozen=True)
class BosPolicy:
    """How sequences start, as decided by the tokenizer.

    Attributes:
        bos_token: the tokenizer's BOS token, ``None`` when it has none (Qwen).
        bos_token_id: its id.
        bos_is_eos: whether BOS and EOS are the same token (GPT-2, GPT-NeoX).
        tokenizer_adds_bos: whether encoding with special tokens prepends BOS (Llama).
        prepend_bos: what mlake does: prepend BOS to every encoded text.  Equal to
            ``tokenizer_adds_bos``: the model is run the way its tokenizer feeds it.
    """

    bos_token: str | None
    bos_token_id: int | None
    bos_is_eos: bool
    tokenizer_adds_bos: bool
    prepend_bos: bool

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> BosPolicy:
        """Read the policy off a Hugging Face tokenizer (by encoding a probe string)."""
        bos_id = tokenizer.bos_token_id
        probe = "a"
        with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
        without = tokenizer(probe, add_special_tokens=False)["input_ids"]
        adds = bool(
            bos_id is not None and len(with_special) > len(without) and with_special[0] == bos_id
        )
        return cls(
            bos_token=tokenizer.bos_token,
            bos_token_id=bos_id,
            bos_is_eos=bos_id is not None and bos_id == tokenizer.eos_token_id,
            tokenizer_adds_bos=adds,
            prepend_bos=adds,
        )

    def describe(self) -> str:
        """One line for humans."""
        if self.bos_token is None:
            return "no BOS token; sequences start with the text"
        if self.prepend_bos:
            return (
                f"BOS {self.bos_token!r} (id {self.bos_token_id}) prepended, as the tokenizer does"
            )
        return (
            f"BOS {self.bos_token!r} (id {self.bos_token_id}) exists but the tokenizer does not "
            "add it; not prepended"
        )


@dataclass(frozen=True)
class ModelInfo:
    """Provenance and shape of a loaded model, recorded with every result.

    Attributes:
        model_id: what the user passed (local folder or hub id).
        revision: the requested hub revision (``None``: default branch, or a local folder).
        commit_hash: the resolved hub commit when known (loaded from the HF cache).
        architecture: ``config.model_type``.
        backend: ``"tlens"`` or ``"nnsight"``.
        dtype: e.g. ``"float32"``.
        device: e.g. ``"cpu"``, ``"cuda:0"``.
        n_layers: number of blocks.
        d_model: residual stream width.
        d_mlp: MLP hidden width (``mlp_post`` width).
        d_vocab: logits width.
        parallel_attn_mlp: whether attention and MLP read the same residual (GPT-NeoX).
        positional: ``"learned"``, ``"rotary"`` or ``"alibi"``.
        bos: the BOS policy.
        trust_remote_code: whether custom modelling code was allowed.
        versions: versions of torch, transformers and the backend library.
        n_heads: attention heads per block.
        d_head: width of one head's output in ``attn_z`` (``attn_z`` is
            ``n_heads * d_head`` wide).
        max_positions: the longest sequence the model is made for (``None``: no limit
            known): a mlake-tiny model's longest training sequence, else the config's
            ``max_position_embeddings`` / ``n_positions``.  Longer sequences are an error with
            learned positions (no embedding exists for them) and a
            :class:`LongSequenceWarning` otherwise (rotary and ALiBi models run them, out of
            the range they were trained on).
        tied_embeddings: whether the unembedding (LM head) and the input embedding are one
            tensor (Qwen2, Gemma 3): writing either writes both, so edits must not touch it
            (:meth:`BaseAdapter.editable_parameter` refuses).
        embed_scale: the factor the embedding module applies to ``W_E[token]`` (Gemma:
            ``sqrt(d_model)``; else 1); the ``embed`` site includes it.
        post_norms: whether attention and MLP outputs pass a norm before joining the residual
            stream (Gemma 3); ``attn_out`` / ``mlp_out`` are then the norms' outputs.
        sliding_window: the sliding-window width of the sliding layers (``None``: none).
        sliding_layers: the layers that attend through the sliding window.
        logit_softcap: the final logit soft-cap (``None``: logits are not capped).
        logit_scale: the factor the logits are multiplied by after the unembedding (Cohere's
            ``logit_scale``; 1 elsewhere).
        gguf_sha256: when the weights were dequantized from a GGUF file (a packaged model
            such as ``gemma-3-270m``, or ``--model FILE.gguf``;
            :mod:`~mlake_core.models.gguf_weights`), that file's SHA256; else ``None``.
        quantization: that file's quantization type, e.g. ``"Q4_K_M"``; else ``None``.
    """

    model_id: str
    revision: str | None
    commit_hash: str | None
    architecture: str
    backend: str
    dtype: str
    device: str
    n_layers: int
    d_model: int
    d_mlp: int
    d_vocab: int
    parallel_attn_mlp: bool
    positional: str
    bos: BosPolicy
    trust_remote_code: bool = False
    versions: Mapping[str, str] = field(default_factory=dict)
    n_heads: int = 0
    d_head: int = 0
    max_positions: int | None = None
    tied_embeddings: bool = False
    embed_scale: float = 1.0
    post_norms: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    logit_softcap: float | None = None
    logit_scale: float = 1.0
    gguf_sha256: str | None = None
    quantization: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for ``meta.json``)."""
        out = asdict(self)
        out["versions"] = dict(self.versions)
        out["sliding_layers"] = list(self.sliding_layers)
        return out


def architecture_facts(spec: ArchitectureSpec, config: Any, hf_model: Any) -> dict[str, Any]:
    """The :class:`ModelInfo` fields that describe a loaded checkpoint's architecture beyond
    its shapes: tied embeddings, embedding scale, post-norms, sliding layers, logit soft-cap.
    """
    embed = hf_model.get_input_embeddings()
    unembed = hf_model.get_output_embeddings()
    tied = (
        embed is not None
        and unembed is not None
        and embed.weight.data_ptr() == unembed.weight.data_ptr()
    )
    window = spec.sliding_window(config)
    return {
        "tied_embeddings": bool(tied),
        "embed_scale": spec.embed_scale(config),
        "post_norms": spec.post_norms,
        "sliding_window": window,
        "sliding_layers": spec.sliding_layers(config) if window is not None else (),
        "logit_softcap": spec.logit_softcap(config),
        "logit_scale": spec.logit_scale(config),
    }


def pass_bytes(info: ModelInfo, n_tokens: int, rows: int = 1) -> int:
    """An estimate of the transient memory of one forward pass over ``rows`` sequences of
    ``n_tokens`` tokens (the weights not included), in bytes.  Not a bound of resident memory:
    a pass of 8 x 128 tokens on Qwen2.5-0.5B's real width (2 layers, CPU, float32) added
    1.1-1.45x this (``tests/mlake_core/models/test_catalog_real_width.py``).

    Eager attention (what mlake loads) holds a layer's scores, their float32 softmax and a
    copy (``3 * heads * n^2`` numbers), beside the causal mask (``n^2``); the residual stream,
    attention and MLP activations of a layer (``8 * d_model + 3 * d_mlp`` per position); and
    the logits of the last position (``d_vocab``): what is measured reads only the last
    positions' log-probabilities, a chunk of the vocabulary at a time
    (:mod:`~mlake_core.models.readout`), so no pass needs the logits of every position.
    Numbers are counted at 4 bytes (float32: softmax upcasts, and CPU runs are float32).
    """
    n = int(n_tokens)
    per_row = (
        (3 * max(info.n_heads, 1) + 1) * n * n
        + n * (8 * info.d_model + 3 * info.d_mlp)
        + info.d_vocab
    )
    return 4 * rows * per_row


#: What :func:`free_bytes` answers inside :func:`assume_free_bytes` (``None``: measure).
_ASSUMED_FREE: ContextVar[int | None] = ContextVar("mlake_assumed_free_bytes", default=None)


@contextmanager
def assume_free_bytes(n_bytes: int) -> Iterator[None]:
    """Inside the block, :func:`free_bytes` answers ``n_bytes`` for every device instead of
    measuring: the planner (:mod:`mlake_core.models.planner`) runs the stages' own batch-size
    functions for a device that is not this machine's (an 80 GiB GPU, the weights loaded)."""
    token = _ASSUMED_FREE.set(max(0, int(n_bytes)))
    try:
        yield
    finally:
        _ASSUMED_FREE.reset(token)


def free_bytes(device: torch.device) -> int | None:
    """Memory free for a pass on ``device``: the GPU's free memory (CUDA), the machine's
    available memory (CPU), ``None`` for other devices (not checked); inside
    :func:`assume_free_bytes`, the assumed amount."""
    assumed = _ASSUMED_FREE.get()
    if assumed is not None:
        return assumed
    if device.type == "cuda":  # what torch's allocator holds but does not use is free too
        free, _total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + held)
    if device.type != "cpu":
        return None
    import psutil

    return int(psutil.virtual_memory().available)


class LongSequenceWarning(UserWarning):
    """A sequence longer than the model's :attr:`ModelInfo.max_positions` was run (rotary or
    ALiBi positions: it runs, outside the lengths the model was trained on)."""


@dataclass(frozen=True, eq=False)
class PastKeyValues:
    """The attention keys and values of a run's positions, to continue it without recomputing
    them (:meth:`ModelAdapter.run_with_past`, ``run_with_patches(..., past=...)``).

    Causal attention makes the activations of a position depend only on positions up to it, so
    continuing from the keys and values of a prefix gives exactly the activations of a run of
    the whole sequence (with the same patches on the prefix).

    Attributes:
        keys: per block, ``[batch, kv_heads, pos, head_dim]``.
        values: per block, the same shape.
        attention_mask: ``[batch, pos]``, the mask of the run that produced them (1 for real
            tokens); new tokens see exactly the real ones.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    attention_mask: TokenIds

    def __post_init__(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise ValueError("PastKeyValues needs one key and one value tensor per block")
        n, pos = self.attention_mask.shape
        for k, v in zip(self.keys, self.values, strict=True):
            if k.ndim != 4 or k.shape != v.shape or k.shape[0] != n or k.shape[2] != pos:
                raise ValueError(
                    f"keys and values must be [batch, heads, pos, head_dim] matching the mask "
                    f"[{n}, {pos}]; got {tuple(k.shape)} and {tuple(v.shape)}"
                )

    @property
    def length(self) -> int:
        """Number of (padded) positions."""
        return int(self.attention_mask.shape[1])

    @property
    def n_rows(self) -> int:
        """Number of batch rows."""
        return int(self.attention_mask.shape[0])

    def left_aligned(self) -> PastKeyValues:
        """The same keys and values with each row's real positions moved to the end of the
        row, in order, and its padding to the start (a left-padded past is returned as is).

        Keys carry their positions (rotary) or get them from the mask (ALiBi), so this changes
        nothing a continuation computes, except on sliding-window layers, which mask by padded
        index: there it removes padding from between a row's real tokens.
        """
        mask = self.attention_mask
        order = torch.argsort(mask.long(), dim=-1, stable=True)  # padding first, real in order
        unchanged = torch.arange(self.length, device=mask.device).expand_as(order)
        if bool((order == unchanged).all()):
            return self

        def gather(t: Tensor) -> Tensor:
            idx = order.to(t.device)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])
            return t.gather(2, idx)

        return PastKeyValues(
            tuple(gather(k) for k in self.keys),
            tuple(gather(v) for v in self.values),
            mask.gather(1, order),
        )

    def crop(self, length: int) -> PastKeyValues:
        """The first ``length`` positions (``1 <= length <= self.length``)."""
        if not 1 <= length <= self.length:
            raise ValueError(f"crop to {length} positions: keep 1 to {self.length}")
        return PastKeyValues(
            tuple(k[:, :, :length] for k in self.keys),
            tuple(v[:, :, :length] for v in self.values),
            self.attention_mask[:, :length],
        )

    def select(self, rows: Indices) -> PastKeyValues:
        """The given rows, in order (a row may be taken several times)."""
        rows = rows.to(self.attention_mask.device)
        return PastKeyValues(
            tuple(k.index_select(0, rows.to(k.device)) for k in self.keys),
            tuple(v.index_select(0, rows.to(v.device)) for v in self.values),
            self.attention_mask.index_select(0, rows),
        )

    @classmethod
    def from_hf(cls, cache: Any, attention_mask: TokenIds) -> PastKeyValues:
        """Read a Hugging Face ``DynamicCache`` (transformers 5: ``cache.layers[i].keys``).

        Raises:
            NotImplementedError: for other caches (sliding-window or recurrent layers, legacy
                tuples), which cannot be cropped to any prefix.
        """
        layers: list[Any] = list(getattr(cache, "layers", None) or [])
        ok = all(
            isinstance(getattr(layer, "keys", None), Tensor)
            and isinstance(getattr(layer, "values", None), Tensor)
            and not getattr(layer, "is_sliding", False)
            for layer in layers
        )
        if not layers or not ok:
            raise NotImplementedError(
                f"cannot continue a run from a {type(cache).__name__} (only full-attention "
                "DynamicCache layers can be cropped to any prefix)"
            )
        return cls(
            tuple(layer.keys for layer in layers),
            tuple(layer.values for layer in layers),
            attention_mask,
        )

    @staticmethod
    def empty_hf() -> Any:
        """An empty Hugging Face ``DynamicCache`` whose layers keep every position."""
        from transformers import DynamicCache

        return DynamicCache()

    def to_hf(self) -> Any:
        """A fresh Hugging Face ``DynamicCache`` holding copies of these keys and values (the
        forward pass extends it; this object is left unchanged)."""
        from transformers import DynamicCache

        return DynamicCache(list(zip(self.keys, self.values, strict=True)))


@runtime_checkable
class ModelAdapter(Protocol):
    """One causal LM behind a backend-independent interface (see the module docstring).

    Attributes:
        info: provenance, shapes and BOS policy (recorded with every result).
        spec: the architecture's site table.
        tokenizer: the Hugging Face tokenizer.
    """

    info: ModelInfo
    spec: ArchitectureSpec
    tokenizer: Any

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        ...

    @property
    def d_model(self) -> int:
        """Residual stream width."""
        ...

    @property
    def d_mlp(self) -> int:
        """MLP hidden width (width of ``mlp_post``)."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the weights live; batches are moved there."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (activations come back in it)."""
        ...

    @property
    def sites(self) -> tuple[str, ...]:
        """Every canonical site name of this model, in execution order."""
        ...

    def site_width(self, site: str) -> int:
        """Last-dimension width of a site's activation (``d_model``, ``d_mlp``, or
        ``n_heads * d_head`` for ``attn_z``)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, following the BOS policy."""
        ...

    def check_fits(self, n_tokens: int, where: str, *, memory: bool = True) -> None:
        """Refuse a prompt of ``n_tokens`` tokens that the model cannot run (see
        :meth:`BaseAdapter.check_fits`), naming ``where``."""
        ...

    def logit_lens(self, resid: Activation, *, grad: bool = False) -> Logits:
        """Logits that residual-stream states ``[..., d_model]`` would give if they left the
        last block (see :meth:`BaseAdapter.logit_lens`)."""
        ...

    def batch(
        self, sequences: Sequence[Sequence[int]], padding_side: PaddingSide = "left"
    ) -> TokenBatch:
        """Pad token id sequences into a batch on :attr:`device`."""
        ...

    def tokenize(self, texts: Sequence[str], padding_side: PaddingSide = "left") -> TokenBatch:
        """Encode and pad texts."""
        ...

    def forward(self, batch: TokenBatch) -> Logits:
        """Logits ``[batch, pos, vocab]``."""
        ...

    def run_with_cache(
        self,
        batch: TokenBatch,
        sites: Sequence[str],
        *,
        patches: Sequence[Patch] = (),
        last_only: bool = False,
    ) -> tuple[Logits, dict[str, Tensor]]:
        """Logits and detached activations ``[batch, pos, width]`` by canonical site name."""
        ...

    def activations(
        self, batch: TokenBatch, sites: Sequence[str], *, patches: Sequence[Patch] = ()
    ) -> dict[str, Tensor]:
        """Detached activations at ``sites`` only: the forward pass stops after the last of
        them (no later block, no unembedding)."""
        ...

    def run_with_patches(
        self,
        batch: TokenBatch,
        patches: Sequence[Patch],
        *,
        last_only: bool = False,
        past: PastKeyValues | None = None,
    ) -> Logits:
        """Logits after applying the patches (``[batch, 1, vocab]`` with ``last_only``); with
        ``past``, the batch's tokens continue the past's rows."""
        ...

    def run_with_past(
        self,
        batch: TokenBatch,
        patches: Sequence[Patch] = (),
        *,
        last_only: bool | int = False,
        past: PastKeyValues | None = None,
    ) -> tuple[Logits, PastKeyValues]:
        """Logits after applying the patches, and the keys and values of every position
        (the past's included when the batch continues one)."""
        ...

    def gradients(
        self,
        batch: TokenBatch,
        sites: Sequence[str],
        metric: Metric,
        *,
        patches: Sequence[Patch] = (),
        activations: dict[str, Tensor] | None = None,
        keep_last: int = 0,
        past: PastKeyValues | None = None,
        tokens: Tensor | None = None,
    ) -> tuple[Scalar, dict[str, Tensor]]:
        """``metric(logits)`` (or of the log-probabilities of ``tokens``) and its gradient with
        respect to each site's activation (``activations``, when given, receives the
        activations themselves)."""
        ...

    def final_states(
        self,
        batch: TokenBatch,
        patches: Sequence[Patch] = (),
        *,
        sites: Sequence[str] = (),
        past: PastKeyValues | None = None,
        keep_past: bool = False,
        start: tuple[int, Activation] | None = None,
    ) -> tuple[Activation, dict[str, Tensor], PastKeyValues | None]:
        """A pass that stops after the last block: its output, activations at ``sites``, and
        (``keep_past``) the keys and values (see :meth:`BaseAdapter.final_states`)."""
        ...

    def readout_logprobs(self, resid: Activation, tokens: Tensor) -> Tensor:
        """Log-probabilities of ``tokens`` from last-block outputs, a chunk of the vocabulary
        at a time (see :meth:`BaseAdapter.readout_logprobs`)."""
        ...

    def intervening(self, patches: Sequence[UnitPatch]) -> AbstractContextManager[None]:
        """A block in which every forward pass applies ``patches`` (ablations)."""
        ...


class BaseAdapter:
    """Shared implementation of :class:`ModelAdapter`; backends implement :meth:`_run`.

    Args:
        tokenizer: the model's Hugging Face tokenizer (not modified).
        spec: the architecture's site table.
        info: provenance and shapes.
    """

    def __init__(self, tokenizer: Any, spec: ArchitectureSpec, info: ModelInfo) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.info = info
        self._device = torch.device(info.device)
        self._dtype = getattr(torch, info.dtype)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        # Padding is masked everywhere, so any in-vocabulary id will do.
        self.pad_token_id: int = int(pad) if pad is not None else 0
        # Unit patches applied to every pass (see :meth:`intervening`).
        self._standing: tuple[UnitPatch, ...] = ()
        # Output deltas added in every pass (see :meth:`adding`).
        self._deltas: tuple[OutputDelta, ...] = ()
        # Blocks below this one do not run (see :meth:`_starting_at`).
        self._skipped_below = 0
        # How EditResult.applied applies an edit unless told (ModelSettings.edit_apply):
        # ``weights`` or ``intervention`` (mlake_core.editing.intervention.EDIT_APPLY).
        self.edit_apply: str = "weights"

    # -- shapes ----------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return self.info.n_layers

    @property
    def d_model(self) -> int:
        """Residual stream width."""
        return self.info.d_model

    @property
    def d_mlp(self) -> int:
        """MLP hidden width (width of ``mlp_post``)."""
        return self.info.d_mlp

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return self._dtype

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site name of this model, in execution order."""
        return all_sites(self.n_layers)

    @property
    def kv_width(self) -> int:
        """Numbers per position in one block's key cache (the same for values):
        ``num_key_value_heads * d_head`` from the model's config (fewer heads than ``n_heads``
        under grouped-query attention), ``n_heads * d_head`` when the config does not say."""
        root = getattr(self, "_hf_modules", {}).get("")
        kv_heads = getattr(getattr(root, "config", None), "num_key_value_heads", None)
        heads = int(kv_heads or self.info.n_heads or 1)
        return heads * int(self.info.d_head or max(1, self.d_model // max(1, self.info.n_heads)))

    def site_width(self, site: str) -> int:
        """Last-dimension width of a site's activation."""
        kind = parse_site(site, self.n_layers).kind
        if kind == "mlp_post":
            return self.d_mlp
        if kind == "attn_z":
            return self.info.n_heads * self.info.d_head
        return self.d_model

    def module_path(self, site: str) -> str:
        """The Hugging Face module boundary carrying ``site``, e.g. ``"...down_proj (input)"``."""
        parsed = parse_site(site, self.n_layers)
        where = self.spec.sites[parsed.kind]
        return f"{where.path(parsed.layer)} ({where.port})"

    # -- weights (for editing) -------------------------------------------------------------

    def _index_modules(self, hf_model: torch.nn.Module) -> None:
        """Remember the HF modules by their original paths (called by backends before any
        wrapping: TransformerLens re-parents modules, after which paths change)."""
        self._hf_modules: dict[str, torch.nn.Module] = dict(hf_model.named_modules())
        import inspect

        # Whether the HF forward can compute the logits of the last position only.
        self._logits_to_keep = "logits_to_keep" in inspect.signature(hf_model.forward).parameters

    def hf_module(self, path: str) -> torch.nn.Module:
        """The Hugging Face module at ``path`` (its original dotted path)."""
        try:
            return self._hf_modules[path]
        except KeyError:
            raise KeyError(f"{self.info.model_id}: no module {path!r}") from None

    def module_device(self, path: str) -> torch.device:
        """Where the module at ``path`` computes: its parameters' device, or, for a module
        whose weights accelerate keeps offloaded (``meta`` until its forward loads them), the
        execution device of its hook.  With one device for the whole model this is
        :attr:`device`; with a device map (``--device auto`` over several GPUs) each layer's
        own, so patches, read-outs and edits of a layer are computed where the layer is."""
        module: Any = self.hf_module(path)
        hook = getattr(module, "_hf_hook", None)
        execution = getattr(hook, "execution_device", None)
        if execution is not None:
            return torch.device(f"cuda:{execution}" if isinstance(execution, int) else execution)
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type != "meta":
                return tensor.device
        return self.device

    def mlp_down(self, layer: int) -> tuple[torch.nn.Parameter, bool]:
        """The weight of layer ``layer``'s MLP output projection (input: ``mlp_post``,
        output: ``mlp_out`` minus its bias), and whether it is stored ``[out, in]`` (torch
        ``Linear``) rather than ``[in, out]`` (GPT-2's ``Conv1D``).

        Editing methods change this weight in place; both backends wrap the same tensor.
        """
        parse_site(f"mlp_post.{layer}", self.n_layers)  # range check
        module: Any = self.hf_module(self.spec.sites["mlp_post"].path(layer))
        out_in = type(module).__name__ != "Conv1D"
        return module.weight, out_in

    def sublayer_output(
        self, kind: Literal["attn", "mlp"], layer: int, projected: Activation
    ) -> Activation:
        """What sublayer ``kind`` of block ``layer`` adds to the residual stream, given the
        output of its projection (``o_proj(attn_z)`` or ``down_proj(mlp_post)``): that output
        itself, or the architecture's post-norm of it (Gemma 3).  So
        ``sublayer_output("mlp", L, down_proj(mlp_post.L)) == mlp_out.L``; differentiable, for
        methods that need a projection's output from a change of ``mlp_out`` (a weight edit
        solves for the projection's output, not for what the norm makes of it).
        """
        parse_site(f"{kind}_out.{layer}", self.n_layers)  # kind and range check
        norm = self.spec.post_norm(kind)
        if norm is None:
            return projected
        block = self.spec.sites["resid_pre"].path(layer)
        path = f"{block}.{norm}"
        # Computed on the norm's device (a layer of a device map), returned on the input's.
        out = self.hf_module(path)(projected.to(self.module_device(path)))
        return out.to(projected.device)

    def logit_lens(self, resid: Activation, *, grad: bool = False) -> Logits:
        """The logit lens (nostalgebraist 2020): the logits residual-stream states
        ``[..., d_model]`` (``resid_post.L`` read at any layer) would give if they left the last
        block: the final norm, the unembedding, the logit scale (Cohere) and, where the model
        has one, the final logit soft-cap (Gemma 3 270M has none).  Applied to
        ``resid_post.{n_layers-1}`` it gives the model's own logits.  No gradient unless
        ``grad`` (then differentiable in ``resid``: a tuned lens fits its translators through
        it, :mod:`analysis.tuned_lens`); float32 on the model's device.
        """
        norm = self.hf_module(self.spec.final_norm)
        head = self.hf_module(self.spec.unembed)
        with torch.enable_grad() if grad else torch.no_grad():
            # The final norm and the unembedding may sit on the last device of a device map.
            where = self.module_device(self.spec.final_norm)
            normed = norm(resid.to(device=where, dtype=self.dtype))
            logits = head(normed.to(self.module_device(self.spec.unembed))).float()
            logits = logits.to(self.device)
            if self.info.logit_scale != 1.0:
                logits = logits * self.info.logit_scale
            cap = self.info.logit_softcap
            if cap:
                logits = cap * torch.tanh(logits / cap)
        return logits

    def readout_logprobs(self, resid: Activation, tokens: Tensor) -> Tensor:
        """Log-probabilities of ``tokens`` given the last block's outputs: the final norm, then
        :func:`~mlake_core.models.readout.token_logprobs` with the model's unembedding (bias
        and tied weights as the model has them) and final logit soft-cap, the log-sum-exp over
        the vocabulary a chunk at a time, so no ``[rows, vocab]`` logits are held at once.

        Args:
            resid: ``resid_post.{n_layers-1}`` states ``[..., d_model]`` (e.g. the last
                positions of :meth:`final_states`).
            tokens: the token measured at each state, ``[...]`` (broadcast to ``resid``'s
                leading shape).

        Returns:
            ``[...]`` float32 log-probabilities, equal to ``log_softmax`` of the model's
            logits there; differentiable with respect to ``resid`` when it requires grad.
        """
        from mlake_core.models.readout import token_logprobs

        norm = self.hf_module(self.spec.final_norm)
        head: Any = self.hf_module(self.spec.unembed)
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor) or weight.ndim != 2:
            raise NotImplementedError(
                f"{self.info.model_id}: the unembedding {self.spec.unembed} is not a linear map"
            )
        bias = getattr(head, "bias", None)
        # Differentiable with respect to ``resid`` only: a detached ``resid`` gives a detached
        # result (the weights' requires_grad does not make an analysis build a graph).
        if weight.device.type == "meta":
            raise NotImplementedError(
                f"{self.info.model_id}: the unembedding is offloaded by the device map; keep "
                f"{self.spec.unembed} on a device"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and resid.requires_grad):
            # The final norm and the unembedding compute on their own devices (the last ones
            # of a device map); the result is on the model's device.
            where = self.module_device(self.spec.final_norm)
            hidden = norm(resid.to(device=where, dtype=self.dtype)).to(weight.device)
            scale = self.info.logit_scale
            if scale != 1.0:
                # s * (W h + b) == W (s h) + s b: the scaled logits without a scaled weight.
                hidden = hidden * scale
                bias = bias * scale if isinstance(bias, Tensor) else bias
            return token_logprobs(
                hidden,
                weight,
                torch.as_tensor(tokens, device=weight.device),
                bias=bias if isinstance(bias, Tensor) else None,
                softcap=self.info.logit_softcap,
            ).to(self.device)

    def editable_parameter(self, name: str) -> torch.nn.Parameter:
        """The parameter ``name`` (``"<module path>.<attribute>"``, original HF paths), for
        writing in place (weight edits).

        Raises:
            ConfigError: for the token embedding and the unembedding (LM head).  With tied
                embeddings they are one tensor, so writing the input embedding also changes
                every logit; no edit method writes them, and none may.
        """
        module_path, _, attr = name.rpartition(".")
        param = getattr(self.hf_module(module_path), attr, None)
        if not isinstance(param, torch.nn.Parameter):
            raise KeyError(f"{self.info.model_id}: no parameter {name!r}")
        embed = self.hf_module(self.spec.sites["embed"].path(None))
        unembed = self.hf_module(self.spec.unembed)
        guarded = {p.data_ptr() for p in (*embed.parameters(), *unembed.parameters())}
        if param.data_ptr() in guarded:
            tie = " (tied: one tensor for both)" if self.info.tied_embeddings else ""
            raise ConfigError(
                f"{self.info.model_id}: {name} is the token embedding or the unembedding{tie}; "
                "edits may write MLP projections only"
            )
        return param

    # -- tokenization ----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with BOS prepended iff :attr:`info.bos.prepend_bos`.

        No other special tokens are added.  Join prompt and answer by concatenating the ids of
        separately encoded pieces, not the strings.
        """
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.info.bos.prepend_bos and self.info.bos.bos_token_id is not None:
            ids = [self.info.bos.bos_token_id, *ids]
        return ids

    def batch(
        self, sequences: Sequence[Sequence[int]], padding_side: PaddingSide = "left"
    ) -> TokenBatch:
        """Pad token id sequences into a :class:`TokenBatch` on this model's device."""
        return TokenBatch.from_sequences(sequences, self.pad_token_id, padding_side, self.device)

    def tokenize(self, texts: Sequence[str], padding_side: PaddingSide = "left") -> TokenBatch:
        """Encode texts (:meth:`encode`) and pad them into a batch."""
        return self.batch([self.encode(t) for t in texts], padding_side)

    # -- operations ------------------------------------------------------------------------

    def forward(self, batch: TokenBatch) -> Logits:
        """Logits of a batch."""
        with torch.no_grad():
            logits, _ = self._run(batch.to(self.device), [], self._group(()), keep_graph=False)
        return logits

    def run_with_cache(
        self,
        batch: TokenBatch,
        sites: Sequence[str],
        *,
        patches: Sequence[Patch] = (),
        last_only: bool = False,
    ) -> tuple[Logits, dict[str, Tensor]]:
        """Logits and activations (``[batch, pos, width]``, detached) at ``sites``.

        With ``patches``, activations are read after patching: a patched site returns its
        patched value, later sites their values downstream of the patch.  With ``last_only``,
        only the last position's logits are computed (``[batch, 1, vocab]``; as in
        :meth:`run_with_patches`, rows must end at the last index), for callers that want
        the activations: the unembedding of every position can cost more than the blocks.

        Returns:
            Logits ``[batch, pos, vocab]`` and the activations keyed by canonical site name
            (``"resid_post.-1"`` comes back as ``"resid_post.{n_layers - 1}"``).
        """
        if (
            last_only
            and batch.padding_side == "right"
            and bool((batch.lengths != batch.shape[1]).any())
        ):
            raise ValueError("last_only needs left padding or rows of equal length")
        order = execution_order(list(sites), self.n_layers)
        with torch.no_grad():
            logits, cache = self._run(
                batch.to(self.device),
                order,
                self._group(patches),
                keep_graph=False,
                last_only=last_only,
            )
        return (logits[:, -1:] if last_only else logits), cache

    def activations(
        self, batch: TokenBatch, sites: Sequence[str], *, patches: Sequence[Patch] = ()
    ) -> dict[str, Tensor]:
        """Activations (``[batch, pos, width]``, detached) at ``sites``, as
        :meth:`run_with_cache` returns them, without the rest of the forward pass: it stops
        once the last of ``sites`` is read, so neither the blocks after it nor the unembedding
        run.  On a model with a large vocabulary (Gemma 3: 262k tokens) the unembedding costs
        more than the blocks, so a statistic of one early layer's activations (ROME's key
        covariance, LAPE's activation rates, probes) costs a fraction of a full pass.

        Patches (and :meth:`intervening` ablations) at or before the last site apply as in
        :meth:`run_with_cache`; those after it cannot change what is read.
        """
        if not sites:
            raise ValueError("activations: no site to read")
        order = execution_order(list(sites), self.n_layers)
        with torch.no_grad():
            _, cache = self._run(
                batch.to(self.device), order, self._group(patches), keep_graph=False, stop=True
            )
        return cache

    def final_states(
        self,
        batch: TokenBatch,
        patches: Sequence[Patch] = (),
        *,
        sites: Sequence[str] = (),
        past: PastKeyValues | None = None,
        keep_past: bool = False,
        start: tuple[int, Activation] | None = None,
    ) -> tuple[Activation, dict[str, Tensor], PastKeyValues | None]:
        """One pass that stops after the last block: its output ``resid_post.{n_layers-1}``
        ``[batch, pos, d_model]`` (for :meth:`readout_logprobs`; no logits are computed), the
        activations at ``sites``, and with ``keep_past`` the keys and values of every position
        (as :meth:`run_with_past` returns them).  No gradient.

        Args:
            batch: the tokens; with ``past``, row ``i`` continues the past's row ``i``.
            patches: as in :meth:`run_with_patches` (positions index ``batch``).
            sites: activations to return besides (detached).
            past: keys and values this batch continues.
            keep_past: also return the keys and values (raises ``NotImplementedError`` where
                :meth:`run_with_past` would).
            start: ``(layer, resid)``: start the pass at block ``layer``, whose input is
                ``resid`` ``[batch, pos, d_model]`` (every position, e.g. a cached run's
                ``resid_pre.{layer}``); the blocks below do not run (see
                :meth:`_starting_at`).  Patches may then touch only sites from
                ``resid_pre.{layer}`` on.
        """
        last = f"resid_post.{self.n_layers - 1}"
        order = execution_order([*sites, last], self.n_layers)
        batch = batch.to(self.device)
        past = self._check_past(batch, past)
        grouped = self._group(patches)
        out: list[Any] | None = [] if keep_past else None
        with torch.no_grad(), self._starting_at(start, batch, grouped):
            _, cache = self._run(
                batch, order, grouped, keep_graph=False, past=past, past_out=out, stop=True
            )
        new_past = None
        kept = getattr(self, "_pass_cache", None)
        self._pass_cache: Any = None  # hold no cache between passes
        if keep_past:
            hf_cache = out[0] if out else kept
            if hf_cache is None:
                raise NotImplementedError(f"{self.info.model_id}: the forward kept no cache")
            mask = batch.attention_mask
            if past is not None:
                mask = torch.cat([past.attention_mask.to(mask.device), mask], dim=-1)
            new_past = PastKeyValues.from_hf(hf_cache, mask)
        wanted = {parse_site(s, self.n_layers).name for s in sites}
        name = parse_site(last, self.n_layers).name
        final = cache[name] if name in wanted else cache.pop(name)
        return final, cache, new_past

    @contextmanager
    def _starting_at(
        self,
        start: tuple[int, Activation] | None,
        batch: TokenBatch,
        grouped: dict[Site, list[Patch | UnitPatch]],
    ) -> Iterator[None]:
        """Run the passes inside the block from block ``layer`` on (``start = (layer,
        resid)``): ``resid`` is written into ``resid_pre.{layer}`` at every position (before
        the caller's patches there, which win), and every block below ``layer`` returns its
        input unchanged instead of computing (its keys and values are not extended: nothing
        above reads them).  The embedding still runs (it costs one lookup per token).  A
        restoration at layer ``l`` changes nothing below ``l``, so rows that start there from
        the cached corrupted run's residual stream equal the whole-stack rows (tested on every
        architecture and both backends).  Works through the Hugging Face blocks themselves, so
        on both backends and every architecture alike.

        Raises:
            ValueError: a patch at a site below ``resid_pre.{layer}`` (it would be ignored), or
                ``resid`` not ``[batch, pos, d_model]``.
        """
        if start is None:
            yield
            return
        layer, resid = int(start[0]), start[1]
        entry = parse_site(f"resid_pre.{layer}", self.n_layers)
        n_rows, n_pos = batch.shape
        if tuple(resid.shape) != (n_rows, n_pos, self.d_model):
            raise ValueError(
                f"start at block {layer}: resid must be {(n_rows, n_pos, self.d_model)}, got "
                f"{tuple(resid.shape)}"
            )
        below = [
            s.name
            for s, ps in grouped.items()
            if s < entry and any(isinstance(p, Patch) for p in ps)
        ]
        if below:
            raise ValueError(
                f"start at block {layer}: patches at {below} lie below it and would not apply"
            )
        rows = torch.arange(n_rows).repeat_interleave(n_pos)
        positions = torch.arange(n_pos).repeat(n_rows)
        feed = Patch(entry.name, rows, positions, resid.reshape(-1, self.d_model))
        grouped[entry] = [feed, *grouped.get(entry, [])]
        as_tuple = self._block_returns_tuple()
        blocks = [self.hf_module(self.spec.sites["resid_pre"].path(lo)) for lo in range(layer)]
        saved = [block.__dict__.get("forward") for block in blocks]

        def skip(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            # The same structure as the block's own output (a wrapper may unwrap a 1-tuple).
            return (hidden, *[None] * (as_tuple - 1)) if as_tuple else hidden

        skipped_before = self._skipped_below
        self._skipped_below = layer  # output deltas below are not visited (_delta_plan)
        try:
            for block in blocks:
                block.forward = skip
            yield
        finally:
            self._skipped_below = skipped_before
            for block, before in zip(blocks, saved, strict=True):
                if before is None:
                    block.__dict__.pop("forward", None)
                else:
                    block.forward = before

    def _block_returns_tuple(self) -> int:
        """The length of the tuple the model's blocks return (BLOOM: hidden states and
        attention weights), or 0 when they return the hidden states (the others, under
        transformers 5); read once from a one-token pass."""
        known = getattr(self, "_blocks_tuple", None)
        if known is None:
            # Wrapped as :meth:`_starting_at` wraps it (a bridge may call ``forward`` without
            # the module's hooks).
            block = self.hf_module(self.spec.sites["resid_pre"].path(0))
            before = block.__dict__.get("forward")
            inner = block.forward
            seen: list[int] = []

            def probe(*args: Any, **kwargs: Any) -> Any:
                output = inner(*args, **kwargs)
                seen.append(len(output) if isinstance(output, tuple) else 0)
                return output

            block.forward = probe
            try:
                self.forward(self.batch([[self.pad_token_id]]))
            finally:
                if before is None:
                    block.__dict__.pop("forward", None)
                else:
                    block.forward = before
            if not seen:
                raise NotImplementedError(
                    f"{self.info.model_id}: the blocks cannot be skipped (the pass does not call "
                    "their forward)"
                )
            known = seen[0]
            self._blocks_tuple = known
        return known

    def run_with_patches(
        self,
        batch: TokenBatch,
        patches: Sequence[Patch],
        *,
        last_only: bool = False,
        past: PastKeyValues | None = None,
    ) -> Logits:
        """Logits after applying ``patches`` (see :class:`Patch`).

        With ``last_only``, only the last position's logits are computed and returned
        (``[batch, 1, vocab]``), which saves the unembedding of every other position (most of
        the cost of a small model with a large vocabulary).  Every row's last real token must
        then be at the last index: left padding, or rows of equal length.

        With ``past`` (from :meth:`run_with_past`, cropped or row-selected as needed), row
        ``i`` of ``batch`` holds the tokens that follow row ``i`` of the past: they attend to
        the past's real tokens and their positions count on from them, so their activations
        and logits equal those of the whole sequence run at once.  Only the new tokens are
        computed, and patch positions index the new tokens (``batch``), not the past.
        """
        if (
            last_only
            and batch.padding_side == "right"
            and bool((batch.lengths != batch.shape[1]).any())
        ):
            raise ValueError("last_only needs left padding or rows of equal length")
        with torch.no_grad():
            logits, _ = self._run(
                batch.to(self.device),
                [],
                self._group(patches),
                keep_graph=False,
                last_only=last_only,
                past=self._check_past(batch, past),
            )
        return logits[:, -1:] if last_only else logits

    def run_with_past(
        self,
        batch: TokenBatch,
        patches: Sequence[Patch] = (),
        *,
        last_only: bool | int = False,
        past: PastKeyValues | None = None,
    ) -> tuple[Logits, PastKeyValues]:
        """Logits after applying ``patches`` (as :meth:`run_with_patches`), and the attention
        keys and values of every position, to continue the run with
        ``run_with_patches(..., past=...)`` or another ``run_with_past(..., past=...)``
        (incremental decoding).

        Args:
            batch: the tokens to run; with ``past``, row ``i`` continues the past's row ``i``.
            patches: as in :meth:`run_with_patches` (positions index ``batch``).
            last_only: ``True``: the logits of the last position only (``[batch, 1, vocab]``);
                an int ``k``: those of the last ``k`` positions (``[batch, k, vocab]``).  Every
                row's last real token must be at the last index (left padding, or rows of equal
                length).
            past: keys and values this batch continues (the returned past holds them too, its
                mask the past's followed by the batch's; on models with sliding-window layers
                the past's real positions may first be moved to the end of each row, see
                :meth:`_check_past`).

        Raises:
            NotImplementedError: when the model's cache cannot be continued from an arbitrary
                prefix (see :meth:`PastKeyValues.from_hf`), or a sliding window would make the
                continued run differ from the whole sequence's (see :meth:`_check_past`);
                callers fall back to full runs.
        """
        if (
            last_only
            and batch.padding_side == "right"
            and bool((batch.lengths != batch.shape[1]).any())
        ):
            raise ValueError("last_only needs left padding or rows of equal length")
        batch = batch.to(self.device)
        past = self._check_past(batch, past)
        out: list[Any] = []
        with torch.no_grad():
            logits, _ = self._run(
                batch,
                [],
                self._group(patches),
                keep_graph=False,
                last_only=last_only,
                past=past,
                past_out=out,
            )
        if not out:
            raise NotImplementedError(f"{self.info.model_id}: the forward returned no cache")
        mask = batch.attention_mask
        if past is not None:
            mask = torch.cat([past.attention_mask.to(mask.device), mask], dim=-1)
        new_past = PastKeyValues.from_hf(out[0], mask)
        keep = int(last_only)
        return (logits[:, -keep:] if keep else logits), new_past

    def _check_past(self, batch: TokenBatch, past: PastKeyValues | None) -> PastKeyValues | None:
        """Check that ``past`` fits ``batch`` and can be continued exactly; returns the past to
        continue (left-aligned on models with sliding-window layers, see below).

        Sliding-window layers (:attr:`ModelInfo.sliding_window` ``w``) mask keys by *padded*
        index: a query at index ``i`` sees keys ``i - w + 1 .. i``.  Within a row whose real
        tokens are contiguous, padded distances are token distances and a continued run is
        exact (the keys are kept whole, :meth:`_model_inputs`).  Padding *between* a row's
        real tokens -- a past with interior padding, or a left-padded batch continuing a past
        -- stretches padded distances, so keys the whole sequence would see could fall out of
        the window.  Hence:

        * when the past and batch together span at most ``w`` positions, every key is in
          every query's window either way: continued as is;
        * otherwise the past is left-aligned (each row's real positions moved to its end;
          keys carry their rotary positions already, so only their padded index changes),
          and the run is refused (``NotImplementedError``: callers run whole sequences) if a
          row still has padding between real tokens and spans more than ``w`` positions.

        Raises:
            ValueError: a past with another number of rows or blocks than the batch and model.
            NotImplementedError: a continuation a sliding window would make inexact.
        """
        if past is None:
            return None
        if past.n_rows != batch.shape[0]:
            raise ValueError(
                f"past has {past.n_rows} rows and the batch {batch.shape[0]}: one past row per "
                "batch row (PastKeyValues.select repeats rows)"
            )
        if len(past.keys) != self.n_layers:
            raise ValueError(f"past has {len(past.keys)} blocks, the model {self.n_layers}")
        window = self.info.sliding_window
        if window is None or past.length + batch.shape[1] <= window:
            return past  # no sliding layer, or everything within every window (no sync)
        past = past.left_aligned()
        mask = torch.cat(
            [past.attention_mask.to(batch.attention_mask.device), batch.attention_mask], dim=-1
        ).long()
        index = torch.arange(mask.shape[1], device=mask.device)
        span = (mask * index).amax(-1) - mask.argmax(-1) + 1  # first to last real token
        exact = (span == mask.sum(-1)) | (span <= window)
        if not bool(exact.all()):
            raise NotImplementedError(
                f"{self.info.model_id}: a row continuing its past has padding between its "
                f"tokens and spans more than the {window}-token sliding window; run the whole "
                "sequences instead"
            )
        return past

    def gradients(
        self,
        batch: TokenBatch,
        sites: Sequence[str],
        metric: Metric,
        *,
        patches: Sequence[Patch] = (),
        activations: dict[str, Tensor] | None = None,
        keep_last: int = 0,
        past: PastKeyValues | None = None,
        tokens: Tensor | None = None,
    ) -> tuple[Scalar, dict[str, Tensor]]:
        """Gradient of ``metric(logits)`` with respect to the activations at ``sites``.

        The model's parameters get no ``.grad``: only the activations are differentiated.

        Args:
            batch: the inputs.
            sites: canonical site names.
            metric: maps logits ``[batch, pos, vocab]`` to a scalar, e.g. the summed
                log-probability of the answer tokens.
            patches: applied before differentiating (gradients are at the patched point).
            activations: when given, filled with the (detached) activations at ``sites``, so
                attribution patching gets values and gradients from one pass.
            keep_last: when positive, only the logits of the last ``keep_last`` positions are
                computed and given to ``metric`` (rows must end at the last index: left padding
                or equal lengths); the unembedding of the other positions is saved.
            past: keys and values of a prefix to continue from (as in
                :meth:`run_with_patches`): ``batch`` holds only the following tokens, whose
                activations (and gradients) are those of the whole sequence.  The prefix itself
                is constant: nothing flows back into it.
            tokens: when given (token ids ``[k]``, or ``[batch, k]``), ``metric`` receives the
                log-probabilities ``[batch, k]`` of ``tokens[..., j]`` at the last ``k``
                positions instead of logits (rows must end at the last index): the pass stops
                after the last block and :meth:`readout_logprobs` reads them, a chunk of the
                vocabulary at a time in the forward and the backward pass, so no logits are
                held (``keep_last`` is then ignored).

        Returns:
            The metric's value (detached) and, per site, ``d metric / d activation``
            ``[batch, pos, width]``.
        """
        order = execution_order(list(sites), self.n_layers)
        final = f"resid_post.{self.n_layers - 1}"
        read = order if tokens is None else execution_order([*sites, final], self.n_layers)
        with torch.enable_grad():
            logits, acts = self._run(
                batch.to(self.device),
                read,
                self._group(patches),
                keep_graph=True,
                last_only=keep_last if tokens is None else False,
                past=self._check_past(batch, past),
                stop=tokens is not None,
            )
            if tokens is not None:
                ids = torch.as_tensor(tokens, device=self.device)
                k = int(ids.shape[-1])
                state = acts[parse_site(final, self.n_layers).name][:, -k:]
                value = metric(self.readout_logprobs(state, ids))
            else:
                if keep_last:
                    logits = logits[:, -keep_last:]
                value = metric(logits)
            if value.numel() != 1:
                raise ValueError(f"metric must return a scalar, got shape {tuple(value.shape)}")
            names = [s.name for s in order]
            grads = torch.autograd.grad(
                value.reshape(()), [acts[n] for n in names], allow_unused=True
            )
        # On the model's device whatever layer's device each was computed on (device map).
        out = {
            name: (g if g is not None else torch.zeros_like(acts[name])).detach().to(self.device)
            for name, g in zip(names, grads, strict=True)
        }
        if activations is not None:
            activations.update({name: acts[name].detach().to(self.device) for name in names})
        return value.detach().reshape(()), out

    # -- backend primitive -----------------------------------------------------------------

    @contextmanager
    def intervening(self, patches: Sequence[UnitPatch]) -> Iterator[None]:
        """Apply unit patches (ablations) to every forward pass inside the block: logits,
        caches, gradients and generation alike (other patches of a call come after them).

        Nested blocks add to the outer ones; leaving a block removes exactly its patches, even
        after an exception.
        """
        bad = [p for p in patches if not isinstance(p, UnitPatch)]
        if bad:
            raise TypeError("intervening takes UnitPatch objects (they fit any batch shape)")
        for patch in patches:
            parse_site(patch.site, self.n_layers)
        previous = self._standing
        self._standing = (*previous, *patches)
        try:
            yield
        finally:
            self._standing = previous

    @contextmanager
    def adding(self, deltas: Sequence[OutputDelta]) -> Iterator[None]:
        """Add the output deltas (:class:`OutputDelta`: a weight change applied as a term at
        its module's output) to every forward pass inside the block: logits, caches,
        gradients and generation alike.  No parameter is written.

        The backends apply them through their own hooks (a TransformerLens hook pair on the
        projection's input and output, or nnsight's ``.input``/``.output`` in the trace), read
        after any patch of the module's input site and before any read or patch of its output
        site.  Nested blocks add to the outer ones; leaving a block removes exactly its deltas,
        even after an exception.

        Raises:
            ConfigError: a module that is not an attention or MLP output projection (the
                modules whose input is the ``attn_z`` or ``mlp_post`` site).
        """
        for delta in deltas:
            if not isinstance(delta, OutputDelta):
                raise TypeError("adding takes OutputDelta objects")
            self.delta_input_site(delta.path)
        previous = self._deltas
        self._deltas = (*previous, *deltas)
        try:
            yield
        finally:
            self._deltas = previous

    def delta_input_site(self, path: str) -> Site:
        """The site at the input of the module ``path`` that an :class:`OutputDelta` may
        change: ``mlp_post.L`` (the MLP output projection) or ``attn_z.L`` (the attention
        output projection).

        Raises:
            ConfigError: for any other module.
        """
        for layer in range(self.n_layers):
            for kind in ("mlp_post", "attn_z"):
                if self.spec.sites[kind].path(layer) == path:
                    return parse_site(f"{kind}.{layer}", self.n_layers)
        raise ConfigError(
            f"{self.info.model_id}: {path!r} is not an MLP or attention output projection; "
            "an edit applied as an intervention may change those only"
        )

    def _delta_plan(self) -> dict[str, tuple[Site, Site | None, tuple[OutputDelta, ...]]]:
        """The standing output deltas by module path: ``(the module's input site, the site at
        its output or None when no site is there (Gemma 3's projection, followed by a
        post-norm), the deltas)``; none of blocks a pass skips (:meth:`_starting_at`)."""
        plan: dict[str, tuple[Site, Site | None, tuple[OutputDelta, ...]]] = {}
        for delta in self._deltas:
            if self.delta_input_site(delta.path).layer < self._skipped_below:
                continue  # a skipped block: its change is in the residual the pass starts from
            if delta.path in plan:
                site_in, site_out, ds = plan[delta.path]
                plan[delta.path] = (site_in, site_out, (*ds, delta))
                continue
            site_in = self.delta_input_site(delta.path)
            out_kind = "mlp_out" if site_in.kind == "mlp_post" else "attn_out"
            where = self.spec.sites[out_kind]
            site_out = (
                parse_site(f"{out_kind}.{site_in.layer}", self.n_layers)
                if where.path(site_in.layer) == delta.path and where.port == "output"
                else None
            )
            plan[delta.path] = (site_in, site_out, (delta,))
        return plan

    def _group(self, patches: Sequence[Patch]) -> dict[Site, list[Patch | UnitPatch]]:
        grouped: dict[Site, list[Patch | UnitPatch]] = {}
        every: list[Patch | UnitPatch] = [*self._standing, *patches]
        for patch in every:
            grouped.setdefault(parse_site(patch.site, self.n_layers), []).append(patch)
        return grouped

    def _run(
        self,
        batch: TokenBatch,
        read: list[Site],
        patches: dict[Site, list[Patch | UnitPatch]],
        *,
        keep_graph: bool,
        last_only: bool | int = False,
        past: PastKeyValues | None = None,
        past_out: list[Any] | None = None,
        stop: bool = False,
    ) -> tuple[Logits, dict[str, Tensor]]:
        """One forward pass that patches and reads sites.

        Args:
            batch: inputs, already on the model's device.
            read: sites to return, in execution order.
            patches: patches to apply, by site.
            keep_graph: return the live activations (part of the autograd graph) instead of
                detached ones.
            last_only: the logits of the last position are enough (the HF forward is asked
                for them alone when it supports ``logits_to_keep``; callers slice).
            past: keys and values the batch continues (:meth:`_model_inputs` passes them).
            past_out: when a list, the HF forward is asked for its cache and the cache object
                (past included) is appended to it.
            stop: stop the pass once the last site of ``read`` is read (nothing after it runs;
                the logits returned are then an empty tensor).

        Returns:
            Logits and the activations at ``read`` (after patching), by canonical name.
        """
        raise NotImplementedError

    def check_fits(self, n_tokens: int, where: str, *, memory: bool = True) -> None:
        """Refuse, before any pass, a sequence of ``n_tokens`` tokens (a prompt and what is
        scored or generated after it) that the model cannot run, naming ``where`` (the record).

        Two limits:

        - with learned positions, :attr:`ModelInfo.max_positions` (there is no embedding past
          it; rotary and ALiBi models run longer sequences, with a
          :class:`LongSequenceWarning` from the pass);
        - memory: one pass of one such sequence (:func:`pass_bytes`) must fit in the memory
          free on the model's device (:func:`free_bytes`).  Without this check a prompt far
          longer than the context ended in an out-of-memory traceback, or in the kernel's
          OOM killer, with nothing saying which record it was.  It depends on the memory
          free at the moment, so it is made (``memory``) only where a refusal stops the
          stage (the knowledge stage, which measures every prompt form first), never where
          a refused record would be skipped and the run saved as complete without it.

        Raises:
            DataError: naming ``where``, the limit and what to do.
        """
        from mlake_core.errors import DataError

        limit = self.info.max_positions
        if self.info.positional == "learned" and limit is not None and n_tokens > limit:
            raise DataError(  # the same reason for every record (stages count skips by it)
                f"{where}: longer than the model's {limit} learned positions (there is no "
                "position embedding past them); shorten the prompt (e.g. fewer in-context "
                "demonstrations)"
            )
        if not memory:
            return
        need = pass_bytes(self.info, n_tokens)
        free = free_bytes(self.device)
        if free is not None and need > free:
            raise DataError(
                f"{where}: {n_tokens} tokens"
                + (f" (the model is made for {limit})" if limit is not None else "")
                + f"; one forward pass of it needs about {need / 2**30:.1f} GiB (attention "
                f"over {n_tokens}x{n_tokens} positions in {self.info.n_heads} heads, and "
                f"the last position's logits over {self.info.d_vocab} tokens), more than the "
                f"{free / 2**30:.1f} GiB free on {self.device}; shorten the prompt"
            )

    def _check_length(self, batch: TokenBatch, past: PastKeyValues | None) -> None:
        """Compare the longest row (past and batch real tokens) with ``max_positions``."""
        limit = self.info.max_positions
        if limit is None or batch.shape[1] + (past.length if past else 0) <= limit:
            return  # the padded width fits: no row is longer (and no device sync)
        lengths = batch.attention_mask.sum(-1)
        if past is not None:
            lengths = lengths + past.attention_mask.to(lengths.device).sum(-1)
        longest = int(lengths.max())
        if longest <= limit:
            return
        what = (
            f"{self.info.model_id}: a sequence of {longest} tokens is longer than the "
            f"{limit} positions the model is made for"
        )
        if self.info.positional == "learned":
            raise ConfigError(
                f"{what} (learned position embeddings: there is none past {limit}); shorten "
                "the prompts (e.g. fewer in-context demonstrations, --set "
                "ike.n_demonstrations=N) or the generation"
            )
        if not getattr(self, "_warned_length", False):
            self._warned_length = True
            warnings.warn(
                f"{what}; {self.info.positional} positions run it, outside the lengths it was "
                "trained on (warned once per model)",
                LongSequenceWarning,
                stacklevel=2,
            )

    def _model_inputs(
        self,
        batch: TokenBatch,
        last_only: bool | int = False,
        past: PastKeyValues | None = None,
        keep_past: bool = False,
    ) -> dict[str, Any]:
        """Keyword arguments of the HF forward: ids, mask, (if taken) mask-derived positions,
        ``logits_to_keep`` when only the last position's (or last ``last_only``) logits are
        wanted, and ``use_cache`` only when a cache is continued (``past``: a fresh
        ``DynamicCache`` of it, the mask prefixed with the past's, positions counted on from its
        real tokens) or kept (``keep_past``: an empty ``DynamicCache`` of full layers, so that
        sliding-window layers keep every key too); plain passes build no cache."""
        mask = batch.attention_mask
        positions = batch.position_ids
        inputs: dict[str, Any] = {"input_ids": batch.input_ids}
        self._check_length(batch, past)
        if past is not None:
            past_mask = past.attention_mask.to(mask.device)
            positions = positions + past_mask.sum(-1, keepdim=True)
            mask = torch.cat([past_mask, mask], dim=-1)
            inputs["past_key_values"] = past.to_hf()
        elif keep_past:
            # A cache of full layers: left to itself, the model would build sliding-window
            # layers for its sliding layers (Gemma 3), which drop keys beyond the window and
            # cannot be continued from a prefix.
            inputs["past_key_values"] = PastKeyValues.empty_hf()
        # The cache this pass extends in place (read back by :meth:`final_states` when the pass
        # stops after the last block, before the model returns it).
        self._pass_cache = inputs.get("past_key_values")
        inputs["attention_mask"] = mask
        if self.spec.uses_position_ids:
            inputs["position_ids"] = positions
        inputs["use_cache"] = past is not None or keep_past
        if last_only and getattr(self, "_logits_to_keep", False):
            # ``last_only`` may be a count: the logits of the last that many positions.
            inputs["logits_to_keep"] = int(last_only)
        return inputs
