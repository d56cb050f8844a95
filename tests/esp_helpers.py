"""Shared helpers for the ESP tests: SA configs for every transform, packets."""

from __future__ import annotations

import struct

from datapath.esp import InboundSA, OutboundSA, SAConfig
from datapath.transform import TRANSFORMS as ALL_TRANSFORMS

SPI = 0x0000_1234

# transform -> (key size, auth key size); AEAD key sizes include the salt
KEY_SIZES = {
    name: (cls.key_lengths()[0][0], cls.key_lengths()[1])
    for name, cls in ALL_TRANSFORMS.items()
}
TRANSFORMS = sorted(KEY_SIZES)


def test_key(size: int, seed: int) -> bytes:
    """Deterministic key material that is not degenerate for 3DES."""
    return bytes((seed * 37 + i * 11 + 1) & 0xFF for i in range(size))


def make_config(
    transform: str, esn: bool = True, window: int = 1024, spi: int = SPI
) -> SAConfig:
    key_size, auth_size = KEY_SIZES[transform]
    return SAConfig(
        spi=spi,
        transform=transform,
        key=test_key(key_size, 1),
        auth_key=test_key(auth_size, 2),
        replay_window=window,
        esn=esn,
    )


def make_pair(
    transform: str, esn: bool = True, window: int = 1024
) -> tuple[OutboundSA, InboundSA]:
    cfg = make_config(transform, esn, window)
    return OutboundSA(cfg), InboundSA(cfg)


def ipv4_packet(
    src: str = "10.1.0.2", dst: str = "10.2.0.2", payload: bytes = b"ping"
) -> bytes:
    """A minimal IPv4/UDP packet (checksums zero: nothing here checks them)."""
    total = 20 + 8 + len(payload)
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        total,
        1,
        0,
        64,
        17,
        0,
        bytes(int(x) for x in src.split(".")),
        bytes(int(x) for x in dst.split(".")),
    )
    return header + struct.pack(">HHHH", 1000, 2000, 8 + len(payload), 0) + payload
