"""Shared test set-up: import the modules from the repository root, keep caches in a temporary folder."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Every test builds its caches under a fresh temporary folder, never in ./cache."""
    monkeypatch.setenv("PCL_CACHE", str(tmp_path_factory.mktemp("cache")))
