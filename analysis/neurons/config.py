"""Settings and result of the neuron stage (:func:`mlake.stages.neurons.neurons_stage`)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from analysis.neurons.ablation import MODES
from analysis.neurons.attribution import (
    AttributionConfig,
    attribution_methods,
    get_attribution_method,
)
from mlake_core.configs import coerce_fields
from mlake_core.errors import ConfigError
from mlake_core.results.store import read_run

#: Significance level of the ablation check (its one-sided Wilcoxon signed-rank test).
CHECK_ALPHA: float = 0.05

#: Why an ablation check shows no signal (:func:`ablation_signal`): the attributed sets hurt
#: no more than random ones on average; they hurt more, but not significantly (Wilcoxon
#: ``p >= CHECK_ALPHA``); too few facts for the test (the stage tests 5 or more).
CHECK_NO_SIGNAL_REASONS: tuple[str, ...] = ("not_above_random", "not_significant", "untested")


def ablation_signal(
    check: dict[str, Any], alpha: float = CHECK_ALPHA
) -> tuple[bool | None, str | None]:
    """Whether an attribution method's ablation check tells its sets from random ones.

    The check ablates each fact's attributed set, and random sets of the same sizes and
    layers (the control), and compares the drops of the answer's probability.  The sets are
    *distinguishable from random* (signal) when the mean drop with them is larger than with the
    random sets and the one-sided Wilcoxon signed-rank test of the per-fact pairs (attributed
    drop > random drop) gives ``p < alpha``.  Otherwise the control equals the measurement:
    the attribution's sets hurt the answer no more than any units would, and what is read from
    them (their overlap between languages, the language-specific units) describes the
    attribution scores, not units the answer depends on.
    ``alpha = 0.05`` is the conventional level; it is not adjusted for the methods and unit
    kinds tested side by side (a handful), so a p-value just under it is weak evidence.

    Args:
        check: :attr:`MethodSummary.check` (``n``, ``drop``, ``drop_random``, ``wilcoxon_p``).

    Returns:
        ``(signal, reason)``: ``(None, None)`` without a check (LAPE, or no fact measured);
        ``(True, None)``; or ``(False, reason)``, ``reason`` one of
        :data:`CHECK_NO_SIGNAL_REASONS`.
    """
    n = check.get("n")
    if not n or (isinstance(n, float) and math.isnan(n)):
        return None, None
    drop, drop_random = check.get("drop"), check.get("drop_random")
    if drop is None or drop_random is None or math.isnan(drop) or math.isnan(drop_random):
        return False, "untested"
    if not drop > drop_random:
        return False, "not_above_random"
    p = check.get("wilcoxon_p")
    if p is None or math.isnan(p):
        return False, "untested"
    if p >= alpha:
        return False, "not_significant"
    return True, None


def per_fact(method: str) -> bool:
    """Whether the registered attribution method ``method`` scores each fact's prompts (scope
    ``fact``: per-fact important sets, their overlap, the ablation check) rather than select
    units per language from text (scope ``language``, LAPE).

    Raises:
        ConfigError: an unknown method.
    """
    return get_attribution_method(method).per_fact


@dataclass(frozen=True)
class NeuronConfig:
    """Settings of the neuron stage.

    Attributes:
        methods: registered attribution methods (default: the built-in ``ig``, ``atp`` and
            ``lape``): per fact (``ig``, ``atp``) or per language, from text (``lape``).
        attribution: the per-fact methods' settings (:class:`AttributionConfig`).
        min_rate: a unit is used by a language when important for at least this fraction
            of its facts ...
        min_facts: ... and at least this many of them.
        lape_top_rate: LAPE: fraction of neurons selected (lowest entropy).
        lape_filter_rate: LAPE: neurons with no language above this quantile of activation
            probabilities are dismissed.
        lape_bar_rate: LAPE: a selected neuron belongs to the languages above this quantile.
        text_tokens: tokens of text read per language for the activation statistics.
        ablation: ``zero`` or ``mean`` ablation of neurons (heads: zero).
        n_random: random sets per fact in the ablation check.
        ablation_facts: known facts per language measured in the ablation matrix.
    """

    # Every built-in method: importing analysis.neurons registers them before this module runs.
    methods: tuple[str, ...] = attribution_methods()
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    min_rate: float = 0.05
    min_facts: int = 2
    lape_top_rate: float = 0.01
    lape_filter_rate: float = 0.95
    lape_bar_rate: float = 0.95
    text_tokens: int = 200_000
    ablation: str = "zero"
    n_random: int = 3
    ablation_facts: int = 100

    def __post_init__(self) -> None:
        coerce_fields(self)
        if isinstance(self.methods, str):
            object.__setattr__(
                self, "methods", tuple(m.strip() for m in self.methods.split(",") if m.strip())
            )
        object.__setattr__(self, "methods", tuple(self.methods))
        known = attribution_methods()
        bad = [m for m in self.methods if m not in known]
        if bad or not self.methods:
            raise ConfigError(
                f"--methods {','.join(self.methods)}: unknown {', '.join(bad) or '(none)'}; "
                f"choose from {', '.join(known)}"
            )
        checks = [
            (0 < self.min_rate <= 1, f"--min-rate {self.min_rate}: must be in (0, 1]"),
            (self.min_facts >= 1, f"--min-facts {self.min_facts}: must be at least 1"),
            (self.text_tokens >= 1, f"--text-tokens {self.text_tokens}: must be at least 1"),
            (self.ablation in MODES, f"--ablation {self.ablation!r}: choose zero or mean"),
            (self.n_random >= 1, f"--n-random {self.n_random}: must be at least 1"),
            (self.ablation_facts >= 0, f"--ablation-facts {self.ablation_facts}: must be >= 0"),
        ]
        for name in ("lape_top_rate", "lape_filter_rate", "lape_bar_rate"):
            value = getattr(self, name)
            checks.append((0 < value < 1, f"--{name.replace('_', '-')} {value}: must be in (0, 1)"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def fact_methods(self) -> tuple[str, ...]:
        """The per-fact attribution methods asked for (scope ``fact``), in order."""
        return tuple(m for m in self.methods if per_fact(m))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["methods"] = list(self.methods)
        out["attribution"] = self.attribution.to_dict()
        return out


def _clean(value: Any) -> Any:
    """JSON-safe: NaN becomes None, numpy scalars and arrays become Python values."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass
class MethodSummary:
    """What one method found (per unit kind for the per-fact methods).

    Attributes:
        method: the attribution method (``ig``, ``atp``, ``lape``).
        unit: ``neuron`` or ``head``.
        n_facts: facts attributed per language (LAPE: 0).
        set_size: mean important-set size per language.
        jaccard: language x language mean Jaccard index of the same fact's sets (NaN for LAPE).
        overlap: language x language mean overlap coefficient.
        n_pairs: language x language number of facts entering each mean.
        counts: per layer, units specific to each language, shared and neither.
        ablation: ``[ablated, measured]`` drop of knowledge accuracy with the specific units
            ablated; ``ablation_random`` with random sets of the same sizes.
        check: the ablation check of the attributed sets (mean answer-probability drop with
            the set and with random sets, the fraction of facts where the set hurts more, and
            a Wilcoxon signed-rank p-value); :attr:`check_signal` says whether it tells the
            sets from random ones.
        seconds_per_fact: attribution time per fact and language (computed this run).
        passes_per_fact: forward and backward passes per fact and language.
    """

    method: str
    unit: str
    n_facts: dict[str, int]
    set_size: dict[str, float]
    jaccard: list[list[float]]
    overlap: list[list[float]]
    n_pairs: list[list[int]]
    counts: list[dict[str, Any]]
    ablation: list[list[float]]
    ablation_random: list[list[float]]
    check: dict[str, float]
    seconds_per_fact: float | None = None
    passes_per_fact: float | None = None

    @property
    def per_fact(self) -> bool:
        """Whether the method scores each fact (:func:`per_fact`): only then are there
        per-fact sets, their overlap between languages and an ablation check."""
        return per_fact(self.method)

    @property
    def check_signal(self) -> bool | None:
        """Whether the ablation check tells the attributed sets from random sets of the same
        sizes (:func:`ablation_signal`); ``None`` without a check."""
        return ablation_signal(self.check)[0]

    @property
    def check_no_signal_reason(self) -> str | None:
        """Why the check shows no signal (:data:`CHECK_NO_SIGNAL_REASONS`), else ``None``."""
        return ablation_signal(self.check)[1]

    def to_dict(self) -> dict[str, Any]:
        # The verdict is derived from ``check`` (MethodSummary.from_dict leaves it out).
        return _clean(
            asdict(self)
            | {
                "check_signal": self.check_signal,
                "check_no_signal_reason": self.check_no_signal_reason,
            }
        )


#: Keys of :meth:`MethodSummary.to_dict` derived from the fields, not fields themselves.
_DERIVED = ("check_signal", "check_no_signal_reason")


@dataclass
class NeuronResult:
    """The neuron stage's result.

    Attributes:
        langs: languages.
        n_layers: layers.
        methods: one summary per (method, unit kind).
        skipped: facts skipped per reason.
        run_path: the run folder.
        lape: what the language-scope method (LAPE) selected, when run: the number of
            neurons, the activation-probability bar and the text tokens per language.
    """

    langs: tuple[str, ...]
    n_layers: int
    methods: list[MethodSummary]
    skipped: dict[str, int]
    run_path: str
    lape: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> NeuronResult:
        """The result a neuron run saved (its ``summary.json``, through :meth:`from_dict`):
        what :func:`mlake.stages.neurons.neurons_stage` returned, with :attr:`run_path` the
        folder it was read from.  The pieces are beside it: each fact's attribution
        (:meth:`~analysis.neurons.attribution.FactAttribution.load`), the activation
        statistics (:meth:`~analysis.neurons.activation.ActivationStats.load`) and LAPE's
        selection (:meth:`~analysis.neurons.activation.LapeResult.load`).

        Raises:
            DataError: not a neuron run, or one that did not finish (no ``summary.json``);
                the message names the folder or file.
        """
        run = read_run(run_dir, "neurons")
        result = cls.from_dict(run.load_summary("neuron summary"))
        result.run_path = str(run.path)
        return result

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeuronResult:
        """Rebuild a result from :meth:`to_dict` (a run's ``summary.json``); ``None`` in the
        matrices and sizes becomes NaN."""

        def nan(value: Any) -> Any:
            if isinstance(value, list):
                return [nan(v) for v in value]
            if isinstance(value, dict):
                return {k: nan(v) for k, v in value.items()}
            return math.nan if value is None else value

        methods = []
        for m in data["methods"]:
            fields = {k: v for k, v in m.items() if k not in _DERIVED}
            for key in ("jaccard", "overlap", "ablation", "ablation_random", "set_size", "check"):
                fields[key] = nan(fields[key])
            methods.append(MethodSummary(**fields))
        return cls(
            langs=tuple(data["langs"]),
            n_layers=int(data["n_layers"]),
            methods=methods,
            skipped=dict(data.get("skipped", {})),
            run_path=str(data.get("run_path", "")),
            lape=dict(data.get("lape", {})),
        )

    def get(self, method: str, unit: str = "neuron") -> MethodSummary:
        for m in self.methods:
            if m.method == method and m.unit == unit:
                return m
        raise KeyError(f"no result for {method} ({unit})")

    def to_dict(self) -> dict[str, Any]:
        return _clean(
            {
                "langs": list(self.langs),
                "n_layers": self.n_layers,
                "methods": [m.to_dict() for m in self.methods],
                "skipped": self.skipped,
                "run_path": self.run_path,
                "lape": self.lape,
            }
        )
