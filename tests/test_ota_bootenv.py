"""Boot environment: format (checked with GRUB's own grub-editenv), torn writes."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ota import bootenv
from ota.bootenv import ENVBLK_SIZE, BlockStore, BootEnvError, BootState
from ota.prove import clear_trial, mark_good

STATE = BootState(
    seq=7,
    good="a",
    trial="-",
    tries=0,
    versions={"a": "1.0.0", "b": "-"},
    floor="1.0.0",
)
needs_editenv = pytest.mark.skipif(
    shutil.which("grub-editenv") is None, reason="grub-editenv (grub-common) missing"
)


def store_with(tmp_path: Path, blob: bytes) -> BlockStore:
    path = tmp_path / "env"
    path.write_bytes(blob)
    return BlockStore(path, (0, ENVBLK_SIZE))


def test_roundtrip() -> None:
    block = bootenv.encode(STATE)
    assert len(block) == ENVBLK_SIZE
    assert bootenv.decode(block) == STATE


@needs_editenv
def test_grub_editenv_reads_our_block(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(bootenv.encode(replace(STATE, trial="b", tries=3)))
    out = subprocess.run(
        ["grub-editenv", str(path), "list"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "moat_seq=1000000007" in out
    assert "moat_seal=1000000007" in out
    assert "moat_try=b" in out and "moat_tries=3" in out


@needs_editenv
def test_grub_in_place_decrement_changes_one_byte_and_keeps_block_valid(
    tmp_path: Path,
) -> None:
    """GRUB's save_env edits in place like grub-editenv set: one byte moves."""
    path = tmp_path / "grubenv"
    before = bootenv.encode(replace(STATE, trial="b", tries=3))
    path.write_bytes(before)
    subprocess.run(["grub-editenv", str(path), "set", "moat_tries=2"], check=True)
    after = path.read_bytes()
    assert sum(x != y for x, y in zip(before, after, strict=True)) == 1
    assert bootenv.decode(after).tries == 2
    # our simulation of GRUB's write produces the same bytes
    store = store_with(tmp_path, before + bootenv.encode(replace(STATE, seq=6)))
    assert bootenv.grub_boot(store).slot == "b"
    assert store.read(0) == after


def test_torn_block_is_invalid() -> None:
    old = bootenv.encode(STATE)
    new = bootenv.encode(replace(STATE, seq=8, trial="b", tries=3))
    diff = [i for i in range(ENVBLK_SIZE) if old[i] != new[i]]
    for cut in range(0, ENVBLK_SIZE + 1):
        torn = new[:cut] + old[cut:]
        try:
            got = bootenv.decode(torn)
        except BootEnvError:
            continue
        # decodable only when the cut lies before any change or after the last
        assert (cut <= diff[0] and got == STATE) or (cut > diff[-1] and got.seq == 8)


@pytest.mark.parametrize(
    "change",
    [
        lambda s: replace(s, trial="b", tries=3, versions={"a": "1.0.0", "b": "1.1.0"}),
        lambda s: mark_good(replace(s, trial="b", tries=1), "b"),
        clear_trial,
    ],
    ids=["switch-to-trial", "mark-good", "clear-failed-trial"],
)
def test_crash_at_every_byte_of_a_save_keeps_old_or_new_choice(
    tmp_path: Path, change: object
) -> None:
    """Power cut after any prefix of the write: GRUB picks the old or new state."""
    base = replace(STATE, trial="b", tries=0)
    initial = bootenv.encode(base) + bootenv.encode(replace(base, seq=6))
    store = store_with(tmp_path, initial)
    new_state = bootenv.save(store, change)  # type: ignore[arg-type]
    written = store.read(1)
    choices = {
        bootenv.grub_choose(base).slot,
        bootenv.grub_choose(new_state).slot,
    }
    for cut in range(0, ENVBLK_SIZE + 1, 7):
        blob = bytearray(initial)
        blob[ENVBLK_SIZE : ENVBLK_SIZE + cut] = written[:cut]
        s = store_with(tmp_path, bytes(blob))
        loaded = bootenv.load(s).state
        assert loaded in (base, new_state), cut
        assert bootenv.grub_boot(s).slot in choices


def test_grub_torn_decrement_falls_back_to_older_block(tmp_path: Path) -> None:
    """GRUB's own write torn into garbage: the older block (before the switch) wins."""
    before = replace(STATE, seq=6)
    trial = replace(STATE, trial="b", tries=3, versions={"a": "1.0.0", "b": "1.1.0"})
    blob = bytearray(bootenv.encode(trial) + bootenv.encode(before))
    blob[0:512] = b"\x00" * 512  # sector 0 of the block GRUB was writing
    s = store_with(tmp_path, bytes(blob))
    assert bootenv.grub_boot(s).slot == "a"


def test_no_valid_block_boots_slot_a(tmp_path: Path) -> None:
    s = store_with(tmp_path, b"\0" * 2 * ENVBLK_SIZE)
    assert bootenv.grub_boot(s) == bootenv.BootChoice("a", False, None, None)
    with pytest.raises(BootEnvError):
        bootenv.load(s)


def test_tries_count_down_then_fall_back(tmp_path: Path) -> None:
    trial = replace(STATE, trial="b", tries=3)
    s = store_with(
        tmp_path, bootenv.encode(trial) + bootenv.encode(replace(STATE, seq=6))
    )
    slots = [bootenv.grub_boot(s) for _ in range(5)]
    assert [c.slot for c in slots] == ["b", "b", "b", "a", "a"]
    assert slots[3].fell_back_from == "b"


def test_save_alternates_blocks_and_never_touches_block_in_use(tmp_path: Path) -> None:
    s = store_with(tmp_path, bootenv.initial_blocks("a", "1.0.0"))
    for i in range(4):
        in_use = bootenv.load(s).index
        before = s.read(in_use)
        bootenv.save(s, lambda st, i=i: replace(st, tries=i % 4))
        assert s.read(in_use) == before
        assert bootenv.load(s).index == 1 - in_use


def test_init_cli_writes_two_valid_blocks(tmp_path: Path) -> None:
    out = tmp_path / "blocks"
    assert bootenv.main(["init", "--good", "b", "--version", "2.0", str(out)]) == 0
    loaded = bootenv.load(BlockStore(out, (0, ENVBLK_SIZE)))
    assert loaded.state.good == "b" and loaded.other_valid


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=ENVBLK_SIZE, max_size=ENVBLK_SIZE))
def test_fuzz_decode_only_raises_bootenv_error(data: bytes) -> None:
    try:
        bootenv.decode(data)
    except BootEnvError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, ENVBLK_SIZE - 1), st.integers(0, 255))
def test_fuzz_single_byte_damage_never_yields_other_state(at: int, value: int) -> None:
    block = bytearray(bootenv.encode(STATE))
    block[at] = value
    try:
        got = bootenv.decode(bytes(block))
    except BootEnvError:
        return
    # no CRC (GRUB could not check one): damage that still parses must at
    # least be a well-formed state, so GRUB and Linux agree on what it means
    assert bootenv.decode(bootenv.encode(got)) == got


def test_version_with_newline_cannot_enter_a_block() -> None:
    with pytest.raises(BootEnvError):
        bootenv.encode(replace(STATE, floor="1.0\nmoat_good=b"))
    with pytest.raises(BootEnvError):
        bootenv.encode(replace(STATE, versions={"a": "1.0\n", "b": "-"}))
