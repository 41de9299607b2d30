"""The examples drawn afresh from the corpus in each epoch: entity documents, name
continuations, interchange examples, context dropout and bilingual documents."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from mlake_core.languages import is_unspaced
from mlake_core.models.mlake_tiny.corpus import Corpus, Example, _encode, _shifted


def entity_document(
    corpus: Corpus, unit: int, tokenizer: Any, rng: random.Random, max_len: int
) -> Example:
    """The entity document of ``unit`` for one epoch: ``<s>{subject}\n`` then its sentences
    in a random order (joined by a space in spaced languages), ``</s>``; LM loss on every
    token after the subject; the logit-lens target at the subject's last token."""
    entry = corpus.entities[unit]
    assert entry is not None
    subject, sentences = entry
    _, lang = corpus.units[unit]
    order = sentences[:]
    rng.shuffle(order)
    head = [tokenizer.bos_token_id, *_encode(tokenizer, subject)]
    body = _encode(tokenizer, "\n" + ("" if is_unspaced(lang) else " ").join(order))
    ids = (head + body + [tokenizer.eos_token_id])[:max_len]
    weights = ([0.0] * len(head) + [1.0] * (len(ids) - len(head)))[:max_len]
    return Example(ids, weights, unit, "entity", lens=corpus.subject_lens[unit])


def _continuation(corpus: Corpus, unit: int, rng: random.Random, max_len: int) -> Example:
    """A name continuation for ``unit``: the question of another fact in the same language,
    then a random answer of that language, with the loss on every answer token but the first
    (see :attr:`TinyTrainConfig.answer_continuations`).  The question never belongs to the
    fact whose answer follows, so no fact's own question is trained with its new answer."""
    _, lang = corpus.units[unit]
    name = rng.choice(corpus.names[lang])
    owners = corpus.name_owners[lang][tuple(name)]
    others = [u for u in corpus.by_lang[lang] if corpus.units[u][0] not in owners]
    source = rng.choice(others) if others else unit
    prompt, _ = corpus.pieces[source]
    ids = (prompt + name)[-max_len:]
    weights = ([0.0] * (len(prompt) + 1) + [1.0] * (len(name) - 1))[-max_len:]
    route = corpus.routes[source] if corpus.routes else None
    return Example(
        ids,
        weights,
        unit,
        "continuation",
        route=_shifted(route, len(prompt) + len(name) - len(ids)),
    )


def _interchange(
    corpus: Corpus, unit: int, rng: random.Random, max_len: int, synthetic: bool = False
) -> Example | None:
    """An interchange example for ``unit`` (see :attr:`TinyTrainConfig.interchange`): its
    question prompt followed by the answer of another fact's question in the same language
    (with ``synthetic``, of a synthetic entity of that language,
    :attr:`TinyTrainConfig.name_entities`), the loss on that answer; ``None`` when the unit's
    subject is not located or there is no source."""
    route = corpus.routes[unit]
    if route is None:
        return None
    fact_id, lang = corpus.units[unit]
    if synthetic:
        others = corpus.synthetic.get(lang, [])
    else:
        others = [
            u
            for u, (f, other_lang) in enumerate(corpus.units)
            if other_lang == lang and f != fact_id and corpus.routes[u] is not None
        ]
    if not others:
        return None
    source = rng.choice(others)
    prompt, _ = corpus.pieces[unit]
    source_route = corpus.routes[source]
    assert source_route is not None
    answer = corpus.pieces[source][1]
    ids = (prompt + answer)[-max_len:]
    weights = ([0.0] * len(prompt) + [1.0] * len(answer))[-max_len:]
    shifted = _shifted(route, len(prompt) + len(answer) - len(ids))
    if shifted is None:
        return None
    return Example(
        ids,
        weights,
        unit,
        "interchange",
        route=shifted,
        swap=(shifted[1], source, source_route[1]),
    )


def _dropped(example: Example, rate: float, low: int, high: int, rng: random.Random) -> Example:
    """``example`` with each droppable token replaced by a random ordinary token with
    probability ``rate``."""
    ids = list(example.ids)
    for i in example.droppable:
        if rng.random() < rate:
            ids[i] = rng.randrange(low, high)
    return replace(example, ids=ids)


def _bilingual(corpus: Corpus, unit: int, other: int, tokenizer: Any, max_len: int) -> Example:
    """The question-answer pair of ``unit`` followed by that of ``other`` in one context."""
    newline = _encode(tokenizer, "\n")
    p1, a1 = corpus.pieces[unit]
    p2, a2 = corpus.pieces[other]
    second = p2[1:]  # no second BOS
    ids = p1 + a1[:-1] + newline + second + a2
    weights = ([0.0] * len(p1) + [1.0] * (len(a1) - 1) + [0.0] * (len(newline) + len(second))) + [
        1.0
    ] * len(a2)
    return Example(ids[-max_len:], weights[-max_len:], unit, "bilingual")
