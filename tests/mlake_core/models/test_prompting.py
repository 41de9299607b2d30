"""Prompt templates: question and cloze prompts, answer prefixes, stop strings, registry."""

from __future__ import annotations

import json

import pytest

from mlake_core.errors import ConfigError
from mlake_core.models import prompting
from mlake_core.models.prompting import (
    DEFAULT_TEMPLATE,
    PromptTemplate,
    get_template,
    register_template,
)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, PromptTemplate]:
    """A private copy of the template registry (tests must not leak registrations)."""
    copy = dict(prompting.TEMPLATES)
    monkeypatch.setattr(prompting, "TEMPLATES", copy)
    return copy


def test_qa_template_frames_the_question() -> None:
    qa = get_template("qa")
    assert DEFAULT_TEMPLATE == "qa"
    assert qa.question_prompt("What is the capital of France?") == (
        "Q: What is the capital of France?\nA:",
        " ",
    )


def test_question_prompt_strips_the_question() -> None:
    qa = get_template("qa")
    assert qa.question_prompt("  法国的首都是哪里？ \n") == ("Q: 法国的首都是哪里？\nA:", " ")


def test_question_with_braces_is_inserted_literally() -> None:
    qa = get_template("qa")
    assert qa.question_prompt("What is {x} in {0}?")[0] == "Q: What is {x} in {0}?\nA:"


def test_bare_template() -> None:
    assert get_template("bare").question_prompt(" Who? ") == ("Who?", " ")


@pytest.mark.parametrize(
    ("lang", "prefix", "prompt", "answer_prefix"),
    [
        ("en", "The capital of France is ", "The capital of France is", " "),
        ("fr", "La capitale de la France est\t", "La capitale de la France est", " "),
        ("de", "Die Hauptstadt von Frankreich ist", "Die Hauptstadt von Frankreich ist", " "),
        ("zh", "法国的首都是 ", "法国的首都是", ""),
        ("ja", "フランスの首都は\n", "フランスの首都は", ""),
    ],
)
def test_cloze_prompt_moves_whitespace_to_the_answer(
    lang: str, prefix: str, prompt: str, answer_prefix: str
) -> None:
    qa = get_template("qa")
    assert qa.cloze_prompt(prefix, lang) == (prompt, answer_prefix)


def test_cloze_prompt_keeps_leading_text() -> None:
    assert get_template("qa").cloze_prompt("  x y  ", "en") == ("  x y", " ")


def test_prompt_dispatches_on_kind() -> None:
    qa = get_template("qa")
    assert qa.prompt("question", "Where?", "zh") == ("Q: Where?\nA:", " ")
    assert qa.prompt("cloze", "巴黎是 ", "zh") == ("巴黎是", "")
    assert qa.prompt("cloze", "Paris is ", "en") == ("Paris is", " ")


def test_prompt_unknown_kind_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="'mcqa'"):
        get_template("qa").prompt("mcqa", "x", "en")


@pytest.mark.parametrize(
    ("stop", "generated", "expected"),
    [
        (("\n",), "Paris\nQ: next question", "Paris"),
        (("\n",), "Paris", "Paris"),
        (("\n",), "\nParis", ""),
        (("\n",), "", ""),
        ((".", "\n"), "Paris\nis big.", "Paris"),
        (("\n", "。"), "巴黎。它是首都\n", "巴黎"),
        (("Q:",), "Paris Q: x\nQ: y", "Paris "),
    ],
)
def test_cut_at_first_stop_string(stop: tuple[str, ...], generated: str, expected: str) -> None:
    template = PromptTemplate(name="t", question="{question}", stop=stop)
    assert template.cut(generated) == expected


def test_default_stop_is_newline() -> None:
    assert get_template("qa").stop == ("\n",)
    assert get_template("qa").cut("Berlin\nQ:") == "Berlin"


@pytest.mark.parametrize("question", ["Q: {q}\nA:", "no field", "{question} {question}", ""])
def test_template_needs_exactly_one_question_field(question: str) -> None:
    with pytest.raises(ConfigError, match=r"\{question\}"):
        PromptTemplate(name="broken", question=question)


def test_register_template_adds_and_refuses_duplicates(registry: dict) -> None:
    new = PromptTemplate(name="test_only_frame", question="Question: {question}\nAnswer:")
    assert register_template(new) is new
    assert get_template("test_only_frame") is new
    assert registry["test_only_frame"] is new
    with pytest.raises(ValueError, match="test_only_frame"):
        register_template(PromptTemplate(name="test_only_frame", question="{question}?"))
    assert get_template("test_only_frame") is new  # the first one stays
    with pytest.raises(ValueError, match="already registered"):
        register_template(PromptTemplate(name="qa", question="{question}"))
    assert get_template("qa").question == "Q: {question}\nA:"


def test_get_template_unknown_lists_known_names() -> None:
    with pytest.raises(ConfigError) as info:
        get_template("nope")
    message = str(info.value)
    assert "'nope'" in message
    assert "--template" in message
    for name in prompting.TEMPLATES:
        assert name in message
    assert "qa" in message and "bare" in message


def test_to_dict_is_json_serialisable() -> None:
    template = PromptTemplate(
        name="t", question="> {question}", answer_prefix="", stop=("\n", "。")
    )
    data = template.to_dict()
    assert data == {
        "name": "t",
        "question": "> {question}",
        "answer_prefix": "",
        "stop": ["\n", "。"],
        "context": "",
    }
    assert json.loads(json.dumps(data)) == data
    assert PromptTemplate(**{**data, "stop": tuple(data["stop"])}) == template


def test_qa_to_dict() -> None:
    assert get_template("qa").to_dict() == {
        "name": "qa",
        "question": "Q: {question}\nA:",
        "answer_prefix": " ",
        "stop": ["\n"],
        "context": "",
    }


def test_context_goes_before_every_prompt() -> None:
    qa = get_template("qa").with_context("New fact: X.\n")
    assert qa.question_prompt("Who?") == ("New fact: X.\nQ: Who?\nA:", " ")
    assert qa.cloze_prompt("巴黎是 ", "zh") == ("New fact: X.\n巴黎是", "")
    assert get_template("qa").context == ""
