"""Coverage-guided fuzzing of the ESP receive path with atheris (libFuzzer).

Not part of `make test`: atheris is not a dependency. To run for an hour:

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_esp.py -max_total_time=3600 -rss_limit_mb=1024

The harness keys one inbound SA of every transform, with and without ESN,
and feeds each input both raw and as a sealed packet whose bytes the fuzzer
then overwrites (so the fuzzer gets past the ICV for its first input bytes).
The only acceptable outcomes are an Opened or a counted Drop; any exception,
or an Opened payload we never sealed, is a crash.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from datapath.esp import SADB, Drop, InboundSA, Opened, OutboundSA, SAConfig
    from datapath.selector import Selectors
    from datapath.udpencap import classify
    from tests.esp_helpers import KEY_SIZES

KEYS = KEY_SIZES  # transform -> (key bytes, auth key bytes)


def build() -> tuple[SADB, list[OutboundSA]]:
    db = SADB()
    senders = []
    selectors = Selectors(["10.2.0.0/16"], ["10.1.0.0/16"])
    spi = 0x100
    for name, (key_size, auth_size) in KEYS.items():
        for esn in (False, True):
            cfg = SAConfig(
                spi=spi,
                transform=name,
                key=bytes((spi + i * 7) & 0xFF for i in range(key_size)),
                auth_key=bytes((spi + i * 13) & 0xFF for i in range(auth_size)),
                replay_window=128,
                esn=esn,
            )
            db.add(InboundSA(cfg, selectors))
            senders.append(OutboundSA(cfg))
            spi += 1
    return db, senders


DB, SENDERS = build()
SEALED: set[bytes] = set()


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    sender = SENDERS[fdp.ConsumeIntInRange(0, len(SENDERS) - 1)]
    next_header = fdp.ConsumeIntInRange(0, 255)
    inner = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
    overwrite_at = fdp.ConsumeIntInRange(0, 300)
    raw = fdp.ConsumeBytes(fdp.remaining_bytes())

    SEALED.add(inner)
    packet = bytearray(sender.seal(inner, next_header))
    patch = raw[:8]
    packet[overwrite_at : overwrite_at + len(patch)] = patch
    for datagram in (bytes(packet), raw):
        classify(datagram)
        _, result = DB.open(datagram, now=0.0)
        if isinstance(result, Opened):
            if result.payload not in SEALED:
                raise AssertionError("opened a payload nobody sealed")
        elif not isinstance(result, Drop):
            raise AssertionError(f"unexpected result {result!r}")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
