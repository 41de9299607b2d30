"""The pipeline: every stage on one model, one run folder.

``mlake pipeline`` (and :func:`run_pipeline`) runs, in order:

1. ``data``: load MLaKE, check it (:func:`~mlake_core.data.stats.dataset_stats`: subjects
   located, cloze prompts well-posed, multi-hop links) and select the facts;
2. ``model``: load the model (mlake-tiny is trained first when it is not cached);
3. ``knowledge``: what the model knows in each language, on the selected facts and the
   transfer stage's locality sample;
4. ``tracing``: causal tracing of the selected facts (it runs before editing so that an edit
   layer ``auto`` can take the layer tracing recommends);
5. ``lens``: the latent-language lens of the selected facts the model knows (per prompt
   language, the answer written in every language, layer by layer: :mod:`analysis.lens`);
6. ``patching``: cross-lingual activation patching of the known facts (5x5 follow matrices per
   layer and position, and whether an edit's state carries it into another language:
   :mod:`analysis.patching`);
7. ``transfer``: edit transfer, one run per editing method;
8. ``neurons``: neuron attribution, language-specific and shared units, ablation matrix;
9. ``restricted``: FT restricted to the shared / random neurons found in step 8;
10. ``probes``: language-identity and cross-lingual probes (skipped, with a note, when the
   ``probes`` package is not installed);
11. ``relate``: sharing against transfer, for each transfer method;
12. ``figures`` and ``report``: every figure (PDF and PNG) and ``report.md``.

Every stage is one of :mod:`mlake.stages`' stage functions (or
:func:`mlake.stages.relate.relate_stage`), which cache their result in the results store keyed by
everything that determines it and save each fact as it finishes: a stopped pipeline, run
again with the same config, reloads the finished stages and facts and computes only the rest.

The run folder (``--out``)::

    config.yaml      the resolved config (every setting, defaults filled in)
    provenance.json  package versions, git commit, seeds, command line, machine
    manifest.json    per stage: status, seconds, the stage's run folder in the store
    store/           the results store (unless ``run.results_dir`` points elsewhere)
    figures/         every figure as PDF and PNG (``mlake figures`` redraws them)
    report.md        the key tables and the figures
    replaced-<time>/ what a run of another config left here (set aside, not deleted)

Running again into the same folder with the same config (other stages, batch size or store
allowed) continues the run.  With another config, the old run's report, figures and records
are first moved into ``replaced-<time>/``, so that nothing of it stands beside the new
config; the results store is kept.

The config (:class:`PipelineConfig`) is a tree of frozen dataclasses, one section per stage,
reusing each stage's own config dataclass.  :func:`load_config` reads it from YAML, rejecting
unknown keys (naming the key path and the file) and coercing values through the dataclasses.
The defaults (``mlake/pipeline_default.yaml`` documents them) are chosen so that the
default pipeline on mlake-tiny finishes within 15 minutes on two CPU cores.
"""

from mlake.pipeline.config import (
    DEFAULT_CONFIG_FILE,
    STAGES,
    PipelineConfig,
    config_from_dict,
    dump_config,
    load_config,
    with_overrides,
)
from mlake.pipeline.manifest import StageRecord, read_manifest
from mlake.pipeline.run import NOTEBOOK_SETTINGS, PipelineResult, notebook_run, run_pipeline
from mlake.pipeline.steps import StageSkipped

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "NOTEBOOK_SETTINGS",
    "STAGES",
    "PipelineConfig",
    "PipelineResult",
    "StageRecord",
    "StageSkipped",
    "config_from_dict",
    "dump_config",
    "load_config",
    "notebook_run",
    "read_manifest",
    "run_pipeline",
    "with_overrides",
]
