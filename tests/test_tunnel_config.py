"""The tunnel TOML file: a good file parses; every error names field and problem."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datapath import config
from moat.errors import ConfigError

KEY_IN = "00112233445566778899aabbccddeeff01020304"
KEY_OUT = "ffeeddccbbaa99887766554433221100a1a2a3a4"

GOOD = f"""
[tunnel]
name = "portal"
encapsulation = "udp"
keepalive = 15
control_socket = "/tmp/t.sock"

[tun]
name = "moat0"
addresses = ["10.9.0.1/24", "fd00::1/64"]
mtu = 0

[outer]
local = "192.0.2.1"
remote = "198.51.100.7"

[selectors]
local = ["10.1.0.0/24"]
remote = ["10.2.0.0/16", "fd00:2::/48"]

[sa.in]
spi = 0x1001
transform = "aes-gcm-128"
key = "{KEY_IN}"

[sa.out]
spi = "0x2001"
transform = "aes-gcm-128"
key = "{KEY_OUT}"
replay_window = 4096
esn = false
"""


def test_good_file_parses() -> None:
    cfg = config.parse(GOOD, "t.toml")
    assert cfg.name == "portal"
    assert cfg.encapsulation == "udp"
    assert cfg.keepalive == 15.0
    assert cfg.tun.addresses[0] == ipaddress.ip_interface("10.9.0.1/24")
    # routes default to the remote selectors
    assert cfg.tun.routes == cfg.remote_subnets
    assert cfg.outer.port == 4500 and cfg.outer.remote_port == 4500
    assert cfg.sa_in.spi == 0x1001 and cfg.sa_out.spi == 0x2001
    assert cfg.sa_in.key == bytes.fromhex(KEY_IN)
    assert cfg.sa_in.esn is True and cfg.sa_out.esn is False
    assert cfg.sa_out.replay_window == 4096
    assert cfg.mtu_policy == "virtual-large"


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(GOOD)
    assert config.load(path).source == str(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        config.load(tmp_path / "absent.toml")


def test_cbc_transform_takes_an_auth_key() -> None:
    text = GOOD.replace(
        f'transform = "aes-gcm-128"\nkey = "{KEY_IN}"',
        f'transform = "aes-cbc-hmac-sha256"\nkey = "{"11" * 32}"\n'
        f'auth_key = "{"22" * 32}"',
    )
    cfg = config.parse(text)
    assert cfg.sa_in.transform == "aes-cbc-hmac-sha256"
    assert len(cfg.sa_in.auth_key) == 32


def _edit(old: str, new: str, text: str = GOOD) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# (edit, field named in the error, words of the problem)
ERRORS = [
    (("[tunnel]", "[tunnel]\nbogus = 1"), "tunnel.bogus", "unknown field"),
    (
        ('encapsulation = "udp"', 'encapsulation = "gre"'),
        "tunnel.encapsulation",
        "not one of",
    ),
    (("keepalive = 15", "keepalive = -1"), "tunnel.keepalive", "out of range"),
    (("keepalive = 15", 'keepalive = "x"'), "tunnel.keepalive", "must be a number"),
    (('name = "portal"', "name = 3"), "tunnel.name", "must be a string"),
    (("[tunnel]", '[tunnel]\nmtu_policy = "magic"'), "tunnel.mtu_policy", "not one of"),
    (
        ('name = "moat0"', 'name = "a-very-long-interface-name"'),
        "tun.name",
        "valid interface",
    ),
    (('"10.9.0.1/24"', '"10.9.0.300/24"'), "tun.addresses[0]", "not an address"),
    (("mtu = 0", "mtu = 40"), "tun.mtu", "below"),
    (("mtu = 0", "mtu = 70000"), "tun.mtu", "out of range"),
    (('local = "192.0.2.1"', 'local = "192.0.2"'), "outer.local", "not an IP address"),
    (('remote = "198.51.100.7"', 'remote = "2001:db8::1"'), "outer.remote", "IPv6"),
    (('remote = "198.51.100.7"', ""), "outer.remote", "missing"),
    (
        ('remote = "198.51.100.7"', 'remote = "198.51.100.7"\nport = 0'),
        "outer.port",
        "range",
    ),
    (
        ('local = ["10.1.0.0/24"]', 'local = ["10.1.0.1/24"]'),
        "selectors.local[0]",
        "host bits",
    ),
    (('local = ["10.1.0.0/24"]', "local = []"), "selectors.local", "at least one"),
    (('local = ["10.1.0.0/24"]', 'local = "10.1.0.0/24"'), "selectors.local", "list"),
    (('local = ["10.1.0.0/24"]', "local = [1]"), "selectors.local[0]", "string"),
    (("[selectors]", "[selectorz]"), "selectors", "missing"),
    (("spi = 0x1001", "spi = 17"), "sa.in.spi", "reserved"),
    (("spi = 0x1001", "spi = 0x100000000"), "sa.in.spi", "out of range"),
    (('spi = "0x2001"', 'spi = "zz"'), "sa.out.spi", "not a number"),
    (("spi = 0x1001", "spi = true"), "sa.in.spi", "must be an integer"),
    (
        ('transform = "aes-gcm-128"', 'transform = "rot13"'),
        "sa.in.transform",
        "not one of",
    ),
    ((f'key = "{KEY_IN}"', 'key = "0011"'), "sa.in.key", "2 bytes"),
    ((f'key = "{KEY_IN}"', 'key = "xyz"'), "sa.in.key", "not valid hex"),
    ((f'key = "{KEY_IN}"', ""), "sa.in.key", "missing"),
    (
        (f'key = "{KEY_IN}"', f'key = "{KEY_IN}"\nauth_key = "00"'),
        "sa.in.auth_key",
        "not used",
    ),
    (
        ("replay_window = 4096", "replay_window = 8"),
        "sa.out.replay_window",
        "out of range",
    ),
    (("esn = false", 'esn = "no"'), "sa.out.esn", "true or false"),
    (("esn = false", "esn = false\nlifetime = 3"), "sa.out.lifetime", "unknown field"),
    ((f'key = "{KEY_OUT}"', f'key = "{KEY_IN}"'), "sa.out.key", "each direction"),
    (("[sa.out]", "[sa.sideways]"), "sa.out", "missing"),
    (("[outer]", "[outer]\nmtu = 100"), "outer.mtu", "out of range"),
    (("[tunnel]", "[tunnel]\n[tunnel.x]"), "tunnel.x", "unknown field"),
    (("[tunnel]", "[tunnel"), "(file)", "not valid TOML"),
    (("[tunnel]", "oops = 1\n[tunnel]"), "oops", "unknown field"),
]


@pytest.mark.parametrize(
    ("edit", "field", "problem"), ERRORS, ids=[e[1] for e in ERRORS]
)
def test_every_error_names_field_and_problem(
    edit: tuple[str, str], field: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(_edit(*edit), "t.toml")
    err = info.value
    assert str(err).startswith("t.toml: ")
    assert err.field == field, str(err)
    assert problem in err.problem, str(err)


def test_cbc_auth_key_length_checked() -> None:
    text = GOOD.replace(
        f'transform = "aes-gcm-128"\nkey = "{KEY_IN}"',
        f'transform = "aes-cbc-hmac-sha256"\nkey = "{"11" * 32}"\nauth_key = "22"',
    )
    with pytest.raises(ConfigError) as info:
        config.parse(text)
    assert info.value.field == "sa.in.auth_key"
    assert "needs 32" in info.value.problem


def test_cbc_key_length_checked() -> None:
    text = GOOD.replace(
        f'transform = "aes-gcm-128"\nkey = "{KEY_IN}"',
        f'transform = "aes-cbc-hmac-sha256"\nkey = "{"11" * 20}"\n'
        f'auth_key = "{"22" * 32}"',
    )
    with pytest.raises(ConfigError, match=r"sa\.in\.key: 20 bytes.*16 or 24 or 32"):
        config.parse(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_garbage_gives_config_error_only(text: str) -> None:
    try:
        config.parse(text)
    except ConfigError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.integers(1, 20), st.text(max_size=8))
def test_mutated_file_gives_config_error_or_parses(
    pos: int, cut: int, ins: str
) -> None:
    text = GOOD[:pos] + ins + GOOD[pos + cut :]
    try:
        config.parse(text)
    except ConfigError:
        pass
