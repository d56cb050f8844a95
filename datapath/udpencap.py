"""UDP encapsulation of ESP (RFC 3948): what a datagram on port 4500 is.

On a UDP/4500 socket three things arrive (RFC 3948 §2):

  - a NAT-keepalive, the single byte 0xFF (§2.3), to be ignored; it must not
    be taken as a sign that the peer is alive (§4);
  - an IKE message, prefixed with the non-ESP marker, four zero bytes sitting
    where an SPI would be (§2.2) -- SPI 0 never appears on the wire, so the
    two cannot be confused;
  - an ESP packet, starting with its non-zero SPI (§2.1).

Anything else (shorter than an ESP header and neither of the two above) is a
runt and is dropped.
"""

from __future__ import annotations

import enum

NAT_KEEPALIVE = b"\xff"
NON_ESP_MARKER = b"\0\0\0\0"
NON_ESP_MARKER_SIZE = len(NON_ESP_MARKER)
ESP_HEADER_SIZE = 8  # SPI + sequence number
IKE_PORT = 500
NAT_T_PORT = 4500  # RFC 3948 §2.1, shared by IKE and ESP-in-UDP
KEEPALIVE_INTERVAL = 20.0  # seconds, RFC 3948 §4 default


class Kind(enum.Enum):
    ESP = "esp"
    KEEPALIVE = "keepalive"
    IKE = "ike"
    RUNT = "runt"


def classify(datagram: bytes) -> Kind:
    """What a UDP/4500 payload is (RFC 3948 §2.2, §2.3)."""
    if len(datagram) >= ESP_HEADER_SIZE:
        if datagram[:NON_ESP_MARKER_SIZE] == NON_ESP_MARKER:
            return Kind.IKE
        return Kind.ESP
    if datagram == NAT_KEEPALIVE:
        return Kind.KEEPALIVE
    if datagram[:NON_ESP_MARKER_SIZE] == NON_ESP_MARKER:
        return Kind.IKE
    return Kind.RUNT
