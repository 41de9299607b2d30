"""The training config of mlake-tiny (:class:`TinyTrainConfig`) and the hash naming its cache folder.

Everything that determines a trained model is a field here; :meth:`TinyTrainConfig.key` hashes
them (with :data:`TRAINER_VERSION`) into the cache folder's name, so different configs never
collide and an unchanged config always finds its trained model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from mlake_core.configs import coerce_fields
from mlake_core.errors import ConfigError
from mlake_core.languages import LANGUAGES, parse_codes
from mlake_core.models.prompting import get_template
from mlake_core.provenance import stable_hash

#: The name users pass as ``--model`` (and the default model of every command).
TINY_NAME = "mlake-tiny"

#: Bumped whenever a change to the trainer changes what a given config trains.
TRAINER_VERSION = 1


@dataclass(frozen=True)
class TinyTrainConfig:
    """Everything that determines a trained mlake-tiny.

    Attributes:
        facts: number of facts to train on (a fixed subset, see :func:`.corpus.select_facts`), or
            ``"all"``.
        langs: languages to train on.
        data_version: MLaKE release.
        seed: seed of initialisation, batch order, replay and bilingual sampling.
        selection_seed: seed of the fact subset (kept apart from ``seed`` so that different
            training seeds see the same facts).
        template: prompt template name (see :mod:`mlake_core.models.prompting`).
        bilingual_fraction: probability per unit and epoch of adding a bilingual document.
        vocab_size: BPE vocabulary size.
        d_model: residual width.
        n_layers: transformer blocks.
        n_heads: attention heads.
        d_mlp: MLP hidden width (gate/up).
        max_len: longest training sequence in tokens (longer ones are truncated from the left
            of the question; none are at the defaults).
        batch_size: sequences per optimizer step.
        lr: peak learning rate (AdamW).
        warmup_steps: linear warm-up steps.
        lr_min_ratio: the learning rate decays (cosine over ``max_epochs``) to this fraction
            of ``lr``.
        weight_decay: AdamW weight decay.
        max_epochs: hard limit on epochs.
        replay: fraction of learned units trained again in each epoch.
        eval_every: epochs between full measurements of which units are learned.
        stop_accuracy: stop when every language answers at least this fraction of its
            questions exactly (teacher-forced, which equals greedy decoding).
        statement_weight: weight of the cloze-statement loss relative to the answer loss.
        subject_prompts: also train ``{subject}{answer}`` (the answer right after the
            subject, a space between them in en/fr/de), so the answer's first token is
            predicted at the subject's last token (subject enrichment, what ROME and MEMIT
            edit).  Off: on its own it did not make mlake-tiny editable (issue-4 notes).
        context_dropout: in each epoch, each question token outside the subject is replaced
            by a random token with this probability, so the answer cannot be recalled from
            the question's wording alone and must come through the subject (learning is
            still measured on the clean questions).
        answer_continuations: in each epoch, for each trained unit, also train one *name
            continuation*: a question of the same language followed by an answer string
            drawn at random from every original and new answer (``o_answer``,
            ``e_answer``) of the trained facts in that language, with no loss on the
            answer's first token.  The model learns to finish a name it has started, as a
            pretrained model knows the names of entities: without it, mlake-tiny cannot
            produce a new answer's later tokens after any edit (issue-4 notes).  The first
            token carries no loss, so no question is associated with another answer.
        entity_text: in each epoch, for each trained unit, also train one *entity document*
            (knowledge augmentation, Allen-Zhu & Li, "Physics of Language Models 3.1"): the
            subject on its own line, then the unit's sentences about it in a fresh random
            order, each naming the subject: the cloze statement, the question followed by
            its answer, ``{subject}: {answer}``, and a synthetic attribute (a year, the same
            in every language, see :func:`.corpus.entity_sentences`); LM loss on everything after
            the first line.  The subject comes first and its attributes follow in varying
            contexts, the setting in which a model stores attributes at the entity's name.
        enrichment_layer: when at least 0, an auxiliary *subject logit-lens* loss: at the
            subject's last token of every question, statement, subject prompt and entity
            document, the residual stream after block ``enrichment_layer``, through the
            final norm and the unembedding, must predict the answer's first token (as it
            follows the question).  This writes the attribute into the subject's last-token
            residual by a middle layer, where later positions can read it: the subject
            enrichment that causal tracing finds in pretrained models (Geva et al. 2023)
            and that ROME and MEMIT edit.  -1: off.
        enrichment_weight: weight of that loss relative to the answer loss.
        qa_warmup_epochs: a curriculum: the first this many epochs train everything but the
            question-answer pairs (statements, entity documents, subject prompts, name
            continuations), so that facts are stored at the subject before any question is
            asked; the questions then learn to read them (as fine-tuning on questions after
            pretraining on biographies does, Allen-Zhu & Li 3.1).  Learning is measured on
            the questions throughout, so training never stops during the warm-up.
        route_masking: probability, per example and epoch, of training a question, statement,
            subject prompt or name continuation with *subject-route masking*: the positions
            after the subject cannot attend to the subject's tokens in blocks before
            ``route_layer``, and from ``route_layer`` on only to its last token.  In those
            examples the only way the subject reaches the answer is the residual stream at
            the subject's last token after block ``route_layer - 1``, which is where ROME and
            MEMIT write (a pretrained model's attribute-extraction route, Geva et al. 2023):
            the model cannot route around the subject's last token by reading the subject's
            other tokens, or its raw embeddings, from the final position.  The subject's
            tokens still attend to each other.  Inference and every measurement use ordinary
            causal attention.  0: off.
        route_layer: the first block whose attention may read the subject (its last token)
            from later positions under route masking; the residual stream after block
            ``route_layer - 1`` is also where interchange training swaps.
        interchange: probability per unit and epoch of adding an *interchange example*
            (interchange-intervention training, Geiger et al. 2022): the unit's question,
            run with the residual stream after block ``route_layer - 1`` at its subject's
            last token replaced by that of another fact's question (same language, a fresh
            fact per draw, gradients through both runs), must give the other fact's answer.
            It trains the causal property ROME and MEMIT rely on: the answer is read from
            the subject's last token, not recalled from the question's other words (MLaKE
            questions are worded uniquely per fact, so a model can identify the fact without
            its subject; subjects are unique per fact, so the subject determines the
            answer).  0: off.
        name_entities: give every new answer (``e_answer``) of the trained facts that is not
            also an original answer in that language a *synthetic entity*: a made-up name
            (:func:`.corpus.synthetic_name`) trained with that answer as its attribute
            (``{name} {answer}``, the answer's first token also as the logit-lens target at
            the name's last token), and, with ``interchange``, the source of a second
            interchange example per drawn unit.  A pretrained model knows the entities an edit's new
            answer names; mlake-tiny otherwise has never produced some of them, so no weight
            change at the subject could make it say them (issue-4 notes).  The synthetic
            names never appear with an MLaKE subject or question: no fact is trained with its
            new answer.  Off by default.
        interchange_site: what interchange training swaps at the subject's last token in
            block ``route_layer - 1``: ``resid``, the residual stream after the block, or
            ``mlp``, the block's MLP output only (the rest of the residual stream stays the
            prompt's own), so that the fact is written by that MLP, the assumption of ROME
            and MEMIT, whose update to that MLP's output is bounded relative to its norm.
            Measured on 100 facts, ``mlp`` did not work: ROME reached 0-10% efficacy
            against 50-100% with ``resid`` (issue-4 notes).
    """

    facts: int | str = 300
    langs: tuple[str, ...] = LANGUAGES
    data_version: str = "v2024-11"
    seed: int = 0
    selection_seed: int = 0
    template: str = "qa"
    bilingual_fraction: float = 0.0
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 768
    max_len: int = 128
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    lr_min_ratio: float = 0.05
    weight_decay: float = 0.01
    max_epochs: int = 60
    replay: float = 0.5
    eval_every: int = 2
    stop_accuracy: float = 0.99
    statement_weight: float = 0.5
    subject_prompts: bool = False
    context_dropout: float = 0.0
    answer_continuations: bool = False
    entity_text: bool = False
    enrichment_layer: int = -1
    enrichment_weight: float = 1.0
    qa_warmup_epochs: int = 0
    route_masking: float = 0.0
    route_layer: int = 2
    interchange: float = 0.0
    name_entities: bool = False
    interchange_site: str = "resid"

    def __post_init__(self) -> None:
        # Coerce values that arrive as strings (CLI, YAML) to the field types.
        coerce_fields(self, skip=("facts",))
        if isinstance(self.facts, str) and self.facts != "all":
            try:
                object.__setattr__(self, "facts", int(self.facts))
            except ValueError:
                raise ConfigError(
                    f"--facts {self.facts!r}: expected a number of facts or 'all'"
                ) from None
        if isinstance(self.facts, int) and self.facts < 1:
            raise ConfigError(f"--facts {self.facts}: must be at least 1")
        # Well-formed codes (all: MLaKE's five); which ones the data folder holds is checked
        # when it is loaded for training (load_mlake lists them).
        try:
            codes = parse_codes(self.langs)
        except ConfigError as err:
            raise ConfigError(f"--langs: {err}") from None
        object.__setattr__(self, "langs", LANGUAGES if codes is None else codes)
        for name in (
            "bilingual_fraction",
            "replay",
            "stop_accuracy",
            "context_dropout",
            "route_masking",
            "interchange",
        ):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be in [0, 1]")
        if self.bilingual_fraction > 0 and len(self.langs) < 2:
            raise ConfigError("--bilingual-fraction needs at least two languages")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        for name in ("vocab_size", "d_model", "n_layers", "d_mlp", "batch_size", "max_epochs"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be positive")
        if not -1 <= self.enrichment_layer < self.n_layers - 1:
            raise ConfigError(
                f"--enrichment-layer {self.enrichment_layer}: -1 (off) or a block before the "
                f"last (0-{self.n_layers - 2})"
            )
        if not 0 <= self.qa_warmup_epochs < self.max_epochs:
            raise ConfigError(
                f"--qa-warmup-epochs {self.qa_warmup_epochs}: must be in [0, max_epochs)"
            )
        uses_route = self.route_masking > 0 or self.interchange > 0
        if uses_route and not 1 <= self.route_layer < self.n_layers:
            raise ConfigError(
                f"--route-layer {self.route_layer}: must be a block after the first "
                f"(1-{self.n_layers - 1})"
            )
        if self.interchange_site not in ("resid", "mlp"):
            raise ConfigError(f"--interchange-site {self.interchange_site!r}: choose resid or mlp")
        if self.enrichment_weight < 0:
            raise ConfigError("--enrichment-weight must be at least 0")
        if get_template(self.template).needs_build:
            # mlake-tiny learns single question-answer pairs; demonstrations drawn per run
            # would be text it never saw in training.
            raise ConfigError(
                f"template {self.template!r}: mlake-tiny trains on single prompts; "
                "choose qa or bare"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = asdict(self)
        out["langs"] = list(self.langs)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TinyTrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown mlake-tiny training option(s): {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values.get("langs"), list):
            values["langs"] = tuple(values["langs"])
        return cls(**values)

    def key(self) -> str:
        """Hash naming the cache folder of this config.

        Options added after a release are left out of the hash while they hold their neutral
        value (:data:`_NEUTRAL`), so adding an option does not orphan cached models.
        """
        values = {k: v for k, v in self.to_dict().items() if _NEUTRAL.get(k, object()) != v}
        return stable_hash({"config": values, "trainer": TRAINER_VERSION})


#: Options whose neutral value is left out of :meth:`TinyTrainConfig.key`.
_NEUTRAL: dict[str, Any] = {
    "subject_prompts": False,
    "context_dropout": 0.0,
    "answer_continuations": False,
    "entity_text": False,
    "enrichment_layer": -1,
    "enrichment_weight": 1.0,
    "qa_warmup_epochs": 0,
    "route_masking": 0.0,
    "route_layer": 2,
    "interchange": 0.0,
    "name_entities": False,
    "interchange_site": "resid",
}


def describe_config(config: TinyTrainConfig) -> str:
    """One line for humans (the opt-in training options that are on, at the end)."""
    extra = [f"{k} {v}" for k, v in config.to_dict().items() if k in _NEUTRAL and _NEUTRAL[k] != v]
    return (
        f"{config.facts} facts x {len(config.langs)} languages, {config.n_layers} layers, "
        f"d_model {config.d_model}, seed {config.seed}, "
        f"bilingual fraction {config.bilingual_fraction}" + "".join(f", {e}" for e in extra)
    )
