"""Attribution of one fact prompt to MLP neurons and attention heads, and the registry of
attribution methods.

A *unit* is an MLP neuron (``mlp_post.{L}``, one column) or an attention head (the head's
``d_head`` columns of ``attn_z.{L}``).  An attribution method scores every unit of the chosen
layers for one prompt; the score says how much the unit's value supports the answer.  The
measured quantity is the probability of the whole answer (teacher-forced, the product of its
tokens' probabilities), not of its first token: with byte-level BPE a CJK answer's first token
can be a byte shared by many answers.

Methods (a registry, :func:`register_attribution_method`; each entry declares its scope and
what it needs from the stage, so the stage never branches on method names):

* ``ig`` -- integrated gradients over MLP neurons, the knowledge-neuron method of Dai et al.
  2022 ("Knowledge Neurons in Pretrained Transformers").  One layer at a time, the neurons at
  the attributed positions are moved along the straight path from a baseline ``b`` (zeros, or
  the neuron's mean activation over text) to their value ``a``; the attribution is
  ``(a - b) * mean_k grad(b + k/m (a - b))`` for ``k = 1..m`` (a right Riemann sum of
  ``m = steps`` points), summed over the attributed positions.  Completeness: a layer's
  attributions sum to ``p(a) - p(b)`` as ``m`` grows.  Every (layer, step) is one row of a
  batch and rows go through in chunks sized to the memory, so memory stays bounded on large
  models (EasyEdit#184); ``layers`` restricts the work to candidate layers.
* ``atp`` -- attribution patching (Nanda 2023; Kramár et al. 2024) over neurons and heads.
  One clean forward and backward pass give the activations ``a`` and gradients ``g``; one
  forward pass over ``samples`` runs with the subject's embeddings corrupted by noise (as in
  causal tracing) gives the corrupted activations ``a*`` (averaged over samples).  The
  attribution ``(a - a*) . g`` is the first-order estimate of how much the answer's
  probability drops when the unit takes its corrupted value.  It is a linear approximation,
  unreliable for large changes (the benchmark checks it against integrated gradients, and the
  ablation check against real interventions).
* ``lape`` (scope ``language``, registered in :mod:`~analysis.neurons.activation`) selects
  language-specific neurons from the activation statistics of text, not per fact.

Positions: ``last`` (default, Dai et al.: the position that predicts the answer) or ``all``
prompt positions, summed.  Both methods are relative to the same metric and positions, so
their scores are comparable (``benchmarks/attribution_speed.py`` reports their agreement).

Important sets (:func:`important_units`): units scoring above ``threshold`` times the
prompt's largest score (Dai et al.'s coarse rule, 0.2), or the ``top_k`` best; then Dai et
al.'s refinement, keeping the units found in at least ``agreement`` of a fact's prompts (its
question and, where well-posed, cloze form).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from mlake_core.configs import coerce_fields
from mlake_core.errors import ConfigError
from mlake_core.models.adapter import ModelAdapter, Patch, free_bytes
from mlake_core.registry import Registry
from mlake_core.results.store import read_arrays

#: Unit kinds and the site each lives in.
UNIT_SITES: dict[str, str] = {"neuron": "mlp_post", "head": "attn_z"}
POSITIONS: tuple[str, ...] = ("last", "all")
BASELINES: tuple[str, ...] = ("zero", "mean")
RULES: tuple[str, ...] = ("threshold", "topk")


@dataclass(frozen=True)
class AttributionConfig:
    """Settings of the per-prompt attribution methods and of the important-set rule.

    Attributes:
        steps: integrated-gradients points on the path (Dai et al.: 20).
        baseline: ``zero`` or ``mean`` (each neuron's mean activation over text, from
            :mod:`analysis.neurons.activation`).
        positions: ``last`` (the position predicting the answer) or ``all`` prompt positions.
        layers: candidate layers (``None``: all).  Comma-separated text is accepted.
        samples: noise samples of the corrupted run of attribution patching.
        noise_scale: its noise std in units of the subject-token embedding std (as tracing).
        rule: ``threshold`` (score above ``threshold`` x the prompt's maximum) or ``topk``.
        threshold: Dai et al.'s 0.2.
        top_k: units kept per prompt by the ``topk`` rule.
        agreement: fraction of a fact's prompts a unit must be important in (Dai et al.'s
            refinement); with two prompts, 0.7 means both.
        forms: the prompt forms of a fact (the cloze form only where well-posed).
        max_rows: rows per pass for integrated gradients (``0``: adapted to memory).
        seed: seed of the corruption noise.
    """

    steps: int = 20
    baseline: str = "zero"
    positions: str = "last"
    layers: tuple[int, ...] | None = None
    samples: int = 5
    noise_scale: float = 3.0
    rule: str = "threshold"
    threshold: float = 0.2
    top_k: int = 20
    agreement: float = 0.7
    forms: tuple[str, ...] = ("question", "cloze")
    max_rows: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        coerce_fields(self)
        if isinstance(self.forms, str):
            object.__setattr__(self, "forms", tuple(f.strip() for f in self.forms.split(",")))
        object.__setattr__(self, "forms", tuple(self.forms))
        if isinstance(self.layers, str):
            text = self.layers.strip()
            try:
                layers = tuple(int(x) for x in text.split(",")) if text else None
            except ValueError:
                raise ConfigError(f"--layers {self.layers!r}: expected e.g. 2,3,4") from None
            object.__setattr__(self, "layers", layers)
        elif self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        checks = [
            (self.steps >= 1, f"--steps {self.steps}: must be at least 1"),
            (self.baseline in BASELINES, f"--baseline {self.baseline!r}: choose zero or mean"),
            (self.positions in POSITIONS, f"--positions {self.positions!r}: choose last or all"),
            (self.samples >= 1, f"--samples {self.samples}: must be at least 1"),
            (self.noise_scale > 0, f"--noise-scale {self.noise_scale}: must be positive"),
            (self.rule in RULES, f"--rule {self.rule!r}: choose threshold or topk"),
            (0 < self.threshold < 1, f"--threshold {self.threshold}: must be in (0, 1)"),
            (self.top_k >= 1, f"--top-k {self.top_k}: must be at least 1"),
            (0 < self.agreement <= 1, f"--agreement {self.agreement}: must be in (0, 1]"),
            (self.max_rows >= 0, f"--max-rows {self.max_rows}: must be 0 (auto) or more"),
            (
                bool(self.forms) and all(f in ("question", "cloze") for f in self.forms),
                f"--forms {','.join(self.forms)}: choose from question, cloze",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def check_layers(self, n_layers: int) -> tuple[int, ...]:
        """The candidate layers for a model of ``n_layers`` blocks.

        Raises:
            ConfigError: a layer out of range.
        """
        layers = tuple(range(n_layers)) if self.layers is None else self.layers
        bad = [x for x in layers if not 0 <= x < n_layers]
        if bad or not layers:
            raise ConfigError(
                f"--layers {','.join(map(str, layers))}: out of range for a model with "
                f"{n_layers} layers (0..{n_layers - 1})"
            )
        return tuple(sorted(set(layers)))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["forms"] = list(self.forms)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out


@dataclass(frozen=True)
class AttributionPrompt:
    """One prompt of one fact, ready to attribute.

    Attributes:
        where: ``"fact F [lang] form"`` (for messages).
        prompt_ids: the encoded prompt (BOS included when the model uses one).
        subject_positions: indices of the subject's tokens in ``prompt_ids``.
        answer_ids: the answer's token ids (encoded separately, joined by ids).
    """

    where: str
    prompt_ids: tuple[int, ...]
    subject_positions: tuple[int, ...]
    answer_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.prompt_ids or not self.answer_ids:
            raise ConfigError(f"{self.where}: empty prompt or answer")


@dataclass
class AttributionContext:
    """What a method may need beyond the prompt and config.

    Attributes:
        generator: source of the corruption noise (CPU).
        noise_std: the standard deviation of subject-token embeddings.
        mean_activation: per layer, each neuron's mean activation ``[d_mlp]`` (the ``mean``
            baseline of integrated gradients); ``None`` when not measured.
    """

    generator: torch.Generator
    noise_std: float = 0.0
    mean_activation: dict[int, torch.Tensor] | None = None


@dataclass
class Attribution:
    """Scores of every unit for one prompt.

    Attributes:
        method: the method's registry name.
        scores: per unit kind (``neuron``, ``head``), ``[n_layers, n_units]`` float64;
            layers outside the candidate layers are 0.
        p_answer: the answer's probability on the clean prompt.
        passes: forward passes run (a backward pass counts as one more).
        layers: the candidate layers.
    """

    method: str
    scores: dict[str, np.ndarray]
    p_answer: float
    passes: int
    layers: tuple[int, ...]


class AttributionMethod(Protocol):
    """The signature every attribution method has."""

    def __call__(
        self,
        adapter: ModelAdapter,
        prompt: AttributionPrompt,
        config: AttributionConfig,
        context: AttributionContext,
    ) -> Attribution: ...


#: What one call of a method's function covers: ``fact`` -- one prompt of a fact (the stage
#: scores each fact's prompts and keeps the units important in enough of them); ``language``
#: -- the whole run, from the activation statistics of text in each language (the function
#: returns the units it selects for each language).
SCOPES: tuple[str, ...] = ("fact", "language")

#: What a method may need from the stage beyond its settings: ``noise`` -- the standard
#: deviation of subject-token embeddings (:attr:`AttributionContext.noise_std`);
#: ``activation_stats`` -- the activation statistics of text in each language (the mean
#: activations in :attr:`AttributionContext.mean_activation`, or the statistics themselves for
#: a ``language`` method).
NEEDS: tuple[str, ...] = ("noise", "activation_stats")


@dataclass(frozen=True)
class MethodEntry:
    """A registered attribution method.

    Attributes:
        name: the registry name.
        fn: the method: an :class:`AttributionMethod` for scope ``fact``; for scope
            ``language``, ``fn(stats, config) -> selection`` with the activation statistics
            (:class:`~analysis.neurons.activation.ActivationStats`) and the stage's config,
            returning a selection such as :class:`~analysis.neurons.activation.LapeResult`.
        units: the unit kinds it scores (a ``language`` method: one).
        summary: one line for help texts.
        scope: one of :data:`SCOPES`.
        needs: what the stage provides it, from :data:`NEEDS`.
    """

    name: str
    fn: Callable[..., Any]
    units: tuple[str, ...]
    summary: str
    scope: str = "fact"
    needs: tuple[str, ...] = ()

    @property
    def per_fact(self) -> bool:
        """Whether the method scores each fact's prompts (and so has per-fact important sets,
        their overlap between languages and the ablation check)."""
        return self.scope == "fact"


#: The attribution methods, by name.  The built-in ones register themselves where they are
#: defined (``ig`` and ``atp`` here, ``lape`` in :mod:`~analysis.neurons.activation`); importing
#: :mod:`analysis.neurons` imports both modules.
ATTRIBUTION_METHODS: Registry[MethodEntry] = Registry("attribution method")


def register_attribution_method(
    name: str,
    *,
    units: tuple[str, ...],
    summary: str,
    scope: str = "fact",
    needs: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an attribution method under ``name`` (refuses duplicates).

    Raises:
        ValueError: a duplicate name, an unknown unit kind, scope or need, or a ``language``
            method with other than one unit kind.
    """
    bad = [u for u in units if u not in UNIT_SITES] + [n for n in needs if n not in NEEDS]
    if scope not in SCOPES or bad or not units or (scope == "language" and len(units) != 1):
        raise ValueError(
            f"attribution method {name!r}: units {units}, scope {scope!r}, needs {needs}; "
            f"units from {tuple(UNIT_SITES)} (a language method: one), scope from {SCOPES}, "
            f"needs from {NEEDS}"
        )

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        ATTRIBUTION_METHODS.register(
            name, MethodEntry(name, fn, tuple(units), summary, scope, tuple(needs))
        )
        return fn

    return deco


def get_attribution_method(name: str) -> MethodEntry:
    """The registered method ``name``.

    Raises:
        ConfigError: an unknown method, listing the known ones.
    """
    return ATTRIBUTION_METHODS.get(name)


def attribution_methods() -> tuple[str, ...]:
    """Names of the registered methods, in registration order."""
    return ATTRIBUTION_METHODS.names()


# -- shared pieces ------------------------------------------------------------------------------


def _sequence(prompt: AttributionPrompt) -> list[int]:
    """Prompt and answer, minus the answer's last token (teacher forcing)."""
    return [*prompt.prompt_ids, *prompt.answer_ids[:-1]]


def answer_probability(logits: torch.Tensor, prompt: AttributionPrompt) -> torch.Tensor:
    """Probability of the whole answer in each row, ``[rows]``.

    Args:
        logits: ``[rows, pos, vocab]`` of rows that all hold :func:`_sequence` unpadded, or
            only their last ``len(answer_ids)`` positions (``keep_last``).
        prompt: the prompt.
    """
    n = len(prompt.answer_ids)
    # The last n positions of prompt + answer[:-1] predict the answer's n tokens.
    logp = logits[:, -n:].float().log_softmax(-1)
    ids = torch.as_tensor(prompt.answer_ids, device=logp.device)
    picked = logp.gather(-1, ids.expand(logp.shape[0], n)[..., None])[..., 0]
    return picked.sum(-1).exp()


def answer_logprob_metric(logprobs: torch.Tensor) -> torch.Tensor:
    """The summed probability of the whole answer over the rows, from the log-probabilities
    ``[rows, n]`` of its tokens (``ModelAdapter.gradients(..., tokens=answer_ids)``): the metric
    the methods differentiate, equal to ``answer_probability(logits, prompt).sum()`` without
    computing logits."""
    return logprobs.sum(-1).exp().sum()


def answer_probabilities(
    adapter: ModelAdapter, batch: Any, prompt: AttributionPrompt, **kwargs: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The probability of the whole answer in each row ``[rows]`` of ``batch`` (rows holding
    :func:`_sequence`, unpadded), read from the last block's outputs a chunk of the
    vocabulary at a time (:meth:`ModelAdapter.readout_logprobs`: no logits), and the
    activations ``final_states`` returns (``kwargs`` go to it: ``sites``, patches...)."""
    final, cache, _ = adapter.final_states(batch, **kwargs)
    n = len(prompt.answer_ids)
    ids = torch.as_tensor(prompt.answer_ids)
    return adapter.readout_logprobs(final[:, -n:], ids).sum(-1).exp(), cache


def attributed_positions(prompt: AttributionPrompt, positions: str) -> list[int]:
    """Indices of the prompt tokens whose units are attributed."""
    n = len(prompt.prompt_ids)
    return [n - 1] if positions == "last" else list(range(n))


def grad_rows_per_pass(
    adapter: ModelAdapter,
    n_tokens: int,
    fraction: float = 0.25,
    *,
    past_tokens: int | None = None,
) -> int:
    """Rows of a prompt of ``n_tokens`` tokens that fit in one forward-and-backward pass.

    A row runs the prompt's last ``n_tokens - past_tokens`` tokens, continuing the keys and
    values of the first ``past_tokens`` (:func:`integrated_gradients` scales neurons from the
    first attributed position on; by default, ``positions="last"``, it runs one token after a
    cache of all the others: ``past_tokens=None`` means ``n_tokens - 1``, what the planner
    plans).  Every layer's activations stay alive for the backward pass: per run token and
    layer about 12 ``d_model``, 4 ``d_mlp`` and 4 attention-width (``n_heads * d_head``) values
    and 3 scores per attended position; per row and layer the keys and values of every
    attended position at full attention width (grouped-query keys are repeated per head
    before the product, and that copy is saved) and the row's own copy of the cached ones.
    Counted against the tensors autograd saves on every tiny architecture (tests).  No full
    logits: the answer's log-probabilities are read a chunk of the vocabulary at a time and
    recomputed in the backward pass (:mod:`~mlake_core.models.readout`); a row's share of a
    chunk (its float32 logits, their exponentials and their gradient) is charged at the whole
    vocabulary, ``12 * d_vocab`` bytes: an upper bound, as the chunk is capped.  Uses
    ``fraction`` of CUDA's free memory, or on CPU 256 MiB.
    """
    n_tokens = max(1, int(n_tokens))
    past = n_tokens - 1 if past_tokens is None else min(max(0, int(past_tokens)), n_tokens - 1)
    run = n_tokens - past
    bytes_per = max(1, torch.finfo(adapter.dtype).bits // 8)
    heads = max(1, adapter.info.n_heads)
    attn = heads * (adapter.info.d_head or max(1, adapter.d_model // heads))
    per_token_layer = 12 * adapter.d_model + 4 * adapter.d_mlp + 4 * attn + 3 * heads * n_tokens
    kv_layer = 2 * attn * (n_tokens + past)  # attended keys and values, and the cached copy
    per_row = bytes_per * adapter.n_layers * (run * per_token_layer + kv_layer)
    per_row += 3 * 4 * adapter.info.d_vocab  # the readout: float32 logits, exp, gradient
    free = free_bytes(adapter.device) if adapter.device.type == "cuda" else None
    if free is not None:
        budget = fraction * free
    else:
        budget = 256 << 20
    return max(1, int(budget // per_row))


def corrupted_embeddings(
    adapter: ModelAdapter,
    clean_embed: torch.Tensor,
    subject: Sequence[int],
    config: AttributionConfig,
    context: AttributionContext,
) -> Patch:
    """A patch of ``embed`` that adds noise to the subject tokens, one sample per row."""
    if context.noise_std <= 0:
        raise ConfigError("attribution patching needs the subject-embedding noise level")
    base = clean_embed[list(subject)].float().cpu()
    noise = torch.randn(config.samples, len(subject), base.shape[-1], generator=context.generator)
    values = (base[None] + config.noise_scale * context.noise_std * noise).to(adapter.dtype)
    rows = torch.arange(config.samples).repeat_interleave(len(subject))
    positions = torch.tensor(list(subject)).repeat(config.samples)
    return Patch("embed", rows, positions, values.reshape(-1, base.shape[-1]))


# -- methods ------------------------------------------------------------------------------------


@register_attribution_method(
    "ig",
    units=("neuron",),
    summary="integrated gradients over MLP neurons (Dai et al. 2022)",
    needs=("activation_stats",),  # the mean baseline
)
def integrated_gradients(
    adapter: ModelAdapter,
    prompt: AttributionPrompt,
    config: AttributionConfig,
    context: AttributionContext,
) -> Attribution:
    """Integrated gradients over the MLP neurons of each candidate layer (module docstring)."""
    layers = config.check_layers(adapter.n_layers)
    seq = _sequence(prompt)
    positions = attributed_positions(prompt, config.positions)
    sites = [f"mlp_post.{layer}" for layer in layers]
    probs, clean = answer_probabilities(adapter, adapter.batch([seq]), prompt, sites=sites)
    p_answer = float(probs[0])
    passes = 1
    value = {layer: clean[f"mlp_post.{layer}"][0, positions].float() for layer in layers}
    if config.baseline == "mean":
        if context.mean_activation is None:
            raise ConfigError("--baseline mean needs the mean activations (activation statistics)")
        base = {
            layer: context.mean_activation[layer].float().to(adapter.device)[None].expand_as(v)
            for layer, v in value.items()
        }
    else:
        base = {layer: torch.zeros_like(v) for layer, v in value.items()}
    alphas = [k / config.steps for k in range(1, config.steps + 1)]
    work = [(layer, alpha) for layer in layers for alpha in alphas]
    grad_sum = {layer: torch.zeros_like(v) for layer, v in value.items()}
    # Scaling neurons at positions >= p changes nothing before p (causal attention): the rows
    # continue from the clean run's keys and values of the tokens before the first attributed
    # position and run only the rest, when the model's cache allows it.
    first = positions[0]
    rows_seq, past, shift = seq, None, 0
    if first > 0:
        try:
            _, prefix_past = adapter.run_with_past(adapter.batch([seq[:first]]), last_only=True)
            rows_seq, past, shift = seq[first:], prefix_past, first
            passes += 1
        except NotImplementedError:
            pass
    local = [p - shift for p in positions]
    chunk = config.max_rows or grad_rows_per_pass(adapter, len(seq), past_tokens=shift)
    start = 0
    while start < len(work):
        part = work[start : start + chunk]
        batch = adapter.batch([rows_seq] * len(part))
        by_layer: dict[int, list[tuple[int, float]]] = {}
        for row, (layer, alpha) in enumerate(part):
            by_layer.setdefault(layer, []).append((row, alpha))
        patches = []
        for layer, rows in by_layer.items():
            r = torch.tensor([row for row, _ in rows])
            a = torch.tensor([alpha for _, alpha in rows])[:, None, None]
            scaled = base[layer][None] + a.to(value[layer].device) * (value[layer] - base[layer])
            patches.append(
                Patch(
                    f"mlp_post.{layer}",
                    r.repeat_interleave(len(local)),
                    torch.tensor(local).repeat(len(rows)),
                    scaled.reshape(-1, scaled.shape[-1]).to(adapter.dtype),
                )
            )
        rows_past = None
        if past is not None:
            rows_past = past.select(torch.zeros(len(part), dtype=torch.long))
        try:
            _, grads = adapter.gradients(
                batch,
                [f"mlp_post.{layer}" for layer in by_layer],
                answer_logprob_metric,
                patches=patches,
                past=rows_past,
                tokens=torch.as_tensor(prompt.answer_ids),
            )
        except torch.cuda.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            torch.cuda.empty_cache()
            continue
        passes += 2
        for layer, rows in by_layer.items():
            g = grads[f"mlp_post.{layer}"][[row for row, _ in rows]][:, local].float()
            grad_sum[layer] += g.sum(0)
        start += len(part)
    scores = np.zeros((adapter.n_layers, adapter.d_mlp))
    for layer in layers:
        attr = (value[layer] - base[layer]) * grad_sum[layer] / config.steps
        scores[layer] = attr.sum(0).double().cpu().numpy()
    return Attribution("ig", {"neuron": scores}, p_answer, passes, layers)


@register_attribution_method(
    "atp",
    units=("neuron", "head"),
    summary="attribution patching over MLP neurons and attention heads (clean vs corrupted)",
    needs=("noise",),  # the subject-corruption noise
)
def attribution_patching(
    adapter: ModelAdapter,
    prompt: AttributionPrompt,
    config: AttributionConfig,
    context: AttributionContext,
) -> Attribution:
    """Attribution patching over neurons and heads (module docstring)."""
    layers = config.check_layers(adapter.n_layers)
    seq = _sequence(prompt)
    positions = attributed_positions(prompt, config.positions)
    sites = ["embed"] + [f"{s}.{layer}" for layer in layers for s in ("attn_z", "mlp_post")]
    clean: dict[str, torch.Tensor] = {}
    value, grads = adapter.gradients(
        adapter.batch([seq]),
        sites,
        answer_logprob_metric,
        activations=clean,
        tokens=torch.as_tensor(prompt.answer_ids),
    )
    noise = corrupted_embeddings(
        adapter, clean["embed"][0], prompt.subject_positions, config, context
    )
    corrupt = adapter.activations(adapter.batch([seq] * config.samples), sites[1:], patches=[noise])
    n_heads, d_head = adapter.info.n_heads, adapter.info.d_head
    scores = {
        "neuron": np.zeros((adapter.n_layers, adapter.d_mlp)),
        "head": np.zeros((adapter.n_layers, n_heads)),
    }
    for layer in layers:
        for unit, site in (("neuron", f"mlp_post.{layer}"), ("head", f"attn_z.{layer}")):
            diff = clean[site][0, positions].float() - corrupt[site][:, positions].float().mean(0)
            attr = (diff * grads[site][0, positions].float()).sum(0)
            if unit == "head":
                attr = attr.reshape(n_heads, d_head).sum(-1)
            scores[unit][layer] = attr.double().cpu().numpy()
    # The clean pass (forward and backward) and the corrupted pass.
    return Attribution("atp", scores, float(value), 3, layers)


# -- important sets -----------------------------------------------------------------------------


def important_units(scores: np.ndarray, config: AttributionConfig) -> np.ndarray:
    """Flat indices (``layer * n_units + unit``, sorted) of the important units of one prompt.

    ``threshold``: scores above ``config.threshold`` times the largest score (none when no
    score is positive).  ``topk``: the ``config.top_k`` largest positive scores.
    """
    flat = np.asarray(scores, dtype=np.float64).reshape(-1)
    top = float(flat.max()) if flat.size else 0.0
    if top <= 0:
        return np.zeros(0, dtype=np.int64)
    if config.rule == "threshold":
        chosen = np.flatnonzero(flat > config.threshold * top)
    else:
        k = min(config.top_k, int((flat > 0).sum()))
        chosen = np.argpartition(-flat, k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
    return np.sort(chosen.astype(np.int64))


def agreed_units(sets: Sequence[np.ndarray], agreement: float) -> np.ndarray:
    """Units in at least ``agreement`` of the prompts' sets (Dai et al.'s refinement)."""
    if not sets:
        return np.zeros(0, dtype=np.int64)
    need = max(1, math.ceil(agreement * len(sets) - 1e-9))
    units, counts = np.unique(np.concatenate([np.asarray(s) for s in sets]), return_counts=True)
    return units[counts >= need].astype(np.int64)


@dataclass
class FactAttribution:
    """One method's attribution of one fact in one language, over its prompts.

    Attributes:
        method: the method.
        forms: the forms attributed (question first).
        p_answer: the answer's probability per form.
        scores: per unit kind, ``[n_forms, n_layers, n_units]`` (float32).
        sets: per unit kind, the agreed important units (flat indices).
        passes: forward and backward passes run.
    """

    method: str
    forms: list[str]
    p_answer: list[float]
    scores: dict[str, np.ndarray]
    sets: dict[str, np.ndarray] = field(default_factory=dict)
    passes: int = 0

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for the results store."""
        out: dict[str, np.ndarray] = {
            "method": np.array(self.method),
            "forms": np.array(self.forms),
            "p_answer": np.array(self.p_answer),
            "passes": np.array(self.passes),
        }
        for unit, s in self.scores.items():
            out[f"scores_{unit}"] = s.astype(np.float32)
            out[f"set_{unit}"] = self.sets[unit]
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FactAttribution:
        """One fact's attribution as a neuron run saved it (``arrays/<method>_<lang>_<fact>.npz``;
        the ablation check and timing saved beside it in the same file are not part of it).

        Raises:
            DataError: no such file, or not a fact attribution (the message names the file).
        """
        keys = ("method", "forms", "p_answer", "passes")
        return cls.from_arrays(read_arrays(path, keys=keys, what="a fact attribution"))

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> FactAttribution:
        units = [k[len("scores_") :] for k in arrays if k.startswith("scores_")]
        return cls(
            method=str(arrays["method"]),
            forms=[str(f) for f in arrays["forms"]],
            p_answer=[float(p) for p in arrays["p_answer"]],
            scores={u: np.asarray(arrays[f"scores_{u}"]) for u in units},
            sets={u: np.asarray(arrays[f"set_{u}"], dtype=np.int64) for u in units},
            passes=int(arrays["passes"]),
        )


def attribute_fact(
    adapter: ModelAdapter,
    method: str,
    prompts: Sequence[tuple[str, AttributionPrompt]],
    config: AttributionConfig,
    context: AttributionContext,
) -> FactAttribution:
    """Attribute each of a fact's prompts (``(form, prompt)`` pairs) with ``method`` and keep
    the units important in enough of them."""
    entry = get_attribution_method(method)
    if not entry.per_fact:
        raise ConfigError(f"{method} is not a per-fact attribution method (scope {entry.scope})")
    results = [entry.fn(adapter, prompt, config, context) for _, prompt in prompts]
    scores = {u: np.stack([r.scores[u] for r in results]) for u in entry.units}
    sets = {
        u: agreed_units([important_units(s, config) for s in scores[u]], config.agreement)
        for u in entry.units
    }
    return FactAttribution(
        method=method,
        forms=[form for form, _ in prompts],
        p_answer=[r.p_answer for r in results],
        scores=scores,
        sets=sets,
        passes=sum(r.passes for r in results),
    )
