"""Shared fixtures. Real-data tests skip with a reason where celeba-10k is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"
SAMPLE_FACES = ASSETS / "sample_faces"


def celeba_path() -> Path:
    """celeba-10k: $PRIC_CELEBA, else ../shared/data/celeba-10k beside the checkout."""
    env = os.environ.get("PRIC_CELEBA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "celeba-10k"


@pytest.fixture(scope="session")
def celeba_dir() -> Path:
    path = celeba_path()
    if not (path / "list_attr_celeba.txt").is_file():
        pytest.skip(f"celeba-10k not found at {path} (set PRIC_CELEBA to its folder)")
    return path


@pytest.fixture(scope="session")
def sample_faces() -> Path:
    """48 bundled CelebA thumbnails in the generic layout (images/ + labels.csv with split)."""
    return SAMPLE_FACES


@pytest.fixture(scope="session")
def sample_images(sample_faces: Path) -> list[Path]:
    return sorted((sample_faces / "images").glob("*.jpg"))
