"""Edit evaluation builds every prompt with the run's template, a few-shot one included
(multi-hop portability questions too), and mlake-tiny refuses templates it cannot train on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import analysis.transfer as transfer
from mlake_core.errors import ConfigError
from mlake_core.models.mlake_tiny import TinyTrainConfig
from mlake_core.models.prompting import FewShotTemplate, get_template


def test_portability_prompts_carry_the_demonstrations(mlake_v2411, monkeypatch) -> None:
    template = FewShotTemplate.build(mlake_v2411, exclude=[0, 1, 2], k=2, langs=["en", "zh"])
    seen: list[list[int]] = []

    def fake_generate(adapter, prompts, **kwargs):
        seen.extend(prompts)
        return [[] for _ in prompts]

    monkeypatch.setattr(transfer, "greedy_generate", fake_generate)
    checked: list[tuple[int, str]] = []
    adapter = SimpleNamespace(
        encode=lambda text: list(text.encode()),
        tokenizer=SimpleNamespace(decode=lambda *a, **k: ""),
        check_fits=lambda n, where: checked.append((n, where)),
    )
    questions = [
        SimpleNamespace(kind="new", lang=lang, index=0, question=q, answer="x", aliases=())
        for lang, q in (("en", "Who is it?"), ("zh", "是谁？"))
    ]
    config = SimpleNamespace(max_new_tokens=4, stop_when_decided=False)
    out = transfer._portability(adapter, questions, ["en", "zh"], template, config, 8)
    assert out == {"en": (0, 1), "zh": (0, 1)}
    # Each question is checked to fit the model (prompt and generation), naming it.
    assert [w for _, w in checked] == [
        "multi-hop new question 0 [en]",
        "multi-hop new question 0 [zh]",
    ]
    assert all(n == len(ids) + 3 for (n, _), ids in zip(checked, seen, strict=True))
    for (lang, question), ids in zip((("en", "Who is it?"), ("zh", "是谁？")), seen, strict=True):
        assert bytes(ids).decode() == template.question_prompt(question, lang)[0]
        assert bytes(ids).decode().count("Q: ") == 3  # two demonstrations, then the question


def test_mlake_tiny_refuses_a_template_built_per_run() -> None:
    with pytest.raises(ConfigError, match="mlake-tiny trains on single prompts"):
        TinyTrainConfig(template="fewshot")
    assert TinyTrainConfig(template="bare").template == "bare"
    assert get_template("fewshot-5-seed1").needs_build
