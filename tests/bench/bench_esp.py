"""Micro-benchmark of the ESP core: µs per seal/open against bare crypto calls.

Run with `make bench-esp` (or `python tests/bench/bench_esp.py [--size N]`).
For each transform it times OutboundSA.seal, InboundSA.open and SADB.open on
an inner packet of --size bytes, and, in the same run, the bare `cryptography`
AEAD call on the same plaintext, so the Python overhead the core adds shows
as a ratio that does not depend on how fast the machine is today.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryptography.hazmat.primitives.ciphers.aead import (  # noqa: E402
    AESGCM,
    ChaCha20Poly1305,
)

from datapath.esp import SADB, InboundSA, OutboundSA, SAConfig  # noqa: E402
from tests.esp_helpers import KEY_SIZES  # noqa: E402

KEYS = KEY_SIZES  # transform -> (key bytes, auth key bytes)
BARE = {
    "aes-gcm-128": AESGCM,
    "aes-gcm-256": AESGCM,
    "chacha20-poly1305": ChaCha20Poly1305,
}


def per_call_us(run: Callable[[], object], calls: int, repeat: int) -> float:
    """Best of `repeat` runs, in µs per call.

    Timed as CPU time of this thread, so other processes disturb it less.

    `run` makes `calls` calls in a plain for loop, so the loop costs the same
    for the core and for the bare crypto call it is compared with.
    """
    runs = []
    for _ in range(repeat):
        start = time.thread_time()
        run()
        runs.append(time.thread_time() - start)
    return min(runs) / calls * 1e6


def bench_transform(name: str, size: int, calls: int, repeat: int) -> dict[str, float]:
    key_size, auth_size = KEYS[name]
    cfg = SAConfig(
        spi=0x1000,
        transform=name,
        key=os.urandom(key_size),
        auth_key=os.urandom(auth_size),
        replay_window=4096,
        esn=True,
    )
    inner = bytes([0x45]) + os.urandom(size - 1)
    out = OutboundSA(cfg)

    def seal_all() -> None:
        seal = out.seal
        for _ in range(calls):
            seal(inner, 4)

    results = {"seal": per_call_us(seal_all, calls, repeat)}

    # open distinct packets in order, as a real receiver sees them; a fresh
    # SA for every run so the replay window accepts them again
    packets = [out.seal(inner, 4) for _ in range(calls)]

    def open_all() -> None:
        sa_open = InboundSA(cfg).open
        for packet in packets:
            sa_open(packet, 0.0)

    def sadb_open_all() -> None:
        db = SADB()
        db.add(InboundSA(cfg))
        db_open = db.open
        for packet in packets:
            db_open(packet, 0.0)

    results["open"] = per_call_us(open_all, calls, repeat)
    results["sadb.open"] = per_call_us(sadb_open_all, calls, repeat)

    bare_cls = BARE.get(name)
    if bare_cls is not None:
        aead = bare_cls(cfg.key[:-4])
        aad = os.urandom(12)
        plaintext = inner + b"\1\2\0\4"
        nonces = [os.urandom(12) for _ in range(calls)]
        sealed = [(n, aead.encrypt(n, plaintext, aad)) for n in nonces]

        def encrypt_all() -> None:
            encrypt = aead.encrypt
            for nonce in nonces:
                encrypt(nonce, plaintext, aad)

        def decrypt_all() -> None:
            decrypt = aead.decrypt
            for nonce, ct in sealed:
                decrypt(nonce, ct, aad)

        results["bare encrypt"] = per_call_us(encrypt_all, calls, repeat)
        results["bare decrypt"] = per_call_us(decrypt_all, calls, repeat)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1400, help="inner packet bytes")
    parser.add_argument("--calls", type=int, default=10000, help="calls per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs (best taken)")
    parser.add_argument("transforms", nargs="*", default=list(KEYS))
    args = parser.parse_args()

    print(f"ESP core micro-benchmark, {args.size}-byte inner packets, ESN on")
    for name in args.transforms:
        r = bench_transform(name, args.size, args.calls, args.repeat)
        line = f"{name:20s} seal {r['seal']:6.2f} µs  open {r['open']:6.2f} µs"
        line += f"  sadb.open {r['sadb.open']:6.2f} µs"
        if "bare encrypt" in r:
            seal_ratio = r["seal"] / r["bare encrypt"]
            open_ratio = r["sadb.open"] / r["bare decrypt"]
            line += (
                f"  | bare encrypt {r['bare encrypt']:5.2f} decrypt "
                f"{r['bare decrypt']:5.2f} µs  ratio seal {seal_ratio:4.2f}x"
                f" open {open_ratio:4.2f}x"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
