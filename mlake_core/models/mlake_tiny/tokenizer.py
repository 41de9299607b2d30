"""mlake-tiny's tokenizer: a byte-level BPE trained on all MLaKE text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlake_core.data.dataset import MlakeDataset

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


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
