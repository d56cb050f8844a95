"""Micro-benchmark of the ESP core: µs per seal/open against bare crypto calls.

Run with `make bench-esp` (or `python tests/bench/bench_esp.py [--size N]`).
For each transform it times OutboundSA.seal, InboundSA.open and SADB.open on
an inner packet of --size bytes and, in the same rounds, the bare
`cryptography` AEAD call on the same plaintext, so the Python overhead that
the core adds shows as a difference and a ratio. The measurements are
interleaved round by round and each takes its best round, timed as CPU time
of this thread: on a busy shared machine that is far steadier than wall time.
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

BARE = {
    "aes-gcm-128": AESGCM,
    "aes-gcm-256": AESGCM,
    "chacha20-poly1305": ChaCha20Poly1305,
}
SALT_SIZE = 4
# start where a long-lived SA is: past the first window of its 2^32 subspace
# (the replay window takes a slower ESN path only for the first packets)
STEADY_SEQ = 1 << 20


def runners(name: str, size: int, calls: int) -> dict[str, Callable[[], None]]:
    """Loops of `calls` calls each: the core's, and the bare AEAD's."""
    key_size, auth_size = KEY_SIZES[name]
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
    out.seq = STEADY_SEQ
    # distinct packets in order, as a real receiver sees them; a fresh SA
    # for every round so the replay window accepts them again
    packets = [out.seal(inner, 4) for _ in range(calls)]

    def seal() -> None:
        sa_seal = out.seal
        for _ in range(calls):
            sa_seal(inner, 4)

    def receiver() -> InboundSA:
        sa = InboundSA(cfg)
        sa.replay.reset(STEADY_SEQ)
        return sa

    def sa_open() -> None:
        opener = receiver().open
        for packet in packets:
            opener(packet, 0.0)

    def sadb_open() -> None:
        db = SADB()
        db.add(receiver())
        opener = db.open
        for packet in packets:
            opener(packet, 0.0)

    loops = {"seal": seal, "open": sa_open, "sadb.open": sadb_open}
    bare_cls = BARE.get(name)
    if bare_cls is not None:
        aead = bare_cls(cfg.key[:-SALT_SIZE])
        aad = os.urandom(12)
        plaintext = inner + b"\1\2\2\4"
        nonces = [os.urandom(12) for _ in range(calls)]
        sealed = [(n, aead.encrypt(n, plaintext, aad)) for n in nonces]

        def bare_encrypt() -> None:
            encrypt = aead.encrypt
            for nonce in nonces:
                encrypt(nonce, plaintext, aad)

        def bare_decrypt() -> None:
            decrypt = aead.decrypt
            for nonce, ct in sealed:
                decrypt(nonce, ct, aad)

        loops["bare encrypt"] = bare_encrypt
        loops["bare decrypt"] = bare_decrypt
    return loops


def measure(loops: dict[str, Callable[[], None]], calls: int, rounds: int) -> dict:
    """Best round of each loop, in µs per call, the loops interleaved."""
    best = dict.fromkeys(loops, float("inf"))
    for _ in range(rounds):
        for key, loop in loops.items():
            start = time.thread_time()
            loop()
            best[key] = min(best[key], time.thread_time() - start)
    return {key: seconds / calls * 1e6 for key, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1400, help="inner packet bytes")
    parser.add_argument("--calls", type=int, default=5000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=20, help="rounds (best taken)")
    parser.add_argument("transforms", nargs="*", default=list(KEY_SIZES))
    args = parser.parse_args()

    print(f"ESP core, {args.size}-byte inner packets, ESN on, µs per packet")
    for name in args.transforms:
        calls = args.calls if name in BARE else max(args.calls // 50, 20)
        r = measure(runners(name, args.size, calls), calls, args.rounds)
        line = f"{name:20s} seal {r['seal']:6.2f}  open {r['open']:6.2f}"
        line += f"  sadb.open {r['sadb.open']:6.2f}"
        if "bare encrypt" in r:
            line += (
                f"  | bare encrypt {r['bare encrypt']:4.2f} decrypt "
                f"{r['bare decrypt']:4.2f}  | core adds seal "
                f"+{r['seal'] - r['bare encrypt']:4.2f} "
                f"({r['seal'] / r['bare encrypt']:3.1f}x)  open "
                f"+{r['sadb.open'] - r['bare decrypt']:4.2f} "
                f"({r['sadb.open'] / r['bare decrypt']:3.1f}x)"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
