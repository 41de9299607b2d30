"""Running the pipeline: every stage in order into one run folder, resumable."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlake.executors import make_executor
from mlake.pipeline.config import (
    STAGES,
    PipelineConfig,
    config_from_dict,
    dump_config,
    load_config,
)
from mlake.pipeline.manifest import StageRecord, write_json
from mlake.pipeline.steps import STAGE_FUNCTIONS, PipelineState, StageSkipped
from mlake.progress import Bars


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` returns: the run folder and each stage's record."""

    out: Path
    stages: dict[str, StageRecord]
    seconds: float

    def summary(self) -> str:
        """The table printed at the end of a run."""
        lines = [f"{'stage':<11}{'status':<10}{'seconds':>9}{'cpu s':>9}  result"]
        for name, rec in self.stages.items():
            where = "; ".join(f"{k}: {v}" for k, v in rec.runs.items()) or (rec.note or "")
            lines.append(
                f"{name:<11}{rec.status:<10}{rec.seconds:>9.1f}{rec.cpu_seconds:>9.1f}  {where}"
            )
        cpu = sum(r.cpu_seconds for r in self.stages.values())
        lines.append(f"{'total':<21}{self.seconds:>9.1f}{cpu:>9.1f}  {self.out}")
        return "\n".join(lines)


def _what_results_depend_on(config: PipelineConfig) -> dict[str, Any]:
    """The config without the settings that change no result: which stages run, the batch
    size and where the store is (``run`` keeps only its seed)."""
    data = config.to_dict()
    data["run"] = {"seed": config.run.seed}
    return data


def set_aside_other_run(out: Path, config: PipelineConfig, store: Path) -> Path | None:
    """Move what a run of another config left in the run folder ``out`` (its report,
    figures, records, ``config.yaml``) into ``out/replaced-<time>/``, so that nothing of it
    stands beside the new config's results.  The results store (``<out>/store`` by default,
    and this config's wherever it is) and earlier ``replaced-*`` folders stay.  A run of the same config, with other stages,
    batch size or store, is a continuation: nothing moves.

    Returns:
        The folder the old run went to, or ``None`` when nothing moved.
    """
    from mlake_core.errors import MlakeError

    old_file = out / "config.yaml"
    if not old_file.is_file():
        return None
    try:
        old = _what_results_depend_on(load_config(old_file))
    except (MlakeError, ValueError):  # unreadable (bad YAML, not UTF-8): not this config
        old = None
    if old == _what_results_depend_on(config):
        return None
    aside = out / time.strftime("replaced-%Y%m%dT%H%M%S")
    n = 1
    while aside.exists():
        n += 1
        aside = out / time.strftime(f"replaced-%Y%m%dT%H%M%S-{n}")
    where = store.resolve()
    entries = [
        e
        for e in out.iterdir()
        if not e.name.startswith("replaced-")
        and e.name != "store"  # the default store, which an earlier config may have used
        and e.resolve() != where
        and e.resolve() not in where.parents
    ]
    aside.mkdir()
    for entry in entries:
        entry.rename(aside / entry.name)
    return aside


def run_pipeline(
    config: PipelineConfig,
    out: str | os.PathLike[str],
    *,
    log: Callable[[str], None] | None = None,
    bars: bool | None = None,
    on_item: Callable[[str, dict[str, Any]], None] | None = None,
    argv: Sequence[str] | None = None,
) -> PipelineResult:
    """Run every stage of ``config.run.stages`` on one model into the run folder ``out``
    (module docstring).  Stages already computed (in the results store) are reloaded.

    Args:
        config: the pipeline config.
        out: the run folder.
        log: receives progress lines (default: none).
        bars: progress bars on stderr (``None``: when stderr is a terminal; otherwise
            progress goes to ``log`` every 10%).
        on_item: called with ``(stage, info)`` after every fact or edit a stage finishes (for
            tests that stop a run mid-stage, and for callers' own progress).
        argv: the command line, recorded in ``provenance.json``.

    Returns:
        The run folder and the stages' records (also in ``manifest.json``).
    """
    import platform

    from mlake_core.provenance import provenance

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _m: None)
    store = Path(config.run.results_dir) if config.run.results_dir else out / "store"
    aside = set_aside_other_run(out, config, store)
    if aside is not None:
        say(
            f"{out} held a run of another config: its report, figures and records are moved "
            f"to {aside} (the results store keeps every computed result)"
        )
    (out / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    write_json(
        out / "provenance.json",
        {
            **provenance(),
            "seeds": config.seeds(),
            "command": list(argv) if argv is not None else None,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "results_dir": str(store),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    manifest_path = out / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    records: dict[str, StageRecord] = {}
    bar = Bars(bars, say)
    state = PipelineState(config=config, out=out, store=store, log=say, bar=bar, on_item=on_item)
    started = time.perf_counter()

    def save_manifest() -> None:
        write_json(
            manifest_path,
            {
                "out": str(out),
                "results_dir": str(store),
                "resumed": bool(previous),
                "stages": {k: v.to_dict() for k, v in records.items()},
                "seconds": round(time.perf_counter() - started, 1),
            },
        )

    # --executor ray: the sharded stages' pieces are computed on Ray workers, then read back
    # here (mlake.executors); local: None, every stage computes in this process.
    executor = make_executor(config.run, config.model, config.data, log=say)
    try:
        for name in STAGES:
            if name not in config.run.stages:
                continue
            record = StageRecord(status="running")
            records[name] = record
            save_manifest()
            t0, c0 = time.perf_counter(), time.process_time()
            say(f"stage {name}")
            try:
                record.runs = STAGE_FUNCTIONS[name](state) or {}
                record.status = "complete"
            except StageSkipped as why:
                record.status, record.note = "skipped", str(why)
                say(f"stage {name} skipped: {why}")
            except BaseException as err:
                record.status = "failed" if isinstance(err, Exception) else "interrupted"
                record.note = f"{type(err).__name__}: {err}"
                record.seconds = round(time.perf_counter() - t0, 1)
                record.cpu_seconds = round(time.process_time() - c0, 1)
                save_manifest()
                raise
            if name == "model" and executor is not None and state.ctx is not None:
                state.ctx = dataclasses.replace(state.ctx, executor=executor)
            record.seconds = round(time.perf_counter() - t0, 1)
            record.cpu_seconds = round(time.process_time() - c0, 1)
            save_manifest()
    finally:
        if executor is not None:
            executor.close()
    return PipelineResult(out, records, round(time.perf_counter() - started, 1))


NOTEBOOK_SETTINGS: dict[str, Any] = {
    "tracing": {"n_samples": 3},
    "lens": {"method": "ft", "edits": 3},  # the lens before and after 3 FT edits per language
    "transfer": {"n_locality": 4, "ike": {"n_demonstrations": 2}},
    "neurons": {
        "attribution": {"steps": 5, "samples": 2},
        "text_tokens": 2000,
        "ablation_facts": 5,
        "min_facts": 1,
        "n_random": 1,
    },
    "probes": {"folds": 2, "inner_folds": 2, "min_class_facts": 2, "max_iter": 100},
    "relate": {"n_boot": 50, "n_perm": 20, "folds": 2},
}


def notebook_run(
    stages: Sequence[str],
    *,
    facts: int | None = None,
    model: str | None = None,
    out: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> PipelineResult:
    """The pipeline's ``stages`` (after ``data``, ``model`` and ``knowledge``) on a small
    subset, for the notebooks: ``facts`` (default ``$MLAKE_NB_FACTS``, else 10) of ``model``
    (default ``$MLAKE_NB_MODEL``, else mlake-tiny) into ``out`` (default ``$MLAKE_NB_OUT``,
    else ``runs/notebooks`` of the project the working directory is in), with
    :data:`NOTEBOOK_SETTINGS`.  The notebooks share one run folder and store, so each reuses
    what the others computed.
    """
    data = json.loads(json.dumps(NOTEBOOK_SETTINGS))
    n = facts or int(os.environ.get("MLAKE_NB_FACTS", "10"))
    data["data"] = {"facts": n}
    data["model"] = {"name": model or os.environ.get("MLAKE_NB_MODEL", "mlake-tiny")}
    wanted = ["data", "model", "knowledge", *stages]
    data["run"] = {"stages": [s for s in STAGES if s in wanted]}
    config = config_from_dict(data, source="notebook settings")
    folder = out or os.environ.get("MLAKE_NB_OUT") or _project_root() / "runs" / "notebooks"
    return run_pipeline(config, folder, log=log, bars=False)


def _project_root() -> Path:
    """The nearest folder at or above the working directory with a ``pyproject.toml`` (a
    notebook's kernel starts in ``notebooks/``), else the working directory."""
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return here
