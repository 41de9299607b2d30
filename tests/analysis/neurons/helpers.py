"""Helpers shared by the neuron tests."""

from __future__ import annotations

from analysis.neurons.attribution import AttributionPrompt
from mlake_core.editing.base import locate_prompt
from mlake_core.models.prompting import get_template

QA = get_template("qa")


def attribution_prompt(adapter, view, form: str = "question") -> AttributionPrompt:
    """A fact view's prompt, built by hand (the stage's recipe: the answer encoded separately,
    after the template's answer prefix, joined by ids)."""
    loc = locate_prompt(adapter, view, QA, form)
    answer = adapter.tokenizer(
        loc.answer_prefix + view.form(form).target.text.strip(), add_special_tokens=False
    )["input_ids"]
    return AttributionPrompt(loc.where, loc.prompt_ids, loc.subject_positions, tuple(answer))
