"""Shared fixtures. Tiny Shakespeare is read from $SWITCH_CORE_DATA, else <repo>/../shared/data (never copied
into the repository)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shakespeare_root() -> Path:
    """Directory holding tinyshakespeare/input.txt; skips the test when the file is not there."""
    root = Path(os.environ.get("SWITCH_CORE_DATA") or REPO.parent / "shared" / "data")
    if not (root / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"Tiny Shakespeare not found under {root}; set SWITCH_CORE_DATA")
    return root


@pytest.fixture(scope="session")
def char_data(shakespeare_root):
    """Tokenized Tiny Shakespeare (train/val split), loaded once per session without downloading."""
    from switch_core.data import load_char_data

    return load_char_data(shakespeare_root, download=False)


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny models on one thread: faster at these sizes, and robust when other jobs share the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
