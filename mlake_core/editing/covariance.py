"""Second-moment statistics of MLP keys, ``C = E[k k^T]``, for ROME and MEMIT.

ROME and MEMIT insert a new key-value pair into an MLP output projection while disturbing
other keys as little as possible, which needs the uncentred covariance of the keys (the
``mlp_post`` activations) over ordinary text (Meng et al. 2022, eq. 2).  Computing it is the
slow, failure-prone part of both methods (EasyEdit#23, #450), so here it is:

* computed from a corpus the user names: a local text file, or a folder of ``*.txt`` files
  (one document per non-empty line), or by default MLaKE's own text in the model's languages
  (for mlake-tiny, the text it was trained on);
* accumulated in float64 over every real token, in chunks of texts, each chunk's partial
  sum saved as it finishes (resumable), then summed;
* cached in the results store keyed by model identity, layer, corpus hash and sample count.

The solve uses a ridge term (:func:`ridge_inverse_apply`) so a rank-deficient ``C`` (few
tokens, small models) does not fail (kmeng01/memit#12).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mlake_core.errors import ConfigError
from mlake_core.provenance import stable_hash


def read_corpus(path: str | os.PathLike[str]) -> list[str]:
    """Documents of a local corpus: a text file or a folder of ``*.txt`` files, one document
    per non-empty line.

    Raises:
        ConfigError: missing path, no text, or undecodable file (named).
    """
    p = Path(path).expanduser()
    files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
    if not p.exists():
        raise ConfigError(f"--corpus {str(p)!r} does not exist")
    docs: list[str] = []
    for f in files:
        try:
            docs += [line.strip() for line in f.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as err:
            raise ConfigError(f"--corpus file {f}: not UTF-8 text ({err})") from None
    docs = [d for d in docs if d]
    if not docs:
        raise ConfigError(f"--corpus {str(p)!r} holds no text")
    return docs


def mlake_corpus(dataset: Any) -> list[str]:
    """Default corpus: every single-hop statement and question of the loaded languages."""
    docs: list[str] = []
    for fact in dataset.facts:
        for view in fact.views.values():
            docs += [view.record.o_prompt, view.record.question]
    return docs


def key_second_moment(
    adapter: Any,
    layer: int,
    docs: Sequence[str],
    *,
    n_tokens: int = 100_000,
    batch_size: int = 32,
    max_len: int = 128,
    run: Any | None = None,
    chunk_docs: int = 512,
) -> tuple[torch.Tensor, int]:
    """``E[k k^T]`` of ``mlp_post.{layer}`` over the tokens of ``docs`` (float64).

    Args:
        adapter: the model.
        layer: MLP layer.
        docs: documents, used in order until ``n_tokens`` tokens are seen.
        n_tokens: how many tokens to accumulate (fewer if the corpus is shorter).
        batch_size: documents per forward pass.
        max_len: documents are truncated to this many tokens.
        run: a results-store run to save partial sums in (resumable), or ``None``.
        chunk_docs: documents per saved partial sum.

    Returns:
        ``(C [d_mlp, d_mlp] float64, tokens counted)``.
    """
    site = f"mlp_post.{layer}"
    d = adapter.d_mlp
    total = torch.zeros(d, d, dtype=torch.float64)
    count = 0
    for c_start in range(0, len(docs), chunk_docs):
        if count >= n_tokens:
            break
        chunk = list(docs[c_start : c_start + chunk_docs])
        name = f"chunk_{c_start // chunk_docs:05d}"
        if run is not None and run.has_arrays(name):
            saved = run.load_arrays(name)
            total += torch.from_numpy(saved["sum"])
            count += int(saved["count"])
            continue
        part = torch.zeros(d, d, dtype=torch.float64)
        part_count = 0
        for b in range(0, len(chunk), batch_size):
            if count + part_count >= n_tokens:
                break
            seqs = [adapter.encode(text)[:max_len] for text in chunk[b : b + batch_size]]
            batch = adapter.batch(seqs, padding_side="right")
            cache = adapter.activations(batch, [site])
            keys = cache[site][batch.attention_mask.bool()].double().cpu()
            keys = keys[: n_tokens - count - part_count]
            part += keys.T @ keys
            part_count += keys.shape[0]
        if run is not None:
            run.save_arrays(name, {"sum": part.numpy(), "count": part_count})
        total += part
        count += part_count
    if count == 0:
        raise ConfigError("the covariance corpus produced no tokens")
    return total / count, count


def covariance_key(
    model_ident: dict[str, Any], layer: int, docs: Sequence[str], n_tokens: int
) -> dict[str, Any]:
    """What determines a covariance estimate (the results-store key)."""
    return {
        "model": model_ident,
        "layer": layer,
        "corpus": stable_hash(list(docs), length=16),
        "n_docs": len(docs),
        "n_tokens": n_tokens,
    }


def cached_second_moment(
    adapter: Any,
    model_ident: dict[str, Any],
    layer: int,
    docs: Sequence[str],
    *,
    n_tokens: int = 100_000,
    results_dir: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """:func:`key_second_moment`, cached in the results store (kind ``covariance``).

    Computed once: under the claim of the piece ``moment``
    (:meth:`~mlake_core.results.store.Run.claim`, a file lock in the run folder), so of the
    processes that need it at once (the workers of a sharded run, each with its own model) one
    computes and saves it while the others wait and read it; a killed holder's claim is taken
    over, and its saved partial sums are read back.
    """
    from mlake_core.results.store import open_run

    run = open_run("covariance", covariance_key(model_ident, layer, docs, n_tokens), results_dir)
    if not run.has_arrays("moment"):
        with run.claim("moment"):
            if not run.has_arrays("moment"):  # not saved by the claim's holder before
                moment, count = key_second_moment(adapter, layer, docs, n_tokens=n_tokens, run=run)
                run.save_arrays("moment", {"C": moment.numpy(), "count": count})
                run.write_meta(status="complete", tokens=count, layer=layer)
                return moment
    return torch.from_numpy(run.load_arrays("moment")["C"])


def ridge_inverse_apply(moment: torch.Tensor, vectors: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(C + λ I)^{-1} vectors`` in float64, with ``λ = ridge * trace(C) / d``.

    Args:
        moment: ``[d, d]``.
        vectors: ``[d]`` or ``[d, n]``.
        ridge: relative ridge strength (> 0 keeps the solve well-posed).
    """
    c = moment.double()
    d = c.shape[0]
    lam = ridge * float(torch.trace(c)) / d
    lam = lam if lam > 0 else ridge
    return torch.linalg.solve(c + lam * torch.eye(d, dtype=torch.float64), vectors.double())
