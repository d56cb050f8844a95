"""The multi-call program: every verb answers --help, errors are clear."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

from moat.cli import VERBS

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def moat(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moat", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )


def test_overview_lists_every_verb() -> None:
    res = moat("--help")
    assert res.returncode == 0
    for verb in VERBS:
        assert f"  {verb}" in res.stdout


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help(verb: str) -> None:
    res = moat(verb, "--help")
    assert res.returncode == 0, res.stderr
    assert f"moat {verb}" in res.stdout


def test_unknown_verb_is_a_clear_error() -> None:
    res = moat("frobnicate")
    assert res.returncode == 2
    assert "unknown verb 'frobnicate'" in res.stderr


def test_called_through_a_link_named_after_the_verb() -> None:
    code = (
        "import sys; sys.argv[0] = '/usr/bin/moat-version'; "
        "from moat.cli import main; sys.exit(main())"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV
    )
    assert res.returncode == 0
    assert res.stdout.strip() == "0.1.0"
