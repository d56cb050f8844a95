"""Installing updates: TUF checks, our policy, and 'nothing written' on refusal."""

from __future__ import annotations

import functools
import http.server
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from ota_world import World, edit_json, rewrite_bundle
from tuf.api.metadata import Metadata, Root

from ota import bootenv
from ota.client import OtaRefused, Source
from ota.repository import Repository


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def refused(world: World, bundle: Path, match: str) -> None:
    """The install is refused with `match` in the message and no byte changed."""
    before = world.snapshot_box()
    with pytest.raises(OtaRefused, match=match):
        world.install(bundle)
    assert world.snapshot_box() == before


def test_good_bundle_installs_into_idle_slot_and_switches(world: World) -> None:
    bundle, image = world.publish("1.1.0")
    assert world.install(bundle) == "b"
    assert (world.box / "slotb").read_bytes()[: len(image)] == image
    assert (world.box / "slota").read_bytes()[:200_000] == world.old_image
    s = world.state()
    assert (s.good, s.trial, s.tries) == ("a", "b", 3)
    assert s.versions == {"a": "1.0.0", "b": "1.1.0"}
    assert s.floor == "1.0.0"  # raised only once the slot proves itself
    assert any("installed 1.1.0 in slot b" in m for m in world.messages)
    # the next boot tries slot b
    assert bootenv.grub_boot(world.config.store()).slot == "b"


def test_unsigned_metadata_refused(world: World, tmp_path: Path) -> None:
    bundle, _ = world.publish("1.1.0")
    bad = tmp_path / "unsigned.moat"

    def strip(name: str, data: bytes) -> bytes:
        if name.endswith("targets.json"):
            return edit_json(data, lambda d: d.update(signatures=[]))
        return data

    rewrite_bundle(bundle, bad, strip)
    refused(world, bad, "signature check failed")


def test_wrong_key_refused(world: World, tmp_path: Path) -> None:
    other = World(tmp_path / "other")
    bundle, _ = other.publish("1.1.0")
    refused(world, bundle, "signature check failed")


def test_altered_metadata_refused(world: World, tmp_path: Path) -> None:
    bundle, _ = world.publish("1.1.0")
    bad = tmp_path / "altered.moat"

    def bump(name: str, data: bytes) -> bytes:
        if name.endswith("targets.json"):
            return data.replace(b'"1.1.0"', b'"9.9.9"')
        return data

    rewrite_bundle(bundle, bad, bump)
    refused(world, bad, "signature check failed")


def test_altered_image_refused_before_any_write(world: World, tmp_path: Path) -> None:
    bundle, _ = world.publish("1.1.0")
    bad = tmp_path / "altered-image.moat"

    def flip(name: str, data: bytes) -> bytes:
        if name.startswith("targets/"):
            return data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
        return data

    rewrite_bundle(bundle, bad, flip)
    refused(world, bad, "altered image")


def test_truncated_image_refused(world: World, tmp_path: Path) -> None:
    bundle, _ = world.publish("1.1.0")
    bad = tmp_path / "short.moat"
    rewrite_bundle(bundle, bad, lambda n, d: d[:-10] if n.startswith("targets/") else d)
    refused(world, bad, "altered image")


def test_older_version_refused(world: World) -> None:
    bundle, _ = world.publish("0.9.0")
    refused(
        world, bundle, "older version: 0.9.0 is not above the installed floor 1.0.0"
    )


def test_same_version_refused(world: World) -> None:
    bundle, _ = world.publish("1.0.0")
    refused(world, bundle, "older version")


def test_replayed_old_metadata_refused(world: World) -> None:
    old_bundle, _ = world.publish("1.1.0")
    new_bundle, _ = world.publish("1.2.0")
    world.installer().check(Source(None, new_bundle))  # box now trusts newer metadata
    refused(world, old_bundle, "replayed old metadata")


def test_expired_timestamp_refused_freeze(tmp_path: Path) -> None:
    world = World(tmp_path, expiry={"timestamp": timedelta(hours=1)})
    bundle, _ = world.publish("1.1.0")
    world.wall = lambda: time.time() + 2 * 3600
    refused(world, bundle, "metadata expired")


def test_clock_set_back_cannot_unfreeze(tmp_path: Path) -> None:
    """Synced once in the future, then the clock goes back: the floor holds."""
    world = World(tmp_path, expiry={"timestamp": timedelta(hours=1)})
    bundle, _ = world.publish("1.1.0")
    world.wall = lambda: time.time() + 2 * 3600
    with pytest.raises(OtaRefused, match="expired"):
        world.install(bundle)
    world.synced = False
    world.wall = lambda: 0.0  # RTC-less box woke up in 1970
    refused(world, bundle, "metadata expired")


def test_wrong_board_refused(world: World) -> None:
    bundle, _ = world.publish("1.1.0", board="apu2")
    refused(world, bundle, "wrong board: update is for apu2, this box is pc-x86_64")


def test_below_threshold_signatures_refused(tmp_path: Path) -> None:
    world = World(tmp_path, counts={"targets": 2}, thresholds={"targets": 2})
    bundle, _ = world.publish("1.1.0")
    bad = tmp_path / "one-sig.moat"

    def drop_one(name: str, data: bytes) -> bytes:
        if name.endswith("targets.json"):
            return edit_json(data, lambda d: d.update(signatures=d["signatures"][:1]))
        return data

    rewrite_bundle(bundle, bad, drop_one)
    refused(world, bad, "signature check failed")
    world.install(bundle)  # both signatures: accepted


def test_root_rotation_followed_by_box(world: World, tmp_path: Path) -> None:
    world.repo.rotate_root(
        world.root_keys, tmp_path / "newroot", 2, 2, rotate=("timestamp",)
    )
    bundle, _ = world.publish("1.1.0")
    world.install(bundle)
    trusted = Metadata[Root].from_file(
        str(world.config.state_dir / "metadata/root.json")
    )
    assert trusted.signed.version == 2


def test_root_rotation_not_signed_by_old_keys_refused(
    world: World, tmp_path: Path
) -> None:
    # an attacker with fresh keys makes "root 2" signed only by those keys
    repo = Repository(world.repo.path)
    old = repo.root()
    from securesystemslib.signer import CryptoSigner

    forged = Metadata[Root].from_bytes(old.to_bytes())
    forged.signed.version = 2
    signer = CryptoSigner.generate_ed25519()
    for keyid in list(forged.signed.roles["root"].keyids):
        forged.signed.revoke_key(keyid, "root")
    forged.signed.add_key(signer.public_key, "root")
    forged.sign(signer)
    (repo.metadata_dir / "2.root.json").write_bytes(forged.to_bytes())
    bundle, _ = world.publish("1.1.0")
    refused(world, bundle, "signature check failed")


def test_install_refused_while_a_slot_is_on_trial(world: World) -> None:
    bundle, _ = world.publish("1.1.0")
    world.install(bundle)
    bundle2, _ = world.publish("1.2.0")
    refused(world, bundle2, "not proven good yet")


def test_version_that_failed_here_is_refused(world: World) -> None:
    bundle, _ = world.publish("1.1.0")
    world.installer().record_failed("1.1.0")
    refused(world, bundle, "already failed")


def test_not_a_bundle_refused(world: World, tmp_path: Path) -> None:
    junk = tmp_path / "junk.moat"
    junk.write_bytes(b"hello" * 100)
    refused(world, junk, "not an update bundle")


@pytest.fixture
def served_repo(world: World) -> Iterator[str]:
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(world.repo.path)
    )
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_repository_check_and_install(world: World, served_repo: str) -> None:
    world.publish("1.1.0")
    world.publish("1.2.0")
    world.publish("1.3.0", board="apu2")
    world.config.repository_url = served_repo
    cand = world.installer().check(Source(served_repo, None))
    assert cand.version == "1.2.0"
    world.install(None)
    assert world.state().versions["b"] == "1.2.0"
    assert world.state().trial == "b"


def test_http_altered_image_leaves_boot_choice(world: World, served_repo: str) -> None:
    world.publish("1.1.0")
    for p in world.repo.targets_dir.iterdir():
        data = bytearray(p.read_bytes())
        data[5] ^= 0xFF
        p.write_bytes(bytes(data))
    world.config.repository_url = served_repo
    with pytest.raises(OtaRefused, match="altered image.*slot b was overwritten"):
        world.install(None)
    s = world.state()
    assert (s.good, s.trial, s.versions["b"]) == ("a", "-", "-")
    assert bootenv.grub_boot(world.config.store()).slot == "a"


class PowerCut(BaseException):
    """Raised instead of the N-th write, after half of its bytes landed."""


def test_power_cut_at_every_write_step_boots_a_good_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import ota.client

    monkeypatch.setattr(ota.client, "CHUNK_SIZE", 64 * 1024)
    real_pwrite = os.pwrite
    probe = World(tmp_path / "probe")
    bundle, image = probe.publish("1.1.0")
    count = [0]

    def counting(fd: int, data: bytes, offset: int) -> int:
        count[0] += 1
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counting)
    probe.install(bundle)
    total = count[0]
    assert total >= 6  # env, >= 4 image chunks, env

    for cut_at in range(1, total + 1):
        world = World(tmp_path / f"cut{cut_at}")
        world.repo = probe.repo
        (world.box / "root.json").write_bytes((probe.box / "root.json").read_bytes())
        count[0] = 0

        def crashing(fd: int, data: bytes, offset: int, cut_at: int = cut_at) -> int:
            count[0] += 1
            if count[0] == cut_at:
                real_pwrite(fd, bytes(data)[: len(data) // 2], offset)
                raise PowerCut
            return real_pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", crashing)
        with pytest.raises(PowerCut):
            world.install(bundle)
        monkeypatch.setattr(os, "pwrite", real_pwrite)

        choice = bootenv.grub_boot(world.config.store())
        got = (world.box / f"slot{choice.slot}").read_bytes()
        want = world.old_image if choice.slot == "a" else image
        assert got[: len(want)] == want, f"cut at write {cut_at} boots a torn slot"
        # only the very last write may switch; a cut there leaves slot a
        assert choice.slot == "a"


def test_config_takes_devices_from_the_init_scripts_boot_env(tmp_path: Path) -> None:
    import json

    from ota.config import OtaConfig

    facts = tmp_path / "boot.env"
    facts.write_text(
        "MOAT_DISK=/dev/vda\nMOAT_SLOT=b\nMOAT_BOOT_DEV=/dev/vda1\n"
        "MOAT_SLOT_A_DEV=/dev/vda2\nMOAT_SLOT_B_DEV=/dev/vda3\n"
    )
    cfg_path = tmp_path / "ota.json"
    cfg_path.write_text(
        json.dumps(
            {
                "product": "moat",
                "board": "pc-x86_64",
                "version": "1.0.0",
                "boot_env": str(facts),
                "bootenv": {"path": str(tmp_path / "env"), "offsets": [0, 1024]},
            }
        )
    )
    cfg = OtaConfig.load(cfg_path)
    assert cfg.slots == {"a": Path("/dev/vda2"), "b": Path("/dev/vda3")}
    assert cfg.running() == "b"


def test_fuzz_mutated_bundle_is_refused_or_installs_the_signed_image(
    tmp_path: Path,
) -> None:
    """Random byte damage anywhere in a bundle: a clear refusal, never a crash,
    and an install only ever writes the exact signed image."""
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    base = World(tmp_path / "base")
    bundle, image = base.publish("1.1.0", size=20_000)
    data = bundle.read_bytes()
    env_before = (base.box / "env").read_bytes()
    slot_before = (base.box / "slotb").read_bytes()
    counter = [0]

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        st.lists(
            st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
            min_size=1,
            max_size=4,
        )
    )
    # a tar header zeroed: the image's member is gone from the bundle
    @example([(7168, 0)])
    def one(edits: list[tuple[int, int]]) -> None:
        blob = bytearray(data)
        for at, value in edits:
            blob[at] = value
        counter[0] += 1
        path = tmp_path / f"m{counter[0]}.moat"
        path.write_bytes(bytes(blob))
        # fresh box state each time
        (base.box / "env").write_bytes(env_before)
        (base.box / "slotb").write_bytes(slot_before)
        import shutil

        shutil.rmtree(base.config.state_dir, ignore_errors=True)
        try:
            base.install(path)
        except OtaRefused:
            assert (base.box / "env").read_bytes() == env_before
            return
        assert (base.box / "slotb").read_bytes()[: len(image)] == image

    one()


def test_version_parser_properties() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    from ota.version import VersionError, is_newer, parse_version

    @given(st.text(max_size=40))
    def no_crash(text: str) -> None:
        try:
            parse_version(text)
        except VersionError:
            pass

    @given(st.lists(st.integers(0, 10**6), min_size=1, max_size=3))
    def zeros_do_not_matter(parts: list[int]) -> None:
        v = ".".join(map(str, parts))
        assert parse_version(v) == parse_version(v + ".0")
        assert not is_newer(v, v)
        assert is_newer(v + ".1", v)

    no_crash()
    zeros_do_not_matter()
    assert is_newer("1.10", "1.9")


def test_schedule_backs_off_when_unreachable_and_resets() -> None:
    from ota.schedule import Outcome, Schedule

    s = Schedule(interval=3600, retry_min=60)
    mid = lambda: 0.5  # noqa: E731 - no jitter
    delays = [s.next_check(0, Outcome.UNREACHABLE, mid) for _ in range(8)]
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert s.next_check(0, Outcome.UP_TO_DATE, mid) == 3600
    assert s.next_check(0, Outcome.UNREACHABLE, mid) == 60
    low, high = (
        s.next_check(0, Outcome.INSTALLED, lambda: 0.0),
        s.next_check(0, Outcome.INSTALLED, lambda: 1.0),
    )
    assert (low, high) == pytest.approx((3240, 3960))


def test_watch_installs_from_served_repository(world: World, served_repo: str) -> None:
    from ota.schedule import Schedule, watch

    world.config.repository_url = served_repo
    sleeps: list[float] = []
    # nothing published yet: up to date, wait a full interval
    watch(
        world.installer(),
        served_repo,
        Schedule(interval=100),
        None,
        lambda: 0.0,
        sleeps.append,
        rounds=1,
    )
    assert world.state().trial == "-"
    world.publish("1.1.0")
    watch(
        world.installer(),
        served_repo,
        Schedule(interval=100),
        None,
        lambda: 0.0,
        sleeps.append,
        rounds=1,
    )
    assert world.state().trial == "b"
    assert all(90 <= d <= 110 for d in sleeps)
    # portal unreachable: retried sooner
    watch(
        world.installer(),
        "http://127.0.0.1:9",
        Schedule(interval=100, retry_min=5),
        None,
        lambda: 0.0,
        sleeps.append,
        rounds=1,
    )
    assert sleeps[-1] <= 5.5


def test_missing_trusted_root_is_a_clear_refusal(world: World) -> None:
    bundle, _ = world.publish("1.1.0")
    (world.box / "root.json").unlink()
    with pytest.raises(OtaRefused, match="no trusted TUF root"):
        world.install(bundle)
