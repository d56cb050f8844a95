from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session")
def dev_image(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test image with the development shell on serial (qemubox.dev_copy)."""
    from qemubox import dev_copy

    return dev_copy(image, tmp_path_factory.mktemp("dev") / "moat-dev.img")


@pytest.fixture
def box_image(dev_image: Path, tmp_path: Path) -> Path:
    """A fresh disk for one test, copied from dev_image."""
    import shutil

    copy = tmp_path / "box.img"
    shutil.copyfile(dev_image, copy)
    return copy


@pytest.fixture
def boxes() -> Iterator[list[Any]]:
    """QEMU boxes (qemubox.Box) a test starts: closed, QEMU killed, at its end."""
    started: list[Any] = []
    yield started
    for box in started:
        box.close()


@pytest.fixture
def moat_cmd() -> list[str]:
    """The argv prefix that runs the `moat` program from this checkout."""
    return [sys.executable, "-m", "moat"]


# --- the firmware image, built once per session (qemu tests) ---------------

TEST_IMAGE_DIR = REPO / "build" / "test-image"


def _build_test_image(out: Path) -> Path:
    """make payload + make image into `out`, trusting a throwaway TUF root
    (out/ota: repository with its online keys, root keys beside it)."""
    import shutil
    import subprocess

    from ota.repository import DEFAULT_EXPIRY, TOP_ROLES, Repository

    ota = out / "ota"
    if ota.exists():
        shutil.rmtree(ota)
    repo = Repository(ota / "repo")
    one = {role: 1 for role in TOP_ROLES}
    repo.keygen(ota / "root-keys", one, one, dict(DEFAULT_EXPIRY))
    env = {**os.environ, "MOAT_OTA_ROOT": str(repo.root_versions()[0])}
    image, payload = out / "moat-x86_64.img", out / "payload"
    for argv in (
        [sys.executable, "-m", "firmware.payload", "--out", str(payload)],
        [
            *(sys.executable, "-m", "firmware.image", "-o", str(image)),
            *("--payload", str(payload / "dist" / "moat"), "--work", str(out / "work")),
        ],
    ):
        subprocess.run(argv, cwd=REPO, check=True, env=env)
    return image


@pytest.fixture(scope="session")
def image() -> Path:
    """The test image. MOAT_TEST_IMAGE=build/test-image/moat-x86_64.img reuses
    an earlier session's build (the OTA tests also need its work/ and ota/)."""
    import shutil

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86 is not installed (make deps)")
    given = os.environ.get("MOAT_TEST_IMAGE")
    return Path(given).resolve() if given else _build_test_image(TEST_IMAGE_DIR)
