"""Prompt templates: how a fact's prompt and its answer are put in front of a model.

A template is part of a model's configuration (base models answer a bare question poorly, a
``Q:``/``A:`` frame helps; mlake-tiny is trained with one frame and must be asked in it), so it
is chosen per model, recorded with every result, and applied the same way by every analysis.

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from mlake_core.errors import ConfigError
from mlake_core.languages import UNSPACED


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

    def question_prompt(self, question: str) -> tuple[str, str]:
        """``(prompt, answer prefix)`` for a question-form prompt."""
        text = self.question.replace("{question}", question.strip())
        return self.context + text, self.answer_prefix

    def cloze_prompt(self, prefix: str, lang: str) -> tuple[str, str]:
        """``(prompt, answer prefix)`` for a cloze prefix in ``lang``.

        The prefix's trailing whitespace is removed; the answer gets a leading space in
        spaced languages and none in zh and ja.
        """
        stripped = prefix.rstrip()
        return self.context + stripped, ("" if lang in UNSPACED else " ")

    def prompt(self, kind: str, text: str, lang: str) -> tuple[str, str]:
        """``(prompt, answer prefix)`` for a prompt form of ``kind`` (``question``/``cloze``)."""
        if kind == "question":
            return self.question_prompt(text)
        if kind == "cloze":
            return self.cloze_prompt(text, lang)
        raise ValueError(f"unknown prompt form {kind!r}")

    def cut(self, generated: str) -> str:
        """Generated text up to the first stop string."""
        end = len(generated)
        for stop in self.stop:
            at = generated.find(stop)
            if at != -1:
                end = min(end, at)
        return generated[:end]

    def with_context(self, context: str) -> PromptTemplate:
        """The same template with ``context`` before every prompt."""
        return replace(self, context=context)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (recorded in ``meta.json``)."""
        out = asdict(self)
        out["stop"] = list(self.stop)
        return out


#: Named templates (``--template``).  ``qa`` is the default for every model.
TEMPLATES: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate) -> PromptTemplate:
    """Add a template to :data:`TEMPLATES`; a duplicate name is an error."""
    if template.name in TEMPLATES:
        raise ValueError(f"prompt template {template.name!r} is already registered")
    TEMPLATES[template.name] = template
    return template


QA = register_template(PromptTemplate(name="qa", question="Q: {question}\nA:"))
BARE = register_template(PromptTemplate(name="bare", question="{question}"))

DEFAULT_TEMPLATE = "qa"


def get_template(name: str) -> PromptTemplate:
    """Look up a template by name.

    Raises:
        ConfigError: for an unknown name (the message lists the known ones).
    """
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(
            f"--template {name!r} is not known; choose one of {', '.join(TEMPLATES)}"
        ) from None
