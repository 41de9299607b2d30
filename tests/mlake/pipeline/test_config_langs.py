"""A pipeline config naming only a data folder runs on that folder's languages (DataSettings'
langs default "all" is resolved against the data_dir given, not the default folder's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mlake.pipeline.config import config_from_dict

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "sixth_language" / "build.py"


@pytest.fixture(scope="module")
def six_languages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("sixth_language_build", FIXTURE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.build_sixth_language(tmp_path_factory.mktemp("mlake6")))


def test_a_data_dir_without_langs_takes_its_languages(six_languages: Path) -> None:
    config = config_from_dict({"data": {"data_dir": str(six_languages)}})
    assert config.data.langs == ("en", "zh", "ja", "fr", "de", "es")


def test_langs_given_are_kept(six_languages: Path) -> None:
    config = config_from_dict({"data": {"data_dir": str(six_languages), "langs": "en,es"}})
    assert config.data.langs == ("en", "es")


def test_the_default_folder_keeps_its_five() -> None:
    config = config_from_dict({"data": {"facts": 3}})
    assert config.data.langs == ("en", "zh", "ja", "fr", "de")
