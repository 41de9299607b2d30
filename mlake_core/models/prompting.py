"""Prompt templates: how a fact's prompt and its answer are put in front of a model.

A template is part of a model's configuration (base models answer a bare question poorly, a
``Q:``/``A:`` frame and a few worked examples help; mlake-tiny is trained with one frame and
must be asked in it), so it is chosen per model, recorded with every result, and applied the
same way by every analysis.

What a template decides:

* the text around a question (``"Q: {question}\\nA:"``);
* what separates a prompt from its answer.  Prompt and answer are tokenized **separately** and
  joined by token ids, never as strings (``prompt + " " + target`` is wrong for Chinese and
  Japanese and changes token ids in English, zjunlp/EasyEdit#302).  After a question frame the
  answer starts with :attr:`PromptTemplate.answer_prefix` (a space after ``A:``).  After a cloze
  prefix the answer starts with a space in the spaced languages (en, fr, de) and with nothing
  in zh and ja; the prefix's own trailing whitespace is moved onto the answer so that the
  space is tokenized with the word, as byte-level BPE vocabularies expect;
* what ends an answer in generated text (:attr:`PromptTemplate.stop`): generation is cut at the
  first stop string before alias matching.

**Few-shot prompts** (:class:`FewShotTemplate`, ``--template fewshot``; the default of every
model that records no template of its own, i.e. every model but mlake-tiny): ``k``
demonstrations in the prompt's language come first, each a fact **outside** the evaluated
set asked and answered in the template's own frame (``Q: …\\nA: …\\n\\n``; a cloze prompt gets
cloze demonstrations, ``prefix answer\\n\\n``), then the prompt itself.  The demonstrations
are drawn once per run (:meth:`PromptTemplate.for_run`, from the dataset and the evaluated
fact ids, with a recorded seed), so every prompt of a language in a run has the same ones and
every stage asks the very prompt the knowledge stage measured; :meth:`FewShotTemplate.to_dict`
records ``k``, the seed and the demonstrations (fact ids and texts) per language, so they
enter every result key.

The order of the parts of a prompt is: few-shot demonstrations, then :attr:`context` (what
in-context editing puts before the prompt: its own demonstrations and the new fact), then the
question or cloze prefix.  The new fact thus stays next to the question it bears on.

:meth:`PromptTemplate.place` also says where the form's text starts inside the prompt, so the
subject is located in the prompt's own question, never in a demonstration or the context
that may contain the same words (:func:`mlake_core.editing.base.locate_prompt`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from mlake_core.errors import ConfigError
from mlake_core.languages import is_unspaced

if TYPE_CHECKING:
    from mlake_core.data.dataset import FactView, MlakeDataset


@dataclass(frozen=True)
class PlacedPrompt:
    """A prompt and where the form's text sits in it.

    Attributes:
        prompt: the prompt text.
        answer_prefix: what the answer starts with (joined by ids).
        text_offset: index in :attr:`prompt` of the form text's first character: character
            ``i`` of the text (past its stripped leading whitespace, and before its stripped
            trailing whitespace) is ``prompt[text_offset + i]``.
    """

    prompt: str
    answer_prefix: str
    text_offset: int


@dataclass(frozen=True)
class PromptTemplate:
    """How questions and cloze prefixes are turned into prompts.

    Attributes:
        name: registry name, recorded with results.
        question: format string with one ``{question}`` field.
        answer_prefix: text the answer starts with after a question prompt.
        stop: strings that end an answer in generated text (besides EOS).
        context: text put before every prompt (in-context editing puts the new fact and
            demonstrations here); empty for plain templates.
    """

    name: str
    question: str
    answer_prefix: str = " "
    stop: tuple[str, ...] = ("\n",)
    context: str = ""

    def __post_init__(self) -> None:
        if self.question.count("{question}") != 1:
            raise ConfigError(
                f"prompt template {self.name!r}: the question format must contain "
                f"{{question}} exactly once, got {self.question!r}"
            )

    # -- the run's prompt -----------------------------------------------------------------

    @property
    def needs_build(self) -> bool:
        """Whether :meth:`for_run` must be called before prompts are made (few-shot
        templates before their demonstrations are drawn)."""
        return False

    def for_run(
        self,
        dataset: MlakeDataset,
        exclude: Collection[int],
        langs: Sequence[str] | None = None,
    ) -> PromptTemplate:
        """The template a run uses, given its data and evaluated facts (``exclude``): a
        plain template is itself; a few-shot template draws its demonstrations."""
        return self

    def demonstration_facts(self) -> frozenset[int]:
        """Fact ids shown as demonstrations in any language (none for plain templates)."""
        return frozenset()

    def describe(self) -> str:
        """One line saying what the template is (for progress logs)."""
        return f"template {self.name!r}"

    def lead(self, kind: str, lang: str | None) -> str:
        """The text before the form's own text: :attr:`context` (few-shot templates put
        their demonstrations first)."""
        return self.context

    # -- prompts ----------------------------------------------------------------------------

    def frame(self, question: str) -> str:
        """``question`` (stripped) in the question format, nothing before it."""
        return self.question.replace("{question}", question.strip())

    def place(self, kind: str, text: str, lang: str | None) -> PlacedPrompt:
        """The prompt of a form of ``kind`` (``question``/``cloze``) whose text is ``text``,
        and where that text starts in it.

        Raises:
            ValueError: an unknown kind.
            ConfigError: a cloze form, or a few-shot template, without a language.
        """
        if kind not in ("question", "cloze"):
            raise ValueError(f"unknown prompt form {kind!r}")
        if kind == "cloze" and lang is None:
            raise ConfigError("a cloze prompt needs its language")
        lead = self.lead(kind, lang)
        if kind == "question":
            before = self.question[: self.question.index("{question}")]
            indent = len(text) - len(text.lstrip())
            return PlacedPrompt(
                lead + self.frame(text), self.answer_prefix, len(lead) + len(before) - indent
            )
        assert lang is not None
        return PlacedPrompt(lead + text.rstrip(), "" if is_unspaced(lang) else " ", len(lead))

    def question_prompt(self, question: str, lang: str | None = None) -> tuple[str, str]:
        """``(prompt, answer prefix)`` for a question-form prompt (few-shot templates need
        ``lang``)."""
        placed = self.place("question", question, lang)
        return placed.prompt, placed.answer_prefix

    def cloze_prompt(self, prefix: str, lang: str) -> tuple[str, str]:
        """``(prompt, answer prefix)`` for a cloze prefix in ``lang``.

        The prefix's trailing whitespace is removed; the answer gets a leading space in
        spaced languages and none in zh and ja.
        """
        placed = self.place("cloze", prefix, lang)
        return placed.prompt, placed.answer_prefix

    def prompt(self, kind: str, text: str, lang: str) -> tuple[str, str]:
        """``(prompt, answer prefix)`` for a prompt form of ``kind`` (``question``/``cloze``)."""
        placed = self.place(kind, text, lang)
        return placed.prompt, placed.answer_prefix

    def cut(self, generated: str) -> str:
        """Generated text up to the first stop string."""
        end = len(generated)
        for stop in self.stop:
            at = generated.find(stop)
            if at != -1:
                end = min(end, at)
        return generated[:end]

    def with_context(self, context: str) -> PromptTemplate:
        """The same template with ``context`` before every prompt (after few-shot
        demonstrations)."""
        return replace(self, context=context)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (recorded in ``meta.json`` and every result key)."""
        out = asdict(self)
        out["stop"] = list(self.stop)
        return out


# -- few-shot prompts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Demonstration:
    """One worked example of a few-shot prompt: a fact outside the evaluated set in one
    language.

    Attributes:
        fact_id: the MLaKE fact.
        question: its question.
        answer: the question's answer (the original object).
        cloze: its cloze prefix.
        cloze_answer: the answer after the cloze prefix (an inflected form in some
            languages).
    """

    fact_id: int
    question: str
    answer: str
    cloze: str
    cloze_answer: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class DemonstrationShortage(ConfigError):
    """Too few usable facts outside the evaluated ones to draw demonstrations from.

    Attributes:
        langs: the languages short of demonstrations.
    """

    def __init__(self, message: str, langs: Sequence[str]) -> None:
        super().__init__(message)
        self.langs = tuple(langs)


#: Longest demonstration answer: characters (and words, in spaced languages).
DEMO_ANSWER_CHARS = {"spaced": 24, "unspaced": 8}
DEMO_ANSWER_WORDS = 3
#: Longest demonstration question, in characters.
DEMO_QUESTION_CHARS = {"spaced": 100, "unspaced": 40}


def demonstration_of(view: FactView) -> Demonstration | None:
    """The demonstration a fact view makes, or ``None`` when it makes a poor one.

    A good demonstration has a usable question and cloze form, a short answer (at most
    :data:`DEMO_ANSWER_WORDS` words and :data:`DEMO_ANSWER_CHARS` characters), a question of
    at most :data:`DEMO_QUESTION_CHARS` characters, no line break, and a cloze prefix that
    does not end inside a word (an elided article such as ``l'``).
    """
    q, c = view.question, view.cloze
    if not (q.usable and c.usable and q.text and c.text):
        return None
    question, answer = q.text.strip(), q.target.text.strip()
    cloze, cloze_answer = c.text.rstrip(), c.target.text.strip()
    if not (question and answer and cloze.strip() and cloze_answer):
        return None
    if any("\n" in s for s in (question, answer, cloze, cloze_answer)):
        return None
    script = "unspaced" if is_unspaced(view.lang) else "spaced"
    for a in (answer, cloze_answer):
        if len(a) > DEMO_ANSWER_CHARS[script]:
            return None
        if script == "spaced" and len(a.split()) > DEMO_ANSWER_WORDS:
            return None
    if len(question) > DEMO_QUESTION_CHARS[script] or cloze.endswith(("'", "’")):
        return None
    return Demonstration(view.fact_id, question, answer, cloze.strip(), cloze_answer)


def _draw_order(fact_ids: Iterable[int], seed: int) -> list[int]:
    """``fact_ids`` in the seed's order: sorted by a hash of (seed, fact id), so the order
    of two facts does not depend on which others are there, nor on a library's generator."""

    def key(fact_id: int) -> str:
        return hashlib.sha256(f"mlake-fewshot:{seed}:{fact_id}".encode()).hexdigest()

    return sorted({int(f) for f in fact_ids}, key=key)


def draw_demonstrations(
    dataset: MlakeDataset,
    exclude: Collection[int],
    k: int,
    seed: int,
    langs: Sequence[str] | None = None,
) -> dict[str, tuple[Demonstration, ...]]:
    """``k`` demonstrations per language from the facts of ``dataset`` not in ``exclude``.

    Facts are taken in the seed's order (:func:`_draw_order`), those that make a good
    demonstration (:func:`demonstration_of`) in every language of ``langs`` first, so the
    languages share their demonstration facts wherever they can.

    Raises:
        DemonstrationShortage: a language with fewer than ``k`` good facts outside
            ``exclude`` (naming it).
    """
    langs = tuple(langs or dataset.langs)
    missing = [lang for lang in langs if lang not in dataset.langs]
    if missing:
        raise ConfigError(f"few-shot demonstrations: MLaKE was loaded without {missing}")
    skip = {int(f) for f in exclude}
    order = _draw_order((f.fact_id for f in dataset.facts if f.fact_id not in skip), seed)
    demos: dict[int, dict[str, Demonstration | None]] = {}
    for fact_id in order:
        views = dataset.fact(fact_id).views
        demos[fact_id] = {lang: demonstration_of(views[lang]) for lang in langs}
    shared = [f for f in order if all(demos[f][lang] is not None for lang in langs)]
    out: dict[str, tuple[Demonstration, ...]] = {}
    short: list[str] = []
    for lang in langs:
        picks = shared[:k]
        picks += [f for f in order if demos[f][lang] is not None and f not in picks][
            : k - len(picks)
        ]
        if len(picks) < k:
            short.append(f"{lang} ({len(picks)})")
        out[lang] = tuple(demos[f][lang] for f in picks)  # type: ignore[misc]
    if short:
        raise DemonstrationShortage(
            f"few-shot template: {k} demonstrations per language are needed from facts "
            f"outside the {len(skip)} evaluated ones, too few usable there in "
            f"{', '.join(short)}",
            [s.split()[0] for s in short],
        )
    return out


@dataclass(frozen=True)
class FewShotTemplate(PromptTemplate):
    """A frame with ``k`` demonstrations in the prompt's language before every prompt
    (module docstring).  Made unbuilt (no demonstrations) by :func:`get_template`, built
    once per run by :meth:`for_run`.

    Attributes:
        k: demonstrations per prompt.
        seed: the seed of the draw.
        demonstrations: ``(lang, demonstrations)`` pairs, in the run's language order;
            empty until built.
    """

    k: int = 3
    seed: int = 0
    demonstrations: tuple[tuple[str, tuple[Demonstration, ...]], ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        for field, low in (("k", 1), ("seed", 0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"few-shot template: {field} must be an integer >= {low}")

    @classmethod
    def build(
        cls,
        dataset: MlakeDataset,
        *,
        exclude: Collection[int],
        k: int = 3,
        seed: int = 0,
        langs: Sequence[str] | None = None,
        frame: PromptTemplate | None = None,
    ) -> FewShotTemplate:
        """A built few-shot template in ``frame`` (default ``qa``): ``k`` demonstrations
        per language drawn with ``seed`` from the facts not in ``exclude``
        (:func:`draw_demonstrations`)."""
        frame = frame or QA
        spec = cls(
            name=FEWSHOT_NAME,
            question=frame.question,
            answer_prefix=frame.answer_prefix,
            stop=frame.stop,
            k=k,
            seed=seed,
        )
        return spec.for_run(dataset, exclude, langs)

    @property
    def needs_build(self) -> bool:
        return not self.demonstrations

    @property
    def spec(self) -> str:
        """The ``--template`` value that asks for this template (``fewshot-5-seed1``)."""
        return f"{FEWSHOT_NAME}-{self.k}-seed{self.seed}"

    def for_run(
        self,
        dataset: MlakeDataset,
        exclude: Collection[int],
        langs: Sequence[str] | None = None,
    ) -> FewShotTemplate:
        drawn = draw_demonstrations(dataset, exclude, self.k, self.seed, langs)
        return replace(self, demonstrations=tuple(drawn.items()))

    def demonstration_facts(self) -> frozenset[int]:
        return frozenset(d.fact_id for _, demos in self.demonstrations for d in demos)

    def describe(self) -> str:
        per_lang = "; ".join(
            f"{lang} {','.join(str(d.fact_id) for d in demos)}"
            for lang, demos in self.demonstrations
        )
        drawn = f": facts {per_lang}" if per_lang else " (not drawn yet)"
        return (
            f"template {self.name!r}, {self.k} demonstrations per language, seed {self.seed}{drawn}"
        )

    def demos(self, lang: str | None) -> tuple[Demonstration, ...]:
        """The demonstrations of ``lang``.

        Raises:
            ConfigError: not built yet, no language, or a language it was not built for.
        """
        if self.needs_build:
            raise ConfigError(
                "few-shot template: its demonstrations are not drawn yet (for_run, once per "
                "run, with the dataset and the evaluated facts)"
            )
        if lang is None:
            raise ConfigError(
                "few-shot template: a prompt needs its language (template.prompt(kind, text, lang))"
            )
        for code, demos in self.demonstrations:
            if code == lang:
                return demos
        built = ", ".join(code for code, _ in self.demonstrations)
        raise ConfigError(f"few-shot template: no demonstrations in {lang} (drawn for {built})")

    def demonstration_text(self, kind: str, lang: str | None) -> str:
        """The demonstrations of ``lang`` as they precede a prompt of ``kind``."""
        parts = []
        for d in self.demos(lang):
            if kind == "cloze":
                sep = "" if lang is not None and is_unspaced(lang) else " "
                parts.append(f"{d.cloze}{sep}{d.cloze_answer}\n\n")
            else:
                parts.append(f"{self.frame(d.question)}{self.answer_prefix}{d.answer}\n\n")
        return "".join(parts)

    def lead(self, kind: str, lang: str | None) -> str:
        return self.demonstration_text(kind, lang) + self.context

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the frame, ``k``, the seed and each language's demonstrations
        (fact ids and texts)."""
        out = super().to_dict()
        out["demonstrations"] = {
            lang: [d.to_dict() for d in demos] for lang, demos in self.demonstrations
        }
        return out


def template_from_dict(data: Mapping[str, Any]) -> PromptTemplate:
    """The template :meth:`PromptTemplate.to_dict` wrote (a few-shot one with its
    demonstrations)."""
    fields = {**data, "stop": tuple(data.get("stop", ("\n",)))}
    if "demonstrations" not in fields:
        return PromptTemplate(**fields)
    demos = fields.pop("demonstrations") or {}
    return FewShotTemplate(
        **fields,
        demonstrations=tuple(
            (lang, tuple(Demonstration(**d) for d in items)) for lang, items in demos.items()
        ),
    )


#: Named templates (``--template``).  ``qa`` is mlake-tiny's default; ``fewshot`` (``qa``
#: with 3 demonstrations) the default of every other model.
TEMPLATES: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate) -> PromptTemplate:
    """Add a template to :data:`TEMPLATES`; a duplicate name is an error."""
    if template.name in TEMPLATES:
        raise ValueError(f"prompt template {template.name!r} is already registered")
    TEMPLATES[template.name] = template
    return template


QA = register_template(PromptTemplate(name="qa", question="Q: {question}\nA:"))
BARE = register_template(PromptTemplate(name="bare", question="{question}"))

FEWSHOT_NAME = "fewshot"
FEWSHOT = FewShotTemplate(name=FEWSHOT_NAME, question=QA.question)
register_template(FEWSHOT)

DEFAULT_TEMPLATE = "qa"
#: The template of a model that records none of its own (every model but mlake-tiny).
BASE_MODEL_TEMPLATE = FEWSHOT_NAME

_FEWSHOT_SPEC = re.compile(rf"^{FEWSHOT_NAME}(?:-(\d+))?(?:-seed(\d+))?$")


def get_template(name: str) -> PromptTemplate:
    """Look up a template by name: a registered one, or ``fewshot-K`` / ``fewshot-K-seedS``
    / ``fewshot-seedS`` (``fewshot`` is ``fewshot-3-seed0``), unbuilt.

    Raises:
        ConfigError: for an unknown name (the message lists the known ones).
    """
    if name in TEMPLATES:
        return TEMPLATES[name]
    match = _FEWSHOT_SPEC.match(str(name).strip())
    if match:
        k, seed = match.groups()
        return replace(
            FEWSHOT,
            k=int(k) if k is not None else FEWSHOT.k,
            seed=int(seed) if seed is not None else FEWSHOT.seed,
        )
    raise ConfigError(
        f"--template {name!r} is not known; choose one of {', '.join(TEMPLATES)} "
        f"(or {FEWSHOT_NAME}-K, {FEWSHOT_NAME}-K-seedS: K demonstrations drawn with seed S)"
    )
