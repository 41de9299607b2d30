"""``mlake-tiny``: the small model mlake trains on MLaKE itself, for offline work.

When no pretrained multilingual model can be downloaded, every analysis still needs a model
that *knows* MLaKE facts in all five languages.  mlake-tiny is that model: a Llama-style
Hugging Face causal LM and a byte-level BPE tokenizer, both trained from scratch here on the
single-hop facts, saved like any checkpoint and loaded by both backends.

Training data, for each selected fact and language (the *unit* of training):

* a question-answer pair in the model's prompt template (``Q: {question}\\nA: {answer}</s>``),
  with the loss on the answer tokens and the end-of-sequence token only: the model must map
  questions to answers, not learn to write questions;
* the cloze statement (``o_prompt``, the fact as a sentence), with the loss on every token;
* optionally, with probability :attr:`TinyTrainConfig.bilingual_fraction` per unit, a
  *bilingual document*: the question-answer pair followed by the same fact's pair in another
  language (chosen at random) in one context.  This is the knob for studying how
  cross-lingual sharing arises; the fraction is recorded in the metadata.

Memorisation, not language modelling, is the goal, and plain next-token training learns
Chinese and Japanese facts far more slowly than the others (longer byte-level answers).
So training is designed for it:

* answer-only loss on the question-answer pairs (above);
* every epoch trains on every unit whose question is not yet answered exactly (teacher-forced
  argmax of every answer token and EOS equals the target, which is what greedy decoding
  produces), plus a random :attr:`~TinyTrainConfig.replay` fraction of the learned units so
  they are not forgotten; the status of every unit is re-measured on all units every
  :attr:`~TinyTrainConfig.eval_every` epochs;
* training stops once every language reaches :attr:`~TinyTrainConfig.stop_accuracy` on that
  full measurement, or after :attr:`~TinyTrainConfig.max_epochs`.

The default facts are a fixed, documented subset: :attr:`TinyTrainConfig.facts` (300) facts
drawn with a fixed selection seed (0) from those whose question form has a located subject in
all five languages, sorted by id.  ``facts="all"`` trains on all 1072.

Named variants (:data:`VARIANTS`) start from other options: ``mlake-tiny-editable`` adds
interchange training at the subject's last token and synthetic name entities for every new
answer, so that ROME and MEMIT can edit it (``--variant``; ``--set FIELD=VALUE`` sets any
option of :class:`TinyTrainConfig`).

Everything is deterministic for a seed on a given machine (initialisation, batch order, replay
sampling, bilingual pairing).  The folder holds ``config.json``, ``model.safetensors``,
``generation_config.json``, the tokenizer files and ``mlake_tiny.json`` (the training config,
data version, seed, fact ids, prompt template, per-language training accuracy, training
time, parameter count, package versions and git commit).  It lives in the cache folder
(:func:`cache_dir`) under a name derived from a hash of the training config, so different
configs never collide; a training run checkpoints every epoch and resumes after a crash.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from mlake_core.configs import coerce_fields
from mlake_core.data.dataset import MlakeDataset
from mlake_core.errors import ConfigError
from mlake_core.languages import LANGUAGES, UNSPACED
from mlake_core.models.prompting import PromptTemplate, get_template
from mlake_core.provenance import git_commit, package_versions, stable_hash

#: The name users pass as ``--model`` (and the default model of every command).
TINY_NAME = "mlake-tiny"

#: Environment variable naming the cache folder.
CACHE_ENV = "MLAKE_CACHE"

#: Bumped whenever a change to this module changes what a given config trains.
TRAINER_VERSION = 1

#: Name of the metadata file written next to the weights.
METADATA_FILE = "mlake_tiny.json"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


@dataclass(frozen=True)
class TinyTrainConfig:
    """Everything that determines a trained mlake-tiny.

    Attributes:
        facts: number of facts to train on (a fixed subset, see the module docstring), or
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
            in every language, see :func:`entity_sentences`); LM loss on everything after
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
            (:func:`synthetic_name`) trained with that answer as its attribute
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
        if isinstance(self.langs, str):
            from mlake_core.languages import parse_langs

            object.__setattr__(self, "langs", parse_langs(self.langs))
        object.__setattr__(self, "langs", tuple(self.langs))
        bad = [lang for lang in self.langs if lang not in LANGUAGES]
        if bad or not self.langs:
            raise ConfigError(f"--langs {','.join(self.langs)}: choose from {', '.join(LANGUAGES)}")
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
        get_template(self.template)

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


#: Named mlake-tiny variants (``--model NAME``): the training options each sets on top of the
#: defaults.  ``mlake-tiny-editable`` is trained so that weight edits at the subject work
#: (issue-4 notes, README "Editing"): its facts are read from the residual stream at the
#: subject's last token after block 1, as ROME and MEMIT assume.
VARIANTS: dict[str, dict[str, Any]] = {
    TINY_NAME: {},
    "mlake-tiny-editable": {
        "answer_continuations": True,
        "enrichment_layer": 1,
        "route_layer": 2,
        "interchange": 1.0,
        "name_entities": True,
    },
}


def variant_config(name: str, **overrides: Any) -> TinyTrainConfig:
    """The training config of the named variant (:data:`VARIANTS`), with ``overrides``
    (field name to value, strings coerced); an unknown name or field is a
    :class:`~mlake_core.errors.ConfigError` naming the known ones."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown mlake-tiny variant {name!r}: choose from {', '.join(VARIANTS)}")
    return TinyTrainConfig.from_dict({**VARIANTS[name], **overrides})


# -- cache ------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """mlake's cache folder: ``$MLAKE_CACHE``, else ``$XDG_CACHE_HOME/mlake``, else
    ``~/.cache/mlake``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mlake"


def model_dir(config: TinyTrainConfig, root: Path | None = None) -> Path:
    """Folder of the mlake-tiny trained with ``config``."""
    return (root or cache_dir()) / "models" / f"{TINY_NAME}-{config.key()}"


def is_trained(path: Path) -> bool:
    """Whether ``path`` holds a complete mlake-tiny (weights, tokenizer and metadata)."""
    return all(
        (path / name).is_file()
        for name in ("config.json", "model.safetensors", "tokenizer.json", METADATA_FILE)
    )


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``mlake_tiny.json`` of a model folder, or ``None`` for other models."""
    meta = Path(path) / METADATA_FILE
    if not meta.is_file():
        return None
    with meta.open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def recommended_edit_settings(path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """The edit-method settings a mlake-tiny model was trained for, as ``{method: {field:
    value}}`` (``mlake edit transfer`` applies them under ``--layer`` and ``--set``); ``{}``
    for other models and for mlake-tiny models trained without ``interchange``.

    A model trained with interchange at block ``route_layer - 1`` (mlake-tiny-editable)
    reads its subject from the residual stream there, so ROME and FT edit that layer and
    MEMIT the layers up to it.  The ``δ`` there must move that residual (about ten times the
    MLP output's norm) towards another subject's state, through attention that opens only for
    subject-like states: ``clamp_norm`` 100, 200 steps at ``lr`` 2, ``init: subject-mean`` and
    3 ``restarts`` (issue 4's notes: with ROME's defaults, 0-10% efficacy), and MEMIT's
    statistics weigh less (``mom2_weight`` 0.01) because the model has seen little text.  FT
    takes the settings that move mlake-tiny at all (``lr`` 0.01, 100 steps, ``max_rel_norm``
    0.3, as the pipeline's defaults).
    """
    meta = read_metadata(path)
    if meta is None or float(meta.get("config", {}).get("interchange", 0.0)) <= 0:
        return {}
    site = int(meta["config"].get("route_layer", 2)) - 1
    delta = {
        "clamp_norm": "100",
        "steps": "200",
        "lr": "2",
        "init": "subject-mean",
        "restarts": "3",
    }
    return {
        "rome": {"layer": str(site), **delta},
        "memit": {"layers": f"0-{site}" if site else "0", **delta, "mom2_weight": "0.01"},
        "ft": {"layer": str(site), "lr": "0.01", "steps": "100", "max_rel_norm": "0.3"},
    }


# -- data -------------------------------------------------------------------------------------


def select_facts(dataset: MlakeDataset, config: TinyTrainConfig) -> list[int]:
    """The fact ids mlake-tiny trains on (see the module docstring).

    Raises:
        ConfigError: when more facts are asked for than are eligible.
    """
    eligible = [
        fact.fact_id
        for fact in dataset.facts
        if all(fact.views[lang].question.usable for lang in config.langs)
    ]
    if config.facts == "all":
        return [fact.fact_id for fact in dataset.facts]
    n = int(config.facts)
    if n > len(eligible):
        raise ConfigError(
            f"--facts {n}: only {len(eligible)} facts have a located subject in "
            f"{','.join(config.langs)}; use --facts all for every fact"
        )
    return sorted(random.Random(config.selection_seed).sample(eligible, n))


def tokenizer_corpus(dataset: MlakeDataset) -> list[str]:
    """All MLaKE text of the loaded languages: questions, statements, answers and aliases
    (original and edited), multi-hop questions and answers."""
    texts: list[str] = []
    for fact in dataset.facts:
        for view in fact.views.values():
            rec = view.record
            texts += [rec.question, rec.o_prompt, rec.e_prompt, rec.o_answer, rec.e_answer]
            texts += list(rec.o_answer_aliases) + list(rec.e_answer_aliases)
    for questions in dataset.multi_hop.values():
        for mh in questions:
            texts += [mh.question, mh.answer]
    return texts


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """Train a byte-level BPE tokenizer (deterministic) and wrap it for transformers.

    Llama conventions: ``<s>`` is prepended by the tokenizer itself, ``</s>`` ends answers,
    ``<pad>`` pads.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, core.token_to_id(BOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )


@dataclass
class Example:
    """One training sequence: token ids and per-position loss weights.

    ``weights[i]`` weighs the loss of predicting ``ids[i]`` from ``ids[:i]`` (0: no loss).
    """

    ids: list[int]
    weights: list[float]
    unit: int  # index of the (fact, language) unit
    kind: str  # "qa", "statement" or "bilingual"
    droppable: tuple[int, ...] = ()  # question tokens outside the subject (context dropout)
    # (position, token): the residual after block ``enrichment_layer`` at ``position`` (the
    # subject's last token) must predict ``token`` (the answer's first token) through the
    # logit lens (TinyTrainConfig.enrichment_layer).
    lens: tuple[tuple[int, int], ...] = ()
    # (first, last): positions of the subject's first and last token, when located; the
    # route masking of TinyTrainConfig.route_masking applies to this example when ``masked``.
    route: tuple[int, int] | None = None
    masked: bool = False
    # Interchange training (TinyTrainConfig.interchange): (position here, source unit,
    # position in the source's question prompt): the residual after block route_layer - 1 at
    # the first position is replaced by the source prompt's at the second.
    swap: tuple[int, int, int] | None = None


@dataclass
class Corpus:
    """The training units and their sequences."""

    units: list[tuple[int, str]]  # (fact_id, lang)
    qa: list[Example]  # one per unit, same order
    statements: list[Example]  # one per unit, same order
    subjects: list[Example | None] = field(default_factory=list)  # subject-only QA, per unit
    pieces: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (prompt, answer)
    # Per language, every original and new answer of the trained facts (tokenized with the
    # template's answer prefix and EOS): the names of name-continuation examples.
    names: dict[str, list[list[int]]] = field(default_factory=dict)
    name_owners: dict[str, dict[tuple[int, ...], set[int]]] = field(default_factory=dict)
    by_lang: dict[str, list[int]] = field(default_factory=dict)  # units per language
    # Per unit, (subject, sentences) of its entity document (TinyTrainConfig.entity_text).
    entities: list[tuple[str, list[str]] | None] = field(default_factory=list)
    # Per unit, the logit-lens target of the subject's last token at the end of the entity
    # document's first line, ((position, token),).
    subject_lens: list[tuple[tuple[int, int], ...]] = field(default_factory=list)
    # Per unit, (first, last) subject token positions in the question prompt of ``pieces``;
    # then the same for each synthetic entity (TinyTrainConfig.name_entities), whose prompt
    # and answer follow the units' in ``pieces``.
    routes: list[tuple[int, int] | None] = field(default_factory=list)
    # Per language, the indices in ``pieces`` of its synthetic entities, and their examples.
    synthetic: dict[str, list[int]] = field(default_factory=dict)
    synthetic_examples: list[Example] = field(default_factory=list)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _last_token(tokenizer: Any, text: str, start: int, end: int) -> int | None:
    """Position (BOS counted) of the last token of ``text`` overlapping ``[start, end)``, as
    editing locates the subject (:func:`mlake_core.editing.base.subject_tokens`)."""
    span = _span_tokens(tokenizer, text, start, end)
    return span[1] if span else None


def _span_tokens(tokenizer: Any, text: str, start: int, end: int) -> tuple[int, int] | None:
    """Positions (BOS counted) of the first and last token of ``text`` overlapping
    ``[start, end)``; ``None`` when no token does."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    return (hits[0] + 1, hits[-1] + 1) if hits else None


#: Synthetic attribute of entity documents, per language: ``{s}`` the subject, ``{y}`` a year
#: drawn per fact (the same in every language).
YEAR_SENTENCES: dict[str, str] = {
    "en": "{s} was first recorded in {y}.",
    "zh": "{s}最早的记载见于{y}年。",
    "ja": "{s}は{y}年に初めて記録された。",
    "fr": "{s} est mentionné pour la première fois en {y}.",
    "de": "{s} wurde {y} zum ersten Mal erwähnt.",
}


def entity_sentences(view: Any) -> tuple[str, list[str]] | None:
    """The subject of a fact view's question and the sentences of its entity document (see
    :attr:`TinyTrainConfig.entity_text`), in a fixed order; ``None`` without a located
    subject.

    The sentences: the cloze statement (``o_prompt``); the question followed by the original
    answer; ``{subject}: {answer}``; and a synthetic year attribute (:data:`YEAR_SENTENCES`),
    drawn from 1500-2019 with the fact id as seed.
    """
    subject = view.question.subject_text
    if not subject or not subject.strip():
        return None
    subject = subject.strip()
    rec = view.record
    sep = "" if view.lang in UNSPACED else " "
    year = random.Random(view.fact_id).randrange(1500, 2020)
    sentences = [
        rec.o_prompt.strip(),
        f"{rec.question.strip()}{sep}{rec.o_answer}",
        f"{subject}: {rec.o_answer}",
        YEAR_SENTENCES[view.lang].format(s=subject, y=year),
    ]
    return subject, sentences


def entity_document(
    corpus: Corpus, unit: int, tokenizer: Any, rng: random.Random, max_len: int
) -> Example:
    """The entity document of ``unit`` for one epoch: ``<s>{subject}\n`` then its sentences
    in a random order (joined by a space in spaced languages), ``</s>``; LM loss on every
    token after the subject; the logit-lens target at the subject's last token."""
    entry = corpus.entities[unit]
    assert entry is not None
    subject, sentences = entry
    _, lang = corpus.units[unit]
    order = sentences[:]
    rng.shuffle(order)
    head = [tokenizer.bos_token_id, *_encode(tokenizer, subject)]
    body = _encode(tokenizer, "\n" + ("" if lang in UNSPACED else " ").join(order))
    ids = (head + body + [tokenizer.eos_token_id])[:max_len]
    weights = ([0.0] * len(head) + [1.0] * (len(ids) - len(head)))[:max_len]
    return Example(ids, weights, unit, "entity", lens=corpus.subject_lens[unit])


def build_corpus(
    dataset: MlakeDataset, fact_ids: Sequence[int], tokenizer: Any, config: TinyTrainConfig
) -> Corpus:
    """Tokenize the question-answer pairs and statements of every (fact, language) unit.

    Prompt and answer are tokenized separately and joined by ids (see
    :mod:`mlake_core.models.prompting`), exactly as the knowledge measurement does.
    """
    template = get_template(config.template)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    corpus = Corpus(units=[], qa=[], statements=[])
    for fact_id in fact_ids:
        fact = dataset.fact(fact_id)
        for lang in config.langs:
            view = fact.views[lang]
            unit = len(corpus.units)
            corpus.units.append((fact_id, lang))
            prompt_text, prefix = template.question_prompt(view.record.question)
            prompt = [bos, *_encode(tokenizer, prompt_text)]
            answer = [*_encode(tokenizer, prefix + view.record.o_answer), eos]
            corpus.pieces.append((prompt, answer))
            ids = (prompt + answer)[-config.max_len :]
            n_answer = len(answer)
            weights = [0.0] * (len(ids) - n_answer) + [1.0] * n_answer
            cut = len(prompt) + len(answer) - len(ids)
            droppable = tuple(
                i - cut for i in _context_tokens(tokenizer, prompt_text, view) if i - cut > 0
            )
            # The first answer token that is not blank (in zh/ja the answer prefix's space is a
            # token of its own, shared by every answer).
            answer_first = next((t for t in answer if tokenizer.decode([t]).strip()), answer[0])
            lens: tuple[tuple[int, int], ...] = ()
            route: tuple[int, int] | None = None
            span = view.question.subject
            q_start = prompt_text.find(view.record.question.strip())
            if span is not None and q_start >= 0 and view.question.text == view.record.question:
                found = _span_tokens(
                    tokenizer, prompt_text, q_start + span.start, q_start + span.end
                )
                if found is not None:
                    route = found
                    if found[1] - cut > 0:
                        lens = ((found[1] - cut, answer_first),)
            corpus.routes.append(route)
            qa_route = _shifted(route, cut)
            corpus.qa.append(Example(ids, weights, unit, "qa", droppable, lens, qa_route))
            statement = [bos, *_encode(tokenizer, view.record.o_prompt), eos][: config.max_len]
            sw = config.statement_weight
            s_lens: tuple[tuple[int, int], ...] = ()
            s_route: tuple[int, int] | None = None
            c_span, c_text = view.cloze.subject, view.cloze.text
            if c_span is not None and c_text and view.record.o_prompt.startswith(c_text):
                found = _span_tokens(tokenizer, view.record.o_prompt, c_span.start, c_span.end)
                if found is not None and found[1] < len(statement) - 1:
                    s_lens = ((found[1], answer_first),)
                    s_route = found
            corpus.statements.append(
                Example(
                    statement,
                    [0.0] + [sw] * (len(statement) - 1),
                    unit,
                    "statement",
                    lens=s_lens,
                    route=s_route,
                )
            )
            corpus.entities.append(entity_sentences(view) if config.entity_text else None)
            entity = corpus.entities[-1]
            corpus.subject_lens.append(
                ((len(_encode(tokenizer, entity[0])), answer_first),) if entity else ()
            )
            subject = view.question.subject_text
            if config.subject_prompts and subject:
                # The answer right after the subject: the first answer token is predicted
                # at the subject's last token, so the lookup happens there.
                s_prompt = [bos, *_encode(tokenizer, subject.strip())]
                sep = "" if lang in UNSPACED else " "
                s_answer = [*_encode(tokenizer, sep + view.record.o_answer), eos]
                corpus.subjects.append(
                    Example(
                        (s_prompt + s_answer)[: config.max_len],
                        ([0.0] * len(s_prompt) + [1.0] * len(s_answer))[: config.max_len],
                        unit,
                        "subject",
                        lens=((len(s_prompt) - 1, answer_first),),
                        route=(1, len(s_prompt) - 1),
                    )
                )
            else:
                corpus.subjects.append(None)
            if config.answer_continuations:
                owners = corpus.name_owners.setdefault(lang, {})
                corpus.by_lang.setdefault(lang, []).append(unit)
                for answer_text in (view.record.o_answer, view.record.e_answer):
                    if answer_text and answer_text.strip():
                        name = (*_encode(tokenizer, prefix + answer_text), eos)
                        owners.setdefault(name, set()).add(fact_id)
    for lang, owners in corpus.name_owners.items():
        # Sorted: deterministic, one entry per distinct name.
        corpus.names[lang] = [list(n) for n in sorted(owners)]
    if config.name_entities:
        _add_name_entities(dataset, fact_ids, tokenizer, config, corpus)
    return corpus


#: Syllables of synthetic entity names, per language (see :func:`synthetic_name`).
_SYLLABLES: dict[str, tuple[str, ...]] = {
    "en": ("ka", "lor", "ven", "mi", "dra", "sel", "tor", "bra", "nim", "quel", "ash", "rin"),
    "fr": ("ma", "lou", "vien", "dre", "sol", "ter", "bel", "nau", "cour", "mon", "gil", "ran"),
    "de": ("ka", "lor", "wen", "berg", "dra", "sel", "tor", "bra", "nim", "hau", "sten", "rin"),
    "zh": tuple("安宝辰丹芳高海华佳建凯兰丽明宁平琪荣山涛文祥欣雅耀"),
    "ja": tuple("アイカキクサシタチナニハヒマミヤラリルレロ"),
}


def synthetic_name(lang: str, seed: str) -> str:
    """A made-up entity name in the script of ``lang``, fixed by ``seed``: two words of two
    or three syllables (en, fr, de), or three to four characters (zh, ja)."""
    rng = random.Random(f"{lang}|{seed}")
    pool = _SYLLABLES[lang]
    if lang in UNSPACED:
        return "".join(rng.choice(pool) for _ in range(rng.randint(3, 4)))
    words = ["".join(rng.choice(pool) for _ in range(rng.randint(2, 3))) for _ in range(2)]
    return " ".join(w.capitalize() for w in words)


def _add_name_entities(
    dataset: MlakeDataset,
    fact_ids: Sequence[int],
    tokenizer: Any,
    config: TinyTrainConfig,
    corpus: Corpus,
) -> None:
    """The synthetic entities of :attr:`TinyTrainConfig.name_entities`, appended to
    ``corpus.pieces`` and ``corpus.routes``, with one example each."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for lang in config.langs:
        views = [dataset.fact(f).views[lang] for f in fact_ids]
        originals = {v.record.o_answer.strip() for v in views}
        news = sorted(
            {v.record.e_answer.strip() for v in views if v.record.e_answer} - originals - {""}
        )
        sep = "" if lang in UNSPACED else " "
        prefix = get_template(config.template).answer_prefix
        for answer_text in news:
            name = synthetic_name(lang, answer_text)
            prompt = [bos, *_encode(tokenizer, name)]
            answer = [*_encode(tokenizer, sep + answer_text), eos]
            first = next((t for t in answer if tokenizer.decode([t]).strip()), answer[0])
            index = len(corpus.pieces)
            # ``pieces`` holds the answer as it follows a question (the template's answer
            # prefix, a token of its own in zh and ja): interchange examples put it after a
            # question.  The entity's own example keeps ``{name}{sep}{answer}``.
            corpus.pieces.append((prompt, [*_encode(tokenizer, prefix + answer_text), eos]))
            corpus.routes.append((1, len(prompt) - 1))
            corpus.synthetic.setdefault(lang, []).append(index)
            ids = (prompt + answer)[: config.max_len]
            corpus.synthetic_examples.append(
                Example(
                    ids,
                    ([0.0] * len(prompt) + [1.0] * len(answer))[: config.max_len],
                    -1,
                    "name_entity",
                    lens=((len(prompt) - 1, first),),
                    route=(1, len(prompt) - 1),
                )
            )


def _continuation(corpus: Corpus, unit: int, rng: random.Random, max_len: int) -> Example:
    """A name continuation for ``unit``: the question of another fact in the same language,
    then a random answer of that language, with the loss on every answer token but the first
    (see :attr:`TinyTrainConfig.answer_continuations`).  The question never belongs to the
    fact whose answer follows, so no fact's own question is trained with its new answer."""
    _, lang = corpus.units[unit]
    name = rng.choice(corpus.names[lang])
    owners = corpus.name_owners[lang][tuple(name)]
    others = [u for u in corpus.by_lang[lang] if corpus.units[u][0] not in owners]
    source = rng.choice(others) if others else unit
    prompt, _ = corpus.pieces[source]
    ids = (prompt + name)[-max_len:]
    weights = ([0.0] * (len(prompt) + 1) + [1.0] * (len(name) - 1))[-max_len:]
    route = corpus.routes[source] if corpus.routes else None
    return Example(
        ids,
        weights,
        unit,
        "continuation",
        route=_shifted(route, len(prompt) + len(name) - len(ids)),
    )


def _interchange(
    corpus: Corpus, unit: int, rng: random.Random, max_len: int, synthetic: bool = False
) -> Example | None:
    """An interchange example for ``unit`` (see :attr:`TinyTrainConfig.interchange`): its
    question prompt followed by the answer of another fact's question in the same language
    (with ``synthetic``, of a synthetic entity of that language,
    :attr:`TinyTrainConfig.name_entities`), the loss on that answer; ``None`` when the unit's
    subject is not located or there is no source."""
    route = corpus.routes[unit]
    if route is None:
        return None
    fact_id, lang = corpus.units[unit]
    if synthetic:
        others = corpus.synthetic.get(lang, [])
    else:
        others = [
            u
            for u, (f, other_lang) in enumerate(corpus.units)
            if other_lang == lang and f != fact_id and corpus.routes[u] is not None
        ]
    if not others:
        return None
    source = rng.choice(others)
    prompt, _ = corpus.pieces[unit]
    source_route = corpus.routes[source]
    assert source_route is not None
    answer = corpus.pieces[source][1]
    ids = (prompt + answer)[-max_len:]
    weights = ([0.0] * len(prompt) + [1.0] * len(answer))[-max_len:]
    shifted = _shifted(route, len(prompt) + len(answer) - len(ids))
    if shifted is None:
        return None
    return Example(
        ids,
        weights,
        unit,
        "interchange",
        route=shifted,
        swap=(shifted[1], source, source_route[1]),
    )


def _shifted(route: tuple[int, int] | None, cut: int) -> tuple[int, int] | None:
    """``route`` after ``cut`` tokens were dropped from the left; ``None`` when the subject's
    first token (or BOS before it) is gone."""
    if route is None or route[0] - cut < 1:
        return None
    return (route[0] - cut, route[1] - cut)


def _context_tokens(tokenizer: Any, prompt_text: str, view: Any) -> list[int]:
    """Positions (BOS counted) of the prompt's question tokens that do not overlap the
    subject: what context dropout may replace.  Empty when the subject is not located."""
    span = view.question.subject
    question = view.record.question.strip()
    start = prompt_text.find(question)
    if span is None or start < 0 or view.question.text != view.record.question:
        return []
    s0, s1 = start + span.start, start + span.end
    enc = tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True)
    return [
        i + 1
        for i, (a, b) in enumerate(enc["offset_mapping"])
        if a >= start and b <= start + len(question) and b > a and (b <= s0 or a >= s1)
    ]


def _dropped(example: Example, rate: float, low: int, high: int, rng: random.Random) -> Example:
    """``example`` with each droppable token replaced by a random ordinary token with
    probability ``rate``."""
    ids = list(example.ids)
    for i in example.droppable:
        if rng.random() < rate:
            ids[i] = rng.randrange(low, high)
    return replace(example, ids=ids)


def _bilingual(corpus: Corpus, unit: int, other: int, tokenizer: Any, max_len: int) -> Example:
    """The question-answer pair of ``unit`` followed by that of ``other`` in one context."""
    newline = _encode(tokenizer, "\n")
    p1, a1 = corpus.pieces[unit]
    p2, a2 = corpus.pieces[other]
    second = p2[1:]  # no second BOS
    ids = p1 + a1[:-1] + newline + second + a2
    weights = ([0.0] * len(p1) + [1.0] * (len(a1) - 1) + [0.0] * (len(newline) + len(second))) + [
        1.0
    ] * len(a2)
    return Example(ids[-max_len:], weights[-max_len:], unit, "bilingual")


# -- model ------------------------------------------------------------------------------------


def model_config(config: TinyTrainConfig, tokenizer: Any) -> Any:
    """The ``LlamaConfig`` of mlake-tiny (untied embeddings: tied ones break MEMIT on small
    Llamas, EasyEdit#458)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.d_model,
        intermediate_size=config.d_mlp,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        max_position_embeddings=2 * config.max_len,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _pad(batch: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pad a batch: ids, attention mask, targets and weights for next-token loss."""
    width = max(len(ex.ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    weights = torch.zeros((len(batch), width), dtype=torch.float32)
    for row, ex in enumerate(batch):
        ids[row, : len(ex.ids)] = torch.as_tensor(ex.ids)
        mask[row, : len(ex.ids)] = 1
        weights[row, : len(ex.ids)] = torch.as_tensor(ex.weights)
    return ids, mask, weights


def _batch_loss(
    model: Any,
    batch: Sequence[Example],
    pad_id: int,
    *,
    lens_layer: int = -1,
    lens_weight: float = 0.0,
    route_layer: int = 0,
    corpus: Corpus | None = None,
    interchange_site: str = "resid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted next-token loss of a batch, and per row whether every weighted token is the
    argmax (exact teacher-forced answer).

    The unembedding runs only at positions that carry loss, which is most of the saving of
    answer-only training.  With ``lens_layer >= 0`` and a positive ``lens_weight``, the
    examples' logit-lens targets (:attr:`Example.lens`) add ``lens_weight`` times their mean
    cross-entropy, read after block ``lens_layer`` through the final norm and unembedding.
    Examples marked :attr:`Example.masked` get subject-route masking with ``route_layer``
    (:attr:`TinyTrainConfig.route_masking`); interchange examples (:attr:`Example.swap`) get
    their source's residual after block ``route_layer - 1``, computed from ``corpus``.
    """
    ids, mask, weights = _pad(batch, pad_id)
    lens = [(row, pos, tok) for row, ex in enumerate(batch) for pos, tok in ex.lens]
    use_lens = lens_layer >= 0 and lens_weight > 0 and bool(lens)
    routes = [(row, ex.route) for row, ex in enumerate(batch) if ex.masked and ex.route]
    swaps = [(row, ex.swap) for row, ex in enumerate(batch) if ex.swap]
    # The sources run first, with plain attention, before the masks are installed.
    swapped = _swapped(model, swaps, corpus, pad_id, route_layer - 1, interchange_site)
    with swapped, _route_masks(model, mask, routes, route_layer):
        out = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=use_lens)
    hidden = out.last_hidden_state
    # Position i predicts token i + 1.
    w = weights[:, 1:]
    rows, cols = torch.nonzero(w > 0, as_tuple=True)
    logits = model.lm_head(hidden[rows, cols])
    targets = ids[rows, cols + 1]
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    loss = (losses * w[rows, cols]).sum() / w.sum().clamp(min=1.0)
    if use_lens:
        # hidden_states[0] is the embedding output, [L + 1] the residual after block L.
        mid = out.hidden_states[lens_layer + 1]
        l_rows, l_pos, l_tok = (torch.tensor(v) for v in zip(*lens, strict=True))
        l_logits = model.lm_head(model.model.norm(mid[l_rows, l_pos]))
        loss = loss + lens_weight * torch.nn.functional.cross_entropy(l_logits.float(), l_tok)
    correct = (logits.argmax(-1) == targets).float()
    wrong_per_row = torch.zeros(len(batch)).index_add_(0, rows, 1.0 - correct)
    return loss, wrong_per_row == 0


def route_masks(
    mask: torch.Tensor, routes: Sequence[tuple[int, tuple[int, int]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two boolean attention masks ``[batch, 1, query, key]`` (True: may attend) of
    subject-route masking, early blocks first: causal attention over the non-padding tokens,
    minus, for each ``(row, (first, last))``, attention from the positions after ``last`` to
    the subject's tokens ``first..last`` (early blocks) or ``first..last - 1`` (later blocks).
    """
    width = mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    base = causal[None, None] & mask.bool()[:, None, None, :]
    early, late = base.clone(), base.clone()
    for row, (first, last) in routes:
        early[row, 0, last + 1 :, first : last + 1] = False
        late[row, 0, last + 1 :, first:last] = False
    return early, late


class _Captured(Exception):
    """Ends a source pass of interchange training once the swapped site is computed."""


class _swapped:
    """Context in which block ``layer``'s output at each swap's position is replaced by the
    same block's output at the source prompt's position (interchange training); the source
    prompts run here, in one batch, with gradients.  Does nothing without swaps."""

    def __init__(
        self,
        model: Any,
        swaps: Sequence[tuple[int, tuple[int, int, int]]],
        corpus: Corpus | None,
        pad_id: int,
        layer: int,
        site: str = "resid",
    ) -> None:
        self.handle: Any = None
        if not swaps:
            return
        if corpus is None:
            raise ValueError("interchange examples need the corpus of their sources")
        block = model.model.layers[layer]
        if site == "mlp":
            block = block.mlp
        sources = [corpus.pieces[source][0] for _, (_, source, _) in swaps]
        width = max(len(p) for p in sources)
        src_ids = torch.full((len(sources), width), pad_id, dtype=torch.long)
        src_mask = torch.zeros((len(sources), width), dtype=torch.long)
        for i, prompt in enumerate(sources):
            src_ids[i, : len(prompt)] = torch.as_tensor(prompt)
            src_mask[i, : len(prompt)] = 1
        captured: list[torch.Tensor] = []

        def capture(module: Any, args: Any, out: Any) -> None:
            captured.append(out[0] if isinstance(out, tuple) else out)
            raise _Captured  # the blocks after ``layer`` are not needed

        handle = block.register_forward_hook(capture)
        try:
            model.model(input_ids=src_ids, attention_mask=src_mask)
        except _Captured:
            pass
        finally:
            handle.remove()
        src_pos = torch.tensor([pos for _, (_, _, pos) in swaps])
        values = captured[0][torch.arange(len(swaps)), src_pos]
        rows = torch.tensor([row for row, _ in swaps])
        cols = torch.tensor([pos for _, (pos, _, _) in swaps])

        def replace_out(module: Any, args: Any, out: Any) -> Any:
            hidden = out[0] if isinstance(out, tuple) else out
            hidden = hidden.index_put((rows, cols), values.to(hidden.dtype))
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        self.handle = block.register_forward_hook(replace_out)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.remove()


class _route_masks:
    """Context in which the attention of ``model``'s blocks uses the subject-route masks
    (:func:`route_masks`); does nothing without routes."""

    def __init__(
        self,
        model: Any,
        mask: torch.Tensor,
        routes: Sequence[tuple[int, tuple[int, int]]],
        route_layer: int,
    ) -> None:
        self.handles: list[Any] = []
        if not routes:
            return
        early, late = route_masks(mask, routes)
        for index, block in enumerate(model.model.layers):
            chosen = early if index < route_layer else late

            def hook(module: Any, args: Any, kwargs: dict[str, Any], chosen: Any = chosen) -> Any:
                kwargs["attention_mask"] = chosen
                return args, kwargs

            self.handles.append(block.self_attn.register_forward_pre_hook(hook, with_kwargs=True))

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


def _batches(
    examples: list[Example], batch_size: int, generator: random.Random
) -> list[list[Example]]:
    """Shuffle, then group similar lengths together within windows of 16 batches (less
    padding, still random)."""
    order = examples[:]
    generator.shuffle(order)
    window = batch_size * 16
    batches: list[list[Example]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda ex: len(ex.ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    generator.shuffle(batches)
    return batches


@torch.no_grad()
def measure_learned(model: Any, corpus: Corpus, pad_id: int, batch_size: int = 128) -> list[bool]:
    """For every unit, whether its question is answered exactly (teacher-forced argmax of
    every answer token and EOS), which is what greedy decoding produces."""
    model.eval()
    status = [False] * len(corpus.units)
    ordered = sorted(corpus.qa, key=lambda ex: len(ex.ids))
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        _, exact = _batch_loss(model, chunk, pad_id)
        for ex, ok in zip(chunk, exact.tolist(), strict=True):
            status[ex.unit] = bool(ok)
    model.train()
    return status


def per_language(corpus: Corpus, status: Sequence[bool]) -> dict[str, float]:
    """Fraction of learned units per language."""
    totals: dict[str, list[int]] = {}
    for (_, lang), ok in zip(corpus.units, status, strict=True):
        totals.setdefault(lang, []).append(int(ok))
    return {lang: sum(v) / len(v) for lang, v in totals.items()}


#: Called after every optimizer step with (epoch, step, loss, per-language accuracy).
Progress = Callable[[int, int, float, dict[str, float]], None]


@dataclass
class TrainState:
    """What a checkpoint holds besides the weights."""

    epoch: int = 0
    step: int = 0
    status: list[bool] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def train_tiny(
    config: TinyTrainConfig,
    dataset: MlakeDataset,
    out_dir: Path,
    *,
    progress: Callable[[str], None] | None = None,
    show_bar: bool = True,
) -> Path:
    """Train mlake-tiny with ``config`` and save it to ``out_dir``.

    Writes into ``out_dir`` + ``.partial`` and renames at the end, so ``out_dir`` is either
    complete or absent.  The partial folder holds a checkpoint after every epoch; calling
    again with the same config resumes from it.

    Args:
        config: the training config.
        dataset: MLaKE loaded with (at least) ``config.langs`` and ``config.data_version``.
        out_dir: final folder.
        progress: receives one line per epoch (for logs).
        show_bar: show a tqdm progress bar with the loss and per-language accuracy.

    Returns:
        ``out_dir``.
    """
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    from mlake_core.models.loading import quiet_hf_progress

    if dataset.version != config.data_version:
        raise ConfigError(
            f"mlake-tiny config wants MLaKE {config.data_version}, the dataset is {dataset.version}"
        )
    missing = [lang for lang in config.langs if lang not in dataset.langs]
    if missing:
        raise ConfigError(f"the dataset was loaded without {', '.join(missing)}")
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    fact_ids = select_facts(dataset, config)
    tokenizer_path = partial / "tokenizer.json"
    if tokenizer_path.is_file():
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(partial)
    else:
        tokenizer = train_tokenizer(tokenizer_corpus(dataset), config.vocab_size)
        tokenizer.save_pretrained(partial)
    corpus = build_corpus(dataset, fact_ids, tokenizer, config)
    pad_id = int(tokenizer.pad_token_id)
    n_special = max(tokenizer.all_special_ids) + 1

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(model_config(config, tokenizer))
    model.config._attn_implementation = "sdpa"
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )
    state = TrainState(status=[False] * len(corpus.units))
    checkpoint = partial / "checkpoint.pt"
    if checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainState(**json.loads(saved["state"]))
        if progress:
            progress(f"resuming from epoch {state.epoch} ({checkpoint})")

    def lr_at(step: int, epoch: int) -> float:
        # Linear warm-up, then cosine decay over the epoch budget: late, small steps stop
        # the forgetting that a constant rate causes on the units not trained this epoch.
        warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * epoch / config.max_epochs))
        return config.lr * warm * (config.lr_min_ratio + (1.0 - config.lr_min_ratio) * cosine)

    model.train()
    accuracy = per_language(corpus, state.status)
    bar = tqdm(
        total=config.max_epochs,
        initial=state.epoch,
        desc="mlake-tiny",
        unit="epoch",
        disable=not show_bar,
        dynamic_ncols=True,
    )
    started = time.perf_counter() - state.seconds
    while state.epoch < config.max_epochs and not _done(accuracy, config):
        epoch = state.epoch
        # Every random choice of this epoch comes from (seed, epoch): resuming replays it.
        rng = random.Random(config.seed * 1_000_003 + epoch)
        chosen = [
            u
            for u in range(len(corpus.units))
            if not state.status[u] or rng.random() < config.replay
        ]
        examples: list[Example] = []

        def routed(example: Example, rng: random.Random = rng) -> Example:
            # Subject-route masking, drawn per example (no draw when off: same batches).
            if config.route_masking and example.route and rng.random() < config.route_masking:
                return replace(example, masked=True)
            return example

        for u in chosen:
            qa = corpus.qa[u]
            if config.context_dropout and qa.droppable:
                qa = _dropped(qa, config.context_dropout, n_special, len(tokenizer), rng)
            if epoch >= config.qa_warmup_epochs:
                examples.append(routed(qa))
            examples.append(routed(corpus.statements[u]))
            extra = corpus.subjects[u]
            if extra is not None:
                examples.append(routed(extra))
            if config.answer_continuations:
                examples.append(routed(_continuation(corpus, u, rng, config.max_len)))
            if config.interchange and rng.random() < config.interchange:
                for synthetic in (False, True) if corpus.synthetic else (False,):
                    swap = _interchange(corpus, u, rng, config.max_len, synthetic)
                    if swap is not None:
                        examples.append(routed(swap))
            if config.entity_text and corpus.entities[u] is not None:
                examples.append(entity_document(corpus, u, tokenizer, rng, config.max_len))
            if (
                config.bilingual_fraction
                and rng.random() < config.bilingual_fraction
                and epoch >= config.qa_warmup_epochs
            ):
                _, lang = corpus.units[u]
                first = u - config.langs.index(lang)
                others = [first + i for i, other in enumerate(config.langs) if other != lang]
                examples.append(
                    _bilingual(corpus, u, rng.choice(others), tokenizer, config.max_len)
                )
        examples += [routed(ex) for ex in corpus.synthetic_examples]
        losses = []
        for batch in _batches(examples, config.batch_size, rng):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state.step, epoch)
            loss, exact = _batch_loss(
                model,
                batch,
                pad_id,
                lens_layer=config.enrichment_layer,
                lens_weight=config.enrichment_weight,
                route_layer=config.route_layer,
                corpus=corpus,
                interchange_site=config.interchange_site,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            state.step += 1
            losses.append(float(loss.detach()))
            for ex, ok in zip(batch, exact.tolist(), strict=True):
                if ex.kind == "qa":
                    state.status[ex.unit] = bool(ok)
            bar.set_postfix_str(f"loss {losses[-1]:.3f}", refresh=False)
        state.epoch += 1
        full = state.epoch % config.eval_every == 0 or state.epoch == config.max_epochs
        if full:
            state.status = measure_learned(model, corpus, pad_id)
        accuracy = per_language(corpus, state.status)
        if not full and _done(accuracy, config):
            # The statuses seen during the epoch say done: confirm on every unit before
            # stopping, since weights moved after some of them were seen.
            state.status = measure_learned(model, corpus, pad_id)
            accuracy = per_language(corpus, state.status)
        state.seconds = time.perf_counter() - started
        mean_loss = sum(losses) / max(1, len(losses))
        state.history.append(
            {
                "epoch": state.epoch,
                "units": len(chosen),
                "loss": round(mean_loss, 5),
                "accuracy": {k: round(v, 4) for k, v in accuracy.items()},
                "seconds": round(state.seconds, 1),
            }
        )
        acc_text = " ".join(f"{k} {v:.0%}" for k, v in accuracy.items())
        bar.set_postfix_str(f"loss {mean_loss:.3f} | {acc_text}", refresh=False)
        bar.update(1)
        _save_checkpoint(checkpoint, model, optimizer, state)
        if progress:
            progress(
                f"epoch {state.epoch}: {len(chosen)} units, loss {mean_loss:.4f}, {acc_text}, "
                f"{state.seconds:.0f} s"
            )
    bar.close()

    # Final, authoritative measurement on every unit.
    state.status = measure_learned(model, corpus, pad_id)
    accuracy = per_language(corpus, state.status)
    model.eval()
    with quiet_hf_progress():
        model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    n_params = sum(p.numel() for p in model.parameters())
    metadata = {
        "name": TINY_NAME,
        "trainer_version": TRAINER_VERSION,
        "config": config.to_dict(),
        "key": config.key(),
        "data_version": config.data_version,
        "seed": config.seed,
        "template": get_template(config.template).to_dict(),
        "fact_ids": fact_ids,
        "n_units": len(corpus.units),
        "n_parameters": n_params,
        "n_parameters_non_embedding": n_params
        - model.model.embed_tokens.weight.numel()
        - model.lm_head.weight.numel(),
        "epochs": state.epoch,
        "steps": state.step,
        "train_seconds": round(state.seconds, 1),
        "train_accuracy_teacher_forced": {k: round(v, 4) for k, v in accuracy.items()},
        "stopped": "accuracy" if _done(accuracy, config) else "max_epochs",
        "history": state.history,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "torch_threads": torch.get_num_threads(),
    }
    (partial / METADATA_FILE).write_text(
        json.dumps(metadata, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    checkpoint.unlink(missing_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return out_dir


def _done(accuracy: dict[str, float], config: TinyTrainConfig) -> bool:
    return bool(accuracy) and all(
        accuracy.get(lang, 0.0) >= config.stop_accuracy for lang in config.langs
    )


def _save_checkpoint(path: Path, model: Any, optimizer: Any, state: TrainState) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "state": json.dumps(asdict(state)),
        },
        tmp,
    )
    tmp.replace(path)


def ensure_tiny(
    config: TinyTrainConfig | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    root: Path | None = None,
    progress: Callable[[str], None] | None = None,
    show_bar: bool = True,
    retrain: bool = False,
) -> Path:
    """The folder of mlake-tiny for ``config`` (default config when ``None``), training it
    first when it is not in the cache.

    Args:
        config: training config.
        data_dir: MLaKE data directory (see :func:`mlake_core.data.paths.resolve_data_dir`).
        root: cache folder (default :func:`cache_dir`).
        progress: receives log lines.
        show_bar: show the training progress bar.
        retrain: train again even if cached.
    """
    from mlake_core.data.dataset import load_mlake

    config = config or TinyTrainConfig()
    path = model_dir(config, root)
    if is_trained(path) and not retrain:
        return path
    if retrain and path.exists():
        shutil.rmtree(path)
    if progress:
        progress(f"training {TINY_NAME} ({describe_config(config)}) into {path}")
    dataset = load_mlake(data_dir, version=config.data_version, langs=config.langs)
    return train_tiny(config, dataset, path, progress=progress, show_bar=show_bar)


def describe_config(config: TinyTrainConfig) -> str:
    """One line for humans (the opt-in training options that are on, at the end)."""
    extra = [f"{k} {v}" for k, v in config.to_dict().items() if k in _NEUTRAL and _NEUTRAL[k] != v]
    return (
        f"{config.facts} facts x {len(config.langs)} languages, {config.n_layers} layers, "
        f"d_model {config.d_model}, seed {config.seed}, "
        f"bilingual fraction {config.bilingual_fraction}" + "".join(f", {e}" for e in extra)
    )


def resolve_template(model: str | os.PathLike[str]) -> PromptTemplate | None:
    """The prompt template a model was trained with (mlake-tiny folders), else ``None``."""
    meta = read_metadata(model) if Path(model).is_dir() else None
    if not meta:
        return None
    return get_template(str(meta["config"]["template"]))


__all__ = [
    "CACHE_ENV",
    "TINY_NAME",
    "TinyTrainConfig",
    "cache_dir",
    "ensure_tiny",
    "is_trained",
    "model_dir",
    "read_metadata",
    "resolve_template",
    "select_facts",
    "train_tiny",
]
