"""Loading the model a command or the pipeline names (:class:`~mlake.settings.ModelSettings`).

``mlake-tiny`` and its variants (``mlake-tiny-editable``) are the models mlake trains on MLaKE
itself: the name becomes the cached folder, trained first when missing
(:mod:`mlake_core.models.mlake_tiny`).  Any other name is a local folder or a hub id
(:func:`~mlake_core.models.loading.load_adapter`).  The prompt template defaults to the one
the model was trained with (mlake-tiny records it), else ``fewshot`` (base models need worked
examples in the prompt; :mod:`mlake_core.models.prompting`).  A few-shot template comes back
unbuilt: its demonstrations are drawn when the run's data and facts are known
(:func:`mlake.session.prepare_template`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlake.settings import ModelSettings
from mlake_core.models.adapter import ModelAdapter
from mlake_core.models.prompting import PromptTemplate


def _stderr(message: str) -> None:
    print(f"mlake: {message}", file=sys.stderr, flush=True)


def resolve_model_path(
    name: str | None,
    data_dir: str | None = None,
    log: Callable[[str], None] | None = None,
) -> str:
    """What to load for a model name: a mlake-tiny variant's name (or nothing: the default
    mlake-tiny) becomes its cached folder, trained first when missing; anything else is
    returned as it is (a folder or a hub id)."""
    from mlake_core.models.mlake_tiny import TINY_NAME, VARIANTS, ensure_tiny, variant_config

    if name is None or name in VARIANTS:
        config = variant_config(name or TINY_NAME)
        return str(
            ensure_tiny(
                config, data_dir=data_dir, progress=log or _stderr, show_bar=sys.stderr.isatty()
            )
        )
    return name


@dataclass
class LoadedModel:
    """An adapter with how it was asked for.

    Attributes:
        adapter: the model.
        name: what the user named (``mlake-tiny``, a folder, a hub id).
        path: what was loaded (a mlake-tiny's cached folder).
        template: the prompt template of every stage (a few-shot one unbuilt until
            :func:`mlake.session.prepare_template` draws its demonstrations for the run).
        tiny_metadata: a mlake-tiny's training record (training facts, config), else ``None``.
    """

    adapter: ModelAdapter
    name: str
    path: str
    template: PromptTemplate
    tiny_metadata: dict[str, Any] | None

    @property
    def trained_facts(self) -> list[int] | None:
        """The facts the model was trained on, when it records them (mlake-tiny)."""
        if not self.tiny_metadata:
            return None
        return [int(f) for f in self.tiny_metadata["fact_ids"]]


def load_model(
    settings: ModelSettings,
    *,
    data_dir: str | None = None,
    log: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load the model ``settings`` name (module docstring).

    Raises:
        ConfigError, DataError: an unknown backend or dtype, a folder that is not a model, a
            hub id that is not cached offline (the message names it).
    """
    from mlake_core.models.loading import load_adapter
    from mlake_core.models.mlake_tiny import read_metadata
    from mlake_core.models.prompting import BASE_MODEL_TEMPLATE, get_template

    say = log or _stderr
    path = resolve_model_path(settings.name, data_dir, say)
    adapter = load_adapter(
        path,
        backend=settings.backend,
        device=settings.device,
        dtype=settings.dtype,
        trust_remote_code=settings.trust_remote_code,
        revision=settings.revision,
    )
    adapter.edit_apply = settings.edit_apply  # how EditResult.applied applies an edit
    if settings.remote:  # every pass on NDIF (ModelSettings asks for the nnsight backend)
        from mlake_core.models.nnsight_backend import NNsightAdapter

        if isinstance(adapter, NNsightAdapter):
            adapter.remote = True
    meta = read_metadata(path) if Path(path).is_dir() else None
    trained = get_template(str(meta["config"]["template"])) if meta else None
    if settings.template is not None:
        template = get_template(settings.template)
        if trained is not None and trained.name != template.name:
            say(
                f"warning: --template {settings.template} differs from the template "
                f"{trained.name!r} the model was trained with"
            )
    else:
        template = trained or get_template(BASE_MODEL_TEMPLATE)
    return LoadedModel(
        adapter=adapter, name=settings.name, path=path, template=template, tiny_metadata=meta
    )
