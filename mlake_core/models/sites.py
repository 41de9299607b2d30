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
``embed``          d_model    Token embeddings: the output of the token embedding module,
                              ``W_E[token]`` times the scale that module applies (Gemma 2
                              and 3 multiply by ``sqrt(d_model)`` inside their
                              ``*ScaledWordEmbedding``; every other architecture
                              by 1), *before* anything else is added or applied.
                              Positional embeddings are not included: GPT-2 adds its
                              learned ``W_pos[position]`` afterwards
                              (``resid_pre.0 = embed + W_pos``); BLOOM normalises it
                              (``resid_pre.0 = LayerNorm(embed)``); rotary (Llama, Qwen2,
                              GPT-NeoX, Gemma, Cohere) and ALiBi (BLOOM) models inject position
                              inside attention, so there ``resid_pre.0 = embed`` (BLOOM
                              aside): what the first block receives, scale included.
                              This is where ROME-style causal tracing adds its noise, and
                              where the noise level is measured (so on Gemma 3 both are in
                              the scaled units the first block sees).
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
``attn_out.{L}``   d_model    The attention block's own contribution to the residual stream,
                              *without* the residual: the output of its output projection
                              (bias included), or, where a norm follows that projection
                              (Gemma 3's ``post_attention_layernorm``), the output of that
                              norm -- exactly what is added to ``resid_pre.{L}``.  BLOOM's
                              attention module adds the residual inside itself
                              (TransformerLens#1639); this site is taken at its ``dense``
                              projection, before that addition.
``mlp_post.{L}``   d_mlp      The MLP neurons: the input of the MLP's down (output)
                              projection, i.e. ``act(W_in x + b_in)``, or
                              ``act(W_gate x) * (W_up x)`` for gated MLPs (Llama, Qwen2,
                              Gemma 3).
``mlp_out.{L}``    d_model    The MLP's contribution to the residual stream, without the
                              residual: the output of the down projection (bias included),
                              or of the norm that follows it (Gemma 3's
                              ``post_feedforward_layernorm``) -- what is added to the
                              residual stream.
=================  =========  =============================================================

Identities the tests check on every architecture
(``tests/mlake_core/models/test_model_semantics.py``):

* ``resid_pre.{L} + attn_out.{L} + mlp_out.{L} == resid_post.{L}``.  This holds for the
  sequential blocks (GPT-2, Llama, Qwen2, BLOOM, and Gemma 2 and 3 because their ``attn_out`` and
  ``mlp_out`` are taken after the post-norms) *and* for GPT-NeoX's parallel blocks
  (``use_parallel_residual=True``: ``x + attn(ln1(x)) + mlp(ln2(x))``) and for Cohere's (always
  parallel, one shared norm: ``x + attn(ln(x)) + mlp(ln(x))``).  What differs in a
  parallel block is the MLP's input: it reads ``ln2(resid_pre.{L})``, not
  ``ln2(resid_pre.{L} + attn_out.{L})``, so patching ``attn_out.{L}`` leaves ``mlp_post.{L}``
  unchanged there.  Parallel blocks have no "resid_mid".
* ``post_norm(down_proj(mlp_post.{L})) == mlp_out.{L}`` and
  ``post_norm(o_proj(attn_z.{L})) == attn_out.{L}``, where ``post_norm`` is the identity
  except on architectures with sublayer post-norms (:attr:`ArchitectureSpec.attn_post_norm`,
  :attr:`ArchitectureSpec.mlp_post_norm`; :meth:`BaseAdapter.sublayer_output
  <mlake_core.models.adapter.BaseAdapter.sublayer_output>` applies it).  Code that needs the
  projection's own output (a weight edit solving ``W k = v``) must go through the norm: on
  Gemma 3 a vector added to ``mlp_out`` is not a change of ``down_proj``'s output.

Besides the site table, each :class:`ArchitectureSpec` records the architecture's facts that
the rest of mlake needs (so no other module tests model names): whether the embedding module
scales its output (:meth:`ArchitectureSpec.embed_scale`), the sublayer post-norms, which
layers attend through a sliding window and how wide it is
(:meth:`ArchitectureSpec.sliding_layers`, :meth:`ArchitectureSpec.sliding_window`), and a
final logit soft-cap (:meth:`ArchitectureSpec.logit_softcap`) and a logit scale
(:meth:`ArchitectureSpec.logit_scale`, Cohere).  The loader copies the values
of a loaded checkpoint into :class:`~mlake_core.models.adapter.ModelInfo`.

Dropout is identity because models are always run in eval mode.
"""

from __future__ import annotations

import math
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
        "embed": "token embeddings W_E[token] (times the embedding module's scale, if any), "
        "before positional embeddings or embedding norm",
        "resid_pre": "residual stream entering block L (pre-norm)",
        "attn_z": "attention heads' outputs, concatenated: input of the output projection",
        "attn_out": "attention output projection (bias included; after its post-norm if "
        "any), residual excluded",
        "mlp_post": "MLP neurons: input of the MLP down projection (act(gate)*up if gated)",
        "mlp_out": "MLP down projection output (bias included; after its post-norm if any), "
        "residual excluded",
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
        ln2: the norm in front of the MLP, relative to a block (Llama's is named
            ``post_attention_layernorm``; Gemma 3's ``pre_feedforward_layernorm``).
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
        attn_post_norm: a norm applied to the attention output before it joins the residual
            stream, relative to a block (Gemma 3's ``post_attention_layernorm``); ``attn_out``
            is then that norm's output.  ``None``: the projection's output is added as is.
        mlp_post_norm: the same for the MLP (Gemma 3's ``post_feedforward_layernorm``);
            ``mlp_out`` is then that norm's output.
        scaled_embed: whether the embedding module multiplies ``W_E[token]`` by
            ``sqrt(d_model)`` (Gemma); the ``embed`` site is that module's output, scale
            included.
        sliding_window_attr: config attribute holding the sliding-window width, for
            architectures that can have sliding-window layers.
        layer_types_attr: config attribute listing each layer's attention type
            (``"sliding_attention"`` / ``"full_attention"``); without it, every layer slides
            when a window is set.
        logit_softcap_attr: config attribute of the final logit soft-cap ``c``: logits are
            ``c * tanh(lm_head(x) / c)`` when it is set.
        always_parallel: whether attention and MLP always read the same residual, whatever
            the config says (Cohere, whose one ``input_layernorm`` feeds both: ``ln1`` and
            ``ln2`` then name the same norm).
        logit_scale_attr: config attribute of a factor the logits are multiplied by after the
            unembedding (Cohere's ``logit_scale``), ``None`` when logits are not scaled.
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
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    scaled_embed: bool = False
    sliding_window_attr: str | None = None
    layer_types_attr: str | None = None
    logit_softcap_attr: str | None = None
    always_parallel: bool = False
    logit_scale_attr: str | None = None

    def __post_init__(self) -> None:
        # With a post-norm, the sublayer's contribution is that norm's output.
        for kind, norm in (("attn_out", self.attn_post_norm), ("mlp_out", self.mlp_post_norm)):
            if norm is not None and not self.sites[kind].module.endswith(f".{norm}"):
                raise ValueError(
                    f"{self.model_type}: site {kind!r} must be the output of its post-norm "
                    f"{norm!r}, not of {self.sites[kind].module!r}"
                )

    def is_parallel(self, config: Any) -> bool:
        """Whether attention and MLP read the same residual in this checkpoint."""
        if self.always_parallel:
            return True
        return bool(self.parallel_flag and getattr(config, self.parallel_flag, False))

    @property
    def post_norms(self) -> bool:
        """Whether attention or MLP outputs are normalised before joining the residual."""
        return self.attn_post_norm is not None or self.mlp_post_norm is not None

    def post_norm(self, kind: Literal["attn", "mlp"]) -> str | None:
        """The post-norm of sublayer ``kind`` relative to a block, ``None`` without one."""
        return self.attn_post_norm if kind == "attn" else self.mlp_post_norm

    def embed_scale(self, config: Any) -> float:
        """The factor the embedding module applies to ``W_E[token]`` (``embed`` includes it):
        ``sqrt(d_model)`` for scaled embeddings, else 1.  (In half precision the module
        multiplies by this value rounded to the weights' dtype.)"""
        return math.sqrt(int(config.hidden_size)) if self.scaled_embed else 1.0

    def sliding_window(self, config: Any) -> int | None:
        """Width of the sliding window (a query at padded index ``i`` sees keys at
        ``i - w + 1 .. i``), ``None`` when no layer of this checkpoint slides."""
        if self.sliding_window_attr is None or not self.sliding_layers(config):
            return None
        return int(getattr(config, self.sliding_window_attr))

    def sliding_layers(self, config: Any) -> tuple[int, ...]:
        """Indices of the layers whose attention is restricted to the sliding window."""
        window = (
            getattr(config, self.sliding_window_attr, None) if self.sliding_window_attr else None
        )
        if window is None:
            return ()
        n_layers = int(config.num_hidden_layers)
        types = getattr(config, self.layer_types_attr, None) if self.layer_types_attr else None
        if types is None:
            return tuple(range(n_layers))
        return tuple(i for i, kind in enumerate(types[:n_layers]) if kind == "sliding_attention")

    def logit_softcap(self, config: Any) -> float | None:
        """The final logit soft-cap of this checkpoint, ``None`` when logits are not capped."""
        value = getattr(config, self.logit_softcap_attr, None) if self.logit_softcap_attr else None
        return float(value) if value else None

    def logit_scale(self, config: Any) -> float:
        """The factor the logits are multiplied by after the unembedding (1 when unscaled)."""
        value = getattr(config, self.logit_scale_attr, None) if self.logit_scale_attr else None
        return float(value) if value is not None else 1.0


def _sites(
    embed: str,
    block: str,
    attn_proj: str,
    mlp_down: str,
    *,
    attn_post_norm: str | None = None,
    mlp_post_norm: str | None = None,
) -> MappingProxyType[str, ModuleSite]:
    return MappingProxyType(
        {
            "embed": ModuleSite(embed, "output"),
            "resid_pre": ModuleSite(block, "input"),
            "attn_z": ModuleSite(f"{block}.{attn_proj}", "input"),
            "attn_out": ModuleSite(f"{block}.{attn_post_norm or attn_proj}", "output"),
            "mlp_post": ModuleSite(f"{block}.{mlp_down}", "input"),
            "mlp_out": ModuleSite(f"{block}.{mlp_post_norm or mlp_down}", "output"),
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

GEMMA3 = ArchitectureSpec(
    # Gemma3ForCausalLM (text-only Gemma 3: 270M, 1B); the multimodal checkpoints are
    # model_type "gemma3" and are not supported.
    model_type="gemma3_text",
    sites=_sites(
        "model.embed_tokens",
        "model.layers.{L}",
        "self_attn.o_proj",
        "mlp.down_proj",
        attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
    ),
    layers="model.layers",
    ln1="input_layernorm",
    ln2="pre_feedforward_layernorm",
    final_norm="model.norm",
    unembed="lm_head",
    positional="rotary",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    scaled_embed=True,
    sliding_window_attr="sliding_window",
    layer_types_attr="layer_types",
    logit_softcap_attr="final_logit_softcapping",
    unsupported_config={
        "use_bidirectional_attention": (
            True,
            "bidirectional attention: not a causal language model",
        )
    },
)

GEMMA2 = ArchitectureSpec(
    # Gemma2ForCausalLM: Gemma 3's module layout (sandwich norms, scaled embeddings, sliding
    # layers, final logit soft-cap).  Its attention logit soft-cap is applied inside the HF
    # attention, before the softmax, so no site sees it.
    model_type="gemma2",
    sites=_sites(
        "model.embed_tokens",
        "model.layers.{L}",
        "self_attn.o_proj",
        "mlp.down_proj",
        attn_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
    ),
    layers="model.layers",
    ln1="input_layernorm",
    ln2="pre_feedforward_layernorm",
    final_norm="model.norm",
    unembed="lm_head",
    positional="rotary",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    scaled_embed=True,
    sliding_window_attr="sliding_window",
    layer_types_attr="layer_types",
    logit_softcap_attr="final_logit_softcapping",
    unsupported_config={
        "use_bidirectional_attention": (
            True,
            "bidirectional attention: not a causal language model",
        )
    },
)

COHERE = ArchitectureSpec(
    # CohereForCausalLM (Command R, Aya 23): one LayerNorm (no bias) feeds attention and the
    # MLP in parallel, ``resid_post = resid_pre + attn_out + mlp_out``; the logits are
    # ``logit_scale * lm_head(norm(x))``.
    model_type="cohere",
    sites=_sites("model.embed_tokens", "model.layers.{L}", "self_attn.o_proj", "mlp.down_proj"),
    layers="model.layers",
    ln1="input_layernorm",
    ln2="input_layernorm",
    final_norm="model.norm",
    unembed="lm_head",
    positional="rotary",
    always_parallel=True,
    logit_scale_attr="logit_scale",
)

#: Supported architectures, by ``config.model_type``.
ARCHITECTURES: Mapping[str, ArchitectureSpec] = MappingProxyType(
    {
        spec.model_type: spec
        for spec in (GPT2, LLAMA, QWEN2, BLOOM, GPT_NEOX, GEMMA3, GEMMA2, COHERE)
    }
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
