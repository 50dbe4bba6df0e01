"""Federated averaging of a PyTorch MLP over secure aggregation, next to plaintext FedAvg.

scikit-learn's digits (8x8 images, 10 classes; shipped with scikit-learn, nothing
is downloaded) are split non-IID across the peers (a Dirichlet(alpha) share of
every class per peer, seeded). Each round every peer trains the global 64-32-10
MLP locally (SGD, seeded shuffling) and contributes its model delta with its
sample count as weight, through a real :class:`server.Coordinator` and real
:class:`peers.Peer` s over websockets on 127.0.0.1, all in one event loop. Some
peers are crashed every round (sockets aborted, as SIGKILL would leave them):
during the share exchange, before the masked input, and on some rounds during
unmasking (that peer is still a contributor); they rejoin the next round as
fresh ``Peer`` objects with the same id.

Alongside, plaintext FedAvg runs over exactly the round's reported
contributors, from the same initial model, with the same data, local training
and seeds, applying the same delta clipping. The two runs therefore differ only
by the quantization error of the secure aggregate (plus its knock-on effect
through float32 rounding and later training). Each round also checks the secure
aggregate against the exact weighted mean of the very deltas that were sent,
within the documented bound ``WeightedEncoding.mean_error_bound``.

::

    python -m scenarios.fedavg_torch [--peers 12] [--rounds 8] [--seed 0]
                                     [--out results/fedavg] [--modulus-bits 64] [--quick]

Writes ``report.json`` and ``accuracy.png`` into ``--out``; exits 1 if the two
runs do not agree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("scenarios.fedavg_torch needs PyTorch: pip install torch==2.13.0 (CPU build) "
             "or the project's 'torch' extra")

from peers import Peer
from peers.fedavg import FedAvgClient, apply_aggregate, update_spec
from secagg.cli_support import HelpFormatter
from secagg.encoding import WeightedEncoding
from secagg.protocol import PeerOutcome
from secagg.torch_state import flatten_state, state_delta
from server import Coordinator

State = dict[str, torch.Tensor]

REPORT_NAME = "report.json"
PLOT_NAME = "accuracy.png"
# Secure and plaintext runs agree when every round's aggregate is within the
# documented quantization bound of the exact weighted mean of the deltas sent, the
# decoded total weight is exact, and the two trajectories stay this close (parameters)
# and within one test sample (accuracy).
PARAM_TOLERANCE = 1e-4
AGREEMENT = ("every round: |secure mean - exact weighted mean of the sent, clipped deltas| < "
             "WeightedEncoding.mean_error_bound and total weight exact; over the run: max "
             f"|parameter difference| <= {PARAM_TOLERANCE} and accuracy difference <= one "
             "test sample")


@dataclass(frozen=True)
class Config:
    peers: int = 12
    rounds: int = 8
    seed: int = 0
    epochs: int = 2
    lr: float = 0.3
    batch_size: int = 16
    alpha: float = 0.5  # Dirichlet concentration over labels: small = very non-IID
    min_samples: int = 10
    hidden: int = 32
    clip: float = 4.0  # bound on each delta coordinate (both runs clip identically)
    modulus_bits: int = 64
    phase_timeout: float = 10.0
    quick: bool = False
    mode: str = "masking"  # or "paillier" / "hybrid" (DESIGN section 5)


@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    parts: list[np.ndarray]  # train indices of each peer

    @property
    def sizes(self) -> list[int]:
        return [len(p) for p in self.parts]


@dataclass
class RoundRecord:
    round: int
    status: str
    reason: str
    contributors: list[str]
    dropped: dict[str, str]
    crashed: dict[str, str]
    total_weight: float | None
    total_weight_expected: float
    secure_accuracy: float
    plaintext_accuracy: float
    accuracy_diff: float
    max_param_diff: float
    aggregate_error: float | None
    aggregate_error_bound: float | None
    within_bound: bool
    clipped_coordinates: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------- data, model


def load_data(cfg: Config) -> Dataset:
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32) / 16.0
    y = np.asarray(digits.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y,
                                              random_state=cfg.seed)
    parts = dirichlet_split(np.asarray(y_tr), cfg.peers, cfg.alpha, cfg.min_samples,
                            np.random.default_rng([cfg.seed, 1]))
    return Dataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te),
                   torch.from_numpy(y_te), parts)


def dirichlet_split(labels: np.ndarray, n: int, alpha: float, min_samples: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Split indices non-IID: each class divided over peers by Dirichlet(alpha) shares."""
    classes = np.unique(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for peer, chunk in enumerate(np.split(idx, cuts)):
                parts[peer].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"cannot give each of {n} peers {min_samples} samples; use fewer peers")


def make_model(cfg: Config) -> nn.Module:
    return nn.Sequential(nn.Linear(64, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10))


def initial_state(cfg: Config) -> State:
    """PyTorch's default Linear init, drawn from a seeded generator."""
    model = make_model(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.uniform_(-bound, bound, generator=generator)
    return clone_state(model.state_dict())


def clone_state(state: Mapping[str, torch.Tensor]) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def local_train(cfg: Config, data: Dataset, peer: int, round_number: int,
                start: Mapping[str, torch.Tensor]) -> State:
    """Train from ``start`` on the peer's data; deterministic in (seed, round, peer)."""
    model = make_model(cfg)
    model.load_state_dict(start)
    seed = int(np.random.SeedSequence([cfg.seed, round_number, peer]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(seed)
    index = torch.from_numpy(data.parts[peer])
    x, y = data.x_train[index], data.y_train[index]
    params = list(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(index), generator=generator)
        for begin in range(0, len(index), cfg.batch_size):
            batch = order[begin:begin + cfg.batch_size]
            for p in params:
                p.grad = None
            loss_fn(model(x[batch]), y[batch]).backward()
            with torch.no_grad():  # plain SGD (torch.optim would import torch._dynamo: slow)
                for p in params:
                    assert p.grad is not None
                    p.add_(p.grad, alpha=-cfg.lr)
    return clone_state(model.state_dict())


def accuracy(cfg: Config, state: Mapping[str, torch.Tensor], data: Dataset) -> float:
    model = make_model(cfg)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        predicted = model(data.x_test).argmax(dim=1)
    return float((predicted == data.y_test).double().mean())


def max_param_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    va, _ = flatten_state(a)
    vb, _ = flatten_state(b)
    return float(np.max(np.abs(va - vb))) if va.size else 0.0


def weighted_mean(vectors: Sequence[np.ndarray], weights: Sequence[float],
                  clip: float) -> np.ndarray:
    """Plaintext FedAvg: sum(w * clip(x)) / sum(w), in float64."""
    total = np.zeros_like(vectors[0])
    for vector, weight in zip(vectors, weights, strict=True):
        total += weight * np.clip(vector, -clip, clip)
    mean: np.ndarray = total / float(sum(weights))
    return mean


def apply_mean(cfg: Config, state: Mapping[str, torch.Tensor], mean: np.ndarray) -> State:
    model = make_model(cfg)
    model.load_state_dict(state)
    apply_aggregate(model, mean, update_spec(model))
    return clone_state(model.state_dict())


# ------------------------------------------------------------------- crashes


def crash_plan(cfg: Config, round_number: int, threshold: int,
               rng: np.random.Generator) -> dict[int, str]:
    """Which peers die this round, and in which phase (varies round by round).

    Peer phases "sharing" (during the share exchange) and "reported" (before the
    masked input) come from each peer's progress callback; "unmasking" is the
    coordinator's phase (the victim's input is already in: it stays a contributor).
    Never more than the threshold allows: the round must be able to finish.
    """
    phases = [["sharing", "reported"], ["reported"], ["sharing"]][round_number % 3]
    if round_number % 2 == 1:
        phases = [*phases, "unmasking"]
    phases = phases[:max(0, cfg.peers - threshold)]
    victims = rng.choice(cfg.peers, size=len(phases), replace=False)
    return {int(v): phase for v, phase in zip(victims, phases, strict=True)}


# ------------------------------------------------------------------ the run


def peer_name(i: int) -> str:
    return f"client-{i:02d}"


async def run(cfg: Config, data: Dataset,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    n = cfg.peers
    threshold = n // 2 + 1
    sizes = data.sizes
    max_weight = float(max(sizes))
    secure_state = initial_state(cfg)
    plain_state = clone_state(secure_state)
    spec = update_spec(secure_state)
    encoding = WeightedEncoding.for_peers(n, clip=cfg.clip, max_weight=max_weight,
                                          modulus_bits=cfg.modulus_bits)
    rng = np.random.default_rng([cfg.seed, 2])
    loop = asyncio.get_running_loop()
    plan: dict[int, str] = {}
    crashed: dict[int, str] = {}
    peers: dict[int, Peer] = {}
    initial_acc = accuracy(cfg, secure_state, data)
    log(f"{n} peers, samples per peer {sizes}, model 64-{cfg.hidden}-10 "
        f"({spec.size} parameters), threshold {threshold}, scale 2^"
        f"{int(math.log2(encoding.quantizer.scale))}, initial accuracy {initial_acc:.4f}")

    def kill(i: int, phase: str) -> None:
        if i in crashed:
            return
        crashed[i] = phase
        loop.call_soon(peers[i].crash)

    def on_peer_phase(i: int) -> Callable[[str, int], None]:
        def progress(state: str, round_number: int) -> None:
            if plan.get(i) == state:
                kill(i, state)
        return progress

    def on_coordinator_phase(phase: str, round_number: int) -> None:
        for i, when in plan.items():
            if when == phase:
                kill(i, phase)

    async def new_peer(i: int, url: str) -> Peer:
        peer = Peer(url, peer_name(i), progress=on_peer_phase(i))
        await peer.start()
        return peer

    async def contribute(client: FedAvgClient, new: State, old: State,
                         weight: int) -> PeerOutcome | None:
        try:
            return await client.contribute_update(new, old, weight)
        except asyncio.CancelledError:
            return None  # crashed mid-round

    records: list[RoundRecord] = []
    async with Coordinator(max_peers=n, threshold=threshold, dim=spec.size, weighted=True,
                           max_weight=max_weight, clip=cfg.clip,
                           modulus_bits=cfg.modulus_bits, phase_timeout=cfg.phase_timeout,
                           progress=on_coordinator_phase,
                           mode=cfg.mode) as coordinator:  # type: ignore[arg-type]
        for i in range(n):
            peers[i] = await new_peer(i, coordinator.url)
        for r in range(cfg.rounds):
            started = time.perf_counter()
            # Secure run: every peer trains from the secure global model.
            trained = [local_train(cfg, data, i, r, secure_state) for i in range(n)]
            clients = [FedAvgClient(peers[i]) for i in range(n)]
            plan.clear()
            crashed.clear()
            plan.update(crash_plan(cfg, r, threshold, rng))
            round_task = asyncio.create_task(coordinator.run_round())
            await asyncio.gather(*(contribute(clients[i], trained[i], secure_state, sizes[i])
                                   for i in range(n)))
            result = await round_task
            outcome = result.outcome
            contributors = list(outcome.contributors)
            index = [int(name.rsplit("-", 1)[1]) for name in contributors]
            expected_weight = float(sum(sizes[i] for i in index))
            sent = [clients[i].last_update for i in index]
            clipped = sum(int(np.sum(np.abs(v) > cfg.clip)) for v in sent if v is not None)
            error: float | None = None
            bound: float | None = None
            within = outcome.status != "ok"  # an aborted round changes neither model
            if outcome.status == "ok" and outcome.mean is not None:
                assert outcome.total_weight is not None
                exact = weighted_mean([v for v in sent if v is not None],
                                      [sizes[i] for i in index], cfg.clip)
                error = float(np.max(np.abs(outcome.mean - exact)))
                bound = encoding.mean_error_bound(len(index), outcome.total_weight)
                within = error < bound and outcome.total_weight == expected_weight
                secure_state = apply_mean(cfg, secure_state, outcome.mean)
                # Plaintext run: the same contributors, trained from the plaintext model.
                plain_deltas = [flatten_state(state_delta(
                    local_train(cfg, data, i, r, plain_state), plain_state))[0] for i in index]
                plain_state = apply_mean(cfg, plain_state, weighted_mean(
                    plain_deltas, [sizes[i] for i in index], cfg.clip))
            secure_acc = accuracy(cfg, secure_state, data)
            plain_acc = accuracy(cfg, plain_state, data)
            records.append(RoundRecord(
                round=r, status=outcome.status, reason=outcome.reason,
                contributors=contributors, dropped=dict(outcome.dropped),
                crashed={peer_name(i): phase for i, phase in sorted(crashed.items())},
                total_weight=outcome.total_weight, total_weight_expected=expected_weight,
                secure_accuracy=secure_acc, plaintext_accuracy=plain_acc,
                accuracy_diff=abs(secure_acc - plain_acc),
                max_param_diff=max_param_diff(secure_state, plain_state),
                aggregate_error=error, aggregate_error_bound=bound, within_bound=within,
                clipped_coordinates=clipped, seconds=time.perf_counter() - started,
                extra={"phase_seconds": result.stats.get("phase_seconds", {})}))
            # Crashed peers rejoin next round as fresh Peer objects with the same id.
            for i in sorted(crashed):
                await peers[i].close()
                peers[i] = await new_peer(i, coordinator.url)
        for peer in peers.values():
            await peer.close()

    max_acc = max((rec.accuracy_diff for rec in records), default=0.0)
    max_param = max((rec.max_param_diff for rec in records), default=0.0)
    errors = [rec.aggregate_error for rec in records if rec.aggregate_error is not None]
    ok_rounds = sum(rec.status == "ok" for rec in records)
    agree = (all(rec.within_bound for rec in records) and ok_rounds > 0
             and max_param <= PARAM_TOLERANCE and max_acc <= 1.0 / len(data.y_test) + 1e-12)
    return {
        "config": {**asdict(cfg), "threshold": threshold, "max_weight": max_weight,
                   "scale": encoding.quantizer.scale, "model": f"MLP 64-{cfg.hidden}-10",
                   "dim": spec.size, "dataset": "sklearn digits"},
        "data": {"train": len(data.y_train), "test": len(data.y_test),
                 "samples_per_peer": sizes,
                 "label_counts_per_peer": [
                     np.bincount(data.y_train[p].numpy(), minlength=10).tolist()
                     for p in data.parts]},
        "initial_accuracy": initial_acc,
        "rounds": [asdict(rec) for rec in records],
        "ok_rounds": ok_rounds,
        "final_secure_accuracy": records[-1].secure_accuracy if records else initial_acc,
        "final_plaintext_accuracy": records[-1].plaintext_accuracy if records else initial_acc,
        "max_accuracy_diff": max_acc,
        "max_param_diff": max_param,
        "max_aggregate_error": max(errors, default=0.0),
        "max_aggregate_error_bound": max((rec.aggregate_error_bound or 0.0 for rec in records),
                                         default=0.0),
        "param_tolerance": PARAM_TOLERANCE,
        "agreement_criteria": AGREEMENT,
        "agree": agree,
    }


# ------------------------------------------------------------------ output


def print_table(report: Mapping[str, Any]) -> None:
    rows = [(str(rec["round"]), rec["status"], str(len(rec["contributors"])),
             ", ".join(f"{k.removeprefix('client-')}@{v}" for k, v in rec["crashed"].items())
             or "-",
             f"{rec['secure_accuracy']:.4f}", f"{rec['plaintext_accuracy']:.4f}",
             f"{rec['max_param_diff']:.2e}",
             "-" if rec["aggregate_error"] is None else
             f"{rec['aggregate_error']:.1e} < {rec['aggregate_error_bound']:.1e}")
            for rec in report["rounds"]]
    headers = ("round", "status", "contributors", "crashed (peer@phase)", "secure acc",
               "plaintext acc", "max |Δparam|", "agg. err < bound")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(row[k]) for row in rows)) for k, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        return
    table = Table(title="FedAvg: secure aggregation vs plaintext")
    for h in headers:
        table.add_column(h, no_wrap=True,
                         justify="left" if h in ("status", "crashed (peer@phase)") else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=140).print(table)


def plot(report: Mapping[str, Any], path: Path | None = None) -> Any:
    """Accuracy of both runs (left) and how far apart they are (right); write the PNG to
    ``path`` when given. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [rec["round"] + 1 for rec in report["rounds"]]
    secure = [report["initial_accuracy"]] + [rec["secure_accuracy"] for rec in report["rounds"]]
    plain = [report["initial_accuracy"]] + [rec["plaintext_accuracy"]
                                            for rec in report["rounds"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    ax.plot(rounds, plain, "o-", label="plaintext FedAvg", linewidth=3, alpha=0.5)
    ax.plot(rounds, secure, "x--", label="secure aggregation", color="black")
    ax.set_xlabel("rounds completed")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits, {report['config']['peers']} non-IID peers, dropouts every round")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    floor = 1e-18  # exact zeros, drawn on the log axis
    diffs = [max(rec["max_param_diff"], floor) for rec in report["rounds"]]
    errors = [max(rec["aggregate_error"] or 0.0, floor) for rec in report["rounds"]]
    bounds = [max(rec["aggregate_error_bound"] or 0.0, floor) for rec in report["rounds"]]
    ax2.semilogy(rounds[1:], diffs, "o-", label="max |secure − plaintext| parameter")
    ax2.semilogy(rounds[1:], errors, "x-", label="round aggregate error")
    ax2.semilogy(rounds[1:], bounds, "k:", label="documented quantization bound")
    ax2.set_xlabel("rounds completed")
    ax2.set_ylabel("absolute difference (largest entry)")
    ax2.set_title("differences (exact zeros drawn at 1e-18)")
    ax2.grid(True, alpha=0.3)
    # Below the axes, where it cannot hide a point.
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
               frameon=False)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scenarios.fedavg_torch",
                                     formatter_class=HelpFormatter,
                                     description="FedAvg over secure aggregation vs plaintext")
    parser.add_argument("--peers", type=int, default=None,
                        help="number of peers (default: 12, 6 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="FedAvg rounds (default: 8, 2 with --quick)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data split, the model and the crashes")
    parser.add_argument("--out", type=Path, default=Path("results/fedavg"),
                        help="directory for report.json and accuracy.png")
    parser.add_argument("--modulus-bits", type=int, choices=(32, 64), default=64,
                        help="ring size: 32 bits quantizes coarsely enough to see its error")
    parser.add_argument("--quick", action="store_true",
                        help="6 peers, 2 rounds, 1 epoch: a few seconds (for tests)")
    parser.add_argument("--mode", choices=("masking", "paillier", "hybrid"), default="masking",
                        help="how updates are protected on their way up the tree")
    args = parser.parse_args(argv)
    base = Config(peers=6, rounds=2, epochs=1, quick=True) if args.quick else Config()
    cfg = Config(**{**asdict(base), "seed": args.seed, "modulus_bits": args.modulus_bits,
                    "mode": args.mode,
                    "peers": args.peers if args.peers is not None else base.peers,
                    "rounds": args.rounds if args.rounds is not None else base.rounds})
    if cfg.peers < 3:
        parser.error("--peers must be at least 3")
    if cfg.rounds < 1:
        parser.error("--rounds must be at least 1")
    logging.basicConfig(level=logging.ERROR)
    started = time.perf_counter()
    try:
        data = load_data(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and contention)
    try:
        report = asyncio.run(run(cfg, data))
    finally:
        torch.set_num_threads(threads)
    report["runtime_seconds"] = round(time.perf_counter() - started, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    png, js = args.out / PLOT_NAME, args.out / REPORT_NAME
    plot(report, png)
    report["files"] = {"report": str(js), "plot": str(png)}
    report["command"] = "python -m scenarios.fedavg_torch " + " ".join(
        argv if argv is not None else sys.argv[1:])
    js.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"largest accuracy difference : {report['max_accuracy_diff']:.4g} "
          f"(one test sample = {1 / report['data']['test']:.4g})")
    print(f"largest parameter difference: {report['max_param_diff']:.3e}")
    print(f"largest aggregate error     : {report['max_aggregate_error']:.3e} "
          f"(each round below its documented bound: "
          f"{all(rec['within_bound'] for rec in report['rounds'])})")
    verdict = ("secure and plaintext FedAvg agree within quantization error" if report["agree"]
               else "secure and plaintext FedAvg DISAGREE beyond quantization error")
    print(f"{verdict}; {report['runtime_seconds']:.1f} s; wrote {js} and {png}")
    return 0 if report["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
