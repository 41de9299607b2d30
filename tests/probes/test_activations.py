"""Probe activations: batched equals one prompt at a time (left padding, every tiny
architecture, both backends), the right tokens are read, values equal the plain Hugging Face
hidden states, unusable views are counted; language identity on the micro mlake-tiny."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from mlake_core.models import load_adapter
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template
from mlake_core.models.tiny import TINY_ARCHITECTURES
from probes.activations import (
    Activations,
    ProbePrompt,
    collect_activations,
    probe_sites,
    question_prompts,
)
from probes.config import ProbeConfig
from probes.language_id import language_id_table

# The tiny checkpoints of every architecture (shared with the model tests).
from tests.mlake_core.models.conftest import TEXTS, get_adapter, get_hf, tiny_models  # noqa: F401

pytestmark = pytest.mark.slow

QA = get_template("qa")
LANGS = ("en", "zh", "ja", "fr", "de")


@pytest.fixture(scope="module")
def micro(micro_tiny: Path, mlake_v2411):
    """Question prompts of 40 facts in five languages (the micro mlake-tiny's 6 training facts
    first) and their activations."""
    adapter = load_adapter(str(micro_tiny), "tlens", device="cpu")
    trained = read_metadata(micro_tiny)["fact_ids"]
    ids = [*trained, *(f for f in range(40) if f not in trained)][:40]
    views = [mlake_v2411.fact(f).views[lang] for lang in LANGS for f in ids]
    prompts, skipped = question_prompts(adapter, views, QA)
    acts = collect_activations(adapter, prompts, batch_size=7)
    return adapter, prompts, skipped, acts


def _text_prompts(adapter) -> list[ProbePrompt]:
    """Prompts of different lengths; the 'subject' is the second token."""
    return [
        ProbePrompt(fact_id=i, lang="en", prompt_ids=tuple(adapter.encode(t)), subject_position=1)
        for i, t in enumerate(TEXTS * 2)
    ]


@pytest.mark.parametrize("backend", ["tlens", "nnsight"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_batched_equals_one_at_a_time(get_adapter, arch, backend):  # noqa: F811
    adapter = get_adapter(arch, backend)
    prompts = _text_prompts(adapter)
    assert len({len(p.prompt_ids) for p in prompts}) > 2  # real padding
    batched = collect_activations(adapter, prompts, batch_size=5)
    single = collect_activations(adapter, prompts, batch_size=1)
    assert batched.sites == probe_sites(adapter.n_layers)
    for position in ("subject", "last"):
        assert np.array_equal(batched.tokens[position], single.tokens[position])
        np.testing.assert_allclose(
            batched.values[position], single.values[position], atol=2e-5, rtol=1e-4
        )
    assert list(batched.tokens["last"]) == [p.prompt_ids[-1] for p in prompts]
    assert list(batched.tokens["subject"]) == [p.prompt_ids[1] for p in prompts]


def test_values_equal_hugging_face_hidden_states(micro, micro_tiny):
    """``resid_pre.0`` is HF's ``hidden_states[0]`` and ``resid_post.{L}`` its
    ``hidden_states[L + 1]`` (the last one only before the final norm, so it is left out)."""
    from transformers import AutoModelForCausalLM

    adapter, prompts, _, acts = micro
    hf = AutoModelForCausalLM.from_pretrained(str(micro_tiny)).eval()
    for row in (0, 7, len(prompts) - 1):
        p = prompts[row]
        with torch.no_grad():
            out = hf(torch.tensor([p.prompt_ids]), output_hidden_states=True)
        for layer in range(adapter.n_layers):  # hidden_states[n_layers] is normed
            hidden = out.hidden_states[layer][0].numpy()
            for position, index in (("subject", p.subject_position), ("last", -1)):
                np.testing.assert_allclose(
                    acts.values[position][layer, row], hidden[index], atol=1e-4, rtol=1e-4
                )


def test_rows_follow_the_prompts_and_round_trip(micro):
    _, prompts, skipped, acts = micro
    assert skipped == {}
    assert len(acts) == len(prompts) == 5 * 40
    assert list(acts.fact_ids) == [p.fact_id for p in prompts]
    assert list(acts.langs) == [p.lang for p in prompts]
    assert list(acts.tokens["subject"]) == [p.prompt_ids[p.subject_position] for p in prompts]
    back = Activations.from_arrays(acts.to_arrays())
    assert back.sites == acts.sites and back.positions == acts.positions
    for position in acts.positions:
        assert np.array_equal(back.values[position], acts.values[position])
    by_lang = acts.by_lang("last", 1)
    assert list(by_lang) == list(LANGS)
    ids, X = by_lang["zh"]
    assert list(ids) == sorted(ids) and X.shape == (40, acts.values["last"].shape[-1])


def test_unusable_views_are_counted(micro, mlake_v2411, micro_tiny):
    adapter = micro[0]
    fact = mlake_v2411.fact(read_metadata(micro_tiny)["fact_ids"][0])
    view = fact.views["ja"]
    broken = dataclasses.replace(
        view, question=dataclasses.replace(view.question, usable=False, reason="planted")
    )
    prompts, skipped = question_prompts(adapter, [fact.views["en"], broken, broken], QA)
    assert [p.lang for p in prompts] == ["en"]
    assert skipped == {"not usable (planted)": 2}


def test_language_id_on_the_micro_model(micro):
    """At the embeddings the last token of every prompt is the same ``:`` (rotary model: no
    position in the stream), so the probe is exactly at chance; deeper, the context tells the
    language."""
    adapter, _, _, acts = micro
    last = acts.values["last"][0]
    assert np.allclose(last, last[0])
    config = ProbeConfig(folds=3, inner_folds=2, cs=(0.01, 1.0))
    table = language_id_table(acts, config)
    row = table[(table["position"] == "last") & (table["layer"] == 0)].iloc[0]
    assert row["accuracy"] == pytest.approx(0.2)
    assert row["chance"] == pytest.approx(0.2)
    assert row["n"] == 200
    deep = table[(table["position"] == "last") & (table["layer"] == adapter.n_layers)].iloc[0]
    assert deep["accuracy"] > 0.6
    assert deep["selectivity"] > 0.3
