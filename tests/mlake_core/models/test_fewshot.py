"""Few-shot prompt templates: the draw (outside the evaluated facts, deterministic per seed,
short answers, shared across languages), the prompt text and where the form's text sits in
it, the subject located in the final question (never in a demonstration or the in-context
editing prefix), the record in ``to_dict`` and its round trip."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from mlake_core.editing.base import locate_prompt, make_request
from mlake_core.errors import ConfigError, DataError
from mlake_core.models.prompting import (
    FEWSHOT,
    QA,
    Demonstration,
    DemonstrationShortage,
    FewShotTemplate,
    PromptTemplate,
    demonstration_of,
    draw_demonstrations,
    get_template,
    template_from_dict,
)

# -- a duck-typed dataset: just what the draw reads ---------------------------------------------


def _form(kind: str, text: str | None, answer: str, usable: bool = True) -> Any:
    return SimpleNamespace(
        kind=kind,
        text=text,
        usable=usable,
        target=SimpleNamespace(text=answer),
    )


def _view(fact_id: int, lang: str, answer: str = "Paris", **over: Any) -> Any:
    question = over.get("question", f"Where is thing {fact_id} in {lang}?")
    cloze = over.get("cloze", f"Thing {fact_id} is in")
    return SimpleNamespace(
        fact_id=fact_id,
        lang=lang,
        question=_form("question", question, answer, over.get("q_usable", True)),
        cloze=_form("cloze", cloze, over.get("cloze_answer", answer), over.get("c_usable", True)),
    )


class FakeDataset:
    def __init__(self, views: dict[int, dict[str, Any]], langs: tuple[str, ...]) -> None:
        self.langs = langs
        self.facts = [SimpleNamespace(fact_id=f, views=v) for f, v in sorted(views.items())]
        self._by_id = {f.fact_id: f for f in self.facts}

    def fact(self, fact_id: int) -> Any:
        return self._by_id[fact_id]


def fake_dataset(n: int = 40, langs: tuple[str, ...] = ("en", "zh")) -> FakeDataset:
    return FakeDataset({f: {lang: _view(f, lang) for lang in langs} for f in range(n)}, langs)


def _ids(drawn: dict[str, tuple[Demonstration, ...]]) -> dict[str, list[int]]:
    return {lang: [d.fact_id for d in demos] for lang, demos in drawn.items()}


# -- the draw ------------------------------------------------------------------------------------


def test_demonstrations_exclude_the_evaluated_facts_and_repeat_for_a_seed() -> None:
    data = fake_dataset(40)
    evaluated = set(range(0, 40, 2)) | {1, 3, 5}
    drawn = draw_demonstrations(data, evaluated, k=4, seed=7)  # type: ignore[arg-type]
    assert set(drawn) == {"en", "zh"}
    for demos in drawn.values():
        assert len(demos) == 4
        assert not {d.fact_id for d in demos} & evaluated
    again = draw_demonstrations(data, evaluated, k=4, seed=7)  # type: ignore[arg-type]
    assert again == drawn
    other = draw_demonstrations(data, evaluated, k=4, seed=8)  # type: ignore[arg-type]
    assert _ids(other) != _ids(drawn)
    # The order of two facts does not depend on which other facts are excluded.
    fewer = draw_demonstrations(data, {1, 3, 5}, k=4, seed=7)  # type: ignore[arg-type]
    kept = [f for f in _ids(fewer)["en"] if f not in evaluated]
    assert kept == _ids(drawn)["en"][: len(kept)]


def test_languages_share_their_demonstration_facts_where_they_can() -> None:
    views = {f: {"en": _view(f, "en"), "zh": _view(f, "zh")} for f in range(20)}
    # Fact 0..9 have no usable cloze in zh: en must still prefer facts usable in both.
    for f in range(10):
        views[f]["zh"] = _view(f, "zh", c_usable=False)
    drawn = draw_demonstrations(FakeDataset(views, ("en", "zh")), (), k=3, seed=0)  # type: ignore[arg-type]
    assert _ids(drawn)["en"] == _ids(drawn)["zh"]
    assert all(f >= 10 for f in _ids(drawn)["en"])


def test_poor_demonstrations_are_never_drawn() -> None:
    views = {}
    for f in range(12):
        views[f] = {"en": _view(f, "en")}
    views[0]["en"] = _view(0, "en", answer="The Very Long Official Name Of A Place")
    views[1]["en"] = _view(1, "en", q_usable=False)
    views[2]["en"] = _view(2, "en", c_usable=False)
    views[3]["en"] = _view(3, "en", question="Why " * 40 + "?")
    views[4]["en"] = _view(4, "en", cloze="Le football provient de l'")
    views[5]["en"] = _view(5, "en", answer="Line\nbreak")
    data = FakeDataset(views, ("en",))
    for seed in range(5):
        drawn = draw_demonstrations(data, (), k=6, seed=seed)  # type: ignore[arg-type]
        assert set(_ids(drawn)["en"]) == set(range(6, 12))
    assert demonstration_of(_view(9, "zh", answer="很长很长很长很长的名字")) is None
    assert demonstration_of(_view(9, "zh", answer="巴黎")) is not None


def test_too_few_facts_outside_the_evaluated_ones_is_an_error_naming_the_language() -> None:
    views = {f: {"en": _view(f, "en"), "ja": _view(f, "ja", c_usable=f > 8)} for f in range(10)}
    data = FakeDataset(views, ("en", "ja"))
    with pytest.raises(DemonstrationShortage, match=r"ja \(1\)") as info:
        draw_demonstrations(data, range(7), k=2, seed=0)  # type: ignore[arg-type]
    assert info.value.langs == ("ja",)
    assert isinstance(info.value, ConfigError)
    with pytest.raises(ConfigError, match="loaded without"):
        draw_demonstrations(data, (), k=1, seed=0, langs=("fr",))  # type: ignore[arg-type]


# -- names, building, prompts --------------------------------------------------------------------


def test_template_names() -> None:
    assert get_template("fewshot") is FEWSHOT
    assert FEWSHOT.needs_build and (FEWSHOT.k, FEWSHOT.seed) == (3, 0)
    five = get_template("fewshot-5-seed2")
    assert isinstance(five, FewShotTemplate) and (five.k, five.seed) == (5, 2)
    assert five.question == QA.question and five.spec == "fewshot-5-seed2"
    assert (get_template("fewshot-1").k, get_template("fewshot-seed4").seed) == (1, 4)
    with pytest.raises(ConfigError, match="k must be"):
        get_template("fewshot-0")
    with pytest.raises(ConfigError, match="fewshot-K"):
        get_template("fewshot-x")
    assert not QA.needs_build and QA.for_run(None, ()) is QA  # type: ignore[arg-type]


def test_an_unbuilt_few_shot_template_makes_no_prompt() -> None:
    with pytest.raises(ConfigError, match="not drawn yet"):
        FEWSHOT.prompt("question", "Who?", "en")


def _built(**demos: list[Demonstration]) -> FewShotTemplate:
    return replace(FEWSHOT, k=len(next(iter(demos.values()))), demonstrations=tuple(demos.items()))


PARIS = Demonstration(1, "Capital of France?", "Paris", "The capital of France is", "Paris")
TOKYO = Demonstration(2, "日本的首都是哪里？", "东京", "日本的首都是", "东京")


def test_prompt_text_question_and_cloze() -> None:
    t = _built(en=[PARIS], zh=[TOKYO])
    assert t.prompt("question", " Capital of Italy? ", "en") == (
        "Q: Capital of France?\nA: Paris\n\nQ: Capital of Italy?\nA:",
        " ",
    )
    assert t.prompt("cloze", "The capital of Italy is ", "en") == (
        "The capital of France is Paris\n\nThe capital of Italy is",
        " ",
    )
    assert t.prompt("cloze", "意大利的首都是", "zh") == ("日本的首都是东京\n\n意大利的首都是", "")
    assert t.prompt("question", "意大利的首都是哪里？", "zh")[0].startswith(
        "Q: 日本的首都是哪里？\nA: 东京\n\n"
    )
    with pytest.raises(ConfigError, match="no demonstrations in ja"):
        t.prompt("question", "Who?", "ja")
    with pytest.raises(ConfigError, match="needs its language"):
        t.question_prompt("Who?")


def test_in_context_editing_prefix_goes_after_the_demonstrations() -> None:
    t = _built(en=[PARIS]).with_context("New fact: Rome is in Spain.\n")
    prompt, _ = t.prompt("question", "Where is Rome?", "en")
    assert prompt == (
        "Q: Capital of France?\nA: Paris\n\nNew fact: Rome is in Spain.\nQ: Where is Rome?\nA:"
    )
    assert isinstance(t, FewShotTemplate) and t.demonstrations


@pytest.mark.parametrize("kind", ["question", "cloze"])
@pytest.mark.parametrize("text", ["Where is Rome?", "  Where is Rome?  ", "\tRome is in"])
def test_place_says_where_the_text_starts(kind: str, text: str) -> None:
    for t in (QA, _built(en=[PARIS]), _built(en=[PARIS]).with_context("New fact: Rome.\n")):
        placed = t.place(kind, text, "en")
        body = text.strip()
        start = len(text) - len(text.lstrip())
        at = placed.text_offset + start
        assert placed.prompt[at : at + len(body)] == body
        assert placed.prompt.endswith(body + ("\nA:" if kind == "question" else ""))


# -- the record ----------------------------------------------------------------------------------


def test_to_dict_records_k_seed_and_demonstrations_and_round_trips() -> None:
    data = fake_dataset(30, ("en", "zh"))
    a = FewShotTemplate.build(data, exclude=range(10), k=2, seed=0, langs=("zh", "en"))  # type: ignore[arg-type]
    b = FewShotTemplate.build(data, exclude=range(10), k=2, seed=1, langs=("zh", "en"))  # type: ignore[arg-type]
    record = a.to_dict()
    assert record["name"] == "fewshot" and record["k"] == 2 and record["seed"] == 0
    assert list(record["demonstrations"]) == ["zh", "en"]
    ids = {lang: [d["fact_id"] for d in demos] for lang, demos in record["demonstrations"].items()}
    assert ids == {lang: [d.fact_id for d in demos] for lang, demos in a.demonstrations}
    assert all(f >= 10 for f in ids["en"] + ids["zh"])
    assert json.loads(json.dumps(record)) == record
    back = template_from_dict(json.loads(json.dumps(record)))
    assert back == a and back.prompt("question", "Who?", "en") == a.prompt("question", "Who?", "en")
    assert b.to_dict() != record
    assert a.demonstration_facts() == frozenset(ids["en"] + ids["zh"])
    # Plain templates keep their record (and result keys) as before.
    assert template_from_dict(QA.to_dict()) == QA
    assert "demonstrations" not in QA.to_dict() and QA.demonstration_facts() == frozenset()


def test_with_context_keeps_the_demonstrations_in_the_record() -> None:
    t = _built(en=[PARIS])
    assert t.with_context("x\n").to_dict()["demonstrations"] == t.to_dict()["demonstrations"]


# -- the subject is located in the final question ------------------------------------------------


@pytest.fixture(scope="module")
def carl(mlake_v2411) -> Any:
    view = mlake_v2411.fact(0).views["en"]
    assert view.question.subject.text == "Carl Sagan"
    return view


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tlens", "nnsight"])
def test_subject_is_located_in_the_final_question_not_in_a_demonstration(
    get_adapter: Callable[[str, str], Any], carl: Any, backend: str
) -> None:
    # A rotary model: the few-shot prompt is longer than the tiny GPT-2's 64 learned
    # positions, which locating now refuses (a prompt the model could not run).
    adapter = get_adapter("llama", backend)
    question, cloze = carl.question.text, carl.cloze.text
    # Demonstrations holding the same subject and even the very same question and cloze.
    same = Demonstration(901, question, "Cornell", cloze, "Cornell")
    other = Demonstration(
        902, "Who advised Carl Sagan?", "Kuiper", "Carl Sagan was advised by", "Kuiper"
    )
    t = _built(en=[same, other]).with_context("New fact: Carl Sagan worked at BBC.\n")
    for form in ("question", "cloze"):
        plain = locate_prompt(adapter, carl, QA, form)
        loc = locate_prompt(adapter, carl, t, form)
        assert loc.prompt.count("Carl Sagan") == 4  # 2 demonstrations, the new fact, the prompt
        last = loc.prompt.rfind("Carl Sagan")
        assert loc.prompt.find(question if form == "question" else cloze) < last
        enc = adapter.tokenizer(loc.prompt, add_special_tokens=False, return_offsets_mapping=True)
        shift = len(loc.prompt_ids) - len(enc["input_ids"])
        spans = [enc["offset_mapping"][i - shift] for i in loc.subject_positions]
        assert all(a < last + len("Carl Sagan") and b > last for a, b in spans)
        assert len(loc.subject_positions) == len(plain.subject_positions)
        assert (
            loc.prompt_ids[loc.subject_positions[-1]]
            == plain.prompt_ids[plain.subject_positions[-1]]
        )
        request = make_request(adapter, carl, t, form)
        assert request.subject_last == loc.subject_positions[-1]
        assert request.prompt == loc.prompt


@pytest.mark.slow
def test_a_template_that_moves_the_text_is_refused(carl: Any) -> None:
    class Shuffled(PromptTemplate):
        def place(self, kind: str, text: str, lang: str | None):  # type: ignore[no-untyped-def]
            placed = super().place(kind, text, lang)
            return replace(placed, text_offset=placed.text_offset + 1)

    with pytest.raises(DataError, match="does not keep the subject"):
        locate_prompt(None, carl, Shuffled(name="s", question="Q: {question}\nA:"))  # type: ignore[arg-type]
