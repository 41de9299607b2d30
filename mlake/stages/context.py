"""What every stage shares: the model's identity in result keys, fact selection, opening a
stage's run folder, and the subject-noise level of tracing and attribution patching."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlake_core.data.dataset import MlakeDataset
from mlake_core.errors import ConfigError
from mlake_core.models.adapter import ModelAdapter
from mlake_core.models.prompting import PromptTemplate
from mlake_core.provenance import stable_hash
from mlake_core.results.store import Run, open_run


def model_identity(adapter: ModelAdapter, path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a model's weights in a result key.

    A hub model is its id, revision and resolved commit.  A local folder is its resolved path
    and the size and modification time of each weight file (so retraining into the same
    folder gives new keys), plus the mlake-tiny training key when there is one.
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
    return ident


def select_fact_ids(
    dataset: MlakeDataset, facts: int | str, trained: Sequence[int] | None = None
) -> list[int]:
    """Facts to use: ``"trained"`` (a mlake-tiny's training facts), ``"all"``, or the first
    ``N`` of the default selection (trained facts when known, else all facts in order).

    Raises:
        ConfigError: ``trained`` for a model that records no training facts, or facts that
            are not in the dataset.
    """
    all_ids = [f.fact_id for f in dataset.facts]
    if facts == "all":
        return all_ids
    if facts == "trained" and trained is None:
        raise ConfigError(
            "--facts trained: this model records no training facts (only mlake-tiny does); "
            "use a number or 'all'"
        )
    base = list(trained) if trained is not None else all_ids
    missing = sorted(set(base) - set(all_ids))
    if missing:
        raise ConfigError(
            f"the model's training facts include ids not in MLaKE {dataset.version}: {missing[:5]}"
        )
    if facts == "trained":
        return base
    return base[: int(facts)]


def open_stage_run(
    kind: str,
    adapter: ModelAdapter,
    model_path: str | os.PathLike[str],
    dataset: MlakeDataset,
    fact_ids: Sequence[int],
    langs: Sequence[str],
    template: PromptTemplate,
    config: Any,
    results_dir: str | os.PathLike[str] | None,
    **extra_key: Any,
) -> Run:
    """Open the run of a stage keyed by the model, data, facts, languages, template and config
    (``None``: a stage without one; left out of the key) plus ``extra_key``, and mark it
    running with the same provenance (stages add their own meta fields after)."""
    key = {
        "model": model_identity(adapter, model_path),
        "data_version": dataset.version,
        "facts": stable_hash(list(fact_ids)),
        "n_facts": len(fact_ids),
        "langs": list(langs),
        "template": template.to_dict(),
        **({"config": config.to_dict()} if config is not None else {}),
        **extra_key,
    }
    run = open_run(kind, key, results_dir)
    run.write_meta(
        status="running",
        model=adapter.info.to_dict(),
        template=template.to_dict(),
        config=config.to_dict() if config is not None else None,
        data_version=dataset.version,
        fact_ids=list(fact_ids),
        langs=list(langs),
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
    from analysis.tracing.causal import embedding_noise_std
    from mlake_core.errors import MlakeError

    if run.has_json("noise"):
        return float(run.load_json("noise")["embedding_std"])
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
