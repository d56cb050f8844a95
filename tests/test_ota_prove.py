"""Prove-or-fall-back: pure decisions over time, and the whole cycle on files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from ota_world import World

from ota import bootenv
from ota.bootenv import BootState
from ota.prove import Action, ProveHook, Prover

TRIAL = BootState(
    seq=3,
    good="a",
    trial="b",
    tries=2,
    versions={"a": "1.0.0", "b": "1.1.0"},
    floor="1.0.0",
)


def test_healthy_long_enough_marks_good() -> None:
    p = Prover(TRIAL, "b", started=100.0, deadline=300, settle=15)
    assert "on trial" in (p.at_boot().message or "")
    assert p.tick(110, False, None).action is Action.NONE
    assert p.tick(120, True, None).action is Action.NONE  # healthy since 120
    assert p.tick(134, True, None).action is Action.NONE
    d = p.tick(135, True, None)
    assert d.action is Action.MARK_GOOD and "proved itself" in (d.message or "")
    assert p.tick(500, False, None).action is Action.NONE  # decided once


def test_flapping_health_restarts_settle_time() -> None:
    p = Prover(TRIAL, "b", started=0.0, deadline=300, settle=15)
    p.tick(10, True, None)
    p.tick(20, False, None)
    assert p.tick(30, True, None).action is Action.NONE
    assert p.tick(40, True, None).action is Action.NONE
    assert p.tick(45, True, None).action is Action.MARK_GOOD


def test_tunnel_required_when_configured() -> None:
    p = Prover(TRIAL, "b", started=0.0, deadline=60, settle=5)
    for t in range(0, 60, 5):
        assert p.tick(t, True, False).action is Action.NONE
    d = p.tick(60, True, False)
    assert d.action is Action.REBOOT
    assert "tunnel down" in (d.message or "")
    assert "GRUB tries it 2 more time(s)" in (d.message or "")


def test_deadline_with_no_tries_left_says_fall_back() -> None:
    p = Prover(replace(TRIAL, tries=0), "b", started=0.0, deadline=10)
    d = p.tick(10, False, None)
    assert d.action is Action.REBOOT
    assert "falls back to slot a (1.0.0)" in (d.message or "")


def test_progress_reported_on_change_and_periodically() -> None:
    p = Prover(TRIAL, "b", started=0.0, deadline=300, settle=100)
    msgs = [p.tick(float(t), t >= 50, None).message for t in range(0, 120, 5)]
    said = [m for m in msgs if m]
    assert said[0].startswith("proving slot b (1.1.0): services not all up")
    assert any("services up" in m for m in said)
    assert len(said) <= 6


def test_at_boot_after_fall_back_clears_trial() -> None:
    state = replace(TRIAL, tries=0)
    d = Prover(state, "a", 0.0).at_boot()
    assert d.action is Action.CLEAR_FAILED_TRIAL
    assert (
        d.message
        == "slot b (1.1.0) failed to prove itself; fell back to slot a (1.0.0)"
    )


def test_at_boot_on_hand_picked_slot_changes_nothing() -> None:
    state = replace(TRIAL, trial="-", tries=0)
    p = Prover(state, "b", 0.0)
    assert p.at_boot().action is Action.NONE
    assert p.tick(1000, True, True).action is Action.NONE


def boot_and_prove(world: World, healthy: bool) -> tuple[str, list[str], list[str]]:
    """One boot: GRUB's choice, then the supervisor hook until it decides."""
    choice = bootenv.grub_boot(world.config.store())
    said: list[str] = []
    reboots: list[str] = []
    hook = ProveHook(
        world.config.store(),
        choice.slot,
        said.append,
        lambda: reboots.append("reboot"),
        world.installer().record_failed,
        deadline=120,
        settle=10,
    )
    hook.start(0.0)
    for t in range(0, 200, 5):
        if hook.tick(float(t), healthy, None) is not Action.NONE:
            break
    return choice.slot, said, reboots


def test_whole_cycle_good_update(tmp_path: Path) -> None:
    world = World(tmp_path)
    bundle, _ = world.publish("1.1.0")
    world.install(bundle)
    slot, said, reboots = boot_and_prove(world, healthy=True)
    assert slot == "b" and not reboots
    s = world.state()
    assert (s.good, s.trial, s.floor) == ("b", "-", "1.1.0")
    assert any("marked good" in m for m in said)
    # the old version is now below the floor
    old, _ = world.publish("1.0.5")
    with pytest.raises(Exception, match="older version"):
        world.install(old)


def test_whole_cycle_unhealthy_update_falls_back(tmp_path: Path) -> None:
    world = World(tmp_path)
    bundle, _ = world.publish("1.1.0")
    world.install(bundle)
    booted = []
    for _ in range(3):
        slot, said, reboots = boot_and_prove(world, healthy=False)
        booted.append(slot)
        assert reboots == ["reboot"]
    slot, said, reboots = boot_and_prove(world, healthy=False)
    assert booted == ["b", "b", "b"] and slot == "a" and not reboots
    assert (
        "ota: slot b (1.1.0) failed to prove itself; fell back to slot a (1.0.0)"
        in said
    )
    s = world.state()
    assert (s.good, s.trial, s.floor) == ("a", "-", "1.0.0")
    assert world.installer().failed_versions() == ["1.1.0"]
    # a newer fix installs again
    fixed, _ = world.publish("1.1.1")
    assert world.install(fixed) == "b"
