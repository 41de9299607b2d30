"""A prompt far longer than the model's context is refused before any pass, naming the
record (issue 24, item 7): with learned positions past the last position, otherwise when one
pass of it cannot fit in the free memory.  Before, it ran into an out-of-memory traceback
(or the kernel's OOM killer) that named nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlake_core.errors import DataError
from mlake_core.models import load_adapter
from mlake_core.models.adapter import free_bytes, pass_bytes
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.tiny import TinySize, build_tiny_model
from tests.conftest import real_data_dir

WHERE = "fact 7 [en] question form"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(arch, root / arch) for arch in ("gpt2", "llama")}


def test_learned_positions_end_at_the_context(tiny_models: dict[str, Path]) -> None:
    adapter = load_adapter(str(tiny_models["gpt2"]), "tlens", device="cpu")
    n_ctx = TinySize().n_ctx
    assert adapter.info.positional == "learned" and adapter.info.max_positions == n_ctx
    adapter.check_fits(n_ctx, WHERE)
    with pytest.raises(DataError) as err:
        adapter.check_fits(n_ctx + 1, WHERE)
    assert str(err.value).startswith(f"{WHERE}: longer than the model's {n_ctx} learned positions")
    # The same reason for every record (stages count skipped records by it).
    with pytest.raises(DataError) as other:
        adapter.check_fits(3 * n_ctx, "fact 8 [zh] question form")
    assert str(other.value).split(": ", 1)[1] == str(err.value).split(": ", 1)[1]


def test_memory_is_checked_only_where_asked(tiny_models: dict[str, Path], monkeypatch) -> None:
    """The memory check depends on the moment, so stages that skip a refused record (and
    save the run as complete) do not make it: ``memory=False`` (``locate_prompt``)."""
    from mlake_core.models import adapter as adapter_module

    adapter = load_adapter(str(tiny_models["llama"]), "tlens", device="cpu")
    monkeypatch.setattr(adapter_module, "free_bytes", lambda device: 1)
    adapter.check_fits(50, WHERE, memory=False)
    with pytest.raises(DataError, match="GiB free on cpu"):
        adapter.check_fits(50, WHERE)


def test_rotary_models_are_refused_when_a_pass_cannot_fit(tiny_models: dict[str, Path]) -> None:
    """No monkeypatching: 10^5 tokens need hundreds of GiB even for a 2-head model."""
    adapter = load_adapter(str(tiny_models["llama"]), "nnsight", device="cpu")
    assert adapter.info.positional == "rotary"
    free = free_bytes(adapter.device)
    assert free is not None
    adapter.check_fits(200, WHERE)  # past the context, but small: the pass warns and runs
    n = 100_000
    assert pass_bytes(adapter.info, n) > free
    with pytest.raises(DataError) as err:
        adapter.check_fits(n, WHERE)
    message = str(err.value)
    assert message.startswith(f"{WHERE}: {n} tokens (the model is made for")
    assert "GiB free on cpu; shorten the prompt" in message


def test_the_estimate_is_quadratic_in_length(tiny_models: dict[str, Path]) -> None:
    info = load_adapter(str(tiny_models["llama"]), "tlens", device="cpu").info
    small, big = pass_bytes(info, 10_000), pass_bytes(info, 20_000)
    assert 3.5 < big / small <= 4.0
    assert pass_bytes(info, 1000, rows=3) == 3 * pass_bytes(info, 1000)


@pytest.fixture(scope="module")
def long_question(micro_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A copy of v2024-11 where the English question of micro mlake-tiny's first fact is
    some 60,000 words long; returns the copy and the fact id."""
    meta = read_metadata(micro_tiny)
    assert meta is not None
    fact = int(meta["fact_ids"][0])
    root = real_data_dir()
    assert root is not None
    copy = tmp_path_factory.mktemp("data") / "mlake"
    shutil.copytree(root / "v2024-11", copy / "v2024-11")
    path = copy / "v2024-11" / "dataset" / "single_hop" / "en_qa.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    records[fact]["question"] = "Very " * 60_000 + records[fact]["question"]
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return copy, fact


@pytest.mark.slow
def test_the_command_names_the_record(
    micro_tiny: Path,
    long_question: tuple[Path, int],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlake import cli

    copy, fact = long_question
    status = cli.main(
        [
            "eval",
            "knowledge",
            "--model",
            str(micro_tiny),
            "--data-dir",
            str(copy),
            "--langs",
            "en",
            "--forms",
            "question",
            "--results-dir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"mlake: error: fact {fact} [en] question form: ")
    assert "GiB free on cpu; shorten the prompt" in err
