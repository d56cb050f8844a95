"""Traffic selectors: which inner addresses an SA may carry (RFC 4301 §4.4.2).

After an inbound packet has been authenticated and decrypted, its inner
source must be one of the peer's (remote) networks and its inner destination
one of ours (local), RFC 4301 §5.2; otherwise an authenticated peer could
inject packets with any source address. Outbound is the mirror image.

Networks are turned into (network, mask) integer pairs once, so a check is a
struct unpack and a short loop, with no ipaddress objects per packet.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, ip_network

IPV4_HEADER_SIZE = 20
IPV6_HEADER_SIZE = 40
_IPV4_ADDRESSES = struct.Struct(">12xII")  # source, destination
_IPV6_ADDRESSES = struct.Struct(">8xQQQQ")  # source hi/lo, destination hi/lo

_LOCAL, _REMOTE = 0, 1  # index into a (local, remote) pair

Network = IPv4Network | IPv6Network
# (network, mask) pairs; a /0 is (0, 0), which every address matches
_Ranges = tuple[tuple[int, int], ...]


def _ranges(networks: list[Network], version: int) -> _Ranges:
    return tuple(
        (int(net.network_address), int(net.netmask))
        for net in networks
        if net.version == version
    )


def inner_addresses(inner: bytes) -> tuple[int, int, int] | None:
    """(IP version, source, destination) of an inner packet, or None.

    None for anything that is too short for its IP header or is neither
    IPv4 nor IPv6.
    """
    if not inner:
        return None
    version = inner[0] >> 4
    if version == 4 and len(inner) >= IPV4_HEADER_SIZE:
        src, dst = _IPV4_ADDRESSES.unpack_from(inner)
        return 4, src, dst
    if version == 6 and len(inner) >= IPV6_HEADER_SIZE:
        src_hi, src_lo, dst_hi, dst_lo = _IPV6_ADDRESSES.unpack_from(inner)
        return 6, src_hi << 64 | src_lo, dst_hi << 64 | dst_lo
    return None


class Selectors:
    """Local and remote networks of one SA pair."""

    def __init__(
        self,
        local: Iterable[Network | str],
        remote: Iterable[Network | str],
    ) -> None:
        self.local = [ip_network(n) for n in local]
        self.remote = [ip_network(n) for n in remote]
        # per IP version: (local ranges, remote ranges), see _LOCAL, _REMOTE
        self._by_version = {
            v: (_ranges(self.local, v), _ranges(self.remote, v)) for v in (4, 6)
        }

    def __repr__(self) -> str:
        local = ",".join(map(str, self.local))
        remote = ",".join(map(str, self.remote))
        return f"Selectors(local=[{local}], remote=[{remote}])"

    def permits_inbound(self, inner: bytes) -> bool:
        """Source in a remote network and destination in a local one."""
        return self._permits(inner, _REMOTE, _LOCAL)

    def permits_outbound(self, inner: bytes) -> bool:
        """Source in a local network and destination in a remote one."""
        return self._permits(inner, _LOCAL, _REMOTE)

    def _permits(self, inner: bytes, src_side: int, dst_side: int) -> bool:
        if len(inner) >= IPV4_HEADER_SIZE and inner[0] >> 4 == 4:  # fast path
            src, dst = _IPV4_ADDRESSES.unpack_from(inner)
            ranges = self._by_version[4]
        else:
            addresses = inner_addresses(inner)
            if addresses is None:
                return False
            version, src, dst = addresses
            ranges = self._by_version[version]
        for network, mask in ranges[src_side]:
            if src & mask == network:
                break
        else:
            return False
        for network, mask in ranges[dst_side]:  # noqa: SIM110 (any() is slower)
            if dst & mask == network:
                return True
        return False
