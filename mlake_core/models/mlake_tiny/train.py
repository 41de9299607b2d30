"""The training loop of mlake-tiny (:func:`train_tiny`): epochs, checkpoints, resume, and the
saved folder with its metadata."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mlake_core.data.dataset import MlakeDataset
from mlake_core.errors import ConfigError
from mlake_core.files import follow_umask
from mlake_core.models.loading import quiet_hf_progress
from mlake_core.models.mlake_tiny.config import TINY_NAME, TRAINER_VERSION, TinyTrainConfig
from mlake_core.models.mlake_tiny.corpus import Example, build_corpus, select_facts
from mlake_core.models.mlake_tiny.examples import (
    _bilingual,
    _continuation,
    _dropped,
    _interchange,
    entity_document,
)
from mlake_core.models.mlake_tiny.loss import _batch_loss, measure_learned, per_language
from mlake_core.models.mlake_tiny.tokenizer import tokenizer_corpus, train_tokenizer
from mlake_core.models.mlake_tiny_metadata import METADATA_FILE
from mlake_core.models.prompting import get_template
from mlake_core.provenance import git_commit, package_versions


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
    follow_umask(partial)  # safetensors writes its weights 0600
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
