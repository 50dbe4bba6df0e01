"""What a round of real peers cannot undercut on this machine: its unit costs, measured.

A round of ``n`` peers on loopback opens websocket links, moves frames, agrees
X25519 keys and expands masks; every one of these costs CPU in whatever process
does it, and all the processes share this machine's cores. :func:`measure_unit_costs`
times each unit once, directly with websockets, ``cryptography`` and numpy (no
secagg code), in this process and on an idle event loop:

- ``link``: CPU seconds to open one websocket on 127.0.0.1 and close it, both ends
  (TCP connect and accept, the HTTP upgrade, the closing handshake);
- ``frame``: CPU seconds to send one 400-byte binary frame and receive it, both ends;
- ``agreement``: one X25519 exchange with a public key loaded from its 32 bytes;
- ``mask``: one AES-256-CTR keystream of ``d`` 32-bit words added into a uint32
  vector (a pair mask or a self mask of a ``d``-coordinate input), as
  :class:`benchmarks.masking.LimitMasker` does it.

:func:`round_floor` multiplies them by a round's counts and divides by the cores:
the wall time below which that round cannot finish here, however its code were
written, as long as it runs on these libraries. The protocol's own work (secret
sharing, AEAD, encoding, bookkeeping) comes on top and is not counted, so the floor
is a lower bound, not an estimate.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from benchmarks.masking import LimitMasker

HOST = "127.0.0.1"
LINKS = 200
FRAMES = 4000
FRAME_BYTES = 400
AGREEMENTS = 2000
MASKS = 200


async def _link_and_frame_seconds() -> tuple[float, float]:
    received = 0
    done = asyncio.Event()

    async def sink(connection: ServerConnection) -> None:
        nonlocal received
        async for _ in connection:
            received += 1
            if received == FRAMES:
                done.set()

    async with serve(sink, HOST, 0, compression=None, ping_interval=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        url = f"ws://{HOST}:{port}"
        started = time.process_time()
        for _ in range(LINKS):
            async with connect(url, compression=None, ping_interval=None, proxy=None):
                pass
        link = (time.process_time() - started) / LINKS
        async with connect(url, compression=None, ping_interval=None, proxy=None) as ws:
            frame = bytes(FRAME_BYTES)
            started = time.process_time()
            for _ in range(FRAMES):
                await ws.send(frame)
            await asyncio.wait_for(done.wait(), 60)
            frame_seconds = (time.process_time() - started) / FRAMES
    return link, frame_seconds


def _agreement_seconds() -> float:
    private = X25519PrivateKey.generate()
    public = X25519PrivateKey.generate().public_key().public_bytes_raw()
    started = time.process_time()
    for _ in range(AGREEMENTS):
        private.exchange(X25519PublicKey.from_public_bytes(public))
    return (time.process_time() - started) / AGREEMENTS


def _mask_seconds(d: int) -> float:
    masker = LimitMasker(d, [bytes([i]) * 32 for i in range(MASKS)])
    encoded = np.zeros(d, dtype=np.uint32)
    started = time.process_time()
    masker(encoded)
    return (time.process_time() - started) / MASKS


async def measure_unit_costs(d: int) -> dict[str, float]:
    """CPU seconds per link, frame, agreement and mask of ``d`` words (see above)."""
    link, frame = await _link_and_frame_seconds()
    return {"link": link, "frame": frame, "agreement": _agreement_seconds(),
            "mask": _mask_seconds(d)}


def round_floor(counts: dict[str, float], costs: dict[str, float], cpus: int
                ) -> dict[str, Any]:
    """The floor of a round that did ``counts`` of each unit: CPU seconds per unit
    kind, their total, and the wall time on ``cpus`` cores (all kept busy, at best)."""
    parts = {kind: counts.get(kind, 0) * cost for kind, cost in costs.items()}
    cpu = sum(parts.values())
    return {"cpu_seconds": round(cpu, 3), "seconds": round(cpu / max(cpus, 1), 3),
            "cpu_seconds_by_unit": {k: round(v, 3) for k, v in parts.items()},
            "counts": {k: int(v) for k, v in counts.items()}}
