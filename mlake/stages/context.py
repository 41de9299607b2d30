"""What every stage shares: the :class:`StageContext` (model, data, facts, languages,
template, results store, run settings), the model's identity in result keys, opening a stage's
run folder, and the subject-noise level that tracing and attribution patching both use."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlake_core.data.dataset import MlakeDataset
from mlake_core.models.adapter import ModelAdapter
from mlake_core.models.prompting import PromptTemplate
from mlake_core.provenance import stable_hash
from mlake_core.results.store import Run, open_run


def model_identity(adapter: ModelAdapter, path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a model's weights in a result key.

    A hub model is its id, revision and resolved commit.  A local folder is its resolved path
    and the size and modification time of each weight file (so retraining into the same
    folder gives new keys), plus the mlake-tiny training key when there is one.  A model read
    from a GGUF file adds the file's SHA256 and quantization type.
    """
    info = adapter.info
    ident: dict[str, Any] = {
        "model_id": info.model_id,
        "backend": info.backend,
        "dtype": info.dtype,
    }
    folder = Path(path)
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors"))
        ident["path"] = str(folder.resolve())
        ident["weights"] = stable_hash(
            [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        )
        from mlake_core.models.mlake_tiny import read_metadata

        meta = read_metadata(folder)
        if meta:
            ident["mlake_tiny_key"] = meta.get("key")
    else:
        ident["revision"] = info.revision
        ident["commit_hash"] = info.commit_hash
    if getattr(info, "gguf_sha256", None):
        # A GGUF file (or a packaged model) is identified by its content, wherever it lies.
        ident["gguf_sha256"] = info.gguf_sha256
        ident["quantization"] = info.quantization
    return ident


@dataclass(frozen=True)
class Shard:
    """A part of a per-fact stage's pieces: the pieces of ``facts`` in ``langs`` (a transfer
    run's edit languages; a knowledge run's languages, whose pieces are whole languages).  A
    shard computes only its missing pieces into the stage's one run folder (the key is the
    whole run's), so it is idempotent and resumable, and the stage run without a shard then
    reads every piece back into the same tables as a run computed in one process
    (:mod:`mlake.executors`).

    Attributes:
        facts: the facts whose pieces it computes.
        langs: the languages whose pieces it computes.
    """

    facts: tuple[int, ...]
    langs: tuple[str, ...]

    def covers(self, lang: str, fact_id: int | None = None) -> bool:
        """Whether the piece of ``fact_id`` (``None``: any) in ``lang`` is this shard's."""
        return lang in self.langs and (fact_id is None or int(fact_id) in self.facts)

    def describe(self) -> str:
        """``en, facts 3, 7, 12`` or ``en, 32 facts 3 ... 97`` (for logs)."""
        ids = [str(f) for f in self.facts]
        facts = (
            f"facts {', '.join(ids)}"
            if len(ids) <= 4
            else f"{len(ids)} facts {ids[0]} ... {ids[-1]}"
        )
        return f"{','.join(self.langs)}, {facts}"


@dataclass(frozen=True)
class StageContext:
    """What every stage takes: the model, the data and where results go.

    The CLI commands, the pipeline and the sweep build one (:func:`mlake.session.prepare`)
    and pass it to every stage, with the stage's own config and the results of the stages
    it reads.

    Attributes:
        adapter: the model.
        model_path: what was loaded (enters the result keys through :func:`model_identity`).
        dataset: MLaKE in the run's languages.
        fact_ids: the facts of the run, in order.
        langs: the languages of the run.
        template: the prompt template every stage uses.
        results_dir: the results store (``None``: ``$MLAKE_RESULTS``, else ``./runs``).
        batch_size: sequences per forward pass.
        seed: the run seed (editing methods, restricted editing's random set).
        log: receives progress lines (``None``: silent).
        executor: runs a sharded stage's shards before the stage reads them back
            (:mod:`mlake.executors`; ``None``: the stage computes every piece itself, in this
            process).  Not part of any result key.
        shard: the part of the pieces to compute (``None``: all of them, then the stage's
            tables and summary); set on the workers of an executor.
    """

    adapter: ModelAdapter
    model_path: str
    dataset: MlakeDataset
    fact_ids: tuple[int, ...]
    langs: tuple[str, ...]
    template: PromptTemplate
    results_dir: str | os.PathLike[str] | None = None
    batch_size: int = 32
    seed: int = 0
    log: Callable[[str], None] | None = None
    executor: Any = None
    shard: Shard | None = None

    def say(self, message: str) -> None:
        """A progress line (to :attr:`log`, when set)."""
        if self.log is not None:
            self.log(message)

    def with_facts(self, fact_ids: Sequence[int]) -> StageContext:
        """The same context for other facts."""
        return dataclasses.replace(self, fact_ids=tuple(int(f) for f in fact_ids))

    def fill_shards(
        self,
        stage: str,
        run: Run,
        fn: Callable[..., Any],
        *args: Any,
        units: Mapping[str, Sequence[Sequence[int]]] | None = None,
        **kw: Any,
    ) -> None:
        """Have :attr:`executor` compute the missing pieces of ``run`` as shards, each a call
        ``fn(ctx_with_shard, *args, **kw)`` on a worker, before the stage reads them back.
        ``units``: the stage's units of work, per language the groups of facts one shard
        computes together (a batch), in order (:data:`mlake.executors.Units`; ``None``:
        every fact of the run on its own).  Nothing is done without an executor, inside a
        shard, or for a complete run."""
        if self.executor is not None and self.shard is None and not run.complete:
            self.executor.fill(stage, self, fn, *args, units=units, **kw)

    def mine(self, lang: str, fact_id: int | None = None) -> bool:
        """Whether this process computes the piece of ``fact_id`` (``None``: any) in
        ``lang``: always without a shard (the stage computes, or reads back, every piece),
        else when the shard covers it (:meth:`Shard.covers`)."""
        return self.shard is None or self.shard.covers(lang, fact_id)

    def edit_pieces(
        self,
        run: Run,
        chosen: Mapping[str, Sequence[int]],
        plan: Callable[[str, int], tuple[Any, ...] | None],
        compute: Callable[..., Mapping[str, Any] | None],
        *,
        keys: Sequence[str] = (),
        what: str = "an edit",
    ) -> dict[str, list[tuple[int, dict[str, Any]]]]:
        """The per-edit loop of the stages that read edited models (the edit lens, patching's
        edit carried): for each edit language ``a`` and fact ``f`` of ``chosen`` that this
        process computes (:meth:`mine`), ``plan(a, f)`` (tokenization only, with its skips
        counted, done whether the edit is computed or read back; ``None``: skipped), then the
        piece ``edit_<a>_<f>``: read back if saved, else ``compute(a, f, *planned)`` under
        the piece's claim (:meth:`~mlake_core.results.store.Run.load_or_compute_arrays`;
        ``None``: a failed edit, not saved).

        Returns:
            Per edit language, ``(fact, arrays)`` of its edits, in ``chosen``'s order.
        """
        from functools import partial

        out: dict[str, list[tuple[int, dict[str, Any]]]] = {a: [] for a in chosen}
        for a, facts in chosen.items():
            for f in facts:
                if not self.mine(a, f):  # another shard's edit
                    continue
                planned = plan(a, f)
                if planned is None:
                    continue
                arrays, _ = run.load_or_compute_arrays(
                    f"edit_{a}_{f}", partial(compute, a, f, *planned), keys=keys, what=what
                )
                if arrays is not None:
                    out[a].append((f, arrays))
        return out

    def identity(self) -> dict[str, Any]:
        """The model's identity in result keys (:func:`model_identity`)."""
        return model_identity(self.adapter, self.model_path)

    def open_run(self, kind: str, config: Any, **extra_key: Any) -> Run:
        """Open the run of a stage keyed by the model, data, facts, languages, template and
        ``config`` (``None``: a stage without one; left out of the key) plus ``extra_key``,
        and mark it running with the same provenance (stages add their own meta fields
        after)."""
        key = {
            "model": self.identity(),
            "data_version": self.dataset.version,
            **self.dataset.content_key,  # a copy of the data that differs from the release
            "facts": stable_hash(list(self.fact_ids)),
            "n_facts": len(self.fact_ids),
            "langs": list(self.langs),
            "template": self.template.to_dict(),
            **({"config": config.to_dict()} if config is not None else {}),
            **extra_key,
        }
        run = open_run(kind, key, self.results_dir)
        # A complete run is read back, not rerun: its status stays and nothing is written.
        status = {} if run.complete else {"status": "running"}
        run.write_meta(
            **status,
            model=self.adapter.info.to_dict(),
            template=self.template.to_dict(),
            config=config.to_dict() if config is not None else None,
            data_version=self.dataset.version,
            data_sha256=self.dataset.content_sha256,
            fact_ids=list(self.fact_ids),
            langs=list(self.langs),
        )
        return run


def synced_seconds(adapter: ModelAdapter, started: float) -> float:
    """Seconds since ``started`` (``time.perf_counter``), once the model's CUDA device has
    finished the work queued on it."""
    import torch

    if adapter.device.type == "cuda":
        torch.cuda.synchronize(adapter.device)
    return time.perf_counter() - started


def subject_noise_std(
    run: Run,
    adapter: ModelAdapter,
    located: Callable[[int, str], Any],
    fact_ids: Sequence[int],
    langs: Sequence[str],
    noise_scale: float,
) -> float:
    """The standard deviation of subject-token embeddings over (at most 1000 of) the facts'
    prompts, measured once per run and saved (``noise.json``)."""
    if run.has_json("noise"):
        return float(run.load_json("noise")["embedding_std"])
    with run.claim("noise"):  # measured once, by one worker of a sharded run
        if run.has_json("noise"):
            return float(run.load_json("noise")["embedding_std"])
        return _measure_noise(run, adapter, located, fact_ids, langs, noise_scale)


def _measure_noise(
    run: Run,
    adapter: ModelAdapter,
    located: Callable[[int, str], Any],
    fact_ids: Sequence[int],
    langs: Sequence[str],
    noise_scale: float,
) -> float:
    from analysis.tracing.causal import embedding_noise_std
    from mlake_core.errors import MlakeError

    sample = []
    for fact_id in fact_ids:
        for lang in langs:
            try:
                loc = located(fact_id, lang)
            except MlakeError:
                continue
            sample.append((loc.prompt_ids, loc.subject_positions))
    sample = sample[:1000]
    noise_std = embedding_noise_std(adapter, sample)
    run.save_json(
        "noise",
        {
            "embedding_std": noise_std,
            "noise_scale": noise_scale,
            "noise_std": noise_scale * noise_std,
            "measured_on_subjects": len(sample),
        },
    )
    return noise_std


class Settings:
    """A config given as a plain dict (for run keys)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)
