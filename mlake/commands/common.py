"""Options shared by every command that needs a model, and how they become an adapter.

``--model`` takes a local checkpoint folder, a Hugging Face hub id, or ``mlake-tiny`` (the
default): the model mlake trains on MLaKE itself, trained first if it is not cached
(:mod:`mlake_core.models.mlake_tiny`).  ``--template`` defaults to the template a model was
trained with (mlake-tiny records it), else ``qa``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlake_core.errors import ConfigError


def add_model_args(parser: argparse.ArgumentParser, *, template: bool = True) -> None:
    """Add ``--model``, ``--backend``, ``--device``, ``--dtype``, ``--revision``,
    ``--trust-remote-code`` (and ``--template``) to ``parser``."""
    from mlake_core.models.loading import BACKENDS, DTYPES
    from mlake_core.models.mlake_tiny import TINY_NAME

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        help=f"local checkpoint folder, Hugging Face hub id, or {TINY_NAME} (default: "
        f"{TINY_NAME}, trained on MLaKE first if it is not cached), or the variant "
        "mlake-tiny-editable (trained for weight edits at the subject)",
    )
    group.add_argument("--backend", default="tlens", choices=BACKENDS, help="default: tlens")
    group.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda:N")
    group.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="default: float32")
    group.add_argument("--revision", default=None, help="hub branch, tag or commit")
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow modelling code shipped with the checkpoint",
    )
    if template:
        from mlake_core.models.prompting import TEMPLATES

        group.add_argument(
            "--template",
            default=None,
            choices=tuple(TEMPLATES),
            help="prompt template (default: the one the model was trained with, else qa)",
        )


def add_data_args(
    parser: argparse.ArgumentParser, *, facts_default: str | None, facts_help: str
) -> None:
    """Add ``--langs``, ``--facts``, ``--version`` and ``--data-dir``."""
    from mlake_core.data.paths import DEFAULT_VERSION, RELEASES

    data = parser.add_argument_group("data")
    data.add_argument("--langs", default="en,zh,ja,fr,de", help="comma-separated languages")
    data.add_argument("--facts", default=facts_default, help=facts_help)
    data.add_argument("--version", default=DEFAULT_VERSION, choices=tuple(RELEASES))
    data.add_argument("--data-dir", default=None, help="MLaKE data directory")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--batch-size``, ``--results-dir`` and ``--json``."""
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    run.add_argument("--results-dir", default=None, help="results root (default: ./runs)")
    run.add_argument("--json", action="store_true", help="print JSON instead of a table")


def check_run_args(args: argparse.Namespace) -> None:
    """Validate the options of :func:`add_run_args` (before any model is loaded)."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")


def log(message: str) -> None:
    """A progress line on stderr (stdout stays clean for tables and JSON)."""
    print(f"mlake: {message}", file=sys.stderr, flush=True)


def resolve_model_path(model: str | None, data_dir: str | None = None) -> str:
    """What to load for ``--model``: ``mlake-tiny`` (or nothing) becomes the cached folder of
    the default mlake-tiny, and another variant's name (``mlake-tiny-editable``, see
    :data:`~mlake_core.models.mlake_tiny.VARIANTS`) that variant's, trained first when
    missing."""
    from mlake_core.models.mlake_tiny import TINY_NAME, VARIANTS, ensure_tiny, variant_config

    if model is None or model in VARIANTS:
        config = variant_config(model or TINY_NAME)
        return str(
            ensure_tiny(config, data_dir=data_dir, progress=log, show_bar=sys.stderr.isatty())
        )
    return model


@dataclass
class LoadedModel:
    """An adapter with how it was asked for."""

    adapter: Any
    name: str  # what the user passed (or mlake-tiny)
    path: str  # what was loaded
    template: Any  # PromptTemplate
    tiny_metadata: dict[str, Any] | None


def load_model(args: argparse.Namespace) -> LoadedModel:
    """Load the model named by the shared options (see :func:`add_model_args`)."""
    from mlake_core.models.loading import load_adapter
    from mlake_core.models.mlake_tiny import TINY_NAME, read_metadata
    from mlake_core.models.prompting import DEFAULT_TEMPLATE, get_template

    path = resolve_model_path(args.model, getattr(args, "data_dir", None))
    adapter = load_adapter(
        path,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
    )
    meta = read_metadata(path) if Path(path).is_dir() else None
    trained = get_template(str(meta["config"]["template"])) if meta else None
    chosen = getattr(args, "template", None)
    if chosen is not None:
        template = get_template(chosen)
        if trained is not None and trained.name != template.name:
            log(
                f"warning: --template {chosen} differs from the template {trained.name!r} the "
                "model was trained with"
            )
    else:
        template = trained or get_template(DEFAULT_TEMPLATE)
    name = args.model or TINY_NAME
    return LoadedModel(adapter=adapter, name=name, path=path, template=template, tiny_metadata=meta)


def parse_facts(value: str) -> int | str:
    """``--facts``: a positive number, ``all``, or ``trained`` (mlake-tiny's training facts)."""
    if value in ("all", "trained"):
        return value
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--facts {value!r}: expected a number, 'all' or 'trained'") from None
    if n < 1:
        raise ConfigError(f"--facts {value}: must be at least 1")
    return n


@dataclass
class FactsAndKnowledge:
    """The data a per-fact command works on.

    Attributes:
        dataset: MLaKE in the asked languages.
        pool: the default fact selection (mlake-tiny's training facts, else all facts).
        fact_ids: the ``--facts`` asked for (the first N of ``pool``).
        knowledge: what the model knows about ``pool`` (knowledge stage, cached).
        knowledge_run: the knowledge stage's run folder.
    """

    dataset: Any
    pool: list[int]
    fact_ids: list[int]
    knowledge: Any
    knowledge_run: str | None = None


def facts_and_knowledge(
    args: argparse.Namespace,
    loaded: LoadedModel,
    langs: Sequence[str],
    facts_option: int | str,
    knowledge_config: Any = None,
) -> FactsAndKnowledge:
    """Load MLaKE, select the facts, and measure (or load) what the model knows about the
    whole pool, as editing, tracing and neuron attribution need (facts unknown before are
    reported separately or skipped)."""
    from mlake.stages.context import select_fact_ids
    from mlake.stages.knowledge import knowledge_stage
    from mlake_core.data.dataset import load_mlake
    from mlake_core.metrics.knowledge import KnowledgeConfig

    dataset = load_mlake(args.data_dir, version=args.version, langs=langs)
    trained = loaded.tiny_metadata["fact_ids"] if loaded.tiny_metadata else None
    pool = select_fact_ids(dataset, "trained" if trained else "all", trained)
    fact_ids = pool if facts_option in ("all", "trained") else pool[: int(facts_option)]
    knowledge, run = knowledge_stage(
        loaded.adapter,
        loaded.path,
        dataset,
        pool,
        langs,
        loaded.template,
        knowledge_config or KnowledgeConfig(mcqa=False),
        batch_size=args.batch_size,
        results_dir=args.results_dir,
        log=log,
    )
    return FactsAndKnowledge(dataset, pool, fact_ids, knowledge, str(run.path))
