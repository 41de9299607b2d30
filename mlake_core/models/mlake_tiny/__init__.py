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
option of :class:`TinyTrainConfig`).  Each variant also defines the edit settings its models
take (:func:`recommended_edit_settings`): FT at layer 0 for mlake-tiny; ROME, MEMIT and FT at
the block where it reads the subject for mlake-tiny-editable.

Everything is deterministic for a seed on a given machine (initialisation, batch order, replay
sampling, bilingual pairing).  The folder holds ``config.json``, ``model.safetensors``,
``generation_config.json``, the tokenizer files and ``mlake_tiny.json`` (the training config,
data version, seed, fact ids, prompt template, per-language training accuracy, training
time, parameter count, package versions and git commit).  It lives in the cache folder
(:func:`cache_dir`) under a name derived from a hash of the training config, so different
configs never collide; a training run checkpoints every epoch and resumes after a crash.
"""

# One concept per module (submodules import each other directly, never this package):
#   config         TinyTrainConfig, the hash naming its cache folder, TINY_NAME
#   variants       the named variants: their training options and edit settings
#   edit_settings  recommended_edit_settings: a trained model's edit settings
#   cache          the cache folder, model_dir, is_trained, ensure_tiny
#   tokenizer      the byte-level BPE tokenizer trained on MLaKE text
#   corpus         the fact selection and the tokenized sequences of every unit
#   examples       the examples drawn afresh each epoch (entity documents, interchange, ...)
#   hooks          subject-route masking and interchange swaps during training
#   loss           the batch loss and the measurement of which units are learned
#   train          the training loop, checkpoints and the saved folder
# The metadata file (mlake_tiny.json) and its reader live in mlake_core.models.mlake_tiny_metadata,
# below both this package and mlake_core.models.loading.

from mlake_core.models.mlake_tiny.cache import (
    CACHE_ENV,
    cache_dir,
    ensure_tiny,
    is_trained,
    model_dir,
)
from mlake_core.models.mlake_tiny.config import (
    TINY_NAME,
    TRAINER_VERSION,
    TinyTrainConfig,
    describe_config,
)
from mlake_core.models.mlake_tiny.corpus import (
    Corpus,
    Example,
    build_corpus,
    entity_sentences,
    select_facts,
    synthetic_name,
)
from mlake_core.models.mlake_tiny.edit_settings import recommended_edit_settings
from mlake_core.models.mlake_tiny.examples import entity_document
from mlake_core.models.mlake_tiny.hooks import route_masks
from mlake_core.models.mlake_tiny.loss import measure_learned, per_language
from mlake_core.models.mlake_tiny.tokenizer import tokenizer_corpus, train_tokenizer
from mlake_core.models.mlake_tiny.train import model_config, train_tiny
from mlake_core.models.mlake_tiny.variants import (
    EDITABLE_NAME,
    VARIANTS,
    Variant,
    variant_config,
    variant_of,
)
from mlake_core.models.mlake_tiny_metadata import METADATA_FILE, read_metadata, resolve_template

__all__ = [
    "CACHE_ENV",
    "EDITABLE_NAME",
    "METADATA_FILE",
    "TINY_NAME",
    "TRAINER_VERSION",
    "VARIANTS",
    "Corpus",
    "Example",
    "TinyTrainConfig",
    "Variant",
    "build_corpus",
    "cache_dir",
    "describe_config",
    "ensure_tiny",
    "entity_document",
    "entity_sentences",
    "is_trained",
    "measure_learned",
    "model_config",
    "model_dir",
    "per_language",
    "read_metadata",
    "recommended_edit_settings",
    "resolve_template",
    "route_masks",
    "select_facts",
    "synthetic_name",
    "tokenizer_corpus",
    "train_tiny",
    "train_tokenizer",
    "variant_config",
    "variant_of",
]
