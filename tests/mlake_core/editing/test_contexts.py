"""ROME's key ``k*`` averaged over context templates (:mod:`mlake_core.editing.contexts`): the
fact's own text, without the run's demonstrations, alone and behind prefixes the model wrote;
drawn once per run, reproducibly; the update still maps the edit prompt's key exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlake_core.editing import EditContext, get_method, make_request
from mlake_core.editing.base import subject_tokens
from mlake_core.editing.contexts import (
    START_WORDS,
    ContextPrefixes,
    context_keys,
    context_texts,
    parse_contexts,
    prefixes_for,
    sample_prefix_ids,
    sample_prefixes,
)
from mlake_core.editing.covariance import key_second_moment, mlake_corpus, ridge_inverse_apply
from mlake_core.editing.rome import RomeConfig
from mlake_core.errors import ConfigError
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template

pytestmark = pytest.mark.slow
LAYER = 0


@pytest.fixture(scope="module")
def requests(adapter, micro_tiny: Path, mlake_v2411):
    meta = read_metadata(micro_tiny)
    assert meta is not None
    ids = meta["fact_ids"]
    template = get_template("fewshot-1-seed0").for_run(mlake_v2411, ids[:4], ["en"])
    return [make_request(adapter, mlake_v2411.fact(f).views["en"], template) for f in ids[:3]]


@pytest.fixture(scope="module")
def second_moment(adapter, mlake_v2411):
    docs = mlake_corpus(mlake_v2411)[:400]
    moment = key_second_moment(adapter, LAYER, docs, n_tokens=4000)[0]
    return lambda layer: moment


def test_parse_contexts() -> None:
    assert parse_contexts("5x10,10x10", "rome.contexts") == ((5, 10), (10, 10))
    assert parse_contexts(" 10x5 ", "memit.contexts") == ((10, 5),)
    assert parse_contexts("none", "rome.contexts") == () == parse_contexts("", "x")
    for bad in ("5,10", "5x", "ax3", "0x10", "5x0"):
        with pytest.raises(ConfigError, match=r"rome\.contexts"):
            parse_contexts(bad, "rome.contexts")
    with pytest.raises(ConfigError, match=r"rome\.contexts"):
        RomeConfig(contexts="ten")


def test_requests_carry_their_own_text_without_demonstrations(requests) -> None:
    for r in requests:
        start, end = r.text_subject
        assert r.text and r.text[start:end] == r.subject
        assert r.text in r.prompt and len(r.prompt) > len(r.text)  # demonstrations before it


def test_prefixes_are_written_by_the_model_reproducibly(adapter) -> None:
    lengths = ((3, 4), (5, 2))
    one = sample_prefixes(adapter, lengths, torch.Generator().manual_seed(0))
    again = sample_prefixes(adapter, lengths, torch.Generator().manual_seed(0))
    other = sample_prefixes(adapter, lengths, torch.Generator().manual_seed(1))
    assert one == again and one != other
    assert len(one) == 6
    for i, text in enumerate(one):
        start = START_WORDS[(i if i < 4 else i - 4) % len(START_WORDS)]
        assert text.startswith(start) and len(text) > len(start)
        assert "\n" not in text
    # Each: the start word, then length - 1 sampled tokens.
    ids = sample_prefix_ids(adapter, lengths, torch.Generator().manual_seed(0))
    for i, seq in enumerate(ids):
        start = adapter.encode(START_WORDS[(i if i < 4 else i - 4) % len(START_WORDS)])
        assert seq[: len(start)] == start
        assert len(seq) - len(start) == (3 if i < 4 else 5) - 1
    drawn = ContextPrefixes(adapter, seed=0)
    assert drawn(lengths) == one and drawn(list(lengths)) is drawn(lengths)  # drawn once
    assert prefixes_for(adapter, (), EditContext(torch.Generator())) is None
    assert prefixes_for(adapter, lengths, EditContext(torch.Generator())) == one
    run_level = EditContext(torch.Generator(), context_prefixes=lambda lengths: ("A b",))
    assert prefixes_for(adapter, lengths, run_level) == ("A b",)


def test_context_texts_keep_the_subject_span(requests) -> None:
    r = requests[0]
    texts = context_texts(r, ("The 19th Annual", "You may"))
    assert [t for t, _, _ in texts] == [r.text, f"The 19th Annual. {r.text}", f"You may. {r.text}"]
    for text, start, end in texts:
        assert text[start:end] == r.subject
    bare = type(r)(**{**r.__dict__, "text": ""})
    with pytest.raises(ConfigError, match=rf"fact {r.fact_id} \[en\].*contexts: none"):
        context_texts(bare, ())


def test_context_keys_average_the_subject_key_over_the_texts(adapter, requests) -> None:
    site = f"mlp_post.{LAYER}"
    prefixes = ("The 19th Annual", "You may")
    got = context_keys(adapter, requests[:2], LAYER, prefixes)
    for row, r in enumerate(requests[:2]):
        manual = []
        for text, start, end in context_texts(r, prefixes):
            ids = adapter.encode(text)
            pos = subject_tokens(adapter, text, start, end, where="test")[-1]
            _, cache = adapter.run_with_cache(adapter.batch([ids]), [site])
            manual.append(cache[site][0, pos].double())
        torch.testing.assert_close(got[row], torch.stack(manual).mean(0), atol=1e-5, rtol=1e-5)
    # Without prefixes: the key in the edit prompt itself (its demonstrations included).
    here = context_keys(adapter, requests[:1], LAYER, None)[0]
    _, cache = adapter.run_with_cache(adapter.batch([list(requests[0].prompt_ids)]), [site])
    torch.testing.assert_close(here, cache[site][0, requests[0].subject_last].double())
    assert not torch.allclose(here, got[0])


def test_rome_update_is_along_the_averaged_key_and_exact_on_the_edit_prompt(
    adapter, requests, second_moment
) -> None:
    """``ΔW ∝ δ uᵀ`` with ``u = (C + λI)⁻¹ k*`` for the averaged ``k*``, scaled so the edit
    prompt's own key gets exactly ``δ``; ``contexts: none`` uses the edit prompt's key for
    both (the earlier behaviour)."""
    entry = get_method("rome")
    r = requests[0]
    prefixes = ("The 19th Annual", "You may", "Because I")
    context = EditContext(
        torch.Generator().manual_seed(0), second_moment, context_prefixes=lambda _: prefixes
    )
    here = context_keys(adapter, [r], LAYER, None)[0]
    averaged = context_keys(adapter, [r], LAYER, prefixes)[0]
    results = {}
    for contexts, k_star in (("2x2", averaged), ("none", here)):
        config = RomeConfig(layer=LAYER, steps=3, contexts=contexts)
        result = entry.fn(adapter, [r], config, context)
        (update,) = result.deltas.values()
        update = update.double()
        u = ridge_inverse_apply(second_moment(LAYER), k_star, config.ridge)
        # rank one, along u
        assert torch.linalg.matrix_rank(update, rtol=1e-6) == 1
        residual = update - torch.outer(update @ u, u) / float(u @ u)
        assert float(residual.norm()) < 1e-4 * float(update.norm())
        results[contexts] = (update, result)
    (with_ctx, res_ctx), (without, res_none) = results["2x2"], results["none"]
    assert res_ctx.info["contexts"] == 1 + len(prefixes) and res_none.info["contexts"] == 1
    # The edit prompt's key gets the same change either way: δ (the same optimisation).
    torch.testing.assert_close(with_ctx @ here, without @ here, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(with_ctx, without, atol=1e-6)


def test_grouped_keys_average_the_group_means(adapter, requests) -> None:
    """MEMIT's reference averages the key of the text alone with the mean of each prefix
    group's keys (``groups``), not all texts equally."""
    r = requests[0]
    prefixes = ("The 19th Annual", "You may", "Because I")
    alone = context_keys(adapter, [r], LAYER, ())[0]
    per_prefix = [context_keys(adapter, [r], LAYER, (p,))[0] * 2 - alone for p in prefixes]
    flat = context_keys(adapter, [r], LAYER, prefixes)[0]
    torch.testing.assert_close(flat, (alone + sum(per_prefix)) / 4)
    grouped = context_keys(adapter, [r], LAYER, prefixes, groups=[1, 2])[0]
    expected = (alone + per_prefix[0] + (per_prefix[1] + per_prefix[2]) / 2) / 3
    torch.testing.assert_close(grouped, expected)
    with pytest.raises(ValueError, match="3 prefixes"):
        context_keys(adapter, [r], LAYER, prefixes, groups=[2])


def test_memit_solves_with_the_averaged_keys(adapter, requests, second_moment) -> None:
    """MEMIT's update at a single layer is ``R Kᵀ (λC + K Kᵀ)⁻¹`` with ``K`` the averaged keys
    (5 prefixes of 10 tokens by default); ``contexts: none`` solves with the edit prompt's."""
    from mlake_core.editing.memit import MemitConfig

    entry = get_method("memit")
    prefixes = ("The 19th Annual", "You may", "Because I", "I am", "Therefore")
    context = EditContext(
        torch.Generator().manual_seed(0), second_moment, context_prefixes=lambda _: prefixes
    )
    assert MemitConfig().contexts == "10x5"
    reqs = requests[:2]
    updates = {}
    for contexts in ("10x5", "none"):
        config = MemitConfig(layers=str(LAYER), steps=3, contexts=contexts)
        result = entry.fn(adapter, reqs, config, context)
        assert result.info["contexts"] == (6 if contexts != "none" else 1)
        (update,) = result.deltas.values()
        updates[contexts] = update.double()
    for contexts, keys in (
        ("10x5", context_keys(adapter, reqs, LAYER, prefixes, groups=[5])),
        ("none", context_keys(adapter, reqs, LAYER, None)),
    ):
        # The update's row space is spanned by (λC + K Kᵀ)⁻¹ K: zero on what is C-orthogonal
        # to the keys.
        lam = MemitConfig().mom2_weight * keys.shape[1]
        system = lam * second_moment(LAYER).double() + keys.T @ keys
        basis = torch.linalg.solve(system, keys.T)  # [d_mlp, n]
        q, _ = torch.linalg.qr(basis)
        update = updates[contexts]
        residual = update - (update @ q) @ q.T
        assert float(residual.norm()) < 1e-4 * float(update.norm())
    assert not torch.allclose(updates["10x5"], updates["none"], atol=1e-6)
