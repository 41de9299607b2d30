"""Where an edit's transfer fails (issue 21 part 3): for every edit (made in the *edit
language* A) whose new answer the model does not give in a *test language* B, the first stage
of recall at which the new answer goes missing, read from the lens before and after the edit
(:class:`analysis.lens.EditLens`).

The stages follow the recall mechanism the cross-lingual studies find (Geva et al. 2023;
Dumas et al. 2025; Fierro et al. 2025): the subject's representation is *enriched* with its
attributes, the attribute is *extracted* at the last token in the middle layers, where it is
often written in a latent (English) form (Wendler et al. 2024), and the last layers *turn it
into the prompt language's output*, where Wang et al. (2025, "Lost in Multilinguality") find
many cross-lingual errors.

Definitions (one place each):

* *decodable*: the lens's own rule (:func:`analysis.lens.emergence`, the one
  :meth:`~analysis.lens.EditLens.emergence_layer` uses): the token ranks below the lens run's
  ``top_k`` at a layer (rank 0: the most likely token);
* *any form*: the new answer written in any of the run's answer languages (MLaKE's new answers
  are parallel); a form counts wherever it is decodable, because the latent form need not be
  B's (Wendler et al.: the answer appears first in English);
* *latent layers*: the layers before the *output layers*, the last
  ``ceil(n_layers * OUTPUT_FRACTION)`` (:func:`latent_layers`).  Wendler et al. see the
  prompt language's token take over from the latent English one in about the last quarter of
  Llama-2's layers, so that quarter is the output stage; at least one layer is each;
* *the final output*: the last layer at the last position; the edit *transfers* to B when the
  new answer's B form is the top token there (:meth:`~analysis.lens.EditLens.success`, the
  criterion of the edit lens and of :mod:`analysis.patching`).

Rules, applied in order to each (edit, test language) (:func:`classify_failure`):

1. **not applicable** (counted, never dropped): B was not read for this edit (its prompt was
   not usable, or the stage found its new and old answers not told apart); B did not answer
   the fact before the edit (:attr:`~analysis.lens.EditLens.known_before`: nothing known to
   transfer over); the new and the old answer's B forms begin with the same token (their
   curves are one);
2. **transferred**: the edit succeeds in B;
3. **not enriched**: no form of the new answer is decodable at B's subject position after the
   edit, at any layer;
4. **not extracted**: it is decodable at the subject, but no form is decodable at B's last
   position in the latent layers;
5. **lost at the output**: a form is present at B's last position in the latent layers, but
   the final output is not the B form; ``other form at output`` counts those whose final top
   token is another language's form of the new answer (a form whose first token is B's form's
   cannot be told apart from it and is not counted as another form).

Each failure also records whether the edit failed in its own language A (``own failed``): a
failure to transfer an edit that did not take in A says little about the crossing.  Each
applicable edit records whether the *old* answer (any form) was decodable at B's subject
position before the edit (``old at subject``): how often the lens reads a known answer at
the subject at all, the baseline against which "not enriched" is read (a lens that never
decodes answers at the subject makes every failure look not enriched).

With a cross-lingual patching run of the same edits (:class:`analysis.patching.EditPatch`,
matched by edit language and fact), each failure also records whether the *edit is carried*
(:func:`carried_at_subject`): the edited model's subject state from A, patched into the
unedited model's run in B at some layer, makes B's top token the new answer.  A failure
marked not enriched whose edit is carried has the edit in a state B could use, but B's own
subject state after the edit does not get it; patches are read only for edits that succeed
in A (the patching rates' rule).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from analysis.lens import EDIT_KINDS, PHASES, POSITIONS, EditLens, emergence
from analysis.patching import DIRECTIONS, EditPatch
from analysis.patching import POSITIONS as PATCH_POSITIONS
from mlake_core.errors import ConfigError, DataError
from mlake_core.results.store import write_text

#: The share of the layers, at the end, that turn the latent answer into the output (module
#: docstring); the layers before them are the latent layers.
OUTPUT_FRACTION: float = 0.25

#: The outcome of an edit in a test language where it transfers.
TRANSFERRED = "transferred"
#: The failure categories, in the order the rules test them (module docstring).
NOT_ENRICHED = "not enriched"
NOT_EXTRACTED = "not extracted"
LOST_AT_OUTPUT = "lost at the output"
FAILURES: tuple[str, ...] = (NOT_ENRICHED, NOT_EXTRACTED, LOST_AT_OUTPUT)
#: Why an (edit, test language) is not classified (rule 1), in the order tested.
NOT_READ = "not applicable: test language not read"
NOT_KNOWN = "not applicable: not known before"
SAME_TOKEN = "not applicable: new and old answer share a first token"
NOT_APPLICABLE: tuple[str, ...] = (NOT_READ, NOT_KNOWN, SAME_TOKEN)
#: Every outcome, in table order.
OUTCOMES: tuple[str, ...] = (TRANSFERRED, *FAILURES, *NOT_APPLICABLE)


def latent_layers(n_layers: int) -> range:
    """The latent layers of a model with ``n_layers`` layers: all but the last
    ``ceil(n_layers * OUTPUT_FRACTION)`` (module docstring).

    Raises:
        ConfigError: fewer than 2 layers (no latent and output layer to tell apart).
    """
    if n_layers < 2:
        raise ConfigError(
            f"failure classification: a model of {n_layers} layer(s) has no latent layers"
        )
    n_output = max(1, math.ceil(n_layers * OUTPUT_FRACTION))
    return range(n_layers - n_output)


def carried_at_subject(patch: EditPatch, test: str) -> bool | None:
    """Whether an edit is carried into ``test`` (module docstring): the edited model's subject
    state, patched into the unedited model's run in ``test`` at some layer, makes the new
    answer its top token; ``None`` when the patch does not say (``test`` not patched, or the
    edit did not succeed in its own language)."""
    if not patch.source_success or test not in patch.target_langs:
        return None
    carried = patch.carried()[
        patch.target_langs.index(test),
        DIRECTIONS.index("edited_to_unedited"),
        PATCH_POSITIONS.index("subject_last"),
    ]
    return bool(carried.any())


def new_answer_decodable(lens: EditLens, test: str, top_k: int) -> tuple[bool, bool] | None:
    """After the edit, whether the new answer (any form) is decodable (``top_k``: the lens
    run's threshold) at ``test``'s subject position at some layer, and at ``test``'s last
    position in the latent layers: what rules 3 and 4 (module docstring) read, as measures of
    their own (the relation analysis uses them as predictors).  ``None`` where rule 1 does
    not read the pair for a reason of the lens (``test`` not read, or its new and old answers
    sharing a first token); whether the fact was known in ``test`` before is the caller's."""
    if test not in lens.test_langs:
        return None
    t = lens.test_langs.index(test)
    j = lens.answer_langs.index(test)
    new, old = EDIT_KINDS.index("new"), EDIT_KINDS.index("old")
    if int(lens.answer_ids[t, new, j]) == int(lens.answer_ids[t, old, j]):
        return None
    after = PHASES.index("after")
    subject, last = POSITIONS.index("subject_last"), POSITIONS.index("last")
    # [position, layer, answer language]: every form of the new answer after the edit
    ranks = lens.rank[t, after, :, :, new, :]
    at_subject = emergence(ranks[subject].min(axis=-1), top_k) is not None
    latent = list(latent_layers(ranks.shape[1]))
    at_last = emergence(ranks[last, latent].min(axis=-1), top_k) is not None
    return at_subject, at_last


@dataclass(frozen=True)
class Classified:
    """The outcome of one edit in one test language.

    Attributes:
        outcome: one of :data:`OUTCOMES`.
        other_form_at_output: (lost at the output) the final top token is another
            language's form of the new answer.
        own_failed: (a failure) the edit does not succeed in its own language either.
        old_at_subject: (applicable) the old answer, in any form, was decodable at the test
            language's subject position before the edit, at some layer.
        carried: (a failure, given a patch) whether the edit is carried into the test
            language (:func:`carried_at_subject`); ``None``: no patch says.
    """

    outcome: str
    other_form_at_output: bool = False
    own_failed: bool = False
    old_at_subject: bool = False
    carried: bool | None = None


def classify_failure(
    lens: EditLens, test: str, top_k: int, patch: EditPatch | None = None
) -> Classified:
    """Classify edit ``lens`` in test language ``test`` by the rules of the module docstring
    (``top_k``: the lens run's decodability threshold; ``patch``: the same edit's
    cross-lingual patches, when measured)."""
    if test not in lens.test_langs:
        return Classified(NOT_READ)
    t = lens.test_langs.index(test)
    if not lens.known_before[t]:
        return Classified(NOT_KNOWN)
    j = lens.answer_langs.index(test)
    new, old = EDIT_KINDS.index("new"), EDIT_KINDS.index("old")
    if int(lens.answer_ids[t, new, j]) == int(lens.answer_ids[t, old, j]):
        return Classified(SAME_TOKEN)
    before, after = PHASES.index("before"), PHASES.index("after")
    subject, last = POSITIONS.index("subject_last"), POSITIONS.index("last")
    readable = emergence(lens.rank[t, before, subject, :, old, :].min(axis=-1), top_k) is not None
    if lens.success(test):
        return Classified(TRANSFERRED, old_at_subject=readable)
    own_failed = lens.edit_lang in lens.test_langs and not lens.success(lens.edit_lang)
    carried = None if patch is None else carried_at_subject(patch, test)
    decodable = new_answer_decodable(lens, test, top_k)
    assert decodable is not None  # read, and the first tokens differ (checked above)
    at_subject, at_last = decodable
    if not at_subject:
        return Classified(NOT_ENRICHED, False, own_failed, readable, carried)
    if not at_last:
        return Classified(NOT_EXTRACTED, False, own_failed, readable, carried)
    distinct = lens.distinct(test, "new")
    final = lens.rank[t, after, last, -1, new, :]
    other = any(
        ok and lang != test and int(final[i]) == 0
        for i, (lang, ok) in enumerate(zip(lens.answer_langs, distinct, strict=True))
    )
    return Classified(LOST_AT_OUTPUT, other, own_failed, readable, carried)


@dataclass
class FailureSummary:
    """The outcomes of one method's edits made in one edit language, read in one test
    language.

    Attributes:
        method: the editing method.
        edit_lang: A.
        test_lang: B.
        n_edits: edits looked at (every outcome, applicable or not).
        counts: per outcome (:data:`OUTCOMES`), how many edits have it.
        other_form_at_output: of the lost at the output, those whose final top token is
            another language's form of the new answer.
        own_failed: of the failures, those whose edit fails in A too.
        old_at_subject: of the applicable edits, those whose old answer was decodable at B's
            subject position before the edit (the enrichment rule's baseline).
        patched: per failure category, the failures a patch says something about.
        carried: per failure category, of those, the failures whose edit is carried.
    """

    method: str
    edit_lang: str
    test_lang: str
    n_edits: int
    counts: dict[str, int]
    other_form_at_output: int = 0
    own_failed: int = 0
    old_at_subject: int = 0
    patched: dict[str, int] = field(default_factory=dict)
    carried: dict[str, int] = field(default_factory=dict)

    @property
    def n_applicable(self) -> int:
        """Edits classified (transferred or failed)."""
        return sum(self.counts.get(o, 0) for o in (TRANSFERRED, *FAILURES))

    @property
    def n_failed(self) -> int:
        return sum(self.counts.get(o, 0) for o in FAILURES)

    def rate(self, outcome: str) -> float:
        """The share of the applicable edits with ``outcome`` (NaN when none is applicable)."""
        n = self.n_applicable
        return self.counts.get(outcome, 0) / n if n else math.nan

    def share_of_failures(self, outcome: str) -> float:
        """The share of the failed edits in failure category ``outcome`` (NaN: none failed)."""
        n = self.n_failed
        return self.counts.get(outcome, 0) / n if n else math.nan


def summarize_failures(
    method: str,
    edit_lang: str,
    test_lang: str,
    lenses: Iterable[EditLens],
    top_k: int,
    patches: Mapping[int, EditPatch] | None = None,
) -> FailureSummary:
    """Classify the edits ``lenses`` (made in ``edit_lang``) in ``test_lang`` and count
    (``patches``: the same edits' cross-lingual patches by fact, when measured)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    patched = dict.fromkeys(FAILURES, 0)
    carried = dict.fromkeys(FAILURES, 0)
    other = own = readable = n = 0
    for lens in lenses:
        patch = (patches or {}).get(lens.fact_id)
        c = classify_failure(lens, test_lang, top_k, patch)
        if c.carried is not None:
            patched[c.outcome] += 1
            carried[c.outcome] += c.carried
        n += 1
        counts[c.outcome] += 1
        other += c.other_form_at_output
        own += c.own_failed
        readable += c.old_at_subject
    return FailureSummary(
        method, edit_lang, test_lang, n, counts, other, own, readable, patched, carried
    )


@dataclass
class FailureResult:
    """Where transfer fails, per method × edit language × test language.

    Attributes:
        langs: the languages (edit and test languages range over them).
        n_layers: layers of the model.
        top_k: the decodability threshold (the lens runs').
        latent: the latent layers (:func:`latent_layers`).
        summaries: one :class:`FailureSummary` per method, edit and test language.
        sources: per method, the lens-edit run it was read from.
    """

    langs: tuple[str, ...]
    n_layers: int
    top_k: int
    latent: list[int]
    summaries: list[FailureSummary]
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(s.method for s in self.summaries))

    def summary(self, method: str, edit_lang: str, test_lang: str) -> FailureSummary:
        for s in self.summaries:
            if (s.method, s.edit_lang, s.test_lang) == (method, edit_lang, test_lang):
                return s
        raise KeyError((method, edit_lang, test_lang))

    def totals(self, method: str) -> dict[str, int]:
        """Per outcome, the count over every pair of ``method``."""
        out = dict.fromkeys(OUTCOMES, 0)
        for s in self.summaries:
            if s.method == method:
                for k, v in s.counts.items():
                    out[k] = out.get(k, 0) + v
        return out

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data; each summary also carries ``rates``: per transferred
        and failure outcome, its share of the applicable edits (``None``: none applicable),
        which :meth:`from_dict` recomputes rather than reads."""
        out = asdict(self)
        out["langs"] = list(self.langs)
        for row, s in zip(out["summaries"], self.summaries, strict=True):
            row["rates"] = {
                o: None if math.isnan(r := s.rate(o)) else round(r, 6)
                for o in (TRANSFERRED, *FAILURES)
            }
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FailureResult:
        return cls(
            langs=tuple(data["langs"]),
            n_layers=int(data["n_layers"]),
            top_k=int(data["top_k"]),
            latent=[int(x) for x in data["latent"]],
            summaries=[
                FailureSummary(**{k: v for k, v in s.items() if k != "rates"})
                for s in data["summaries"]
            ],
            sources=dict(data.get("sources") or {}),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the result as JSON (atomically)."""
        write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FailureResult:
        """The result :meth:`save` wrote.

        Raises:
            DataError: no such file, or not a failure classification (naming the file).
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls.from_dict(data)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}: not a failure classification ({err})") from err


def classify_edits(
    method: str,
    lenses: Mapping[str, Sequence[EditLens]],
    langs: Sequence[str],
    n_layers: int,
    top_k: int,
    source: str = "",
    patches: Mapping[str, Mapping[int, EditPatch]] | None = None,
) -> FailureResult:
    """Classify every edit of one method (``lenses``: per edit language, its edits' lenses) in
    every test language of ``langs`` (``patches``: per edit language, the same edits'
    cross-lingual patches by fact, when measured)."""
    summaries = [
        summarize_failures(method, a, b, lenses.get(a, ()), top_k, (patches or {}).get(a))
        for a in langs
        for b in langs
    ]
    return FailureResult(
        langs=tuple(langs),
        n_layers=n_layers,
        top_k=top_k,
        latent=list(latent_layers(n_layers)),
        summaries=summaries,
        sources={method: source} if source else {},
    )


def combine(results: Sequence[FailureResult]) -> FailureResult:
    """One result of several methods' (the same model, languages and threshold).

    Raises:
        ConfigError: results of different layers, thresholds or languages, or a method twice.
    """
    if not results:
        raise ConfigError("failure classification: no results to combine")
    first = results[0]
    summaries: list[FailureSummary] = []
    sources: dict[str, str] = {}
    seen: set[str] = set()
    for r in results:
        if (r.n_layers, r.top_k, r.langs) != (first.n_layers, first.top_k, first.langs):
            raise ConfigError(
                "failure classification: results of different models, --top-k or languages"
            )
        if seen & set(r.methods):
            raise ConfigError(
                f"failure classification: method {sorted(seen & set(r.methods))} twice"
            )
        seen |= set(r.methods)
        summaries += r.summaries
        sources.update(r.sources)
    return FailureResult(first.langs, first.n_layers, first.top_k, first.latent, summaries, sources)
