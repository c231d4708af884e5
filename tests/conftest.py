"""Shared fixtures: the sample data beside the repository (../shared/data), skipped with a reason if absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"sample data not found at {DATA} (expected ../shared/data beside the repository)")
    return DATA
