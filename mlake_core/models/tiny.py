"""Tiny random-init models of every supported architecture, built offline.

The integration and reference tests (and ``mlake models check`` on a laptop) need real Hugging
Face checkpoints of each architecture, but no weights can be downloaded.  This module builds
them from configs: a byte-level BPE tokenizer trained with the ``tokenizers`` library on a few
lines of English, Chinese, Japanese, French and German (so CJK characters are split across byte
tokens, as in real byte-level vocabularies), and a 2-layer model per architecture whose weights
come from a fixed seed.  Both are saved with ``save_pretrained`` (safetensors weights, a
``PreTrainedTokenizerFast``) to a local folder that :func:`mlake_core.models.load_adapter`
loads like any downloaded checkpoint.

Each tiny tokenizer follows the BOS convention of its architecture's real tokenizers, so the
BOS policy code is exercised on every variant:

===========  =================  =========================  ===================
model_type   BOS token          tokenizer adds BOS itself  padding token
===========  =================  =========================  ===================
gpt2         ``<|endoftext|>``  no                         none (EOS is used)
llama        ``<s>``            yes                        none (EOS is used)
qwen2        none               no                         ``<|endoftext|>``
bloom        ``<s>``            no                         ``<pad>``
gpt_neox     ``<|endoftext|>``  no                         none (EOS is used)
gemma3_text  ``<s>``            yes                        ``<pad>``
gemma2       ``<s>``            yes                        ``<pad>``
cohere       ``<s>``            yes                        ``<pad>``
===========  =================  =========================  ===================

The tiny Gemma 3 (``gemma3_text``, ``Gemma3ForCausalLM``) keeps what sets the architecture
apart: sandwich norms around attention and the MLP, embeddings scaled by ``sqrt(d_model)``
inside the embedding module, grouped-query attention with a head width that is not
``d_model / n_heads`` (so ``attn_z`` is wider than ``d_model``), tied embeddings, and
sliding-window layers with a window (:data:`GEMMA3_SLIDING_WINDOW`) shorter than most test
prompts, alternating with full-attention layers.  The tiny Gemma 2 (``gemma2``) has the same
layout, plus attention logit soft-capping (set low, so that it bites on the random weights)
and a final logit soft-cap.

The tiny Cohere (``cohere``, Aya 23 / Command R) keeps its parallel blocks (one
``input_layernorm``, a LayerNorm without bias, feeding attention and the MLP), grouped-query
attention, tied embeddings and a ``logit_scale`` that is not 1.

After the architecture's own initialisation every parameter gets seeded Gaussian noise
(layer-norm gains and biases included), so a backend that silently drops a bias or a norm
gain produces visibly different numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: ``model_type`` values :func:`build_tiny_model` can build.
TINY_ARCHITECTURES: tuple[str, ...] = (
    "gpt2",
    "llama",
    "qwen2",
    "bloom",
    "gpt_neox",
    "gemma3_text",
    "gemma2",
    "cohere",
)

#: Special tokens, at ids 0..3 of every tiny vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<s>", "</s>", "<pad>")

#: Training text for the tiny tokenizer: MLaKE-like facts in the five MLaKE languages.
TRAINING_TEXT: tuple[str, ...] = (
    "The capital of France is Paris. The Eiffel Tower is in Paris.",
    "Barack Obama was born in Hawaii. He was the president of the United States.",
    "The mother tongue of Marie Curie is Polish. She worked in Paris.",
    "法国的首都是巴黎。埃菲尔铁塔位于巴黎。",
    "巴拉克·奥巴马出生于夏威夷。他曾是美国总统。",
    "玛丽·居里的母语是波兰语。",
    "フランスの首都はパリです。エッフェル塔はパリにあります。",
    "バラク・オバマはハワイで生まれました。東京は日本の首都です。",
    "La capitale de la France est Paris. La tour Eiffel est à Paris.",
    "Barack Obama est né à Hawaï. Il était président des États-Unis.",
    "Die Hauptstadt von Frankreich ist Paris. Der Eiffelturm steht in Paris.",
    "Barack Obama wurde auf Hawaii geboren. Die Muttersprache von Marie Curie ist Polnisch.",
)


#: Sliding window of the tiny Gemma 3's sliding layers (tokens): short enough that the test
#: prompts reach beyond it.
GEMMA3_SLIDING_WINDOW = 6

#: The tiny Gemma 2's attention and final logit soft-caps: low enough to change the random
#: model's scores and logits (Gemma 2's real ones are 50 and 30).
GEMMA2_SOFTCAPS = (2.0, 3.0)

#: The tiny Cohere's logit scale (Aya 23 8B's is 0.0625, against its large logits): far enough
#: from 1 that a logit lens without it gives visibly different log-probabilities, not so far
#: that the random model's next-token distribution is flat (or one-hot).
COHERE_LOGIT_SCALE = 0.5


@dataclass(frozen=True)
class TinySize:
    """Dimensions shared by every tiny model.

    Attributes:
        n_layers: number of transformer blocks.
        d_model: residual stream width.
        n_heads: attention heads (``d_model / n_heads`` is the head width).
        n_kv_heads: key/value heads for the grouped-query architectures (Llama, Qwen2).
        d_mlp: MLP hidden width (gate/up width for gated MLPs).
        n_ctx: maximum sequence length.
        vocab_size: target vocabulary size of the trained BPE tokenizer.
        init_std: standard deviation of the architecture's own weight initialisation.
        noise_std: standard deviation of the noise added to every parameter afterwards.
    """

    n_layers: int = 2
    d_model: int = 32
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 64
    n_ctx: int = 64
    vocab_size: int = 512
    init_std: float = 0.2
    noise_std: float = 0.05


def build_tiny_tokenizer(architecture: str, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE tokenizer offline and dress it in ``architecture``'s conventions.

    Training is deterministic (same text, same vocabulary size: same merges).

    Args:
        architecture: a ``model_type`` from :data:`TINY_ARCHITECTURES`; decides the BOS, EOS
            and padding tokens and whether BOS is added by the tokenizer (see the module table).
        vocab_size: vocabulary size, special tokens and the 256 byte tokens included.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    _check_architecture(architecture)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(TRAINING_TEXT), trainer=trainer)
    endoftext, bos, eos, pad = SPECIAL_TOKENS
    if architecture in ("llama", "gemma3_text", "gemma2", "cohere"):
        # Llama and Gemma tokenizers prepend BOS to every sequence by themselves.
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, core.token_to_id(bos))],
        )
    else:
        core.post_processor = processors.ByteLevel(trim_offsets=False)
    conventions: dict[str, dict[str, str | None]] = {
        "gpt2": {"bos_token": endoftext, "eos_token": endoftext, "pad_token": None},
        "llama": {"bos_token": bos, "eos_token": eos, "pad_token": None},
        "qwen2": {"bos_token": None, "eos_token": endoftext, "pad_token": endoftext},
        "bloom": {"bos_token": bos, "eos_token": eos, "pad_token": pad},
        "gpt_neox": {"bos_token": endoftext, "eos_token": endoftext, "pad_token": None},
        "gemma3_text": {"bos_token": bos, "eos_token": eos, "pad_token": pad},
        "gemma2": {"bos_token": bos, "eos_token": eos, "pad_token": pad},
        "cohere": {"bos_token": bos, "eos_token": eos, "pad_token": pad},
    }
    special = {k: v for k, v in conventions[architecture].items() if v is not None}
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        model_max_length=TinySize().n_ctx,
        clean_up_tokenization_spaces=False,
        **special,
    )


def tiny_config(architecture: str, vocab_size: int, size: TinySize | None = None) -> Any:
    """The Hugging Face config of a tiny ``architecture`` model.

    Args:
        architecture: a ``model_type`` from :data:`TINY_ARCHITECTURES`.
        vocab_size: vocabulary size (the tokenizer's length).
        size: dimensions; defaults to :class:`TinySize`.

    Returns:
        A ``transformers.PretrainedConfig`` subclass instance.
    """
    from transformers import (
        BloomConfig,
        CohereConfig,
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        Qwen2Config,
    )

    _check_architecture(architecture)
    s = size or TinySize()
    if architecture == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=s.n_ctx,
            n_embd=s.d_model,
            n_layer=s.n_layers,
            n_head=s.n_heads,
            n_inner=s.d_mlp,
            initializer_range=s.init_std,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=None,
        )
    if architecture == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=s.d_model,
            intermediate_size=s.d_mlp,
            num_hidden_layers=s.n_layers,
            num_attention_heads=s.n_heads,
            num_key_value_heads=s.n_kv_heads,
            max_position_embeddings=s.n_ctx,
            initializer_range=s.init_std,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
        )
    if architecture == "qwen2":
        # Small Qwen2 checkpoints tie the unembedding to the embedding; keep that here so
        # tied weights are exercised (EasyEdit#458).
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=s.d_model,
            intermediate_size=s.d_mlp,
            num_hidden_layers=s.n_layers,
            num_attention_heads=s.n_heads,
            num_key_value_heads=s.n_kv_heads,
            max_position_embeddings=s.n_ctx,
            initializer_range=s.init_std,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=0,
            pad_token_id=0,
        )
    if architecture == "bloom":
        return BloomConfig(
            vocab_size=vocab_size,
            hidden_size=s.d_model,
            n_layer=s.n_layers,
            n_head=s.n_heads,
            initializer_range=s.init_std,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    if architecture == "gemma3_text":
        # Like Gemma 3 270M (4 heads, 1 key/value head, head width 256 > d_model / n_heads,
        # tied embeddings, sliding layers), scaled down; layers alternate sliding / full so
        # both kinds are present in two blocks.
        return Gemma3TextConfig(
            vocab_size=vocab_size,
            hidden_size=s.d_model,
            intermediate_size=s.d_mlp,
            num_hidden_layers=s.n_layers,
            num_attention_heads=s.n_heads,
            num_key_value_heads=s.n_kv_heads,
            head_dim=2 * s.d_model // s.n_heads,
            query_pre_attn_scalar=2 * s.d_model // s.n_heads,
            max_position_embeddings=s.n_ctx,
            sliding_window=GEMMA3_SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"] * (s.n_layers // 2)
            + ["sliding_attention"] * (s.n_layers % 2),
            initializer_range=s.init_std,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    if architecture == "gemma2":
        # Gemma 3's layout at the same size, with Gemma 2's soft-caps.
        attn_cap, final_cap = GEMMA2_SOFTCAPS
        return Gemma2Config(
            vocab_size=vocab_size,
            hidden_size=s.d_model,
            intermediate_size=s.d_mlp,
            num_hidden_layers=s.n_layers,
            num_attention_heads=s.n_heads,
            num_key_value_heads=s.n_kv_heads,
            head_dim=2 * s.d_model // s.n_heads,
            query_pre_attn_scalar=2 * s.d_model // s.n_heads,
            max_position_embeddings=s.n_ctx,
            sliding_window=GEMMA3_SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"] * (s.n_layers // 2)
            + ["sliding_attention"] * (s.n_layers % 2),
            attn_logit_softcapping=attn_cap,
            final_logit_softcapping=final_cap,
            initializer_range=s.init_std,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    if architecture == "cohere":
        return CohereConfig(
            vocab_size=vocab_size,
            hidden_size=s.d_model,
            intermediate_size=s.d_mlp,
            num_hidden_layers=s.n_layers,
            num_attention_heads=s.n_heads,
            num_key_value_heads=s.n_kv_heads,
            max_position_embeddings=s.n_ctx,
            logit_scale=COHERE_LOGIT_SCALE,
            initializer_range=s.init_std,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=s.d_model,
        intermediate_size=s.d_mlp,
        num_hidden_layers=s.n_layers,
        num_attention_heads=s.n_heads,
        max_position_embeddings=s.n_ctx,
        # Rotary on half of each head, as in Pythia (rotary_pct 0.25) but wider.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
        use_parallel_residual=True,
        initializer_range=s.init_std,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )


def build_tiny_model(
    architecture: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    size: TinySize | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Build a tiny random-init ``architecture`` model and save it with its tokenizer.

    Args:
        architecture: a ``model_type`` from :data:`TINY_ARCHITECTURES`.
        out_dir: folder to write (created if needed): ``config.json``,
            ``model.safetensors``, ``generation_config.json`` and the tokenizer files.
        seed: seed of the weight initialisation and noise (the same seed gives the same
            weights).
        size: dimensions; defaults to :class:`TinySize`.
        config_overrides: config attributes to set before building, e.g.
            ``{"use_parallel_residual": False}`` for a sequential GPT-NeoX.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    from transformers import AutoModelForCausalLM

    from mlake_core.models.loading import quiet_hf_progress

    s = size or TinySize()
    tokenizer = build_tiny_tokenizer(architecture, vocab_size=s.vocab_size)
    config = tiny_config(architecture, vocab_size=len(tokenizer), size=s)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    generator = torch.Generator().manual_seed(seed)
    # from_config draws from the global RNG; fork it so building a model leaves the caller's
    # random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * s.noise_std)
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_hf_progress():
        model.save_pretrained(out)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(out)
    return out


def build_tiny_models(
    root: str | Path,
    architectures: tuple[str, ...] = TINY_ARCHITECTURES,
    *,
    seed: int = 0,
) -> dict[str, Path]:
    """Build one tiny model per architecture under ``root/<architecture>``.

    Args:
        root: parent folder.
        architectures: which ``model_type`` values to build.
        seed: seed for every model.

    Returns:
        Folder of each model, by architecture.
    """
    return {arch: build_tiny_model(arch, Path(root) / arch, seed=seed) for arch in architectures}


def _check_architecture(architecture: str) -> None:
    from mlake_core.errors import ConfigError

    if architecture not in TINY_ARCHITECTURES:
        raise ConfigError(
            f"no tiny model for architecture {architecture!r}; "
            f"choose one of {', '.join(TINY_ARCHITECTURES)}"
        )
