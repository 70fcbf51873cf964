"""Shared fixtures: a small synthetic dataset in the MVTec 3D-AD layout, generated once per session."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import pytest

from utils.data.synthetic import SyntheticConfig, generate_dataset

# Small, non-square, every defect type present in the test split.
TEST_DATA_CONFIG = SyntheticConfig(classes=("dome", "box"), n_train=4, n_val=2, n_test=8, size=(64, 80))


@pytest.fixture(scope="session")
def synthetic_config() -> SyntheticConfig:
    """The configuration ``synthetic_root`` was generated with."""
    return TEST_DATA_CONFIG


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory, synthetic_config: SyntheticConfig) -> Path:
    """A read-only synthetic dataset shared by all tests (do not modify it; copy it with ``dataset_copy``)."""
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), synthetic_config)


@pytest.fixture
def dataset_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the ``dome`` class, for tests that damage files."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "dome", root / "dome")
    return root


@pytest.fixture
def offline_without_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine with no network and no weights: the hub offline, an empty Hugging Face cache (so a user's cached
    DINO weights cannot make a test pass or fail) and a working folder without checkpoints/."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


MeasuredCheck = Callable[..., None]


@pytest.fixture
def check_measured(record_property: Callable[[str, object], None]) -> MeasuredCheck:
    """Assert a learned or measured number against its bound and record both as a JUnit XML property, so that
    ``scripts/dispatch_spread.py`` can report how far each such number moves between CPU code paths and how much
    margin its bound leaves.

    ``check_measured(name, value, minimum=None, maximum=None)``: the bounds are inclusive.
    """

    def check(name: str, value: float, minimum: float | None = None, maximum: float | None = None) -> None:
        value = float(value)
        record_property(name, json.dumps({"value": value, "min": minimum, "max": maximum}))
        assert minimum is None or value >= minimum, f"{name} = {value:.6g} is below its bound {minimum}"
        assert maximum is None or value <= maximum, f"{name} = {value:.6g} is above its bound {maximum}"

    return check
