"""Where ROME's and MEMIT's ``δ`` optimisation starts and how it retries (``init``,
``restarts``; :func:`~mlake_core.editing.delta.optimise_output_delta`), and the run's
subject statistics it starts from (``_subject_mean``, wired into ``transfer_stage``).

Everything runs on the micro mlake-tiny (2 layers, so the edit layer is 0); the values the
optimisation starts from and the losses it reports are checked against activations and NLLs
read independently through the adapter.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from mlake_core.editing import EditContext, get_method, make_request
from mlake_core.editing.base import EditRequest
from mlake_core.editing.covariance import key_second_moment, mlake_corpus
from mlake_core.editing.delta import (
    DELTA_INITS,
    RESTART_NLL,
    check_init,
    nll,
    optimise_output_delta,
    subject_means,
    teacher_forced,
)
from mlake_core.editing.memit import MemitConfig
from mlake_core.editing.rome import RomeConfig
from mlake_core.errors import ConfigError, DataError, MlakeError
from mlake_core.models.adapter import Patch
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template
from mlake_core.results.store import open_run

pytestmark = pytest.mark.slow
QA = get_template("qa")
LAYER = 0
SITE = f"mlp_out.{LAYER}"
# No optimisation step: the first pass measures the start and stops (loss < inf).
MEASURE_ONLY = {
    "steps": 5,
    "lr": 0.5,
    "weight_decay": 1e-3,
    "stop_loss": 1e9,
}  # measure only: stop at the first measurement
# One tiny step per attempt: the new answer's NLL stays far above RESTART_NLL.
STUCK = {"steps": 1, "lr": 1e-6, "clamp_norm": 4.0, "weight_decay": 1e-3, "stop_loss": 0.05}


@pytest.fixture(scope="module")
def fact_ids(micro_tiny: Path) -> list[int]:
    meta = read_metadata(micro_tiny)
    assert meta is not None
    return list(meta["fact_ids"])


@pytest.fixture(scope="module")
def requests_(adapter, fact_ids, mlake_v2411) -> list[EditRequest]:
    return [make_request(adapter, mlake_v2411.fact(i).views["en"], QA) for i in fact_ids[:3]]


@pytest.fixture(scope="module")
def second_moment(adapter, mlake_v2411):
    docs = mlake_corpus(mlake_v2411)[:200]
    moments: dict[int, torch.Tensor] = {}

    def get(layer: int) -> torch.Tensor:
        if layer not in moments:
            moments[layer] = key_second_moment(adapter, layer, docs, n_tokens=2000)[0]
        return moments[layer]

    return get


def _at_subject(adapter, requests, site: str) -> torch.Tensor:
    """``site`` at each request's subject-last token, from a batch of the prompts alone (not
    the teacher-forced batch the optimisation reads; causal, so the values agree)."""
    batch = adapter.batch([list(r.prompt_ids) for r in requests], padding_side="right")
    _, cache = adapter.run_with_cache(batch, [site])
    rows = torch.arange(len(requests))
    return cache[site][rows, torch.tensor([r.subject_last for r in requests])].float()


def _nll_with(adapter, requests, delta: torch.Tensor) -> float:
    """The new answers' mean NLL with ``mlp_out.LAYER`` at the subject moved by ``delta``."""
    batch, targets = teacher_forced(adapter, requests)
    rows = torch.arange(len(requests))
    positions = torch.tensor([r.subject_last for r in requests])
    base = _at_subject(adapter, requests, SITE)
    logits = adapter.run_with_patches(batch, [Patch(SITE, rows, positions, base + delta)])
    return float(nll(logits, targets))


def _optimise(adapter, requests, **kwargs):
    return optimise_output_delta(adapter, requests, SITE, **kwargs)


# -- optimise_output_delta: start_from ---------------------------------------------------------


def test_start_from_sets_the_residual_there(adapter, requests_) -> None:
    """``δ_0 = start_from - h``: with no optimisation step, the returned ``δ`` is that, and
    the returned base is the MLP output at the subject."""
    h = _at_subject(adapter, requests_, f"resid_post.{LAYER}")
    base = _at_subject(adapter, requests_, SITE)
    start = h.flip(0) + 0.1  # other rows' states: far from each row's own
    delta, got_base, loss, steps = _optimise(
        adapter, requests_, clamp_norm=1e6, start_from=start, **MEASURE_ONLY
    )
    assert steps == 0
    assert torch.allclose(got_base, base, atol=1e-5)
    assert float((start - h).norm(dim=-1).min()) > 0.1  # a real move
    assert torch.allclose(delta, start - h, atol=1e-4)
    assert loss == pytest.approx(_nll_with(adapter, requests_, delta), rel=1e-4)
    # Without start_from, δ starts at zero.
    zero, _, loss0, _ = _optimise(adapter, requests_, clamp_norm=1e6, **MEASURE_ONLY)
    assert torch.count_nonzero(zero) == 0
    assert loss0 == pytest.approx(_nll_with(adapter, requests_, zero), rel=1e-4)
    assert loss0 != pytest.approx(loss, rel=1e-3)


def test_start_from_is_clamped(adapter, requests_) -> None:
    """The start is clamped like every step: ``||δ_0|| = clamp_norm * ||base||`` per row,
    in the direction of ``start_from - h``."""
    h = _at_subject(adapter, requests_, f"resid_post.{LAYER}")
    base = _at_subject(adapter, requests_, SITE)
    start = h.flip(0) + 0.1
    clamp = 0.01
    delta, _, loss, _ = _optimise(
        adapter, requests_, clamp_norm=clamp, start_from=start, **MEASURE_ONLY
    )
    limit = clamp * base.norm(dim=-1)
    assert bool(((start - h).norm(dim=-1) > limit).all())  # the clamp applies
    assert torch.allclose(delta.norm(dim=-1), limit, rtol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(delta, start - h, dim=-1)
    assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-5)
    assert loss == pytest.approx(_nll_with(adapter, requests_, delta), rel=1e-4)


def test_start_from_of_one_row_is_reshaped(adapter, requests_) -> None:
    """ROME's single request: a ``[d_model]`` start works like ``[1, d_model]``."""
    h = _at_subject(adapter, requests_[:1], f"resid_post.{LAYER}")
    target = h[0] + 0.5
    delta, *_ = _optimise(adapter, requests_[:1], clamp_norm=1e6, start_from=target, **MEASURE_ONLY)
    assert delta.shape == h.shape
    assert torch.allclose(delta, target - h, atol=1e-4)


def test_returned_loss_is_the_nll_of_the_returned_delta(adapter, requests_) -> None:
    """After optimisation steps too (with restarts: the best attempt's δ and its NLL)."""
    for restarts in (0, 2):
        delta, _, loss, steps = _optimise(
            adapter,
            requests_,
            steps=4,
            lr=0.5,
            clamp_norm=4.0,
            weight_decay=1e-3,
            stop_loss=0.05,
            restarts=restarts,
            generator=torch.Generator().manual_seed(1),
        )
        assert steps >= 4 and float(delta.norm()) > 0
        assert loss == pytest.approx(_nll_with(adapter, requests_, delta), rel=1e-4)


# -- optimise_output_delta: restarts -----------------------------------------------------------


def test_failed_attempts_restart_from_random_starts(adapter, requests_) -> None:
    _, _, loss0, steps0 = _optimise(adapter, requests_, **STUCK)
    assert loss0 > RESTART_NLL  # the precondition: the attempt fails
    assert steps0 == 1

    gen = torch.Generator().manual_seed(0)
    state = gen.get_state().clone()
    delta, _, loss, steps = _optimise(adapter, requests_, restarts=2, generator=gen, **STUCK)
    assert steps == 3  # one step in each of the three attempts
    assert not torch.equal(gen.get_state(), state)  # the random starts come from generator
    assert loss <= loss0  # the best attempt is kept; the first is the restarts=0 one
    assert loss == pytest.approx(_nll_with(adapter, requests_, delta), rel=1e-4)

    # Reproducible for a seed; another seed draws other starts.
    again = _optimise(
        adapter, requests_, restarts=2, generator=torch.Generator().manual_seed(0), **STUCK
    )
    assert torch.equal(again[0], delta) and again[2] == loss and again[3] == steps
    others = [
        _optimise(
            adapter, requests_, restarts=2, generator=torch.Generator().manual_seed(s), **STUCK
        )
        for s in (1, 2)
    ]
    assert any(not torch.equal(o[0], delta) for o in others)
    assert all(o[2] <= loss0 for o in others)


def test_a_random_start_keeps_the_first_start_and_the_clamp(adapter, requests_) -> None:
    """With ``start_from``, restarts perturb that start; every start stays inside the clamp."""
    h = _at_subject(adapter, requests_, f"resid_post.{LAYER}")
    base = _at_subject(adapter, requests_, SITE)
    clamp = 0.5
    delta, _, loss, steps = _optimise(
        adapter,
        requests_,
        steps=1,
        lr=1e-6,
        clamp_norm=clamp,
        weight_decay=1e-3,
        stop_loss=1e9,  # measure each start only
        start_from=h.flip(0),
        restarts=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert steps == 0 and loss > RESTART_NLL
    assert bool((delta.norm(dim=-1) <= clamp * base.norm(dim=-1) * (1 + 1e-4)).all())
    _, _, loss_first, _ = _optimise(
        adapter,
        requests_,
        steps=1,
        lr=1e-6,
        clamp_norm=clamp,
        weight_decay=1e-3,
        stop_loss=1e9,
        start_from=h.flip(0),
    )
    assert loss <= loss_first
    assert loss == pytest.approx(_nll_with(adapter, requests_, delta), rel=1e-4)


def test_the_best_attempt_is_kept(adapter, requests_) -> None:
    """Random starts around an optimised δ are worse than it: the first attempt's δ comes
    back although later attempts ran."""
    settings = {"clamp_norm": 4.0, "weight_decay": 1e-3}
    good, _, good_loss, _ = _optimise(
        adapter, requests_, steps=20, lr=0.5, stop_loss=0.05, **settings
    )
    assert good_loss > RESTART_NLL
    h = _at_subject(adapter, requests_, f"resid_post.{LAYER}")
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state().clone()
    delta, _, loss, steps = _optimise(
        adapter,
        requests_,
        steps=1,
        lr=1e-6,
        stop_loss=1e9,  # measure each start only
        start_from=h + good,
        restarts=3,
        generator=gen,
        **settings,
    )
    assert steps == 0
    assert not torch.equal(gen.get_state(), state)  # the restarts ran
    assert loss == pytest.approx(good_loss, rel=1e-5)
    assert torch.allclose(delta, good, atol=1e-4)


def test_no_restart_after_a_successful_attempt(adapter, requests_) -> None:
    """An attempt that ends below RESTART_NLL is final: no draw, the same δ and steps as
    without restarts.  (The "new" answer is the one the model already gives.)"""
    known = []
    for r in requests_:
        prefix = QA.prompt("question", "x", "en")[1]
        old_ids = tuple(
            adapter.tokenizer(prefix + r.target_old.strip(), add_special_tokens=False)["input_ids"]
        )
        known.append(dataclasses.replace(r, target_new_ids=old_ids))
    settings = {"steps": 3, "lr": 0.1, "clamp_norm": 4.0, "weight_decay": 1e-3, "stop_loss": 0.0}
    plain = _optimise(adapter, known, **settings)
    assert plain[2] <= RESTART_NLL and plain[3] == 3
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state().clone()
    retried = _optimise(adapter, known, restarts=3, generator=gen, **settings)
    assert torch.equal(gen.get_state(), state)
    assert torch.equal(retried[0], plain[0]) and retried[2:] == plain[2:]


# -- subject_means, check_init and the configs ---------------------------------------------------


def test_subject_means(adapter, fact_ids, mlake_v2411) -> None:
    requests = [
        make_request(adapter, mlake_v2411.fact(fact_ids[0]).views[lang], QA)
        for lang in ("en", "zh", "en")
    ]
    d = adapter.d_model
    means = {"en": torch.full((d,), 1.5, dtype=torch.float64), "zh": torch.arange(d).double()}
    calls: list[tuple[int, str]] = []

    def subject_mean(layer: int, lang: str) -> torch.Tensor:
        calls.append((layer, lang))
        return means[lang]

    context = EditContext(torch.Generator().manual_seed(0), subject_mean=subject_mean)
    assert subject_means(requests, 1, "zero", context, "rome") is None
    assert calls == []
    stacked = subject_means(requests, 1, "subject-mean", context, "rome")
    assert stacked is not None
    assert stacked.shape == (3, d) and stacked.dtype == torch.float32
    assert torch.equal(stacked[0], means["en"].float())
    assert torch.equal(stacked[1], means["zh"].float())
    assert torch.equal(stacked[2], means["en"].float())
    assert calls == [(1, "en"), (1, "zh"), (1, "en")]

    bare = EditContext(torch.Generator().manual_seed(0))
    assert bare.subject_mean is None
    assert subject_means(requests, 1, "zero", bare, "memit") is None
    with pytest.raises(ConfigError, match=r"memit\.init subject-mean needs"):
        subject_means(requests, 1, "subject-mean", bare, "memit")
    with pytest.raises(ConfigError, match=r"rome\.init 'bogus'"):
        subject_means(requests, 1, "bogus", context, "rome")


def test_check_init_and_config_fields() -> None:
    assert DELTA_INITS == ("zero", "subject-mean")
    for init in DELTA_INITS:
        check_init(init, "rome")
    with pytest.raises(ConfigError, match=r"ft\.init 'mean': choose one of zero, subject-mean"):
        check_init("mean", "ft")

    assert RomeConfig().init == "zero" and RomeConfig().restarts == 0
    assert MemitConfig().init == "zero" and MemitConfig().restarts == 0
    classes: tuple[tuple[Any, str], ...] = ((RomeConfig, "rome"), (MemitConfig, "memit"))
    for cls, name in classes:
        with pytest.raises(ConfigError, match=rf"^{name}\.init 'bogus'"):
            cls(init="bogus")
        with pytest.raises(ConfigError, match=rf"{name}\.restarts -1: must be >= 0"):
            cls(restarts=-1)
        with pytest.raises(ConfigError, match=rf"{name}\.restarts -2"):
            cls(restarts="-2")
        with pytest.raises(ConfigError, match="--restarts: expected an integer, got 'many'"):
            cls(restarts="many")
        # --set values arrive as strings.
        config = cls(init="subject-mean", restarts="3")
        assert config.init == "subject-mean"
        assert config.restarts == 3 and type(config.restarts) is int
    assert RomeConfig(restarts="3").restarts == 3  # type: ignore[arg-type]


# -- edit_rome / edit_memit with init: subject-mean ---------------------------------------------


def _mean_context(second_moment, target: torch.Tensor, calls: list | None = None):
    def subject_mean(layer: int, lang: str) -> torch.Tensor:
        if calls is not None:
            calls.append((layer, lang))
        return target

    return EditContext(torch.Generator().manual_seed(0), second_moment, subject_mean=subject_mean)


def test_rome_subject_mean_start_moves_the_subject_state_there(
    adapter, requests_, second_moment
) -> None:
    """With no optimisation step the edit moves the subject's residual exactly to the subject
    mean (ROME maps ``k*`` to ``base + δ``, and ``δ_0 = mean - h``)."""
    entry = get_method("rome")
    req = requests_[0]
    h = _at_subject(adapter, [req], f"resid_post.{LAYER}")
    base = _at_subject(adapter, [req], SITE)
    target = _at_subject(adapter, requests_[1:], f"resid_post.{LAYER}").mean(0)
    calls: list[tuple[int, str]] = []
    context = _mean_context(second_moment, target, calls)
    config = RomeConfig(layer=LAYER, init="subject-mean", clamp_norm=1e6, steps=5, stop_loss=1e9)
    result = entry.fn(adapter, [req], config, context)
    assert calls == [(LAYER, "en")]
    assert result.info["steps"] == 0 and result.info["config"]["init"] == "subject-mean"
    expected = float((target - h[0]).norm() / base[0].norm())
    assert result.info["delta_norm_ratio"] == pytest.approx(expected, rel=1e-4)
    with result.applied(adapter):
        moved = _at_subject(adapter, [req], f"resid_post.{LAYER}")[0]
    assert float((moved - target).norm()) < 1e-3 * float(target.norm())
    assert result.loss == pytest.approx(_nll_with(adapter, [req], target - h), rel=1e-4)

    # With optimisation steps and restarts: finite results.
    config = RomeConfig(layer=LAYER, init="subject-mean", steps=3, restarts=1)
    result = entry.fn(adapter, [req], config, context)
    assert math.isfinite(result.loss) and math.isfinite(result.info["delta_norm_ratio"])
    assert result.info["steps"] == 6  # 3 steps in each of two attempts (the NLL stays high)
    assert all(bool(torch.isfinite(d).all()) for d in result.deltas.values())


def test_memit_subject_mean_start(adapter, requests_, second_moment) -> None:
    entry = get_method("memit")
    h = _at_subject(adapter, requests_, f"resid_post.{LAYER}")
    base = _at_subject(adapter, requests_, SITE)
    target = h.mean(0)
    calls: list[tuple[int, str]] = []
    context = _mean_context(second_moment, target, calls)
    config = MemitConfig(
        layers="0",
        init="subject-mean",
        clamp_norm=1e6,
        steps=5,
        stop_loss=1e9,
        mom2_weight=1e-6,
        contexts="none",  # the edit prompts' own keys: then the solve writes the residual exactly
    )
    result = entry.fn(adapter, requests_, config, context)
    assert calls == [(LAYER, "en")] * len(requests_)
    assert result.info["steps"] == 0
    moves = (target - h).norm(dim=-1)
    ratio = float((moves / base.norm(dim=-1)).mean())
    assert result.info["delta_norm_ratio"] == pytest.approx(ratio, rel=1e-4)
    assert result.info["residual_norms"][0] == pytest.approx(float(moves.mean()), rel=1e-4)
    assert result.info["residual_norms"][-1] < 1e-2 * float(moves.mean())
    with result.applied(adapter):
        moved = _at_subject(adapter, requests_, f"resid_post.{LAYER}")
    assert float((moved - target).norm(dim=-1).max()) < 1e-2 * float(target.norm())

    config = MemitConfig(layers="0", init="subject-mean", steps=3, restarts=1)
    result = entry.fn(adapter, requests_, config, context)
    assert math.isfinite(result.loss) and result.info["steps"] == 6
    assert math.isfinite(result.info["delta_norm_ratio"])
    assert all(bool(torch.isfinite(d).all()) for d in result.deltas.values())


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_subject_mean_init_needs_the_statistics(adapter, requests_, second_moment, method) -> None:
    entry = get_method(method)
    context = EditContext(torch.Generator().manual_seed(0), second_moment)
    field = {"layer": LAYER} if method == "rome" else {"layers": "0"}
    config = entry.config_cls(init="subject-mean", steps=2, **field)
    with pytest.raises(ConfigError, match=rf"{method}\.init subject-mean"):
        entry.fn(adapter, requests_[:1], config, context)


# -- _subject_mean and transfer_stage ------------------------------------------------------------


def _hand_mean(adapter, dataset, fact_ids, lang: str, layer: int) -> tuple[torch.Tensor, int]:
    states = []
    for fact_id in fact_ids:
        try:
            req = make_request(adapter, dataset.fact(fact_id).views[lang], QA)
        except MlakeError:
            continue
        states.append(_at_subject(adapter, [req], f"resid_post.{layer}")[0].double())
    return torch.stack(states).mean(0), len(states)


def test_subject_mean_is_measured_saved_and_reloaded(
    adapter, fact_ids, mlake_v2411, tmp_path: Path, monkeypatch
) -> None:
    from mlake.stages.transfer import _subject_mean

    run = open_run("transfer", {"test": "subject-mean"}, root=tmp_path)
    ids = [*fact_ids, 4]  # fact 4's French edit is a no-op: skipped
    with pytest.raises(DataError):
        make_request(adapter, mlake_v2411.fact(4).views["fr"], QA)
    expected, n = _hand_mean(adapter, mlake_v2411, ids, "fr", LAYER)
    assert n == len(fact_ids)
    assert not run.has_arrays(f"subject_mean_fr_{LAYER}")
    # batch_size 4: a full and a partial batch.
    mean = _subject_mean(run, adapter, mlake_v2411, ids, "fr", QA, "question", LAYER, 4)
    assert mean.shape == (adapter.d_model,) and mean.dtype == torch.float32
    assert torch.allclose(mean.double(), expected, atol=1e-5)
    assert run.has_arrays(f"subject_mean_fr_{LAYER}")
    assert torch.equal(torch.from_numpy(run.load_arrays(f"subject_mean_fr_{LAYER}")["mean"]), mean)
    # Another language and another layer are their own statistics.
    en1, _ = _hand_mean(adapter, mlake_v2411, ids, "en", 1)
    got = _subject_mean(run, adapter, mlake_v2411, ids, "en", QA, "question", 1, 32)
    assert torch.allclose(got.double(), en1, atol=1e-5)
    assert not torch.allclose(got, mean)

    def no_model(*args, **kwargs):
        raise AssertionError("the saved mean should have been loaded")

    monkeypatch.setattr(adapter, "activations", no_model)
    again = _subject_mean(run, adapter, mlake_v2411, ids, "fr", QA, "question", LAYER, 4)
    assert torch.equal(again, mean)
    with pytest.raises(AssertionError, match="should have been loaded"):
        _subject_mean(run, adapter, mlake_v2411, ids, "zh", QA, "question", LAYER, 4)


def test_subject_mean_without_usable_prompts(adapter, mlake_v2411, tmp_path: Path) -> None:
    from mlake.stages.transfer import _subject_mean

    run = open_run("transfer", {"test": "none usable"}, root=tmp_path)
    with pytest.raises(DataError, match=r"subject mean \[fr\]: no fact has a usable question"):
        _subject_mean(run, adapter, mlake_v2411, [4], "fr", QA, "question", LAYER, 4)
    assert not run.has_arrays(f"subject_mean_fr_{LAYER}")


def test_transfer_run_key_leaves_out_default_new_fields(monkeypatch) -> None:
    """``init: zero``, ``restarts: 0`` and ``contexts: none`` stay out of the run key (earlier
    runs stay valid); other values enter it, so the context-averaged keys that are now ROME's
    default never reuse a run made with the edit prompt's key."""
    from analysis.transfer import TransferConfig
    from mlake.stages.context import StageContext
    from mlake.stages.transfer import transfer_stage

    keys: list[dict] = []

    class Opened(Exception):
        pass

    def fake_open(self, kind, config, **extra):
        keys.append(extra["method_config"])
        raise Opened

    monkeypatch.setattr(StageContext, "identity", lambda self: {})
    monkeypatch.setattr(StageContext, "open_run", fake_open)
    ctx = StageContext(None, "model", None, (0,), ("en",), QA)  # type: ignore[arg-type]
    configs = [
        RomeConfig(contexts="none"),
        RomeConfig(init="subject-mean", restarts=3, contexts="none"),
        RomeConfig(),
        MemitConfig(),
        MemitConfig(restarts=1),
    ]
    for config in configs:
        method = "rome" if isinstance(config, RomeConfig) else "memit"
        with pytest.raises(Opened):
            transfer_stage(
                ctx,
                method,
                config,
                TransferConfig(),
                knowledge=None,  # type: ignore[arg-type]
                locality_pool=[],
                corpus=["text"],
            )
    rome, rome_new, rome_contexts, memit, memit_new = keys
    assert set(rome) == {"layer", "steps", "lr", "clamp_norm", "weight_decay", "ridge", "stop_loss"}
    assert rome_new == {**rome, "init": "subject-mean", "restarts": "3"}
    assert rome_contexts == {**rome, "contexts": "5x10,10x10"}
    assert "init" not in memit and "restarts" not in memit
    assert memit_new == {**memit, "restarts": "1"}


def test_transfer_stage_gives_edits_the_run_subject_means(
    adapter, micro_tiny: Path, fact_ids, mlake_v2411, tmp_path: Path
) -> None:
    """Through ``EditContext.subject_mean``: measured per language at the edit layer and saved
    in the transfer run; a run with ``init: zero`` measures none."""
    from analysis.transfer import TransferConfig
    from mlake.stages.context import StageContext
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.transfer import transfer_stage
    from mlake_core.metrics.knowledge import KnowledgeConfig

    ids, langs = fact_ids[:2], ("en", "zh")
    ctx = StageContext(
        adapter, str(micro_tiny), mlake_v2411, tuple(ids), langs, QA, results_dir=tmp_path
    )
    knowledge, _ = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
    corpus = mlake_corpus(mlake_v2411)[:40]
    runs = {}
    for init in DELTA_INITS:
        rows, run = transfer_stage(
            ctx,
            "rome",
            RomeConfig(layer=LAYER, steps=2, init=init),
            TransferConfig(n_locality=2),
            knowledge=knowledge,
            locality_pool=fact_ids,
            corpus=corpus,
        )
        assert len(rows) and rows["edit_loss"].notna().all()
        # Every row carries its edit's timing: one value per edit, the method's and the
        # evaluation's seconds.
        timing = ["edit_seconds", "eval_seconds", "setup_seconds"]
        per_edit = rows.groupby(["fact_id", "edit_lang"])[timing]
        assert (per_edit.nunique() == 1).all().all()
        assert (rows["edit_seconds"] > 0).all() and (rows["eval_seconds"] > 0).all()
        # The shared statistics (second moment; subject means per language) are paid by the
        # first edit that needs them, outside its edit_seconds.
        setup = per_edit.first()["setup_seconds"]
        assert (setup >= 0).all() and setup.sum() > 0
        assert (setup > 0).sum() <= (1 + len(langs) if init == "subject-mean" else 1)
        runs[init] = (rows, run)
    zero_run, mean_run = runs["zero"][1], runs["subject-mean"][1]
    assert zero_run.path != mean_run.path
    # The prefixes ROME's keys were averaged behind: drawn once per run from its seed, the
    # same in both runs, recorded in the run (10 of 5 tokens, 10 of 10).
    (drawn,) = zero_run.meta["context_prefixes"]
    assert len(drawn) == 20 and mean_run.meta["context_prefixes"] == [drawn]
    for lang in langs:
        name = f"subject_mean_{lang}_{LAYER}"
        assert not zero_run.has_arrays(name)
        assert mean_run.has_arrays(name)
        expected, _ = _hand_mean(adapter, mlake_v2411, ids, lang, LAYER)
        saved = torch.from_numpy(mean_run.load_arrays(name)["mean"])
        assert torch.allclose(saved.double(), expected, atol=1e-5)
    assert not mean_run.has_arrays("subject_mean_en_1")
    # The start differs, so the edits do.
    losses = [sorted(set(runs[i][0]["edit_loss"].round(6))) for i in DELTA_INITS]
    assert losses[0] != losses[1]
