"""Canonical activation sites and, per architecture, where each one lives in the HF model.

A *site* is a named place in the forward pass whose activation can be read, patched or
differentiated: ``embed``, ``resid_pre.{L}``, ``resid_post.{L}``, ``attn_out.{L}``,
``mlp_out.{L}`` and ``mlp_post.{L}`` (``L`` counts blocks from 0).  Analyses speak only in site
names; the tables below, one per architecture (the layout of pyvene's
``modelings_intervenable_*.py``), say which Hugging Face module boundary carries each site, and
both backends resolve a site through the same table.  Nothing else in mlake looks at module
names or model types.

Meaning of each site (all tensors are ``[batch, pos, width]``):

=================  =========  =============================================================
site               width      value
=================  =========  =============================================================
``embed``          d_model    Token embeddings ``W_E[token]``, the output of the token
                              embedding table, *before* anything else is added or applied.
                              Positional embeddings are not included: GPT-2 adds its
                              learned ``W_pos[position]`` afterwards
                              (``resid_pre.0 = embed + W_pos``); BLOOM normalises it
                              (``resid_pre.0 = LayerNorm(embed)``); rotary (Llama, Qwen2,
                              GPT-NeoX) and ALiBi (BLOOM) models inject position inside
                              attention, so there ``resid_pre.0 = embed`` (BLOOM aside).
                              This is where ROME-style causal tracing adds its noise.
``resid_pre.{L}``  d_model    Residual stream entering block ``L`` (the block's hidden-state
                              input), pre-norm: the block's first layer norm is applied
                              inside the block.
``resid_post.{L}`` d_model    Residual stream leaving block ``L``.  For the last block it is
                              *before* the final norm; ``resid_post.{L} == resid_pre.{L+1}``.
``attn_z.{L}``     n_heads    The attention heads' outputs before they are mixed: the input
                   x d_head   of the attention output projection, head ``h`` in columns
                              ``[h * d_head, (h + 1) * d_head)`` (concatenated, the layout
                              every supported architecture uses).  Per-head attribution
                              (attribution patching over heads) reads and differentiates it.
``attn_out.{L}``   d_model    The attention block's own contribution to the residual stream:
                              the output of its output projection (bias included), *without*
                              the residual.  BLOOM's attention module adds the residual
                              inside itself (TransformerLens#1639); this site is taken at
                              its ``dense`` projection, before that addition.
``mlp_post.{L}``   d_mlp      The MLP neurons: the input of the MLP's down (output)
                              projection, i.e. ``act(W_in x + b_in)``, or
                              ``act(W_gate x) * (W_up x)`` for gated MLPs (Llama, Qwen2).
``mlp_out.{L}``    d_model    The MLP's contribution to the residual stream: the output of the
                              down projection (bias included), without the residual.
=================  =========  =============================================================

Identities the tests check on every architecture (``tests/models/test_site_semantics.py``):

* ``resid_pre.{L} + attn_out.{L} + mlp_out.{L} == resid_post.{L}``.  This holds for the
  sequential blocks (GPT-2, Llama, Qwen2, BLOOM) *and* for GPT-NeoX's parallel blocks
  (``use_parallel_residual=True``: ``x + attn(ln1(x)) + mlp(ln2(x))``).  What differs in a
  parallel block is the MLP's input: it reads ``ln2(resid_pre.{L})``, not
  ``ln2(resid_pre.{L} + attn_out.{L})``, so patching ``attn_out.{L}`` leaves ``mlp_post.{L}``
  unchanged there.  Parallel blocks have no "resid_mid".
* ``down_proj(mlp_post.{L}) == mlp_out.{L}`` and ``o_proj(attn_z.{L}) == attn_out.{L}``.

Dropout is identity because models are always run in eval mode.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from mlake_core.errors import ConfigError

#: Site kinds, in the order they occur in the forward pass within a block.
SITE_KINDS: tuple[str, ...] = (
    "embed",
    "resid_pre",
    "attn_z",
    "attn_out",
    "mlp_post",
    "mlp_out",
    "resid_post",
)

#: Kinds that take a layer index (``kind.{L}``); ``embed`` does not.
LAYERED_KINDS: tuple[str, ...] = SITE_KINDS[1:]

#: One-line description of each site kind (used by ``mlake models check``).
SITE_DESCRIPTIONS: Mapping[str, str] = MappingProxyType(
    {
        "embed": "token embeddings W_E[token], before positional embeddings or embedding norm",
        "resid_pre": "residual stream entering block L (pre-norm)",
        "attn_z": "attention heads' outputs, concatenated: input of the output projection",
        "attn_out": "attention output projection (bias included), residual excluded",
        "mlp_post": "MLP neurons: input of the MLP down projection (act(gate)*up if gated)",
        "mlp_out": "MLP down projection output (bias included), residual excluded",
        "resid_post": "residual stream leaving block L (before the final norm)",
    }
)

Port = Literal["input", "output"]


@dataclass(frozen=True)
class ModuleSite:
    """Where a site lives: one boundary of one Hugging Face module.

    Attributes:
        module: dotted module path in the ``*ForCausalLM`` model, with ``{L}`` standing for
            the layer index (e.g. ``"model.layers.{L}.mlp.down_proj"``).
        port: ``"input"`` for the module's first (hidden-state) argument, ``"output"`` for its
            output (the first element when the module returns a tuple).
    """

    module: str
    port: Port

    def path(self, layer: int | None) -> str:
        """The module path with the layer index filled in."""
        return self.module.format(L=layer) if "{L}" in self.module else self.module


@dataclass(frozen=True)
class ArchitectureSpec:
    """Everything mlake needs to know about one Hugging Face architecture.

    Attributes:
        model_type: the ``config.model_type`` this spec applies to.
        sites: where each site kind lives (keys: :data:`SITE_KINDS`).
        layers: path of the ``ModuleList`` of blocks (its length is the number of layers).
        ln1: the norm in front of attention, relative to a block.
        ln2: the norm in front of the MLP, relative to a block.
        final_norm: the norm after the last block.
        unembed: the unembedding (LM head) module.
        positional: how position enters: ``"learned"`` (added to ``embed`` by
            ``pos_embed``), ``"rotary"`` or ``"alibi"`` (inside attention).
        pos_embed: the learned positional embedding table, when ``positional == "learned"``.
        embed_norm: a norm applied to the embeddings before block 0, if any (BLOOM).
        uses_position_ids: whether the forward takes ``position_ids``; when it does, mlake
            passes ids derived from the attention mask so left padding does not shift positions
            (nnsight#672).  BLOOM derives ALiBi offsets from the mask itself.
        parallel_flag: name of the config attribute that, when true, makes attention and MLP
            read the same residual (GPT-NeoX ``use_parallel_residual``); ``None`` when the
            architecture is always sequential.
        config_overrides: config values mlake sets at load because the site hooks need the
            corresponding module calls (each is numerically equivalent).
        unsupported_config: config values that change what a site means and are refused.
    """

    model_type: str
    sites: Mapping[str, ModuleSite]
    layers: str
    ln1: str
    ln2: str
    final_norm: str
    unembed: str
    positional: Literal["learned", "rotary", "alibi"]
    pos_embed: str | None = None
    embed_norm: str | None = None
    uses_position_ids: bool = True
    parallel_flag: str | None = None
    config_overrides: Mapping[str, Any] = field(default_factory=dict)
    unsupported_config: Mapping[str, tuple[Any, str]] = field(default_factory=dict)

    def is_parallel(self, config: Any) -> bool:
        """Whether attention and MLP read the same residual in this checkpoint."""
        return bool(self.parallel_flag and getattr(config, self.parallel_flag, False))


def _sites(
    embed: str, block: str, attn_proj: str, mlp_down: str
) -> MappingProxyType[str, ModuleSite]:
    return MappingProxyType(
        {
            "embed": ModuleSite(embed, "output"),
            "resid_pre": ModuleSite(block, "input"),
            "attn_z": ModuleSite(f"{block}.{attn_proj}", "input"),
            "attn_out": ModuleSite(f"{block}.{attn_proj}", "output"),
            "mlp_post": ModuleSite(f"{block}.{mlp_down}", "input"),
            "mlp_out": ModuleSite(f"{block}.{mlp_down}", "output"),
            "resid_post": ModuleSite(block, "output"),
        }
    )


GPT2 = ArchitectureSpec(
    model_type="gpt2",
    sites=_sites("transformer.wte", "transformer.h.{L}", "attn.c_proj", "mlp.c_proj"),
    layers="transformer.h",
    ln1="ln_1",
    ln2="ln_2",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    positional="learned",
    pos_embed="transformer.wpe",
    unsupported_config={"add_cross_attention": (True, "cross-attention blocks")},
)

LLAMA = ArchitectureSpec(
    model_type="llama",
    sites=_sites("model.embed_tokens", "model.layers.{L}", "self_attn.o_proj", "mlp.down_proj"),
    layers="model.layers",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    final_norm="model.norm",
    unembed="lm_head",
    positional="rotary",
)

QWEN2 = ArchitectureSpec(
    model_type="qwen2",
    sites=_sites("model.embed_tokens", "model.layers.{L}", "self_attn.o_proj", "mlp.down_proj"),
    layers="model.layers",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    final_norm="model.norm",
    unembed="lm_head",
    positional="rotary",
)

BLOOM = ArchitectureSpec(
    model_type="bloom",
    sites=_sites(
        "transformer.word_embeddings",
        "transformer.h.{L}",
        "self_attention.dense",
        "mlp.dense_4h_to_h",
    ),
    layers="transformer.h",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    positional="alibi",
    embed_norm="transformer.word_embeddings_layernorm",
    uses_position_ids=False,
    # With pretraining_tp > 1 and slow_but_exact, BLOOM computes its projections with
    # F.linear on weight slices instead of calling `dense` / `dense_4h_to_h`, so no hook on
    # those modules would fire; the sliced sum is the same product.
    config_overrides={"slow_but_exact": False},
    unsupported_config={
        "apply_residual_connection_post_layernorm": (
            True,
            "a residual taken after the layer norm (resid_pre + attn_out + mlp_out would "
            "not be resid_post)",
        )
    },
)

GPT_NEOX = ArchitectureSpec(
    model_type="gpt_neox",
    sites=_sites(
        "gpt_neox.embed_in", "gpt_neox.layers.{L}", "attention.dense", "mlp.dense_4h_to_h"
    ),
    layers="gpt_neox.layers",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    positional="rotary",
    parallel_flag="use_parallel_residual",
)

#: Supported architectures, by ``config.model_type``.
ARCHITECTURES: Mapping[str, ArchitectureSpec] = MappingProxyType(
    {spec.model_type: spec for spec in (GPT2, LLAMA, QWEN2, BLOOM, GPT_NEOX)}
)


def get_spec(model_type: str, *, source: str = "the model") -> ArchitectureSpec:
    """The spec of a supported architecture.

    Args:
        model_type: ``config.model_type`` of the checkpoint.
        source: what to call the model in the error message (e.g. its path).

    Raises:
        ConfigError: if the architecture is not supported; the message lists those that are.
    """
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ConfigError(
            f"unsupported architecture {model_type!r} for {source} (config.json model_type); "
            f"supported architectures: {', '.join(ARCHITECTURES)}"
        ) from None


_SITE_RE = re.compile(r"^(?P<kind>[a-z_]+)(?:\.(?P<layer>-?\d+))?$")


@dataclass(frozen=True, order=True)
class Site:
    """A parsed site name.

    Ordering is execution order in the forward pass (see :func:`execution_order`).

    Attributes:
        layer: block index (``-1`` for ``embed``).
        rank: position of :attr:`kind` in :data:`SITE_KINDS`.
        kind: one of :data:`SITE_KINDS`.
    """

    layer: int
    rank: int
    kind: str

    @property
    def name(self) -> str:
        """The canonical name, e.g. ``"mlp_post.3"``."""
        return self.kind if self.kind == "embed" else f"{self.kind}.{self.layer}"


def parse_site(name: str, n_layers: int) -> Site:
    """Parse and validate a site name.

    Args:
        name: e.g. ``"embed"``, ``"resid_pre.0"``, ``"mlp_post.11"``.  Negative layers count
            from the end (``"resid_post.-1"`` is the last block).
        n_layers: number of blocks of the model.

    Returns:
        The :class:`Site`, with a non-negative layer.

    Raises:
        ConfigError: for an unknown kind, a missing or extra layer index, or a layer out of
            range.
    """
    match = _SITE_RE.match(name)
    kind = match.group("kind") if match else None
    if match is None or kind not in SITE_KINDS:
        raise ConfigError(
            f"unknown site {name!r}; sites are 'embed' and "
            f"{', '.join(k + '.{L}' for k in LAYERED_KINDS)}"
        )
    layer_text = match.group("layer")
    if kind == "embed":
        if layer_text is not None:
            raise ConfigError(f"site 'embed' takes no layer index (got {name!r})")
        return Site(-1, 0, "embed")
    if layer_text is None:
        raise ConfigError(f"site {name!r} needs a layer index, e.g. '{kind}.0'")
    layer = int(layer_text)
    if layer < 0:
        layer += n_layers
    if not 0 <= layer < n_layers:
        raise ConfigError(f"site {name!r}: layer out of range for a model with {n_layers} layers")
    return Site(layer, SITE_KINDS.index(kind), kind)


def execution_order(names: list[str] | tuple[str, ...], n_layers: int) -> list[Site]:
    """Parse site names and sort them in the order the forward pass produces them.

    Within a block: ``resid_pre``, ``attn_z``, ``attn_out``, ``mlp_post``, ``mlp_out``, ``resid_post``
    (true for parallel GPT-NeoX blocks too, whose code runs attention first).  Duplicates are
    dropped.
    """
    return sorted({parse_site(n, n_layers) for n in names})


def all_sites(n_layers: int) -> tuple[str, ...]:
    """Every site name of a model with ``n_layers`` blocks, in execution order."""
    names = ["embed"]
    for layer in range(n_layers):
        names += [f"{kind}.{layer}" for kind in LAYERED_KINDS]
    return tuple(names)
