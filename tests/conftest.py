"""Fixtures every test folder may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.smollm2 import convert_once


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF cache holding SmolLM2-135M-Instruct converted (once per session, 15-25 s)."""
    cache = tmp_path_factory.mktemp("gguf-cache")
    convert_once(cache)
    return cache
