"""The README's configuration reference names every setting (so it cannot
silently fall behind the code)."""

from __future__ import annotations

import dataclasses

from common.settings import _SECTIONS
from tests.conftest import ROOT


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [
        f"TQ_{section}_{field.name}".upper()
        for section, cls in _SECTIONS.items()
        for field in dataclasses.fields(cls)
        if f"TQ_{section}_{field.name}".upper() not in readme
    ]
    assert missing == []
