"""Named mlake-tiny variants: the training options each sets and the edit settings it takes.

A variant is what users name with ``--model`` (trained on first use) or ``mlake models
train-tiny --variant``.  Its edit settings are the one definition of how mlake edits it: ``mlake
edit transfer`` and the pipeline read them through
:func:`~mlake_core.models.mlake_tiny.edit_settings.recommended_edit_settings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlake_core.errors import ConfigError
from mlake_core.models.mlake_tiny.config import TINY_NAME, TinyTrainConfig

#: The variant trained so that weight edits at the subject work.
EDITABLE_NAME = "mlake-tiny-editable"


@dataclass(frozen=True)
class Variant:
    """A named mlake-tiny.

    Attributes:
        name: what users pass as ``--model`` or ``--variant``.
        options: the training options it sets on top of :class:`TinyTrainConfig`'s defaults.
        edit_settings: the settings its models take per edit method, ``{method: {field:
            value}}`` with values as ``--set`` strings.  In a value, ``{site}`` stands for the
            block after which a model trained with interchange reads its subject
            (``route_layer - 1`` of that model's config) and ``{through_site}`` for the blocks
            0 to ``{site}`` (MEMIT's ``layers``).
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    edit_settings: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def config(self, **overrides: Any) -> TinyTrainConfig:
        """The training config of this variant, with ``overrides`` (field name to value,
        strings coerced); an unknown field is a :class:`~mlake_core.errors.ConfigError`."""
        return TinyTrainConfig.from_dict({**self.options, **overrides})


#: FT on mlake-tiny: with the library defaults (lr 1e-3, 40 steps, norm 0.05) FT changes
#: nothing on it; these reach about 90% efficacy at layer 0 (README "Editing").
_FT = {"lr": "0.01", "steps": "100", "max_rel_norm": "0.3"}

#: ROME's and MEMIT's ``δ`` on a model trained with interchange: it must move the residual at
#: the subject's last token (about ten times the MLP output's norm) towards another subject's
#: state, through attention that opens only for subject-like states, so a large norm bound,
#: more and larger steps, a start at the mean subject state and restarts (issue 4's notes: with
#: ROME's defaults, 0-10% efficacy).
_DELTA = {"clamp_norm": "100", "steps": "200", "lr": "2", "init": "subject-mean", "restarts": "3"}

#: The named variants, by name.  ``mlake-tiny-editable`` is trained so that weight edits at the
#: subject work (issue-4 notes, README "Editing"): its facts are read from the residual stream
#: at the subject's last token after block ``route_layer - 1`` (1), as ROME and MEMIT assume,
#: so ROME and FT edit that block and MEMIT the blocks up to it; MEMIT's key statistics weigh
#: less (``mom2_weight`` 0.01) because the model has seen little text.
VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant(TINY_NAME, options={}, edit_settings={"ft": {"layer": "0", **_FT}}),
        Variant(
            EDITABLE_NAME,
            options={
                "answer_continuations": True,
                "enrichment_layer": 1,
                "route_layer": 2,
                "interchange": 1.0,
                "name_entities": True,
            },
            edit_settings={
                "rome": {"layer": "{site}", **_DELTA},
                "memit": {"layers": "{through_site}", **_DELTA, "mom2_weight": "0.01"},
                "ft": {"layer": "{site}", **_FT},
            },
        ),
    )
}


def variant_config(name: str, **overrides: Any) -> TinyTrainConfig:
    """The training config of the named variant (:data:`VARIANTS`), with ``overrides``
    (field name to value, strings coerced); an unknown name or field is a
    :class:`~mlake_core.errors.ConfigError` naming the known ones."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown mlake-tiny variant {name!r}: choose from {', '.join(VARIANTS)}")
    return VARIANTS[name].config(**overrides)


def variant_of(config: Mapping[str, Any]) -> Variant:
    """The variant whose edit settings a model trained with ``config`` (a recorded
    :meth:`TinyTrainConfig.to_dict`, possibly partial or from an older release) takes.

    Any model trained with interchange (positive ``interchange``) takes mlake-tiny-editable's,
    whatever its other options: what they rely on is that the model reads its subject where
    interchange swapped, at ``route_layer - 1`` of its own config.  Every other model takes
    mlake-tiny's.
    """
    trained_with_interchange = float(config.get("interchange", 0.0)) > 0
    return VARIANTS[EDITABLE_NAME if trained_with_interchange else TINY_NAME]
