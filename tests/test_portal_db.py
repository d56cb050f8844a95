"""Portal database: records, validation, compare-and-swap, index cache."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import multiprocessing
import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portal.db import Database, StaleRecord, drop_conflicts
from portal.provision import generate_identity
from portal.record import (
    Learned,
    MoatRecord,
    RecordError,
    SaPair,
    normalise_ssh_key,
    record_from_dict,
    record_to_dict,
    record_to_toml,
    spi_for,
)

KEY = normalise_ssh_key(generate_identity("x")[1])


def make(moat_id: str, number: int, subnet: str, key: str | None = None) -> MoatRecord:
    return MoatRecord(
        id=moat_id,
        number=number,
        email=f"{moat_id}@example.com",
        ssh_key=key or normalise_ssh_key(generate_identity(moat_id)[1]),
        wild="dhcp",
        subnet=ipaddress.IPv4Network(subnet),
    )


def full_record() -> MoatRecord:
    sa = SaPair(3, "aes-gcm-128", spi_for(7, 3, True), b"k" * 20, 999, b"m" * 20)
    return make("m7", 7, "10.200.0.112/28", KEY).replace(
        version=5,
        learned=Learned(
            ipaddress.IPv4Address("198.51.100.7"),
            4500,
            dt.datetime(2026, 12, 3, 13, 0, tzinfo=dt.UTC),
        ),
        sa=sa,
        sa_previous=sa,
    )


@pytest.fixture
def db(tmp_path: Path) -> Database:
    d = Database(tmp_path / "db")
    d.create_layout()
    return d


def test_toml_round_trip() -> None:
    rec = full_record()
    text = record_to_toml(rec)
    assert record_from_dict(tomllib.loads(text)) == rec
    assert record_from_dict(record_to_dict(rec)) == rec


@settings(max_examples=200, deadline=None)
@given(email_local=st.text(min_size=1, max_size=30))
def test_writer_escapes_any_string(email_local: str) -> None:
    """Whatever string gets into a field, the file stays valid TOML."""
    rec = full_record()
    object.__setattr__(rec, "email", email_local + "@example.com")
    doc = tomllib.loads(record_to_toml(rec))
    assert doc["email"] == email_local + "@example.com"


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("id", "Bad_Id", "id"),
        ("email", "no-at-sign", "email"),
        ("wild", "300.1.1.1", "wild"),
        ("subnet", "10.200.0.1/28", "subnet"),
        ("subnet", "0.0.0.0/4", "prefix length"),
        ("ssh_key", "ssh-ed25519 !!!", "base64"),
        ("ssh_key", "ssh-dss AAAA", "not accepted"),
        ("number", 0, "number"),
        ("number", True, "integer"),
        ("version", "1", "integer"),
        ("extra", 1, "unknown field"),
    ],
)
def test_validation_names_the_field(field: str, value: object, message: str) -> None:
    d = record_to_dict(full_record())
    d[field] = value
    with pytest.raises(RecordError, match=message):
        record_from_dict(d, "m7.toml")


def test_key_type_must_match_blob() -> None:
    blob = KEY.split()[1]
    with pytest.raises(RecordError, match="does not match"):
        normalise_ssh_key(f"ssh-rsa {blob}")


def test_sa_key_length_checked() -> None:
    d = record_to_dict(full_record())
    d["sa"]["key_to_moat"] = "00" * 19
    with pytest.raises(RecordError, match="sa.key_to_moat"):
        record_from_dict(d)


def test_spis_unique_per_number_direction_generation() -> None:
    seen = set()
    for number in (1, 2, 255, 256, (1 << 23) - 1):
        for gen in (1, 2, 255, 256):
            for to_portal in (True, False):
                spi = spi_for(number, gen, to_portal)
                assert 256 <= spi < 1 << 32
                seen.add(spi)
    # generation 256 wraps onto generation 0 slot, never onto gen 255 (previous)
    assert len(seen) == 5 * 4 * 2


def test_create_update_cas(db: Database) -> None:
    rec = db.create(make("m1", 1, "10.200.0.0/28"))
    assert rec.version == 1
    moved = rec.replace(learned=Learned(address=ipaddress.IPv4Address("192.0.2.9")))
    assert db.update(moved, base_version=1).version == 2
    # a second update still based on version 1 is refused: nothing is lost
    with pytest.raises(StaleRecord):
        db.update(rec.replace(email="other@example.com"), base_version=1)
    got = db.get("m1")
    assert got.version == 2
    assert str(got.learned.address) == "192.0.2.9"
    assert got.email == "m1@example.com"


def _bump(root: str, rounds: int) -> int:
    """Increment `number`-free counter stored in the port field, via CAS."""
    db = Database(root)
    done = 0
    while done < rounds:
        rec = db.get("m1")
        port = (rec.learned.port or 0) + 1
        try:
            db.update(rec.replace(learned=Learned(port=port)), rec.version)
            done += 1
        except StaleRecord:
            continue
    return done


def test_concurrent_updates_lose_nothing(db: Database) -> None:
    db.create(make("m1", 1, "10.200.0.0/28"))
    procs, rounds = 4, 25
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        assert sum(pool.starmap(_bump, [(str(db.root), rounds)] * procs)) == 100
    assert db.get("m1").learned.port == procs * rounds


def test_key_lookup(db: Database) -> None:
    rec = db.create(make("m1", 1, "10.200.0.0/28"))
    assert db.id_for_key(rec.key_blob) == "m1"
    assert db.id_for_key(KEY.split()[1]) is None
    assert db.id_for_key("x" * 5000) is None
    db.remove("m1")
    assert db.id_for_key(rec.key_blob) is None


def test_corrupt_record_skipped_others_loaded(db: Database) -> None:
    for i in range(1, 6):
        db.create(make(f"m{i}", i, f"10.200.0.{16 * i}/28"))
    (db.moats_dir / "m3.toml").write_text("version = [oops\n")
    (db.moats_dir / "m4.toml").write_text(
        record_to_toml(db.get("m4")).replace("10.200.0.64/28", "10.200.0.65/28")
    )
    (db.moats_dir / "zz.toml").write_text(record_to_toml(db.get("m5")))
    snap = db.load_all()
    assert sorted(snap.records) == ["m1", "m2", "m5"]
    assert "not valid TOML" in snap.problems["m3.toml"]
    assert "subnet" in snap.problems["m4.toml"]
    assert "file name" in snap.problems["zz.toml"]


def test_conflicts_dropped() -> None:
    a = make("a", 1, "10.200.0.0/28")
    b = make("b", 1, "10.200.0.16/28")  # same number
    c = make("c", 3, "10.200.0.8/29")  # inside a's subnet
    d = make("d", 4, "10.200.0.32/28", a.ssh_key)  # a's key
    e = make("e", 5, "10.200.0.48/28")
    kept, problems = drop_conflicts([e, d, c, b, a])
    assert [r.id for r in kept] == ["a", "e"]
    assert set(problems) == {"b", "c", "d"}


def test_index_cache_used_and_refreshed(db: Database) -> None:
    for i in range(1, 4):
        db.create(make(f"m{i}", i, f"10.200.0.{16 * i}/28"))
    assert len(db.load_all().records) == 3
    assert db.index_path.exists()
    # a changed file is re-parsed, not taken from the cache
    rec = db.get("m2")
    db.update(rec.replace(email="new@example.com"), rec.version)
    assert db.load_all().records["m2"].email == "new@example.com"
    # a damaged cache entry (stamp still matching) falls back to the file
    index = json.loads(db.index_path.read_text())
    index["entries"]["m3.toml"][3] = {"id": "m3"}
    db.index_path.write_text(json.dumps(index))
    assert db.load_all().records["m3"] == db.get("m3")
    # a removed file disappears; a garbage cache is ignored
    db.remove("m1")
    db.index_path.write_text("{garbage")
    assert sorted(db.load_all().records) == ["m2", "m3"]


def test_files_are_private(db: Database) -> None:
    db.create(make("m1", 1, "10.200.0.0/28"))
    assert os.stat(db.path("m1")).st_mode & 0o077 == 0
