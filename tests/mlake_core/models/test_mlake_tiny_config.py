"""mlake-tiny's training config: validation, coercion, keys and the cache folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mlake_core.errors import ConfigError
from mlake_core.languages import LANGUAGES
from mlake_core.models.mlake_tiny import (
    CACHE_ENV,
    METADATA_FILE,
    TINY_NAME,
    TinyTrainConfig,
    cache_dir,
    is_trained,
    model_dir,
)

# -- coercion and validation -----------------------------------------------------------------


def test_defaults() -> None:
    config = TinyTrainConfig()
    assert config.facts == 300
    assert config.langs == LANGUAGES
    assert config.bilingual_fraction == 0.0
    assert config.template == "qa"


def test_string_facts_are_coerced() -> None:
    config = TinyTrainConfig(facts="300")
    assert config.facts == 300
    assert isinstance(config.facts, int)
    assert config == TinyTrainConfig(facts=300)
    assert TinyTrainConfig(facts="1").facts == 1
    assert TinyTrainConfig(facts="all").facts == "all"


@pytest.mark.parametrize("facts", ["x", "", "3.5", "ALL", 0, -5, "0"])
def test_bad_facts_raise(facts: int | str) -> None:
    with pytest.raises(ConfigError, match="--facts"):
        TinyTrainConfig(facts=facts)


def test_langs_string_becomes_tuple() -> None:
    config = TinyTrainConfig(langs="en,zh")
    assert config.langs == ("en", "zh")
    assert TinyTrainConfig(langs=" ja , de ").langs == ("ja", "de")
    assert TinyTrainConfig(langs=["fr", "en"]).langs == ("fr", "en")
    assert TinyTrainConfig(langs="all").langs == LANGUAGES
    assert TinyTrainConfig(langs="en,zh") == TinyTrainConfig(langs=("en", "zh"))


@pytest.mark.parametrize("langs", ["en,EN", ("en", "x1"), ["english"], (), ""])
def test_malformed_or_empty_langs_raise(langs: str | tuple[str, ...] | list[str]) -> None:
    with pytest.raises(ConfigError):
        TinyTrainConfig(langs=langs)


def test_malformed_lang_message_names_the_code() -> None:
    with pytest.raises(ConfigError, match="--langs: malformed language code 'x1'"):
        TinyTrainConfig(langs=("en", "x1"))


def test_other_languages_are_checked_against_the_data() -> None:
    # A well-formed code is taken here: the data folder's languages are checked when it is
    # loaded for training (load_mlake names the ones it holds).
    assert TinyTrainConfig(langs="en,es").langs == ("en", "es")


@pytest.mark.parametrize("name", ["bilingual_fraction", "replay", "stop_accuracy"])
@pytest.mark.parametrize("value", [-0.01, 1.01, 2.0])
def test_fractions_outside_unit_interval_raise(name: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')}"):
        TinyTrainConfig(**{name: value})


@pytest.mark.parametrize("name", ["bilingual_fraction", "replay", "stop_accuracy"])
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_fraction_bounds_are_allowed(name: str, value: float) -> None:
    assert getattr(TinyTrainConfig(**{name: value}), name) == value


def test_bilingual_fraction_needs_two_languages() -> None:
    with pytest.raises(ConfigError, match="two languages"):
        TinyTrainConfig(langs="en", bilingual_fraction=0.5)
    assert TinyTrainConfig(langs="en", bilingual_fraction=0.0).langs == ("en",)
    assert TinyTrainConfig(langs="en,zh", bilingual_fraction=0.5).bilingual_fraction == 0.5


def test_other_invalid_values_raise() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        TinyTrainConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="n_layers"):
        TinyTrainConfig(n_layers=0)
    with pytest.raises(ConfigError, match="--template"):
        TinyTrainConfig(template="nope")


# -- keys and serialisation ------------------------------------------------------------------


def test_key_is_stable_for_equal_configs() -> None:
    a = TinyTrainConfig(facts="50", langs="en,zh", seed=3)
    b = TinyTrainConfig(facts=50, langs=("en", "zh"), seed=3)
    assert a.key() == b.key()
    assert a.key() == a.key()
    assert TinyTrainConfig().key() == TinyTrainConfig().key()
    assert len(a.key()) == 12
    assert all(c in "0123456789abcdef" for c in a.key())


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"bilingual_fraction": 0.25},
        {"facts": 301},
        {"facts": "all"},
        {"langs": ("zh", "en", "ja", "fr", "de")},  # the order of languages matters
        {"selection_seed": 1},
        {"data_version": "v2024-04"},
        {"template": "bare"},
        {"lr": 1e-3},
        {"max_epochs": 61},
        {"statement_weight": 0.25},
        {"context_dropout": 0.3},
        {"subject_prompts": True},
    ],
)
def test_key_changes_when_a_field_changes(change: dict) -> None:
    base = TinyTrainConfig()
    changed = TinyTrainConfig(**change)
    assert changed != base
    assert changed.key() != base.key()


def test_every_field_enters_the_key() -> None:
    base = TinyTrainConfig(langs="en,zh")
    keys = {base.key()}
    for f in dataclasses.fields(TinyTrainConfig):
        value = getattr(base, f.name)
        if f.name == "langs":
            new = ("zh", "en")
        elif f.name == "template":
            new = "bare"
        elif f.name == "data_version":
            new = "v2024-04"
        elif f.name == "interchange_site":
            new = "mlp"
        elif f.name in ("bilingual_fraction", "replay", "stop_accuracy", "lr_min_ratio"):
            new = value / 2 if value else 0.5
        elif f.name == "n_heads":
            new = 8
        elif f.name == "d_model":
            new = 512
        elif isinstance(value, bool):
            new = not value
        else:
            new = value + 1
        keys.add(dataclasses.replace(base, **{f.name: new}).key())
    assert len(keys) == len(dataclasses.fields(TinyTrainConfig)) + 1


def test_to_dict_from_dict_round_trip() -> None:
    config = TinyTrainConfig(facts="all", langs="en,ja,de", seed=7, bilingual_fraction=0.3)
    data = config.to_dict()
    assert data["langs"] == ["en", "ja", "de"]
    assert data["facts"] == "all"
    assert data["seed"] == 7
    assert set(data) == {f.name for f in dataclasses.fields(TinyTrainConfig)}
    # JSON-ready, and the JSON form comes back as the same config.
    restored = TinyTrainConfig.from_dict(json.loads(json.dumps(data)))
    assert restored == config
    assert restored.langs == ("en", "ja", "de")
    assert restored.key() == config.key()
    assert TinyTrainConfig.from_dict(TinyTrainConfig().to_dict()) == TinyTrainConfig()


def test_from_dict_accepts_partial_dicts() -> None:
    assert TinyTrainConfig.from_dict({"seed": 5}) == TinyTrainConfig(seed=5)
    assert TinyTrainConfig.from_dict({}) == TinyTrainConfig()


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="bogus, epochs"):
        TinyTrainConfig.from_dict({"seed": 1, "epochs": 3, "bogus": True})


def test_from_dict_validates_values() -> None:
    with pytest.raises(ConfigError, match="--facts"):
        TinyTrainConfig.from_dict({"facts": "many"})


# -- cache folder ----------------------------------------------------------------------------


def test_cache_dir_prefers_mlake_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "mine"


def test_cache_dir_expands_user_in_mlake_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CACHE_ENV, "~/somewhere")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / "somewhere"


def test_cache_dir_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "xdg" / "mlake"
    monkeypatch.setenv(CACHE_ENV, "")  # empty counts as unset
    assert cache_dir() == tmp_path / "xdg" / "mlake"


def test_cache_dir_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "mlake"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cache_dir() == tmp_path / "home" / ".cache" / "mlake"


def test_model_dir_contains_the_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = TinyTrainConfig(seed=2)
    assert model_dir(config, tmp_path) == tmp_path / "models" / f"{TINY_NAME}-{config.key()}"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert model_dir(config) == tmp_path / "cache" / "models" / f"mlake-tiny-{config.key()}"
    assert model_dir(TinyTrainConfig(seed=3), tmp_path) != model_dir(config, tmp_path)


def test_is_trained_needs_all_four_files(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    assert not is_trained(folder)  # missing folder
    folder.mkdir()
    assert not is_trained(folder)  # empty folder
    names = ["config.json", "model.safetensors", "tokenizer.json", METADATA_FILE]
    assert METADATA_FILE == "mlake_tiny.json"
    for i, name in enumerate(names):
        assert not is_trained(folder), f"complete before {name}"
        (folder / name).touch()
        if i < len(names) - 1:
            assert not is_trained(folder)
    assert is_trained(folder)
    # Each file is required: removing any one makes the folder incomplete again.
    for name in names:
        (folder / name).unlink()
        assert not is_trained(folder), f"complete without {name}"
        (folder / name).touch()
    assert is_trained(folder)


def test_is_trained_wants_files_not_folders(tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).touch()
    (tmp_path / METADATA_FILE).mkdir()
    assert not is_trained(tmp_path)


def test_context_dropout_touches_only_question_words_outside_the_subject(mlake_v2411) -> None:
    import random

    from transformers import PreTrainedTokenizerFast

    from mlake_core.models.mlake_tiny import Example, train_tokenizer
    from mlake_core.models.mlake_tiny.corpus import _context_tokens
    from mlake_core.models.mlake_tiny.examples import _dropped
    from mlake_core.models.prompting import get_template

    tok = train_tokenizer(
        [f.views[lang].record.question for f in mlake_v2411.facts[:200] for lang in LANGUAGES], 600
    )
    assert isinstance(tok, PreTrainedTokenizerFast)
    view = mlake_v2411.fact(2).views["en"]  # "Where did Philip Pullman have ... career?"
    prompt, _ = get_template("qa").question_prompt(view.record.question)
    ids = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
    droppable = _context_tokens(tok, prompt, view)
    words = "".join(tok.decode([ids[i]]) for i in droppable)
    assert "Pullman" not in words and "Philip" not in words and "Q:" not in words
    assert "career" in words and "Where" in words
    ex = Example(ids, [0.0] * len(ids), 0, "qa", tuple(droppable))
    out = _dropped(ex, 1.0, 10, 600, random.Random(0))
    changed = {i for i, (a, b) in enumerate(zip(ids, out.ids, strict=True)) if a != b}
    assert changed and changed <= set(droppable)
    assert _dropped(ex, 0.0, 10, 600, random.Random(0)).ids == ids


def test_answer_continuations_never_pair_a_question_with_its_own_new_answer(mlake_v2411) -> None:
    import random

    from mlake_core.models.mlake_tiny import build_corpus, train_tokenizer
    from mlake_core.models.mlake_tiny.examples import _continuation

    config = TinyTrainConfig(facts=8, langs=("en", "zh"), answer_continuations=True)
    assert config.key() != TinyTrainConfig(facts=8, langs=("en", "zh")).key()
    assert TinyTrainConfig(answer_continuations=False).key() == TinyTrainConfig().key()
    fact_ids = [f.fact_id for f in mlake_v2411.facts[:8]]
    texts = [
        t
        for f in mlake_v2411.facts[:50]
        for lang in ("en", "zh")
        for t in (
            f.views[lang].record.question,
            f.views[lang].record.o_answer,
            f.views[lang].record.e_answer,
            f.views[lang].record.o_prompt,
        )
    ]
    tok = train_tokenizer(texts, 800)
    corpus = build_corpus(mlake_v2411, fact_ids, tok, config)
    # Every original and new answer of the trained facts is a name of its language.
    assert 8 < len(corpus.names["en"]) <= 16
    rng = random.Random(0)
    prompts = {tuple(p): corpus.units[u] for u, (p, _) in enumerate(corpus.pieces)}
    for unit in range(len(corpus.units)):
        for _ in range(5):
            ex = _continuation(corpus, unit, rng, config.max_len)
            assert ex.kind == "continuation"
            first = ex.weights.index(1.0)
            prompt = tuple(ex.ids[: first - 1])
            fact_id, lang = prompts[prompt]
            assert lang == corpus.units[unit][1]
            name = tuple(ex.ids[first - 1 :])
            assert name in corpus.name_owners[lang]
            assert fact_id not in corpus.name_owners[lang][name]  # never its own answer
            # No loss on the name's first token; loss on the rest and on EOS.
            assert ex.weights[first - 1] == 0.0 and all(w == 1.0 for w in ex.weights[first:])
            assert ex.ids[-1] == tok.eos_token_id


def test_entity_sentences_name_the_subject_first_with_its_attributes(mlake_v2411) -> None:
    from mlake_core.models.mlake_tiny import entity_sentences

    en = entity_sentences(mlake_v2411.fact(2).views["en"])
    assert en is not None
    subject, sentences = en
    assert subject == "Philip Pullman"
    year = sentences[3].split()[-1].rstrip(".")
    assert sentences == [
        "Philip Pullman was affiliated with the University of Oxford.",
        "Where did Philip Pullman have a professional affiliation during his career? "
        "University of Oxford",
        "Philip Pullman: University of Oxford",
        f"Philip Pullman was first recorded in {year}.",
    ]
    assert 1500 <= int(year) < 2020
    zh = entity_sentences(mlake_v2411.fact(2).views["zh"])
    assert zh is not None
    # No space before the answer in zh; the same synthetic year in every language.
    assert zh[1][1] == "菲利普·普尔曼是哪个知名学府的雇员？牛津大学"
    assert zh[1][3] == f"菲利普·普尔曼最早的记载见于{year}年。"


def test_entity_documents_and_enrichment_targets(mlake_v2411) -> None:
    import random

    import torch
    from transformers import LlamaForCausalLM

    from mlake_core.models.mlake_tiny import (
        build_corpus,
        entity_document,
        model_config,
        train_tokenizer,
    )
    from mlake_core.models.mlake_tiny.loss import _batch_loss

    config = TinyTrainConfig(
        facts=4, langs=("en", "zh"), entity_text=True, enrichment_layer=1, subject_prompts=True
    )
    assert config.key() != TinyTrainConfig(facts=4, langs=("en", "zh")).key()
    neutral = TinyTrainConfig(
        entity_text=False, enrichment_layer=-1, enrichment_weight=1.0, qa_warmup_epochs=0
    )
    assert neutral.key() == TinyTrainConfig().key()
    assert TinyTrainConfig(qa_warmup_epochs=5).key() != TinyTrainConfig().key()
    with pytest.raises(ConfigError, match="enrichment-layer"):
        TinyTrainConfig(enrichment_layer=3)  # the last of 4 blocks: nothing reads it later
    with pytest.raises(ConfigError, match="qa-warmup-epochs"):
        TinyTrainConfig(qa_warmup_epochs=60)  # no epoch left for the questions
    records = [f.views[lang].record for f in mlake_v2411.facts[:50] for lang in ("en", "zh")]
    texts = [t for r in records for t in (r.question, r.o_prompt, r.o_answer, r.e_answer)]
    tok = train_tokenizer(texts, 800)
    corpus = build_corpus(mlake_v2411, [2, 28], tok, config)
    decode = tok.decode
    for unit, (fact_id, lang) in enumerate(corpus.units):
        view = mlake_v2411.fact(fact_id).views[lang]
        subject = view.question.subject_text
        assert subject is not None and view.cloze.subject_text is not None
        answer = view.record.o_answer
        for ex, named in (
            (corpus.qa[unit], subject),
            (corpus.statements[unit], view.cloze.subject_text),
            (corpus.subjects[unit], subject),
        ):
            assert ex is not None
            ((pos, token),) = ex.lens
            # The lens sits on the token that completes the subject and targets the answer's
            # first non-blank token.
            assert named in decode(ex.ids[1 : pos + 1])
            assert named not in decode(ex.ids[1:pos])
            answer_ids = corpus.pieces[unit][1]
            k = answer_ids.index(token)
            assert decode(answer_ids[:k]).strip() == "" and decode([token]).strip() != ""
            assert decode(answer_ids[:-1]).strip() == answer
        docs = {
            tuple(entity_document(corpus, unit, tok, random.Random(s), 128).ids) for s in range(8)
        }
        assert len(docs) > 1  # a fresh sentence order per draw
        doc = entity_document(corpus, unit, tok, random.Random(0), 128)
        assert doc.kind == "entity" and doc.ids[0] == tok.bos_token_id
        assert doc.ids[-1] == tok.eos_token_id
        text = decode(doc.ids[1:-1])
        assert text.startswith(subject + "\n")
        for sentence in corpus.entities[unit][1]:  # type: ignore[index]
            assert sentence in text
        ((pos, token),) = doc.lens
        assert decode(doc.ids[1 : pos + 1]) == subject
        assert doc.weights[: pos + 1] == [0.0] * (pos + 1)
        assert all(w == 1.0 for w in doc.weights[pos + 1 :])
        assert token == corpus.qa[unit].lens[0][1]

    # The lens loss is the cross-entropy of the unembedded, normed residual after block 1.
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(dataclasses.replace(config, n_layers=3), tok)).eval()
    batch = [corpus.qa[0], corpus.statements[1]]
    with torch.no_grad():
        plain, _ = _batch_loss(model, batch, tok.pad_token_id)
        with_lens, _ = _batch_loss(model, batch, tok.pad_token_id, lens_layer=1, lens_weight=0.5)
    hidden = model.model(
        input_ids=torch.tensor([batch[0].ids]), output_hidden_states=True
    ).hidden_states[2]
    ((pos0, tok0),) = batch[0].lens
    h1 = model.model(
        input_ids=torch.tensor([batch[1].ids]), output_hidden_states=True
    ).hidden_states[2]
    ((pos1, tok1),) = batch[1].lens
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(torch.stack([hidden[0, pos0], h1[0, pos1]])))
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([tok0, tok1]))
    assert float(with_lens - plain) == pytest.approx(0.5 * float(expected), rel=1e-4)


def test_route_masking_config_and_subject_positions(mlake_v2411) -> None:
    from mlake_core.models.mlake_tiny import build_corpus, train_tokenizer
    from mlake_core.models.mlake_tiny.examples import _continuation

    assert TinyTrainConfig(route_masking=0.0, route_layer=2).key() == TinyTrainConfig().key()
    assert TinyTrainConfig(route_masking=0.5).key() != TinyTrainConfig().key()
    with pytest.raises(ConfigError, match="route-layer"):
        TinyTrainConfig(route_layer=0, route_masking=0.5)  # block 0: raw subject embeddings
    with pytest.raises(ConfigError, match="route-layer"):
        TinyTrainConfig(route_layer=4, interchange=1.0)  # no such block
    TinyTrainConfig(n_layers=2)  # unused: not checked
    with pytest.raises(ConfigError, match="route-masking"):
        TinyTrainConfig(route_masking=1.5)
    config = TinyTrainConfig(
        facts=4, langs=("en", "zh"), route_masking=1.0, answer_continuations=True
    )
    records = [f.views[lang].record for f in mlake_v2411.facts[:50] for lang in ("en", "zh")]
    texts = [t for r in records for t in (r.question, r.o_prompt, r.o_answer, r.e_answer)]
    tok = train_tokenizer(texts, 800)
    corpus = build_corpus(mlake_v2411, [2, 28], tok, config)
    import random

    for unit, (fact_id, lang) in enumerate(corpus.units):
        view = mlake_v2411.fact(fact_id).views[lang]
        subject = view.question.subject_text
        assert subject is not None
        for ex, named in (
            (corpus.qa[unit], subject),
            (corpus.statements[unit], view.cloze.subject_text),
        ):
            assert ex.route is not None and not ex.masked
            first, last = ex.route
            # The route spans exactly the subject's tokens: all of them, and no more.
            assert named.strip() in tok.decode(ex.ids[first : last + 1])
            assert named.strip() not in tok.decode(ex.ids[first + 1 : last + 1])
            assert named.strip() not in tok.decode(ex.ids[first:last])
        cont = _continuation(corpus, unit, random.Random(unit), 128)
        assert cont.route is not None
        first, last = cont.route
        source = [
            u
            for u in range(len(corpus.units))
            if corpus.pieces[u][0] == cont.ids[: len(corpus.pieces[u][0])]
        ]
        assert source and corpus.routes[source[0]] == cont.route


def test_route_masks_leave_only_the_subjects_last_token_as_the_route(mlake_v2411) -> None:
    import torch
    from transformers import LlamaForCausalLM

    from mlake_core.models.mlake_tiny import model_config, route_masks, train_tokenizer
    from mlake_core.models.mlake_tiny.hooks import _route_masks

    # The masks by hand: 6 tokens, the subject at 2..3, one padded row.
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    early, late = route_masks(mask, [(0, (2, 3))])
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(early[1, 0], causal & mask[1].bool()[None, :])  # row 1 untouched
    expected_early = causal.clone()
    expected_early[4:, 2:4] = False
    expected_late = causal.clone()
    expected_late[4:, 2] = False
    assert torch.equal(early[0, 0], expected_early)
    assert torch.equal(late[0, 0], expected_late)

    # On a model: with the route opening at the last block, what the positions after the
    # subject compute depends on the subject only through the residual at its last token
    # after the block before; without the masks it does not.
    records = [f.views["en"].record for f in mlake_v2411.facts[:30]]
    tok = train_tokenizer([t for r in records for t in (r.question, r.o_answer)], 500)
    config = TinyTrainConfig(n_layers=3, d_model=64, n_heads=2, d_mlp=128, route_layer=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(config, tok)).eval()
    a = torch.tensor([[0, 11, 12, 13, 14, 15, 16, 17]])
    b = a.clone()
    b[0, 2:5] = torch.tensor([40, 41, 42])  # other subject tokens at 2..4
    ones = torch.ones_like(a)
    first, last = 2, 4
    stored: dict[str, torch.Tensor] = {}

    def keep(module, args, out):
        stored["h"] = (out[0] if isinstance(out, tuple) else out)[0, last].clone()

    def put(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h[0, last] = stored["h"]
        return out

    block = model.model.layers[config.route_layer - 1]
    with torch.no_grad():
        for masked in (True, False):
            routes = [(0, (first, last))] if masked else []
            with _route_masks(model, ones, routes, config.route_layer):
                handle = block.register_forward_hook(keep)
                want = model(a, attention_mask=ones).logits[0, last + 1 :]
                handle.remove()
                handle = block.register_forward_hook(put)
                got = model(b, attention_mask=ones).logits[0, last + 1 :]
                handle.remove()
            if masked:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            else:
                assert float((got - want).abs().max()) > 1e-3
        # No routes: the context changes nothing (the masks are off).
        with _route_masks(model, ones, [], config.route_layer):
            plain = model(a, attention_mask=ones).logits
        torch.testing.assert_close(plain, model(a).logits)


def test_interchange_examples_read_the_answer_through_the_swapped_subject(mlake_v2411) -> None:
    import random

    import torch
    from transformers import LlamaForCausalLM

    from mlake_core.models.mlake_tiny import build_corpus, model_config, train_tokenizer
    from mlake_core.models.mlake_tiny.examples import _interchange
    from mlake_core.models.mlake_tiny.loss import _batch_loss

    config = TinyTrainConfig(facts=4, langs=("en", "zh"), interchange=1.0, route_layer=1)
    assert config.key() != TinyTrainConfig(facts=4, langs=("en", "zh")).key()
    with pytest.raises(ConfigError, match="interchange"):
        TinyTrainConfig(interchange=-0.1)
    records = [f.views[lang].record for f in mlake_v2411.facts[:50] for lang in ("en", "zh")]
    texts = [t for r in records for t in (r.question, r.o_prompt, r.o_answer, r.e_answer)]
    tok = train_tokenizer(texts, 800)
    corpus = build_corpus(mlake_v2411, [2, 28, 33], tok, config)
    for unit, (fact_id, lang) in enumerate(corpus.units):
        for seed in range(4):
            ex = _interchange(corpus, unit, random.Random(seed), 128)
            assert ex is not None and ex.swap is not None and ex.route is not None
            pos, source, source_pos = ex.swap
            # Another fact of the same language; its subject's last token is swapped into
            # this prompt's subject's last token, and the loss is on its answer.
            assert corpus.units[source][1] == lang and corpus.units[source][0] != fact_id
            assert pos == ex.route[1] and source_pos == corpus.routes[source][1]  # type: ignore[index]
            prompt, answer = corpus.pieces[unit][0], corpus.pieces[source][1]
            assert ex.ids == prompt + answer
            assert ex.weights == [0.0] * len(prompt) + [1.0] * len(answer)

    # The loss equals a forward pass of the prompt whose residual after block 0 at the
    # subject's last token is the source prompt's, scored on the source's answer.
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(dataclasses.replace(config, n_layers=2), tok)).eval()
    ex = _interchange(corpus, 0, random.Random(0), 128)
    assert ex is not None and ex.swap is not None
    pos, source, source_pos = ex.swap
    with torch.no_grad():
        loss, _ = _batch_loss(model, [ex], tok.pad_token_id, route_layer=1, corpus=corpus)
        plain, _ = _batch_loss(model, [dataclasses.replace(ex, swap=None)], tok.pad_token_id)
        src = model.model(
            input_ids=torch.tensor([corpus.pieces[source][0]]), output_hidden_states=True
        ).hidden_states[1][0, source_pos]

        def put(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h[0, pos] = src
            return out

        handle = model.model.layers[0].register_forward_hook(put)
        logits = model(torch.tensor([ex.ids])).logits[0]
        handle.remove()
    n_prompt = len(corpus.pieces[0][0])
    targets = torch.tensor(ex.ids[n_prompt:])
    expected = torch.nn.functional.cross_entropy(logits[n_prompt - 1 : -1], targets)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss) != pytest.approx(float(plain), rel=1e-3)
    # Gradients flow through the source run: the embeddings of tokens only the source prompt
    # has get a gradient.
    only_source = sorted(set(corpus.pieces[source][0]) - set(ex.ids))
    assert only_source
    model.zero_grad()
    loss, _ = _batch_loss(model, [ex], tok.pad_token_id, route_layer=1, corpus=corpus)
    loss.backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad is not None and float(grad[only_source].abs().sum()) > 0


def test_variants_and_overrides() -> None:
    from mlake_core.models.mlake_tiny import VARIANTS, variant_config

    assert variant_config(TINY_NAME) == TinyTrainConfig()
    editable = variant_config("mlake-tiny-editable")
    assert editable.interchange > 0 and editable.answer_continuations
    assert editable.key() != TinyTrainConfig().key()
    assert set(VARIANTS) >= {TINY_NAME, "mlake-tiny-editable"}
    assert variant_config(TINY_NAME, langs="en,zh", route_masking="0.5").langs == ("en", "zh")
    with pytest.raises(ConfigError, match="mlake-tiny-editable"):
        variant_config("mlake-tiny-big")
    with pytest.raises(ConfigError, match="unknown mlake-tiny training option"):
        variant_config(TINY_NAME, routing=1)


def test_name_entities_and_mlp_interchange(mlake_v2411) -> None:
    import random

    import torch
    from transformers import LlamaForCausalLM

    from mlake_core.models.mlake_tiny import (
        build_corpus,
        model_config,
        synthetic_name,
        train_tokenizer,
    )
    from mlake_core.models.mlake_tiny.examples import _interchange
    from mlake_core.models.mlake_tiny.loss import _batch_loss

    with pytest.raises(ConfigError, match="interchange-site"):
        TinyTrainConfig(interchange_site="attn")
    assert synthetic_name("en", "BBC") == synthetic_name("en", "BBC")
    assert synthetic_name("en", "BBC") != synthetic_name("en", "Canada")
    assert all(not c.isascii() for c in synthetic_name("zh", "BBC"))
    config = TinyTrainConfig(
        facts=4, langs=("en", "zh"), interchange=1.0, name_entities=True, route_layer=1
    )
    records = [f.views[lang].record for f in mlake_v2411.facts[:50] for lang in ("en", "zh")]
    texts = [t for r in records for t in (r.question, r.o_prompt, r.o_answer, r.e_answer)]
    tok = train_tokenizer(texts, 800)
    facts = [2, 28, 33]
    corpus = build_corpus(mlake_v2411, facts, tok, config)
    for lang in ("en", "zh"):
        views = [mlake_v2411.fact(f).views[lang] for f in facts]
        originals = {v.record.o_answer.strip() for v in views}
        expected = {v.record.e_answer.strip() for v in views} - originals
        indices = corpus.synthetic[lang]
        answers = {tok.decode(corpus.pieces[i][1][:-1]).strip() for i in indices}
        assert answers == expected  # every new answer that is not an original one, once
        for i in indices:
            prompt, answer = corpus.pieces[i]
            # The answer as it follows a question, exactly as the unit's own question answer
            # is tokenized (the answer prefix is a token of its own in zh).
            text = tok.decode(answer[:-1]).strip()
            assert answer == [
                *tok(" " + text, add_special_tokens=False)["input_ids"],
                tok.eos_token_id,
            ]
            if lang == "zh":
                assert tok.decode(answer[:1]) == " "
            name = tok.decode(prompt[1:])
            assert name not in {v.question.subject_text for v in views}
            assert corpus.routes[i] == (1, len(prompt) - 1)
    assert len(corpus.synthetic_examples) == sum(len(v) for v in corpus.synthetic.values())
    # Interchange sources include the synthetic entities.
    for synthetic in (False, True):
        drawn = [_interchange(corpus, 0, random.Random(s), 128, synthetic) for s in range(20)]
        sources = {ex.swap[1] for ex in drawn if ex and ex.swap}
        assert len(sources) > 1
        assert (sources <= set(corpus.synthetic["en"])) == synthetic
        assert bool(sources & set(corpus.synthetic["en"])) == synthetic

    # The mlp site swaps the block's MLP output only.
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(dataclasses.replace(config, n_layers=2), tok)).eval()
    ex = _interchange(corpus, 0, random.Random(1), 128)
    assert ex is not None and ex.swap is not None
    pos, source, source_pos = ex.swap
    stored: dict[str, torch.Tensor] = {}

    def keep(module, args, out):
        stored["v"] = out[0, source_pos].clone()

    def put(module, args, out):
        out = out.clone()
        out[0, pos] = stored["v"]
        return out

    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        loss, _ = _batch_loss(
            model, [ex], tok.pad_token_id, route_layer=1, corpus=corpus, interchange_site="mlp"
        )
        handle = mlp.register_forward_hook(keep)
        model(torch.tensor([corpus.pieces[source][0]]))
        handle.remove()
        handle = mlp.register_forward_hook(put)
        logits = model(torch.tensor([ex.ids])).logits[0]
        handle.remove()
    n_prompt = len(corpus.pieces[0][0])
    expected_loss = torch.nn.functional.cross_entropy(
        logits[n_prompt - 1 : -1], torch.tensor(ex.ids[n_prompt:])
    )
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-5)
