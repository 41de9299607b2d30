"""The training corpus of mlake-tiny: the selected facts and the tokenized sequences of each
(fact, language) unit, built once before training (:func:`build_corpus`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mlake_core.data.dataset import MlakeDataset
from mlake_core.errors import ConfigError
from mlake_core.languages import is_unspaced
from mlake_core.models.mlake_tiny.config import TinyTrainConfig
from mlake_core.models.prompting import get_template


def select_facts(dataset: MlakeDataset, config: TinyTrainConfig) -> list[int]:
    """The fact ids mlake-tiny trains on: ``config.facts`` facts drawn with
    ``config.selection_seed`` from those whose question has a located subject in every
    language of ``config.langs``, sorted by id; every fact for ``"all"``.

    Raises:
        ConfigError: when more facts are asked for than are eligible.
    """
    eligible = [
        fact.fact_id
        for fact in dataset.facts
        if all(fact.views[lang].question.usable for lang in config.langs)
    ]
    if config.facts == "all":
        return [fact.fact_id for fact in dataset.facts]
    n = int(config.facts)
    if n > len(eligible):
        raise ConfigError(
            f"--facts {n}: only {len(eligible)} facts have a located subject in "
            f"{','.join(config.langs)}; use --facts all for every fact"
        )
    return sorted(random.Random(config.selection_seed).sample(eligible, n))


@dataclass
class Example:
    """One training sequence: token ids and per-position loss weights.

    ``weights[i]`` weighs the loss of predicting ``ids[i]`` from ``ids[:i]`` (0: no loss).
    """

    ids: list[int]
    weights: list[float]
    unit: int  # index of the (fact, language) unit
    kind: str  # "qa", "statement" or "bilingual"
    droppable: tuple[int, ...] = ()  # question tokens outside the subject (context dropout)
    # (position, token): the residual after block ``enrichment_layer`` at ``position`` (the
    # subject's last token) must predict ``token`` (the answer's first token) through the
    # logit lens (TinyTrainConfig.enrichment_layer).
    lens: tuple[tuple[int, int], ...] = ()
    # (first, last): positions of the subject's first and last token, when located; the
    # route masking of TinyTrainConfig.route_masking applies to this example when ``masked``.
    route: tuple[int, int] | None = None
    masked: bool = False
    # Interchange training (TinyTrainConfig.interchange): (position here, source unit,
    # position in the source's question prompt): the residual after block route_layer - 1 at
    # the first position is replaced by the source prompt's at the second.
    swap: tuple[int, int, int] | None = None


@dataclass
class Corpus:
    """The training units and their sequences."""

    units: list[tuple[int, str]]  # (fact_id, lang)
    qa: list[Example]  # one per unit, same order
    statements: list[Example]  # one per unit, same order
    subjects: list[Example | None] = field(default_factory=list)  # subject-only QA, per unit
    pieces: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (prompt, answer)
    # Per language, every original and new answer of the trained facts (tokenized with the
    # template's answer prefix and EOS): the names of name-continuation examples.
    names: dict[str, list[list[int]]] = field(default_factory=dict)
    name_owners: dict[str, dict[tuple[int, ...], set[int]]] = field(default_factory=dict)
    by_lang: dict[str, list[int]] = field(default_factory=dict)  # units per language
    # Per unit, (subject, sentences) of its entity document (TinyTrainConfig.entity_text).
    entities: list[tuple[str, list[str]] | None] = field(default_factory=list)
    # Per unit, the logit-lens target of the subject's last token at the end of the entity
    # document's first line, ((position, token),).
    subject_lens: list[tuple[tuple[int, int], ...]] = field(default_factory=list)
    # Per unit, (first, last) subject token positions in the question prompt of ``pieces``;
    # then the same for each synthetic entity (TinyTrainConfig.name_entities), whose prompt
    # and answer follow the units' in ``pieces``.
    routes: list[tuple[int, int] | None] = field(default_factory=list)
    # Per language, the indices in ``pieces`` of its synthetic entities, and their examples.
    synthetic: dict[str, list[int]] = field(default_factory=dict)
    synthetic_examples: list[Example] = field(default_factory=list)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _last_token(tokenizer: Any, text: str, start: int, end: int) -> int | None:
    """Position (BOS counted) of the last token of ``text`` overlapping ``[start, end)``, as
    editing locates the subject (:func:`mlake_core.editing.base.subject_tokens`)."""
    span = _span_tokens(tokenizer, text, start, end)
    return span[1] if span else None


def _span_tokens(tokenizer: Any, text: str, start: int, end: int) -> tuple[int, int] | None:
    """Positions (BOS counted) of the first and last token of ``text`` overlapping
    ``[start, end)``; ``None`` when no token does."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    return (hits[0] + 1, hits[-1] + 1) if hits else None


#: Synthetic attribute of entity documents, per language: ``{s}`` the subject, ``{y}`` a year
#: drawn per fact (the same in every language).
YEAR_SENTENCES: dict[str, str] = {
    "en": "{s} was first recorded in {y}.",
    "zh": "{s}最早的记载见于{y}年。",
    "ja": "{s}は{y}年に初めて記録された。",
    "fr": "{s} est mentionné pour la première fois en {y}.",
    "de": "{s} wurde {y} zum ersten Mal erwähnt.",
    "es": "{s} se registró por primera vez en {y}.",
}


def entity_sentences(view: Any) -> tuple[str, list[str]] | None:
    """The subject of a fact view's question and the sentences of its entity document (see
    :attr:`TinyTrainConfig.entity_text`), in a fixed order; ``None`` without a located
    subject.

    The sentences: the cloze statement (``o_prompt``); the question followed by the original
    answer; ``{subject}: {answer}``; and a synthetic year attribute (:data:`YEAR_SENTENCES`),
    drawn from 1500-2019 with the fact id as seed.
    """
    subject = view.question.subject_text
    if not subject or not subject.strip():
        return None
    subject = subject.strip()
    rec = view.record
    sep = "" if is_unspaced(view.lang) else " "
    year = random.Random(view.fact_id).randrange(1500, 2020)
    sentences = [
        rec.o_prompt.strip(),
        f"{rec.question.strip()}{sep}{rec.o_answer}",
        f"{subject}: {rec.o_answer}",
        _per_language(YEAR_SENTENCES, view.lang, "entity_text").format(s=subject, y=year),
    ]
    return subject, sentences


def build_corpus(
    dataset: MlakeDataset, fact_ids: Sequence[int], tokenizer: Any, config: TinyTrainConfig
) -> Corpus:
    """Tokenize the question-answer pairs and statements of every (fact, language) unit.

    Prompt and answer are tokenized separately and joined by ids (see
    :mod:`mlake_core.models.prompting`), exactly as the knowledge measurement does.
    """
    template = get_template(config.template)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    corpus = Corpus(units=[], qa=[], statements=[])
    for fact_id in fact_ids:
        fact = dataset.fact(fact_id)
        for lang in config.langs:
            view = fact.views[lang]
            unit = len(corpus.units)
            corpus.units.append((fact_id, lang))
            prompt_text, prefix = template.question_prompt(view.record.question)
            prompt = [bos, *_encode(tokenizer, prompt_text)]
            answer = [*_encode(tokenizer, prefix + view.record.o_answer), eos]
            corpus.pieces.append((prompt, answer))
            ids = (prompt + answer)[-config.max_len :]
            n_answer = len(answer)
            weights = [0.0] * (len(ids) - n_answer) + [1.0] * n_answer
            cut = len(prompt) + len(answer) - len(ids)
            droppable = tuple(
                i - cut for i in _context_tokens(tokenizer, prompt_text, view) if i - cut > 0
            )
            # The first answer token that is not blank (in zh/ja the answer prefix's space is a
            # token of its own, shared by every answer).
            answer_first = next((t for t in answer if tokenizer.decode([t]).strip()), answer[0])
            lens: tuple[tuple[int, int], ...] = ()
            route: tuple[int, int] | None = None
            span = view.question.subject
            q_start = prompt_text.find(view.record.question.strip())
            if span is not None and q_start >= 0 and view.question.text == view.record.question:
                found = _span_tokens(
                    tokenizer, prompt_text, q_start + span.start, q_start + span.end
                )
                if found is not None:
                    route = found
                    if found[1] - cut > 0:
                        lens = ((found[1] - cut, answer_first),)
            corpus.routes.append(route)
            qa_route = _shifted(route, cut)
            corpus.qa.append(Example(ids, weights, unit, "qa", droppable, lens, qa_route))
            statement = [bos, *_encode(tokenizer, view.record.o_prompt), eos][: config.max_len]
            sw = config.statement_weight
            s_lens: tuple[tuple[int, int], ...] = ()
            s_route: tuple[int, int] | None = None
            c_span, c_text = view.cloze.subject, view.cloze.text
            if c_span is not None and c_text and view.record.o_prompt.startswith(c_text):
                found = _span_tokens(tokenizer, view.record.o_prompt, c_span.start, c_span.end)
                if found is not None and found[1] < len(statement) - 1:
                    s_lens = ((found[1], answer_first),)
                    s_route = found
            corpus.statements.append(
                Example(
                    statement,
                    [0.0] + [sw] * (len(statement) - 1),
                    unit,
                    "statement",
                    lens=s_lens,
                    route=s_route,
                )
            )
            corpus.entities.append(entity_sentences(view) if config.entity_text else None)
            entity = corpus.entities[-1]
            corpus.subject_lens.append(
                ((len(_encode(tokenizer, entity[0])), answer_first),) if entity else ()
            )
            subject = view.question.subject_text
            if config.subject_prompts and subject:
                # The answer right after the subject: the first answer token is predicted
                # at the subject's last token, so the lookup happens there.
                s_prompt = [bos, *_encode(tokenizer, subject.strip())]
                sep = "" if is_unspaced(lang) else " "
                s_answer = [*_encode(tokenizer, sep + view.record.o_answer), eos]
                corpus.subjects.append(
                    Example(
                        (s_prompt + s_answer)[: config.max_len],
                        ([0.0] * len(s_prompt) + [1.0] * len(s_answer))[: config.max_len],
                        unit,
                        "subject",
                        lens=((len(s_prompt) - 1, answer_first),),
                        route=(1, len(s_prompt) - 1),
                    )
                )
            else:
                corpus.subjects.append(None)
            if config.answer_continuations:
                owners = corpus.name_owners.setdefault(lang, {})
                corpus.by_lang.setdefault(lang, []).append(unit)
                for answer_text in (view.record.o_answer, view.record.e_answer):
                    if answer_text and answer_text.strip():
                        name = (*_encode(tokenizer, prefix + answer_text), eos)
                        owners.setdefault(name, set()).add(fact_id)
    for lang, owners in corpus.name_owners.items():
        # Sorted: deterministic, one entry per distinct name.
        corpus.names[lang] = [list(n) for n in sorted(owners)]
    if config.name_entities:
        _add_name_entities(dataset, fact_ids, tokenizer, config, corpus)
    return corpus


#: Syllables of synthetic entity names, per language (see :func:`synthetic_name`).
_SYLLABLES: dict[str, tuple[str, ...]] = {
    "en": ("ka", "lor", "ven", "mi", "dra", "sel", "tor", "bra", "nim", "quel", "ash", "rin"),
    "fr": ("ma", "lou", "vien", "dre", "sol", "ter", "bel", "nau", "cour", "mon", "gil", "ran"),
    "de": ("ka", "lor", "wen", "berg", "dra", "sel", "tor", "bra", "nim", "hau", "sten", "rin"),
    "zh": tuple("安宝辰丹芳高海华佳建凯兰丽明宁平琪荣山涛文祥欣雅耀"),
    "ja": tuple("アイカキクサシタチナニハヒマミヤラリルレロ"),
    "es": ("ma", "lo", "ver", "di", "dra", "sel", "tor", "bra", "ni", "que", "san", "rin"),
}


def _per_language(table: dict[str, Any], lang: str, option: str) -> Any:
    """``table[lang]``, or a ConfigError naming the option and the languages it has."""
    try:
        return table[lang]
    except KeyError:
        raise ConfigError(
            f"{option}: mlake-tiny has no {option} text for language {lang!r} "
            f"(it has {', '.join(table)}); train without {option} or without {lang}"
        ) from None


def synthetic_name(lang: str, seed: str) -> str:
    """A made-up entity name in the script of ``lang``, fixed by ``seed``: two words of two
    or three syllables (en, fr, de), or three to four characters (zh, ja)."""
    rng = random.Random(f"{lang}|{seed}")
    pool = _per_language(_SYLLABLES, lang, "name_entities")
    if is_unspaced(lang):
        return "".join(rng.choice(pool) for _ in range(rng.randint(3, 4)))
    words = ["".join(rng.choice(pool) for _ in range(rng.randint(2, 3))) for _ in range(2)]
    return " ".join(w.capitalize() for w in words)


def _add_name_entities(
    dataset: MlakeDataset,
    fact_ids: Sequence[int],
    tokenizer: Any,
    config: TinyTrainConfig,
    corpus: Corpus,
) -> None:
    """The synthetic entities of :attr:`TinyTrainConfig.name_entities`, appended to
    ``corpus.pieces`` and ``corpus.routes``, with one example each."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for lang in config.langs:
        views = [dataset.fact(f).views[lang] for f in fact_ids]
        originals = {v.record.o_answer.strip() for v in views}
        news = sorted(
            {v.record.e_answer.strip() for v in views if v.record.e_answer} - originals - {""}
        )
        sep = "" if is_unspaced(lang) else " "
        prefix = get_template(config.template).answer_prefix
        for answer_text in news:
            name = synthetic_name(lang, answer_text)
            prompt = [bos, *_encode(tokenizer, name)]
            answer = [*_encode(tokenizer, sep + answer_text), eos]
            first = next((t for t in answer if tokenizer.decode([t]).strip()), answer[0])
            index = len(corpus.pieces)
            # ``pieces`` holds the answer as it follows a question (the template's answer
            # prefix, a token of its own in zh and ja): interchange examples put it after a
            # question.  The entity's own example keeps ``{name}{sep}{answer}``.
            corpus.pieces.append((prompt, [*_encode(tokenizer, prefix + answer_text), eos]))
            corpus.routes.append((1, len(prompt) - 1))
            corpus.synthetic.setdefault(lang, []).append(index)
            ids = (prompt + answer)[: config.max_len]
            corpus.synthetic_examples.append(
                Example(
                    ids,
                    ([0.0] * len(prompt) + [1.0] * len(answer))[: config.max_len],
                    -1,
                    "name_entity",
                    lens=((len(prompt) - 1, first),),
                    route=(1, len(prompt) - 1),
                )
            )


def _shifted(route: tuple[int, int] | None, cut: int) -> tuple[int, int] | None:
    """``route`` after ``cut`` tokens were dropped from the left; ``None`` when the subject's
    first token (or BOS before it) is gone."""
    if route is None or route[0] - cut < 1:
        return None
    return (route[0] - cut, route[1] - cut)


def _context_tokens(tokenizer: Any, prompt_text: str, view: Any) -> list[int]:
    """Positions (BOS counted) of the prompt's question tokens that do not overlap the
    subject: what context dropout may replace.  Empty when the subject is not located."""
    span = view.question.subject
    question = view.record.question.strip()
    start = prompt_text.find(question)
    if span is None or start < 0 or view.question.text != view.record.question:
        return []
    s0, s1 = start + span.start, start + span.end
    enc = tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True)
    return [
        i + 1
        for i, (a, b) in enumerate(enc["offset_mapping"])
        if a >= start and b <= start + len(question) and b > a and (b <= s0 or a >= s1)
    ]
