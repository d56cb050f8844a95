"""`moat tunnel` on the command line: clear one-line errors, --check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_tunnel_config import GOOD
from tunnel_pair import ENV


def moat(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moat", "tunnel", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )


def test_check_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(GOOD)
    res = moat("--config", str(path), "--check")
    assert res.returncode == 0, res.stderr
    assert "ok (udp, aes-gcm-128, inner MTU 1438)" in res.stdout


def test_bad_file_is_one_line_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace("spi = 0x1001", "spi = 7"))
    for args in (["--check"], []):
        res = moat("--config", str(path), *args)
        assert res.returncode == 2
        problem = "sa.in.spi: 7 is reserved (SPIs 0-255 are not for SAs)"
        assert res.stderr.strip() == f"moat tunnel: {path}: {problem}"
        assert "Traceback" not in res.stderr


def test_missing_config_and_no_running_tunnel(tmp_path: Path) -> None:
    res = moat()
    assert res.returncode == 2 and "--config: missing" in res.stderr
    res = moat("--status", "--control", str(tmp_path / "none.sock"))
    assert res.returncode == 1
    assert "no running tunnel at" in res.stderr and "Traceback" not in res.stderr
