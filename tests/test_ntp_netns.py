"""`moat ntpd` between two real chronyd: chrony as the portal's server
(`local stratum 3`) upstream, chrony as a LAN client downstream. Neither chronyd
nor our daemon touches the host clock (chronyd -x, moat ntpd --no-set-clock).

    upstream 10.98.0.1 ── 10.98.0.2 moat 192.168.60.1 ── 192.168.60.10 client
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import Host, Lab, wait_for

pytestmark = pytest.mark.netns

UPSTREAM, MOAT_WAN, MOAT_LAN, CLIENT = (
    "10.98.0.1",
    "10.98.0.2",
    "192.168.60.1",
    "192.168.60.10",
)


def spawn_logged(host: Host, log: Path, *argv: str) -> subprocess.Popen:
    with open(log, "a") as out:
        return host.popen(*argv, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def chrony_root() -> Iterator[Path]:
    """A directory chronyd (which drops root for _chrony) can reach: pytest's
    tmp_path is private to root."""
    root = Path(tempfile.mkdtemp(prefix="moat-chrony-"))
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def chrony_dir(path: Path) -> Path:
    # chronyd refuses a command socket in a directory others can enter
    path.mkdir(mode=0o770)
    shutil.chown(path, "_chrony", "_chrony")
    os.chmod(path, 0o770)
    return path


def start_chronyd(host: Host, state: Path, conf: str) -> None:
    (state / "chrony.conf").write_text(
        conf
        + textwrap.dedent(f"""\
            pidfile {state}/chronyd.pid
            driftfile {state}/drift
            """)
    )
    # -x: never control the host clock
    spawn_logged(
        host,
        state / "chronyd.log",
        "chronyd",
        "-x",
        "-d",
        "-f",
        str(state / "chrony.conf"),
    )


def chronyc(host: Host, state: Path, *cmd: str) -> str:
    res = host.run("chronyc", "-h", f"{state}/chronyd.sock", "-n", *cmd, check=False)
    return res.stdout + res.stderr


def ntpdata(host: Host, state: Path) -> dict[str, str]:
    fields = {}
    for line in chronyc(host, state, "ntpdata", MOAT_LAN).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def ntp_status(moat: Host, moat_cmd: list[str], cfg: Path) -> dict:
    res = moat.run(*moat_cmd, "ntpd", "--config", str(cfg), "--status", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else {}


def test_ntpd_between_chrony_server_and_chrony_client(
    lab: Lab, tmp_path: Path, chrony_root: Path, moat_cmd: list[str]
) -> None:
    upstream, moat, client = lab.host("up"), lab.host("moat"), lab.host("cli")
    lab.link(upstream, "eth0", f"{UPSTREAM}/24", moat, "wan0", f"{MOAT_WAN}/24")
    lab.link(moat, "lan0", f"{MOAT_LAN}/24", client, "eth0", f"{CLIENT}/24")

    # our daemon first, with the upstream still silent: unsynchronised
    cfg = tmp_path / "ntp.toml"
    cfg.write_text(
        textwrap.dedent(f"""\
            upstream = "{UPSTREAM}"
            listen = ["{MOAT_LAN}"]
            poll = 1
            status_file = "{tmp_path}/ntp.json"
            """)
    )
    argv = [*moat_cmd, "ntpd", "--config", str(cfg), "--no-set-clock", "-vv"]
    spawn_logged(moat, tmp_path / "moat-ntpd.log", *argv)

    # chrony as the LAN client sees LI=3, stratum 16 and does not select us
    cstate = chrony_dir(chrony_root / "client")
    start_chronyd(
        client,
        cstate,
        textwrap.dedent(f"""\
            server {MOAT_LAN} iburst minpoll 0 maxpoll 0
            bindcmdaddress {cstate}/chronyd.sock
            port 0
            cmdport 0
            """),
    )
    data = wait_for(
        lambda: (d := ntpdata(client, cstate)).get("Stratum") == "16" and d, 30
    )
    assert data["Leap status"] == "Not synchronised", data

    # chrony as the portal's server
    ustate = chrony_dir(chrony_root / "upstream")
    start_chronyd(
        upstream,
        ustate,
        textwrap.dedent(f"""\
            local stratum 3
            allow {MOAT_WAN}
            bindaddress {UPSTREAM}
            cmdport 0
            """),
    )

    # our client follows it: synchronised, stratum 4, a plausible offset
    st = wait_for(
        lambda: (
            (s := ntp_status(moat, moat_cmd, cfg))
            and s["client"]["synchronised"]
            and s["client"]["samples"] >= 3
            and s
        ),
        40,
        interval=0.5,
    )
    cl = st["client"]
    assert cl["stratum"] == 4, cl
    # same host clock on both sides: the offset is only the measuring error
    assert abs(cl["offset"]) < 0.05 and 0 < cl["delay"] < 0.5, cl
    assert st["steps"] == 0 and not st["set_clock"]

    # chrony as client: our packets pass all RFC 5905 tests; it selects us
    data = wait_for(
        lambda: (d := ntpdata(client, cstate)).get("Stratum") == "4" and d, 40
    )
    assert data["Leap status"] == "Normal", data
    assert data["NTP tests"] == "111 111 1111", data
    assert data["Mode"] == "Server" and data["Version"] == "4", data
    assert data["Reference ID"].startswith("0A620001"), data  # 10.98.0.1
    assert int(data["Total valid RX"]) > 0, data
    wait_for(
        lambda: any(
            line.startswith("^*") and MOAT_LAN in line
            for line in chronyc(client, cstate, "sources").splitlines()
        ),
        40,
        interval=0.5,
    )


def test_ntpd_ignores_control_and_garbage(
    lab: Lab, tmp_path: Path, moat_cmd: list[str]
) -> None:
    moat, client = lab.host("moat"), lab.host("cli")
    lab.link(moat, "lan0", f"{MOAT_LAN}/24", client, "eth0", f"{CLIENT}/24")
    cfg = tmp_path / "ntp.toml"
    cfg.write_text(
        textwrap.dedent(f"""\
            upstream = "{UPSTREAM}"
            listen = ["{MOAT_LAN}"]
            status_file = "{tmp_path}/ntp.json"
            """)
    )
    proc = spawn_logged(
        moat,
        tmp_path / "moat-ntpd.log",
        *moat_cmd,
        "ntpd",
        "--config",
        str(cfg),
        "--no-set-clock",
    )
    wait_for((tmp_path / "ntp.json").exists, 20)
    probe = textwrap.dedent(f"""\
        import socket, struct
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        def ask(data):
            s.sendto(data, ("{MOAT_LAN}", 123))
            try:
                return len(s.recv(4096))
            except socket.timeout:
                return 0
        mode6 = bytes([0x26, 2]) + bytes(46)          # ntpq readvar
        mode7 = bytes([0x27, 0, 3, 42]) + bytes(44)   # ntpdc monlist
        short = bytes([0x23]) + bytes(20)
        client = bytes([0x23]) + bytes(39) + struct.pack("!Q", 12345)
        print(ask(mode6), ask(mode7), ask(short), ask(bytes(48)), ask(client))
        """)
    out = client.run(str(Path(moat_cmd[0])), "-c", probe).stdout.split()
    assert out == ["0", "0", "0", "0", "48"], out
    st = wait_for(
        lambda: (
            (s := ntp_status(moat, moat_cmd, cfg))
            and s["server"].get("answered") == 1
            and s
        ),
        10,
        interval=0.3,
    )
    assert st["server"]["drop_mode_6"] == 1 and st["server"]["drop_mode_7"] == 1
    assert st["server"]["drop_short"] == 1 and st["server"]["drop_mode_other"] == 1

    # SIGTERM: a clean stop
    proc.terminate()
    assert proc.wait(10) == 0
