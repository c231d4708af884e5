"""Shared fixtures: the sample data beside the repository (../shared/data), skipped with a reason if absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

# Every process the tests start (torchrun's ranks included) prints its Python threads' stacks if it dies of SIGABRT or
# SIGSEGV: a torchrun rank has aborted now and then in full runs ("terminate called without an active exception",
# three times on record, in segment and training runs; never in 80 runs of the segment command alone): the stacks
# say where.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"sample data not found at {DATA} (expected ../shared/data beside the repository)")
    return DATA
