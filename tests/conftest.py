from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from netns import Lab, have_netns  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if have_netns():
        return
    skip = pytest.mark.skip(reason="needs root and network namespaces")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab


@pytest.fixture
def moat_cmd() -> list[str]:
    """The argv prefix that runs the `moat` program from this checkout."""
    return [sys.executable, "-m", "moat"]
