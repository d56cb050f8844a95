"""What the firmware image builder puts in a slot for the updater.

- /usr/lib/moat/ota/root.json: the TUF root the box trusts, from $OTA_ROOT
  (a repository's 1.root.json or newer); without it a throwaway test
  repository is made under build/ota-test (its keys sign test updates);
- /usr/lib/moat/ota.json: product, board, version and build time (the trusted
  time floor); devices come from the init script's /run/moat/boot.env.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ota.repository import DEFAULT_EXPIRY, TOP_ROLES, Repository

REPO = Path(__file__).resolve().parent.parent
TEST_REPO = REPO / "build" / "ota-test"
PRODUCT = "moat"
BOARD = "pc-x86_64"


def test_repository() -> Repository:
    """The throwaway repository test images trust (created once)."""
    repo = Repository(TEST_REPO / "repo")
    if not (repo.path / "repo.json").exists():
        ones = {r: 1 for r in TOP_ROLES}
        repo.keygen(TEST_REPO / "root-keys", ones, ones, DEFAULT_EXPIRY)
    return repo


def ota_files(moat_lib: Path, version: str) -> None:
    root = os.environ.get("OTA_ROOT") or str(test_repository().root_versions()[0])
    (moat_lib / "ota").mkdir(parents=True, exist_ok=True)
    shutil.copy(root, moat_lib / "ota/root.json")
    config = {
        "product": PRODUCT,
        "board": BOARD,
        "version": version,
        "build_time": int(time.time()),
    }
    (moat_lib / "ota.json").write_text(json.dumps(config, indent=1) + "\n")
