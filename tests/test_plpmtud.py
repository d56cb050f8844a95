"""Path MTU probing between two peers: search, black holes, EMSGSIZE, and the
probe/echo payloads through a real Reassembler."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from datapath.aggfrag import Reassembler
from datapath.plpmtud import Plpmtud, State, echo_payload, probe_payload


def run(plp: Plpmtud, path_mtu: int | None, until: float, start: float = 0.0) -> float:
    """Drive `plp` over a path that carries packets <= path_mtu (None: the
    peer never echoes), with a 10 ms round trip, until time `until`."""
    now = start
    while now < until:
        probe = plp.poll(now)
        if probe is not None and path_mtu is not None and probe.size <= path_mtu:
            plp.on_echo(probe.tval, now + 0.01)
            continue
        now = max(now + 0.01, min(plp.next_timer(), until))
    return now


@settings(max_examples=200, deadline=None)
@given(st.integers(576, 1500))
def test_search_finds_path_mtu_without_icmp(path_mtu: int) -> None:
    plp = Plpmtud(base=576, max_size=1500)
    run(plp, path_mtu, until=60.0)
    assert plp.state == State.SEARCH_COMPLETE
    assert path_mtu - plp.granularity <= plp.plpmtu <= path_mtu


def test_common_case_is_one_round_trip() -> None:
    plp = Plpmtud(base=576, max_size=1500)
    run(plp, 1500, until=0.1)
    assert plp.plpmtu == 1500 and plp.state == State.SEARCH_COMPLETE
    assert plp.counters["probe_sent"] == 2  # base, then the maximum


def test_peer_without_echo_keeps_base() -> None:
    plp = Plpmtud(base=576, max_size=1500)
    run(plp, None, until=100.0)
    assert plp.state == State.ERROR and plp.plpmtu == 576
    # it keeps asking now and then, and recovers when echoes start
    run(plp, 1500, until=200.0, start=100.0)
    assert plp.plpmtu == 1500


def test_black_hole_detected_and_search_again() -> None:
    plp = Plpmtud(base=576, max_size=1500, confirm_interval=5.0)
    run(plp, 1500, until=1.0)
    assert plp.plpmtu == 1500
    run(plp, 1280, until=30.0, start=1.0)  # path shrank, no ICMP at all
    assert plp.counters["black_hole"] == 1
    assert 1280 - plp.granularity <= plp.plpmtu <= 1280


def test_path_grows_again_after_raise_interval() -> None:
    plp = Plpmtud(base=576, max_size=1500, raise_interval=50.0)
    run(plp, 1000, until=40.0)
    assert plp.plpmtu <= 1000
    run(plp, 1500, until=120.0, start=40.0)
    assert plp.plpmtu == 1500


def test_emsgsize_lowers_at_once() -> None:
    plp = Plpmtud(base=576, max_size=1500)
    run(plp, 1500, until=1.0)
    plp.on_emsgsize(1500, 1400, now=1.0)
    assert plp.plpmtu == 1400
    plp.on_emsgsize(1400, None, now=1.0)
    assert plp.plpmtu == 1399


def test_stale_or_unknown_echo_ignored() -> None:
    plp = Plpmtud(base=576, max_size=1500)
    plp.on_echo(12345, 0.0)
    assert plp.counters["echo_unknown"] == 1 and plp.plpmtu == 576


def test_probe_and_echo_payloads_through_reassembler() -> None:
    plp = Plpmtud(base=576, max_size=1500)
    probe = plp.poll(0.0)
    assert probe is not None
    # the probe reaches the peer: an all-pad payload, nothing for the TUN
    peer_rx = Reassembler()
    assert peer_rx.feed(1, probe_payload(probe, 500), 0.0) == []
    (info,) = peer_rx.take_feedback()
    assert info.probe and info.tval == probe.tval
    # the peer's echo comes back on its SA to us
    echo = echo_payload(info)
    assert echo is not None
    our_rx = Reassembler()
    assert our_rx.feed(1, echo, 0.01) == []
    (back,) = our_rx.take_feedback()
    assert echo_payload(back) is None  # an echo is not answered
    plp.on_echo(back.techo, 0.01)
    assert plp.state == State.SEARCHING
