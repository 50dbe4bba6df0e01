"""Benchmark: packed short-exponent Paillier (secagg.paillier) against phe, measured in one run.

What is timed (DESIGN.md section 5)
-----------------------------------
For each vector length ``d`` (uint32 values, ``value_bits = 32``, ``max_summands = 100``,
so 40-bit slots, 51 per 2048-bit plaintext) and one key of ``--key-bits``:

``paillier_keygen``
    :func:`secagg.paillier.generate_keypair` (phe's prime search; varies run to run).

``paillier_encrypt``
    ``ours``: :meth:`FastEncryptor.encrypt_vector` of the whole vector (packing
    included), best of ``--repeat``, per value. ``phe``: ``public_key.encrypt(int)``
    (phe's own API: encode, then obfuscate with a fresh full-size ``r^n``) on a sample
    of ``--phe-sample`` values, per value. ``speedup_vs_phe`` is their ratio. It splits
    into ``speedup_from_packing`` (values per ciphertext) times
    ``speedup_from_short_exponent`` = (phe's ``raw_encrypt`` of one packed plaintext,
    full-size ``r``) / (our time per ciphertext); the latter splits again into
    ``speedup_short_exponent_alone`` (full ``r^n`` vs one ``powmod(h, x, n^2)`` with a
    256-bit ``x``) and ``speedup_fixed_base_table`` (that powmod vs our table of byte
    windows). The product of the factors is close to, not exactly, ``speedup_vs_phe``:
    phe's ``encrypt`` has encoding overhead and ours includes packing. The one-off
    :class:`FastEncryptor` setup (``h = r0^n`` and the table) is ``setup_seconds``.
    ``pure_python_*`` fields repeat our measurement without gmpy2 (on a sample of
    ciphertexts), for installs without the ``fast`` extra.

``paillier_bytes``
    Wire bytes per value of :func:`ciphertexts_to_bytes` against the 4-byte plaintext.

``paillier_relay_add``
    A relay adding ``f = 8`` ciphertext vectors of ``d`` values: ``f - 1``
    :func:`add_ciphertexts` calls into a copy of the first (``seconds``), and the same
    including parsing the ``f`` received byte strings and serialising the sum
    (``with_wire_seconds``).

``paillier_decrypt``
    The server's :func:`decrypt_vector` (phe's CRT ``raw_decrypt`` per ciphertext, then
    unpack) of that ``f``-vector aggregate; ``exact`` checks it against numpy's sum.

``paillier_e2e``
    One round over loopback websockets (``benchmarks/e2e.py``: a Coordinator and
    ``n = 20`` Peers in this process, d = 10,000, 10 % of the peers crashing after
    R1), in each of the three modes, so the cost of the homomorphic modes is read
    against plain masking measured in the same run. ``seconds`` is the round's wall
    time; ``peer_bytes_ratio`` and ``server_bytes_ratio`` are bytes over one raw
    vector (4 d). All peers share one core here, so the masking phase of the
    homomorphic modes shows n encryptions done one after the other.

Output: one JSON line per record on stdout, each with ``bench`` and ``params``. All
times are :func:`time.perf_counter` wall clock in one process. The script always exits
0: benchmarks report, they do not fail.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secagg import paillier
from secagg.paillier import (
    EXPONENT_BITS,
    HAVE_GMPY2,
    FastEncryptor,
    PaillierKeyPair,
    SlotLayout,
    add_ciphertexts,
    ciphertexts_from_bytes,
    ciphertexts_to_bytes,
    decrypt_vector,
    generate_keypair,
    pack,
)

TARGET_SPEEDUP = 100
FLOOR_SPEEDUP = 30
TARGET_BYTES_RATIO = 4.0
PLAINTEXT_BYTES = 4
VALUE_BITS = 32
MAX_SUMMANDS = 100
FANIN = 8
FULL_DIMS = (10_000, 100_000)
QUICK_DIMS = (1_000,)


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _mean(fn: Callable[[Any], object], inputs: Sequence[Any]) -> float:
    """Mean time of one call of ``fn``, over a sample of (different) inputs."""
    started = time.perf_counter()
    for item in inputs:
        fn(item)
    return (time.perf_counter() - started) / len(inputs)


_gmpy2: Any = importlib.import_module("gmpy2") if HAVE_GMPY2 else None


def _short_exponent_encrypt(plaintext: int, h: int, exponent: int, n: int) -> int:
    """(1 + m n) h^x mod n^2 with one powmod: the short exponent without our table."""
    nsquare = n * n
    if _gmpy2 is not None:
        big_n = _gmpy2.mpz(n)
        return int((plaintext * big_n + 1) * _gmpy2.powmod(h, exponent, nsquare) % nsquare)
    return (plaintext * n + 1) * pow(h, exponent, nsquare) % nsquare


class Baselines:
    """Per-key measurements that do not depend on d: phe, the bare short-exponent powmod,
    and our pure-Python path."""

    def __init__(self, keypair: PaillierKeyPair, *, phe_sample: int, ct_sample: int,
                 seed: int) -> None:
        public = keypair.public
        rng = np.random.default_rng(seed)
        values = [int(v) for v in rng.integers(0, 2**VALUE_BITS, size=phe_sample)]
        layout = SlotLayout(VALUE_BITS, MAX_SUMMANDS, public.n.bit_length())
        plaintexts = pack(rng.integers(0, 2**VALUE_BITS, size=layout.slots * ct_sample,
                                       dtype=np.uint32), layout)
        public.encrypt(1)  # warm-up
        self.phe_per_value = _mean(public.encrypt, values)
        self.phe_raw_per_ct = _mean(public.raw_encrypt, plaintexts)
        n = int(public.n)
        h = pow(secrets.randbelow(n - 2) + 2, n, n * n)
        pairs = [(p, secrets.randbits(EXPONENT_BITS)) for p in plaintexts]
        self.powmod_per_ct = _mean(lambda px: _short_exponent_encrypt(px[0], h, px[1], n), pairs)
        started = time.perf_counter()
        pure = FastEncryptor(public, use_gmpy2=False)
        self.pure_setup = time.perf_counter() - started
        self.pure_per_ct = _mean(pure.encrypt, plaintexts)
        self.phe_sample = phe_sample
        self.ct_sample = ct_sample


def bench_d(keypair: PaillierKeyPair, base: Baselines, d: int, *, repeat: int,
            seed: int) -> list[dict[str, Any]]:
    public, key_bits = keypair.public, keypair.key_bits
    layout = SlotLayout(VALUE_BITS, MAX_SUMMANDS, key_bits)
    rng = np.random.default_rng([seed, d])
    vectors = rng.integers(0, 2**VALUE_BITS, size=(FANIN, d), dtype=np.uint32)
    count = layout.ciphertext_count(d)
    params = {"d": d, "key_bits": key_bits, "value_bits": VALUE_BITS,
              "max_summands": MAX_SUMMANDS, "exponent_bits": EXPONENT_BITS,
              "gmpy2": HAVE_GMPY2}

    started = time.perf_counter()
    encryptor = FastEncryptor(public)
    setup = time.perf_counter() - started
    ours = _best(lambda: encryptor.encrypt_vector(vectors[0], layout), repeat)
    plaintexts = pack(vectors[0], layout)
    pack_seconds = _best(lambda: pack(vectors[0], layout), repeat)
    sample = plaintexts[:max(1, min(count, base.ct_sample * 4))]
    ours_per_ct = _mean(encryptor.encrypt, sample)
    ours_per_value = ours / d
    speedup = base.phe_per_value / ours_per_value
    packing = d / count
    short_exponent = base.phe_raw_per_ct / ours_per_ct
    records: list[dict[str, Any]] = [{
        "bench": "paillier_encrypt",
        "params": params,
        "ours_per_value_us": ours_per_value * 1e6,
        "phe_per_value_us": base.phe_per_value * 1e6,
        "speedup_vs_phe": speedup,
        "speedup_from_packing": packing,
        "speedup_from_short_exponent": short_exponent,
        "speedup_short_exponent_alone": base.phe_raw_per_ct / base.powmod_per_ct,
        "speedup_fixed_base_table": base.powmod_per_ct / ours_per_ct,
        "slots": layout.slots,
        "slot_bits": layout.slot_bits,
        "ciphertexts": count,
        "ours_seconds": ours,
        "pack_seconds": pack_seconds,
        "ours_per_ciphertext_us": ours_per_ct * 1e6,
        "phe_raw_encrypt_per_ciphertext_us": base.phe_raw_per_ct * 1e6,
        "short_exponent_powmod_per_ciphertext_us": base.powmod_per_ct * 1e6,
        "setup_seconds": setup,
        "pure_python_setup_seconds": base.pure_setup,
        "pure_python_per_value_us": base.pure_per_ct / layout.slots * 1e6,
        "pure_python_speedup_vs_phe": base.phe_per_value * layout.slots / base.pure_per_ct,
        "phe_sample": base.phe_sample,
        "target_speedup": TARGET_SPEEDUP,
        "floor_speedup": FLOOR_SPEEDUP,
        "meets_target": bool(speedup >= TARGET_SPEEDUP),
        "meets_floor": bool(speedup >= FLOOR_SPEEDUP),
        "repeat": repeat,
    }]

    ciphertext_vectors = [encryptor.encrypt_vector(v, layout) for v in vectors]
    wire = [ciphertexts_to_bytes(c, public) for c in ciphertext_vectors]
    to_bytes = _best(lambda: ciphertexts_to_bytes(ciphertext_vectors[0], public), repeat)
    from_bytes = _best(lambda: ciphertexts_from_bytes(wire[0], public, count), repeat)
    ratio = len(wire[0]) / d / PLAINTEXT_BYTES
    records.append({
        "bench": "paillier_bytes",
        "params": params,
        "bytes": len(wire[0]),
        "bytes_per_value": len(wire[0]) / d,
        "plaintext_bytes_per_value": PLAINTEXT_BYTES,
        "ratio": ratio,
        "target_ratio": TARGET_BYTES_RATIO,
        "meets_target": bool(ratio <= TARGET_BYTES_RATIO),
        "ciphertext_bytes": layout.ciphertext_bytes,
        "to_bytes_seconds": to_bytes,
        "from_bytes_seconds": from_bytes,
    })

    def relay_add() -> list[int]:
        total = list(ciphertext_vectors[0])
        for other in ciphertext_vectors[1:]:
            add_ciphertexts(total, other, public)
        return total

    def relay_with_wire() -> bytes:
        received = [ciphertexts_from_bytes(w, public, count) for w in wire]
        total = received[0]
        for other in received[1:]:
            add_ciphertexts(total, other, public)
        return ciphertexts_to_bytes(total, public)

    add_seconds = _best(relay_add, repeat)
    wire_seconds = _best(relay_with_wire, repeat)
    records.append({
        "bench": "paillier_relay_add",
        "params": {**params, "f": FANIN},
        "seconds": add_seconds,
        "with_wire_seconds": wire_seconds,
        "adds": FANIN - 1,
        "ciphertexts": count,
        "per_ciphertext_add_us": add_seconds / ((FANIN - 1) * count) * 1e6,
    })

    aggregate = relay_add()
    started = time.perf_counter()
    decrypted = decrypt_vector(keypair.private, aggregate, layout, d, np.uint32)
    decrypt_seconds = time.perf_counter() - started
    expected = vectors.sum(axis=0, dtype=np.uint32)
    records.append({
        "bench": "paillier_decrypt",
        "params": {**params, "summands": FANIN},
        "seconds": decrypt_seconds,
        "ciphertexts": count,
        "per_ciphertext_ms": decrypt_seconds / count * 1e3,
        "per_value_us": decrypt_seconds / d * 1e6,
        "exact": bool(np.array_equal(decrypted, expected)),
    })
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes for the smoke test (d in {QUICK_DIMS}, tiny samples)")
    parser.add_argument("--dims", type=int, nargs="+", default=None,
                        help=f"vector lengths (default {FULL_DIMS})")
    parser.add_argument("--key-bits", type=int, default=paillier.DEFAULT_KEY_BITS,
                        choices=paillier.KEY_BITS, help="Paillier modulus size")
    parser.add_argument("--repeat", type=int, default=None,
                        help="best-of-N repetitions (default 3, quick 1)")
    parser.add_argument("--phe-sample", type=int, default=None,
                        help="values encrypted with phe's public_key.encrypt (default 30, quick 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the benchmark's inputs")
    parser.add_argument("--no-e2e", action="store_true",
                        help="skip the end-to-end rounds over loopback websockets")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    phe_sample = args.phe_sample or (3 if args.quick else 30)
    if repeat < 1 or phe_sample < 1:
        parser.error("--repeat and --phe-sample must be at least 1")
    dims = args.dims or (QUICK_DIMS if args.quick else FULL_DIMS)

    started = time.perf_counter()
    keypair = generate_keypair(args.key_bits)
    print(json.dumps({"bench": "paillier_keygen", "params": {"key_bits": args.key_bits},
                      "seconds": time.perf_counter() - started}), flush=True)
    base = Baselines(keypair, phe_sample=phe_sample, ct_sample=2 if args.quick else 10,
                     seed=args.seed)
    for d in dims:
        for record in bench_d(keypair, base, d, repeat=repeat, seed=args.seed):
            print(json.dumps(record), flush=True)
    if not args.no_e2e:
        n, d = E2E_QUICK if args.quick else E2E_FULL
        for record in bench_e2e(n, d, seed=args.seed):
            print(json.dumps(record), flush=True)
    return 0


E2E_FULL = (20, 10_000)
E2E_QUICK = (6, 200)


def bench_e2e(n: int, d: int, *, seed: int) -> list[dict[str, Any]]:
    """One loopback round per mode, with the e2e benchmark's crashes and checks."""
    # benchmarks/ is not an installed package: reach e2e.py from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.e2e import bench_one, raise_fd_limit

    fd_limit = raise_fd_limit()
    records = []
    for mode in ("masking", "paillier", "hybrid"):
        record = asyncio.run(bench_one(n, d, "complete", seed, 60.0, fd_limit, mode))
        record["bench"] = "paillier_e2e"
        record.pop("targets", None)  # the masking targets of e2e.py do not apply here
        record.pop("meets_targets", None)
        records.append(record)
    return records


if __name__ == "__main__":
    sys.exit(main())
