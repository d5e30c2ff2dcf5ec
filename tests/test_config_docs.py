"""docs/configuration.md is generated from the config tree and must not drift from it."""

from __future__ import annotations

from pathlib import Path

from jobs.config_docs import COMMAND, render
from salgl.config import Config, to_flat

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_configuration_page_is_generated() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), f"docs/configuration.md is stale: run `{COMMAND}`"


def test_configuration_page_lists_every_key() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = [key for key in to_flat(Config()) if f"`{key}`" not in text]
    assert not missing, f"keys missing from docs/configuration.md: {missing}; run `{COMMAND}`"
