"""The tuned lens (Belrose et al. 2023, arXiv 2303.08112): one affine *translator* per layer,
applied to the residual stream before the final norm and the unembedding, fitted so that what
each layer decodes to matches the model's own final-layer distribution.

**The translator.**  Layer ``L``'s state ``h`` (``resid_post.L``) is decoded as
``logit_lens(h + A_L h + b_L)``: the identity plus a learned ``d x d`` map and a bias,
initialised at zero (the identity: the tuned lens starts as the logit lens).  The last layer
has none (its logit lens is the model's output).

**The fit** (the paper's recipe, Appendix C, where it fits a CPU budget): the loss is the KL
divergence from the model's final-layer distribution to each layer's tuned-lens
distribution, ``KL(p_final || p_L)``, summed over layers and averaged over token positions;
SGD with Nesterov momentum 0.9, learning rate 1.0 decayed linearly to 0 over 250 steps
(scaled by ``1 - momentum``, as the authors' code scales it: 0.1), weight decay 1e-3 (on ``A`` and ``b``, pulling them to the identity).  *Deviations*: the
paper draws 2^18 tokens per step from the Pile; here each step draws ``tokens_per_step``
token positions (512 by default, a CPU budget) from MLaKE text (below), cycling through a
seeded permutation of the fitting tokens.

**The text** (:func:`fit_texts`): the question and cloze texts, in every language of the
run, of facts that are *not* evaluated (not among the selected facts), split by fact (every
language of a fact on one side), seeded, into fitting facts and held-out facts
(``holdout``, 20%), at most ``max_facts`` facts in all.  Every token position of a text is
a training position (the model's next-token distribution there).

**Validation** (:attr:`TunedLens.validation`): on the held-out texts, the mean KL to the
final layer per layer, of the tuned lens and of the logit lens.

**The cache**: a fitted lens is saved in mlake's cache folder (``$MLAKE_CACHE``, else
``~/.cache/mlake``; ``lens/tuned-<key>.npz``), keyed by the model's identity, the data's
content digest, the fitting and held-out texts and the settings (:func:`tuned_key`), and
written atomically; a second call with the same key reads it back.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlake_core.errors import ConfigError
from mlake_core.models.adapter import ModelAdapter
from mlake_core.provenance import stable_hash

#: :attr:`TunedLens.info` entries that say where this copy came from (not part of a report).
_WHERE = ("cached", "path")


@dataclass(frozen=True)
class TunedLensConfig:
    """Settings of the tuned lens's fit (the module docstring gives the paper's).

    Attributes:
        steps: optimiser steps (the paper: 250).
        lr: the learning-rate scale (the paper: 1.0); the step size is ``lr * (1 -
            momentum)``, decayed linearly to 0.
        momentum: Nesterov momentum (the paper: 0.9).
        weight_decay: on the translators (the paper: 1e-3).
        tokens_per_step: token positions per step (the paper: 2^18; here a CPU budget).
        holdout: the fraction of facts held out for validation.
        max_facts: at most this many non-evaluated facts are used (fit and held out).
        seed: the seed of the split and of the token order.
    """

    steps: int = 250
    lr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-3
    tokens_per_step: int = 512
    holdout: float = 0.2
    max_facts: int = 400
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.steps) < 0:
            raise ConfigError(f"tuned lens steps {self.steps}: must be 0 or more")
        if int(self.tokens_per_step) < 1:
            raise ConfigError(f"tuned lens tokens_per_step {self.tokens_per_step}: at least 1")
        if not 0.0 < float(self.holdout) < 1.0:
            raise ConfigError(f"tuned lens holdout {self.holdout}: must be between 0 and 1")
        if int(self.max_facts) < 2:
            raise ConfigError(f"tuned lens max_facts {self.max_facts}: at least 2")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TunedLens:
    """Fitted translators, one per layer but the last (module docstring).

    Attributes:
        weight: ``[n_layers, d, d]``: ``A_L`` (zero for the last layer and at the start).
        bias: ``[n_layers, d]``: ``b_L``.
        key: the cache key it was fitted under (enters the lens runs' keys).
        info: the split, the settings, the fit's time and the validation
            (:meth:`report`).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    key: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def identity(cls, n_layers: int, d_model: int) -> TunedLens:
        """Translators that change nothing: the tuned lens equals the logit lens."""
        return cls(torch.zeros(n_layers, d_model, d_model), torch.zeros(n_layers, d_model))

    def translate(self, states: torch.Tensor) -> torch.Tensor:
        """``h + A_L h + b_L`` of states ``[..., layer, d]`` (every layer)."""
        w = self.weight.to(states.device, states.dtype)
        b = self.bias.to(states.device, states.dtype)
        return states + torch.einsum("...ld,lkd->...lk", states, w) + b

    def decoder(self, adapter: ModelAdapter) -> Callable[[torch.Tensor], torch.Tensor]:
        """States ``[..., layer, d]`` to logits through the translators and the logit lens
        (for :func:`analysis.lens.lens_prompts`)."""

        def decode(states: torch.Tensor) -> torch.Tensor:
            return adapter.logit_lens(self.translate(states.float()))

        return decode

    @property
    def validation(self) -> dict[str, list[float]]:
        """Held-out mean KL to the final layer per layer: ``tuned`` and ``logit``."""
        return dict(self.info.get("validation", {}))

    def report(self) -> dict[str, Any]:
        """What a lens run records: the key and :attr:`info` (less where it was read from,
        so a run reads back the same)."""
        return {"key": self.key, **{k: v for k, v in self.info.items() if k not in _WHERE}}


def fit_texts(
    dataset: Any, fact_ids: Sequence[int], langs: Sequence[str], config: TunedLensConfig
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """The fitting and held-out texts (module docstring): per fact, its question and cloze
    texts in every language of ``langs`` (forms without text left out), the facts shuffled
    with ``config.seed``, the first ``max_facts`` kept, and ``holdout`` of them held out.

    Raises:
        ConfigError: fewer than two facts with text (nothing to fit or hold out).
    """
    texts: dict[int, list[str]] = {}
    for fid in fact_ids:
        fact = dataset.fact(fid)
        got = []
        for lang in langs:
            view = fact.views.get(lang)
            if view is None:
                continue
            for form in ("question", "cloze"):
                text = view.form(form).text
                if text:
                    got.append(text)
        if got:
            texts[int(fid)] = got
    order = sorted(texts)
    random.Random(config.seed).shuffle(order)
    order = order[: config.max_facts]
    if len(order) < 2:
        raise ConfigError(
            f"tuned lens: {len(order)} facts with text outside the evaluated ones; select fewer "
            "facts (--facts) so the lens has text to be fitted on"
        )
    n_held = max(1, round(len(order) * config.holdout))
    held = {f: texts[f] for f in sorted(order[:n_held])}
    fit = {f: texts[f] for f in sorted(order[n_held:])}
    return fit, held


def collect_states(
    adapter: ModelAdapter, texts: Sequence[str], batch_size: int = 16
) -> torch.Tensor:
    """``resid_post`` of every layer at every token position of ``texts``: ``[tokens, layer,
    d]`` float32 on the CPU (padding left out)."""
    sites = [f"resid_post.{layer}" for layer in range(adapter.n_layers)]
    out = []
    for start in range(0, len(texts), batch_size):
        batch = adapter.batch([adapter.encode(t) for t in texts[start : start + batch_size]])
        cache = adapter.activations(batch, sites)
        stacked = torch.stack([cache[s] for s in sites], dim=2)  # [row, pos, layer, d]
        mask = batch.attention_mask.bool()
        out.append(stacked[mask].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, adapter.n_layers, adapter.d_model)


def layer_kl(
    adapter: ModelAdapter,
    lens: TunedLens,
    states: torch.Tensor,
    chunk: int = 256,
    grad: bool = False,
) -> torch.Tensor:
    """Mean over positions of ``KL(p_final || p_L)`` per layer ``L`` (``[n_layers]``, nats),
    ``p_L`` decoded through ``lens``'s translators (identity translators: the logit lens);
    the final distribution is the last layer's logit lens (the model's own output)."""
    total = torch.zeros(adapter.n_layers)
    n = states.shape[0]
    for start in range(0, n, chunk):
        part = states[start : start + chunk].to(adapter.device)
        with torch.no_grad():
            target = adapter.logit_lens(part[:, -1]).log_softmax(-1)  # [tok, vocab]
        logits = adapter.logit_lens(lens.translate(part), grad=grad)  # [tok, layer, vocab]
        logq = logits.log_softmax(-1)
        kl = (target.exp()[:, None] * (target[:, None] - logq)).sum(-1)  # [tok, layer]
        total = total + kl.sum(0).cpu()
    return total / max(n, 1)


def fit_tuned_lens(
    adapter: ModelAdapter,
    fit: Sequence[str],
    held: Sequence[str],
    config: TunedLensConfig,
    log: Callable[[str], None] | None = None,
) -> TunedLens:
    """Fit the translators on the ``fit`` texts and validate on the ``held`` texts (module
    docstring); :attr:`TunedLens.info` records the split sizes, the settings, the seconds
    and the validation."""
    started = time.perf_counter()
    n_layers, d = adapter.n_layers, adapter.d_model
    train = collect_states(adapter, fit)
    weight = torch.zeros(n_layers, d, d, requires_grad=True)
    bias = torch.zeros(n_layers, d, requires_grad=True)
    trainable = TunedLens(weight, bias)
    frozen_last = torch.ones(n_layers, 1, 1)
    frozen_last[-1] = 0.0  # the last layer keeps the identity
    opt = torch.optim.SGD(
        [weight, bias],
        lr=config.lr * (1.0 - config.momentum),  # the tuned-lens code's SGD scaling
        momentum=config.momentum,
        nesterov=True,
        weight_decay=config.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: max(0.0, 1.0 - step / max(config.steps, 1))
    )
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(train.shape[0], generator=gen)
    at, losses = 0, []
    for step in range(config.steps):
        if at + config.tokens_per_step > len(order):
            order, at = torch.randperm(train.shape[0], generator=gen), 0
        idx = order[at : at + config.tokens_per_step]
        at += config.tokens_per_step
        opt.zero_grad()
        kl = layer_kl(adapter, trainable, train[idx], chunk=len(idx), grad=True)
        loss = kl[:-1].sum()
        loss.backward()
        with torch.no_grad():
            assert weight.grad is not None and bias.grad is not None
            weight.grad.mul_(frozen_last)
            bias.grad.mul_(frozen_last[:, 0])
        opt.step()
        sched.step()
        with torch.no_grad():
            weight.mul_(frozen_last)
            bias.mul_(frozen_last[:, 0])
        losses.append(float(loss.detach()))
        if log and (step + 1) % 50 == 0:
            log(f"tuned lens: step {step + 1}/{config.steps}, summed KL {losses[-1]:.3f}")
    lens = TunedLens(weight.detach().clone(), bias.detach().clone())
    held_states = collect_states(adapter, held)
    with torch.no_grad():
        tuned_kl = layer_kl(adapter, lens, held_states)
        logit_kl = layer_kl(adapter, TunedLens.identity(n_layers, d), held_states)
    lens.info = {
        "config": config.to_dict(),
        "fit_tokens": int(train.shape[0]),
        "held_tokens": int(held_states.shape[0]),
        "seconds": round(time.perf_counter() - started, 1),
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "validation": {
            "tuned": [round(float(x), 6) for x in tuned_kl],
            "logit": [round(float(x), 6) for x in logit_kl],
        },
    }
    return lens


def tuned_key(
    model: Mapping[str, Any],
    data_key: str,
    fit: Mapping[int, Sequence[str]],
    held: Mapping[int, Sequence[str]],
    config: TunedLensConfig,
) -> str:
    """The cache key of a tuned lens: the model's identity, the data's content digest, the
    fitting and held-out texts, and the settings."""
    return stable_hash(
        {
            "model": dict(model),
            "data": data_key,
            "fit": {str(k): list(v) for k, v in fit.items()},
            "held": {str(k): list(v) for k, v in held.items()},
            "config": config.to_dict(),
        }
    )


def cache_path(key: str, root: Path | None = None) -> Path:
    """Where the tuned lens of ``key`` is cached (mlake's cache folder)."""
    from mlake_core.files import cache_dir

    return (root or cache_dir()) / "lens" / f"tuned-{key[:24]}.npz"


def load_or_fit(
    adapter: ModelAdapter,
    model: Mapping[str, Any],
    fit: Mapping[int, Sequence[str]],
    held: Mapping[int, Sequence[str]],
    config: TunedLensConfig,
    *,
    data_key: str,
    root: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> TunedLens:
    """The tuned lens of ``adapter`` fitted on ``fit`` (validated on ``held``): read from the
    cache when fitted before with the same key (:func:`tuned_key`), else fitted and cached
    (written atomically).  :attr:`TunedLens.info` says which (``cached``: true when read)."""
    import json

    from mlake_core.files import atomic_write

    key = tuned_key(model, data_key, fit, held, config)
    path = cache_path(key, root)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    info = json.loads(str(z["info"]))
                    lens = TunedLens(
                        torch.from_numpy(z["weight"]).float(),
                        torch.from_numpy(z["bias"]).float(),
                        key,
                        {**info, "cached": True, "path": str(path)},
                    )
                    if log:
                        log(f"tuned lens: read from {path}")
                    return lens
        except (OSError, KeyError, ValueError) as err:
            if log:
                log(f"tuned lens: the cache {path} is unreadable ({err}); fitted again")
    texts_fit = [t for ts in fit.values() for t in ts]
    texts_held = [t for ts in held.values() for t in ts]
    if log:
        log(
            f"tuned lens: fitting on {len(fit)} facts ({len(texts_fit)} texts), held out "
            f"{len(held)} facts ({len(texts_held)} texts), {config.steps} steps"
        )
    lens = fit_tuned_lens(adapter, texts_fit, texts_held, config, log)
    lens.key = key
    lens.info.update(
        {
            "fit_facts": len(fit),
            "held_facts": len(held),
            "fit_texts": len(texts_fit),
            "held_texts": len(texts_held),
        }
    )

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                weight=lens.weight.numpy(),
                bias=lens.bias.numpy(),
                key=np.asarray(key),
                info=np.asarray(json.dumps(lens.info)),
            )

    try:
        atomic_write(path, write)
        lens.info.update({"cached": False, "path": str(path)})
    except OSError as err:
        if log:
            log(f"tuned lens: not cached ({err})")
        lens.info.update({"cached": False, "path": None})
    return lens
