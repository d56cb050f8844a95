"""Firmware pieces that need no QEMU: layout, GRUB env, /var backup, cpio,
ELF, supervisor, flash refusals, payload options."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware import elf, flash, layout, payload
from firmware.cpio import CpioWriter
from moat import grubenv, supervisor, varbackup
from moat import var as var_verb
from moat.cli import VERBS
from moat.errors import ConfigError

# --- layout ---------------------------------------------------------------


def test_partitions_fit_and_do_not_overlap() -> None:
    parts = layout.partitions()
    total = layout.disk_sectors()
    assert total * layout.SECTOR_SIZE <= 64 * 2**20
    primaries = [p for p in parts.values() if p.number <= 4]
    logicals = [p for p in parts.values() if p.number > 4]
    ext = parts["extended"]
    spans = sorted((p.start, p.start + p.sectors) for p in primaries)
    assert spans[0][0] >= layout.CORE_IMG_SECTORS + 1
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start
    assert spans[-1][1] <= total
    for part in logicals:
        assert (
            ext.start < part.start
            and part.start + part.sectors <= ext.start + ext.sectors
        )
    assert parts["slot_a"].sectors == parts["slot_b"].sectors


def test_sfdisk_accepts_the_layout(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(layout.disk_sectors() * layout.SECTOR_SIZE)
    subprocess.run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(disk)],
        input=layout.sfdisk_script(),
        text=True,
        check=True,
        capture_output=True,
    )
    dump = subprocess.run(
        ["sfdisk", "--dump", str(disk)], capture_output=True, text=True, check=True
    ).stdout
    assert f"label-id: 0x{layout.disk_conf()['DISK_ID']}" in dump
    rows = {}
    for line in dump.splitlines():
        if line.startswith(f"{disk}"):
            name, _, fields = line.partition(" : ")
            values = dict(f.strip().split("=") for f in fields.split(","))
            rows[int(name[len(str(disk)) :])] = (int(values["start"]), values["type"])
    for part in layout.partitions().values():
        assert rows[part.number] == (part.start, part.type)


def test_init_script_knows_every_partition() -> None:
    numbers = layout.shell_numbers()
    init = (layout.BOARD / "overlay/init").read_text()
    for name in ("SLOT_A", "SLOT_B", "VAR", "VARBACKUP", "BOOT"):
        assert f"PART_{name}=" in numbers
        assert f"$PART_{name}" in init


def test_nic_roles() -> None:
    assert layout.nic_roles() == {"eth0": "wild", "eth1": "private", "eth2": "kid"}


# --- GRUB environment -----------------------------------------------------


def test_grubenv_matches_grub_editenv(tmp_path: Path) -> None:
    envfile = tmp_path / "grubenv"
    subprocess.run(["grub-editenv", str(envfile), "create"], check=True)
    subprocess.run(
        ["grub-editenv", str(envfile), "set", "moat_slot=b", "moat_tries=3"],
        check=True,
    )
    data = envfile.read_bytes()
    assert grubenv.decode(data) == {"moat_slot": "b", "moat_tries": "3"}
    # (GRUB 2.06 adds a comment line after the header: ours need not match)
    envfile.write_bytes(grubenv.encode({"moat_next": "a", "moat_cmdline": "x y"}))
    listed = subprocess.run(
        ["grub-editenv", str(envfile), "list"], capture_output=True, text=True
    ).stdout
    assert listed.splitlines() == ["moat_next=a", "moat_cmdline=x y"]


def test_grubenv_rejects_oversize_and_garbage() -> None:
    with pytest.raises(grubenv.GrubEnvError):
        grubenv.encode({"x": "y" * 2000})
    with pytest.raises(grubenv.GrubEnvError):
        grubenv.decode(b"\0" * grubenv.BLOCK_SIZE)


@given(st.binary(max_size=grubenv.BLOCK_SIZE))
def test_grubenv_decode_only_raises_its_error(data: bytes) -> None:
    block = (grubenv.HEADER + data)[: grubenv.BLOCK_SIZE].ljust(
        grubenv.BLOCK_SIZE, b"#"
    )
    try:
        grubenv.decode(block)
    except grubenv.GrubEnvError:
        pass


@given(
    st.dictionaries(
        st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12),
        st.text(
            st.characters(blacklist_categories=["Cs"], blacklist_characters="\n\\"),
            max_size=40,
        ),
        max_size=8,
    )
)
def test_grubenv_round_trip(env: dict[str, str]) -> None:
    assert grubenv.decode(grubenv.encode(env)) == env


# --- /var backup ----------------------------------------------------------

BANKED = 2 * 2**20


def _device(tmp_path: Path) -> Path:
    device = tmp_path / "backup.raw"
    with open(device, "wb") as f:
        f.truncate(BANKED)
    return device


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_backup_commit_and_restore(tmp_path: Path) -> None:
    device = _device(tmp_path)
    var = _tree(tmp_path / "var", {"moat/moat.toml": b"a=1\n", "log/x.log": b"noise"})
    first = varbackup.commit(var, device)
    (var / "moat/moat.toml").write_bytes(b"a=2\n")
    second = varbackup.commit(var, device)
    assert first.header and second.header
    assert (first.index, second.index) == (0, 1)
    assert second.header.sequence == first.header.sequence + 1
    target = tmp_path / "restored"
    target.mkdir()
    bank = varbackup.restore(device, target)
    assert bank.index == 1
    assert (target / "moat/moat.toml").read_bytes() == b"a=2\n"
    assert not (target / "log").exists()  # logs are not backed up


@pytest.mark.parametrize("cut", [0, 1, 100, 4095, 4096, 5000, 40000])
def test_torn_commit_keeps_the_previous_backup(tmp_path: Path, cut: int) -> None:
    """A commit cut after `cut` bytes (payload, then header) loses nothing."""
    device = _device(tmp_path)
    fd = os.open(device, os.O_RDWR)
    try:
        varbackup.write_backup(fd, b"first" * 100)
        varbackup.write_backup(fd, b"second" * 100)
        banks = varbackup.banks(fd)
        target = banks[0]  # the next commit goes to bank 0 (older)
        payload = os.urandom(30000)
        stream = (
            payload
            + varbackup.Header(
                3, len(payload), hashlib.sha256(payload).digest(), 0
            ).encode()[: max(0, cut - len(payload))]
        )
        written = stream[:cut]
        # payload bytes go after the header slot, header bytes to its start
        body = written[: len(payload)]
        os.pwrite(fd, body, target.offset + varbackup.HEADER_SIZE)
        head = written[len(payload) :]
        if head:
            os.pwrite(fd, head, target.offset)
        _, data = varbackup.read_backup(fd)
        complete = cut >= len(payload) + varbackup.HEADER_SIZE
        assert data == (payload if complete else b"second" * 100)
    finally:
        os.close(fd)


def test_backup_refuses_what_does_not_fit(tmp_path: Path) -> None:
    device = _device(tmp_path)
    fd = os.open(device, os.O_RDWR)
    try:
        with pytest.raises(varbackup.VarBackupError):
            varbackup.write_backup(fd, b"x" * BANKED)
        with pytest.raises(varbackup.VarBackupError):
            varbackup.read_backup(fd)
    finally:
        os.close(fd)


@given(st.binary(max_size=varbackup.HEADER_SIZE))
def test_backup_header_decode_never_raises(block: bytes) -> None:
    header = varbackup.Header.decode(block)
    assert header is None or block.startswith(varbackup.MAGIC)


def test_var_verb_stress_and_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    var_verb.stress(tmp_path, count=70, size=100)
    assert var_verb.verify(tmp_path, acked=70) == 0
    assert var_verb.verify(tmp_path, acked=71) == 1  # never committed
    path = tmp_path / f"{var_verb.RECORD_PREFIX}05"
    path.write_bytes(path.read_bytes()[:50])  # torn
    assert var_verb.verify(tmp_path, acked=70) == 1
    out = capsys.readouterr().out
    assert "committed 70" in out and "torn rec-05" in out


# --- cpio and ELF -----------------------------------------------------------


def test_cpio_readable_by_cpio(tmp_path: Path) -> None:
    root = _tree(tmp_path / "root", {"etc/x": b"hello", "bin/busybox": b"\x7fELF"})
    (root / "bin/sh").symlink_to("busybox")
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    writer.chardev("dev/console", 5, 1)
    writer.tree(root)
    writer.close()
    listing = subprocess.run(
        ["cpio", "-itv"], input=buf.getvalue(), capture_output=True, check=True
    ).stdout.decode()
    assert "bin/sh -> busybox" in listing
    assert "dev/console" in listing and listing.startswith("crw")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        ["cpio", "-id", "--quiet"], input=buf.getvalue(), cwd=out, check=True
    ) if os.geteuid() == 0 else None


def test_elf_needed_matches_readelf() -> None:
    binary = Path(shutil.which("ls") or "/bin/ls").resolve()
    dynamic = subprocess.run(
        ["readelf", "-d", str(binary)], capture_output=True, text=True, check=True
    ).stdout
    expect = [
        line.split("[")[1].rstrip("]")
        for line in dynamic.splitlines()
        if "(NEEDED)" in line
    ]
    assert elf.needed(binary) == expect
    with pytest.raises(elf.ElfError):
        elf.sections(b"not an elf")


# --- payload --------------------------------------------------------------


def test_payload_freezes_every_verb_module() -> None:
    argv = payload.pyinstaller_argv(Path("/tmp/out"), onefile=False)
    hidden = {argv[i + 1] for i, a in enumerate(argv) if a == "--hidden-import"}
    assert hidden == {module for module, _ in VERBS.values()}
    collected = {argv[i + 1] for i, a in enumerate(argv) if a == "--collect-submodules"}
    assert collected == {"moat", "datapath", "services", "portal", "ota"}
    assert "--onedir" in argv


def test_payload_prunes_only_binaries_of_excluded_modules() -> None:
    excluded = set(payload.EXCLUDES)
    for pattern in payload.PRUNE:
        parts = Path(pattern).parts[1:]  # below _internal/
        if len(parts) > 1:  # an extension package's directory
            assert ".".join(parts[:-1]) in excluded, pattern
        else:  # a shared library only an excluded extension links
            assert "_ssl" in excluded and parts[0].startswith("libssl"), pattern


def test_frozen_check_imports_every_module_and_keys_every_transform() -> None:
    """The check the payload build runs in the frozen program, here on the
    source tree: it must import every module and seal/open with each ESP
    transform (a broken import or cipher raises)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("entry", payload.ENTRY)
    assert spec and spec.loader
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    count = entry.import_all(list(payload.PACKAGES))
    sources = sum(
        1
        for package in payload.PACKAGES
        for path in (payload.REPO / package).rglob("*.py")
        if path.name != "__main__.py"
    )
    assert count == sources
    assert entry.transform_round_trips() >= 5


# --- flash ----------------------------------------------------------------


def _disk(name: str) -> str:
    return name.rstrip("0123456789")


def test_flash_refuses_mounted_system_and_small_disks() -> None:
    sdb = flash.Target(Path("/dev/sdb"), 8 * 2**30, True, "sdb")
    mounts = "/dev/sda1 / ext4 rw 0 0\n/dev/sdb2 /media/usb vfat rw 0 0\n"
    with pytest.raises(flash.FlashRefused, match="mounted on /media/usb"):
        flash.check(sdb, 2**26, mounts, disk=_disk)
    sda = flash.Target(Path("/dev/sda"), 8 * 2**30, True, "sda")
    with pytest.raises(flash.FlashRefused, match="running system"):
        flash.check(sda, 2**26, mounts, disk=_disk)
    sdc = flash.Target(Path("/dev/sdc"), 8 * 2**30, True, "sdc")
    swaps = "Filename Type Size Used Priority\n/dev/sdc1 partition 1 0 -2\n"
    with pytest.raises(flash.FlashRefused, match="swap"):
        flash.check(sdc, 2**26, mounts, swaps, disk=_disk)
    tiny = flash.Target(Path("/dev/sdd"), 2**20, True, "sdd")
    with pytest.raises(flash.FlashRefused, match="bytes"):
        flash.check(tiny, 2**26, mounts, disk=_disk)
    sde = flash.Target(Path("/dev/sde"), 8 * 2**30, True, "sde")
    flash.check(sde, 2**26, mounts, swaps, disk=_disk)  # free disk: allowed


def test_flash_to_a_file_asks_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "moat.img"
    image.write_bytes(b"M" * 5000)
    fake = tmp_path / "fake-disk"
    fake.write_bytes(b"\0" * 8000)
    monkeypatch.setattr(sys, "stdin", io.StringIO("no\n"))
    assert flash.main([str(image), str(fake)]) == 1
    assert fake.read_bytes() == b"\0" * 8000
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{fake}\n"))
    assert flash.main([str(image), str(fake)]) == 0
    assert fake.read_bytes()[:5000] == b"M" * 5000
    with pytest.raises(flash.FlashRefused, match="mounted"):
        flash.check(flash.inspect(fake), 5000, f"{fake} /mnt ext4 rw 0 0\n")
    with pytest.raises(flash.FlashRefused, match="neither"):
        flash.inspect(Path("/dev/null"))


# --- supervisor -----------------------------------------------------------

HELPER = textwrap.dedent(
    """
    import sys, time
    verb = sys.argv[1]
    print("started", verb, flush=True)
    if verb == "crash":
        sys.exit(3)
    time.sleep(60)
    """
)


def _config(tmp_path: Path, services: str, extra: str = "") -> supervisor.Config:
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    text = textwrap.dedent(
        f"""
        [supervisor]
        ready_after = 0.5
        backoff_min = 0.2
        backoff_max = 0.8
        log_dir = "{tmp_path / "log"}"
        program = ["{sys.executable}", "{helper}"]
        {extra}
        """
    ) + textwrap.dedent(services)
    path = tmp_path / "moat.toml"
    path.write_text(text)
    return supervisor.load_config((path,))


def test_supervisor_ready_hooks_and_restarts(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        """
        [services.good]
        verb = "sleep"
        [services.bad]
        verb = "crash"
        [services.off]
        verb = "sleep"
        enabled = false
        [services.missing]
        verb = "no-such-verb"
        """,
    )
    out = io.StringIO()
    sup = supervisor.Supervisor(cfg, {"sleep", "crash"}, out=out)
    assert set(sup.services) == {"good", "bad"}
    del sup.services["bad"]  # readiness needs every service up: check one
    called: list[str] = []
    sup.ready_hooks.append(lambda s: called.append("ready"))
    deadline = time.monotonic() + 90
    while not sup.ready and time.monotonic() < deadline:
        sup.step(time.monotonic())
    assert sup.ready and called == ["ready"]
    assert "moat ready (1 services)" in out.getvalue()
    sup._stop_children()
    assert "started sleep" in (tmp_path / "log/good.log").read_text()

    crashing = supervisor.Supervisor(cfg, {"crash"}, out=io.StringIO())
    deadline = time.monotonic() + 90
    state = crashing.services["bad"]
    delays = []
    while state.restarts < 4 and time.monotonic() < deadline:
        crashing.step(time.monotonic())
        if not delays or delays[-1] != state.delay:
            delays.append(state.delay)
    assert state.restarts >= 4 and not crashing.ready
    assert delays[1:4] == [0.2, 0.4, 0.8]  # doubling, capped at backoff_max
    assert (tmp_path / "log/bad.log").read_text().count("started crash") >= 4


def test_supervisor_timeout_hook(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path, '[services.bad]\nverb = "crash"\n', extra="ready_timeout = 0.5"
    )
    sup = supervisor.Supervisor(cfg, {"crash"}, out=io.StringIO())
    fired: list[bool] = []
    sup.timeout_hooks.append(lambda s: fired.append(s.ready))
    deadline = time.monotonic() + 90
    while not fired and time.monotonic() < deadline:
        sup.step(time.monotonic())
    sup._stop_children()
    assert fired == [False]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[supervisor]\nready_after = -1\n", "supervisor.ready_after"),
        ("[supervisor]\nbogus = 1\n", "supervisor.bogus"),
        ("[services.x]\nargs = 'not a list'\n", "services.x.args"),
        ("[services.x]\nenabled = 'yes'\n", "services.x.enabled"),
        ("[supervisor]\nready_hooks = ['nomodule']\n", "supervisor hooks"),
        ("[services\n", "syntax"),
    ],
)
def test_supervisor_config_errors(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "moat.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        cfg = supervisor.load_config((path,))
        supervisor.Supervisor(cfg, set(VERBS))
    assert err.value.field == field


def test_board_default_config_loads() -> None:
    cfg = supervisor.load_config((layout.BOARD / "overlay/etc/moat/moat.toml",))
    assert cfg.log_dir == Path("/var/log/moat")


def test_backoff_resets_after_a_stable_run() -> None:
    cfg = supervisor.Config(backoff_min=1, backoff_max=8, stable_after=30)
    assert supervisor.next_backoff(0, 0, cfg) == 1
    assert supervisor.next_backoff(4, 1, cfg) == 8
    assert supervisor.next_backoff(8, 1, cfg) == 8
    assert supervisor.next_backoff(8, 31, cfg) == 1


@settings(max_examples=50)
@given(st.dictionaries(st.sampled_from(["supervisor", "services"]), st.integers()))
def test_config_parser_only_raises_config_error(data: dict[str, int]) -> None:
    try:
        supervisor.parse_config(dict(data), "fuzz")
    except ConfigError:
        pass


def test_boot_partition_tree(tmp_path: Path) -> None:
    from firmware import image
    from ota import bootenv

    image.boot_tree(tmp_path)
    grub = tmp_path / image.GRUB_PREFIX
    cfg = (grub / "grub.cfg").read_text()
    assert "@" not in cfg  # every placeholder filled in
    assert "source (hd0,msdos1)/boot/grub/ota.cfg" in cfg
    assert (grub / "ota.cfg").read_text() == (layout.BOARD / "grub/ota.cfg").read_text()
    state = bootenv.decode((grub / "moatenv0").read_bytes())
    assert state.good == "a" and state.seq == 1
    assert grubenv.decode((grub / "grubenv").read_bytes()) == {"moat_cmdline": ""}


def test_slot_squashfs_headroom_and_overflow(tmp_path: Path) -> None:
    from firmware import image

    tree = tmp_path / "slot"
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/big").write_bytes(os.urandom(300_000))  # incompressible
    out = tmp_path / "slot.squashfs"
    room = image.make_squashfs(tree, out, 2**20)
    assert room == 2**20 - out.stat().st_size > 0
    with pytest.raises(image.BuildError, match=r"more than a slot holds.*usr/lib/big"):
        image.make_squashfs(tree, out, 100_000)
