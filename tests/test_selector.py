"""Traffic selector checks on inner packets."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.packet import raw

from datapath.selector import Selectors, inner_addresses

SEL = Selectors(
    local=["10.2.0.0/16", "fd00:2::/48"], remote=["10.1.0.0/16", "fd00:1::/48"]
)


def test_ipv4_directions() -> None:
    inbound = raw(IP(src="10.1.2.3", dst="10.2.3.4"))
    outbound = raw(IP(src="10.2.3.4", dst="10.1.2.3"))
    assert SEL.permits_inbound(inbound) and not SEL.permits_outbound(inbound)
    assert SEL.permits_outbound(outbound) and not SEL.permits_inbound(outbound)
    assert not SEL.permits_inbound(raw(IP(src="10.9.2.3", dst="10.2.3.4")))


def test_ipv6_directions() -> None:
    inbound = raw(IPv6(src="fd00:1::5", dst="fd00:2:0:1::6"))
    assert SEL.permits_inbound(inbound)
    assert not SEL.permits_inbound(raw(IPv6(src="fd00:3::5", dst="fd00:2::6")))


def test_default_route_matches_everything_of_its_version() -> None:
    sel = Selectors(local=["0.0.0.0/0"], remote=["0.0.0.0/0"])
    assert sel.permits_inbound(raw(IP(src="1.2.3.4", dst="5.6.7.8")))
    assert not sel.permits_inbound(raw(IPv6(src="::1", dst="::2")))


def test_garbage_is_refused() -> None:
    for data in (b"", b"\x45", b"\x45" * 19, b"\x60" * 39, b"\x00" * 60):
        assert not SEL.permits_inbound(data)
        assert inner_addresses(data) is None


addresses4 = st.integers(0, 2**32 - 1).map(lambda n: str(ip_address(n)))
prefixes4 = st.tuples(addresses4, st.integers(0, 32)).map(
    lambda t: ip_network(f"{t[0]}/{t[1]}", strict=False)
)


@settings(deadline=None)  # timing varies on a shared machine
@given(
    st.lists(prefixes4, max_size=4),
    st.lists(prefixes4, max_size=4),
    addresses4,
    addresses4,
)
def test_matches_ipaddress_model(
    local: list,
    remote: list,
    src: str,
    dst: str,  # type: ignore[type-arg]
) -> None:
    sel = Selectors(local, remote)
    expected = any(ip_address(src) in n for n in remote) and any(
        ip_address(dst) in n for n in local
    )
    assert sel.permits_inbound(raw(IP(src=src, dst=dst))) == expected
