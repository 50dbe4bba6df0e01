"""Federated averaging with differential privacy: central vs distributed vs local DP.

A 20-32-5 MLP (PyTorch, CPU) is trained with FedAvg on a synthetic
scikit-learn ``make_classification`` task (nothing is downloaded), split IID
into equal client shards of a few hundred examples. Every round, every client
trains one local epoch from the global model (all clients at once, as a batch
of independent models) and its model delta is clipped to L2 norm ``c``; about
10 % of the clients drop out each round (the same ones in every variant; in
the protocol each dies at a random point before it uploads: before
registering, after registering, or after sharing its keys). The server adds
the mean of the surviving clients' deltas to the model. The variants differ
only in how that mean is made private:

``central``      the server sums the clipped deltas in the clear and adds Gaussian
                 noise of stddev ``z c`` (a trusted curator).
``distributed``  every round is a real round of the secagg protocol, run in memory
                 by :func:`secagg.sim.run_round` with ``dp=DPConfig(z, c)``: each
                 client rotates, clips, scales and stochastically rounds its delta
                 and adds a Skellam noise share of variance ``sigma^2 / t``, masks
                 it (pairwise and self masks, Shamir shares of its secrets), the
                 accumulation tree sums the masked vectors, the dropouts are
                 recovered from the survivors' shares, and the server unmasks and
                 decodes the noisy sum. The round's mean is that sum over its
                 contributors. With ``m >= t`` contributors the sum carries
                 ``m/t sigma^2`` of noise (reported by the server as
                 ``stats["dp"]``), and privacy is accounted with each round's
                 contributor count.
``local``        each client adds the full Gaussian noise ``z c`` to its own delta
                 (no trust in anyone), so the mean carries ``m`` times more noise.
``none``         no noise (the accuracy ceiling).

Threshold ``t = floor(n/2) + 1``. Epsilon (delta 1e-5, all rounds, no client
sampling): central and local use the Gaussian mechanism via ``dp_accounting``;
distributed uses the Skellam RDP bound of :mod:`secagg.dp.accounting` with each
round's contributor count.

Simulator settings (:data:`SIM_GRAPH`, :data:`SIM_ENCODE_FRAMES`, reported in
the JSON under ``distributed_protocol``): the *sparse* neighbour graph (degree
46 at 120 clients; the complete graph costs ~5 s a round there, the sparse one
~2 s: key agreements, shares and masks with every neighbour) and
``encode_frames=False`` (messages pass between the parties as objects instead
of wire bytes: the same protocol, 10-15 % faster). At ~2 s per protocol round a
distributed run of 15 rounds takes ~30 s, so the default runs one seed per
point and spreads the runs over ``--jobs`` worker processes (default 2); the
results do not depend on ``--jobs``.

Usage: ``python -m scenarios.fedavg_dp [--quick] [--seed 0] [--jobs 2]
[--out results/fedavg_dp] [--plot PNG]``. Writes ``report.json`` into ``--out``
and the accuracy-vs-epsilon plot to ``--plot`` (default ``docs/fedavg_dp.png``;
``--quick``: ``<out>/fedavg_dp.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("scenarios.fedavg_dp needs PyTorch: pip install torch==2.13.0 (CPU build) "
             "or the project's 'torch' extra")

from scenarios.common import default_threshold
from secagg.dp import DPConfig, DPParameters
from secagg.dp.accounting import epsilon as distributed_epsilon
from secagg.dp.accounting import gaussian_epsilon
from secagg.graph import GraphKind
from secagg.sim import run_round

ROOT = Path(__file__).resolve().parents[1]
REPORT_NAME = "report.json"
PLOT_NAME = "fedavg_dp.png"
VARIANTS = ("central", "distributed", "local")

SIM_GRAPH: GraphKind = "sparse"
"""The complete graph costs ~5 s a round at 120 clients, the sparse one ~2 s."""
SIM_ENCODE_FRAMES = False
"""Pass messages as objects instead of wire bytes: same protocol, somewhat faster."""
DROP_PHASES = ("advertise_keys", "share_keys", "masked_input")
"""Where a dropping client dies (all before its masked input leaves)."""


@dataclass(frozen=True)
class Config:
    clients: int = 120
    samples_per_client: int = 250
    test_samples: int = 4000
    features: int = 20
    classes: int = 5
    hidden: int = 32
    rounds: int = 15
    batch_size: int = 25
    lr: float = 0.5
    clip: float = 1.0
    drop_rate: float = 0.1
    delta: float = 1e-5
    noise_multipliers: tuple[float, ...] = (1.0, 2.0, 4.0, 7.0, 12.0, 20.0)
    seeds: int = 1  # runs per point, averaged (a distributed run takes ~30 s of protocol)
    seed: int = 0


@dataclass
class Run:
    variant: str
    noise_multiplier: float
    epsilon: float  # the largest over the seeds
    accuracy: float  # final test accuracy, mean over the seeds
    accuracies: list[float] = field(default_factory=list)
    noise_std_of_mean: float = 0.0  # noise stddev on one coordinate of the mean update
    contributors: list[list[int]] = field(default_factory=list)  # per seed, per round
    protocol: list[dict[str, Any]] | None = None  # distributed: the rounds' reports, per seed


@dataclass
class Data:
    x: torch.Tensor  # (clients, samples, features)
    y: torch.Tensor  # (clients, samples)
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class TrainResult:
    accuracy: float
    contributors: list[int]  # per round
    noise_std_of_mean: float  # mean over the rounds
    protocol: dict[str, Any] | None = None  # distributed only: what the server reported


@lru_cache(maxsize=4)
def make_data(cfg: Config, seed: int) -> Data:
    from sklearn.datasets import make_classification  # type: ignore[import-untyped]

    total = cfg.clients * cfg.samples_per_client + cfg.test_samples
    x, y = make_classification(n_samples=total, n_features=cfg.features, n_informative=12,
                               n_redundant=4, n_classes=cfg.classes, n_clusters_per_class=2,
                               class_sep=1.5, flip_y=0.01, random_state=seed)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    train = cfg.clients * cfg.samples_per_client
    shape = (cfg.clients, cfg.samples_per_client)
    return Data(torch.tensor(x[:train], dtype=torch.float32).reshape(*shape, cfg.features),
                torch.tensor(y[:train]).reshape(shape),
                torch.tensor(x[train:], dtype=torch.float32), torch.tensor(y[train:]))


def layer_shapes(cfg: Config) -> list[tuple[int, ...]]:
    return [(cfg.features, cfg.hidden), (1, cfg.hidden), (cfg.hidden, cfg.classes),
            (1, cfg.classes)]


def model_dim(cfg: Config) -> int:
    return sum(math.prod(shape) for shape in layer_shapes(cfg))


def initial_model(cfg: Config, seed: int) -> torch.Tensor:
    """PyTorch's default Linear init, flattened: [W1, b1, W2, b2]."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for shape, fan_in in zip(layer_shapes(cfg), (cfg.features,) * 2 + (cfg.hidden,) * 2,
                             strict=True):
        bound = 1.0 / math.sqrt(fan_in)
        parts.append((torch.rand(shape, generator=g) * 2 - 1).flatten() * bound)
    return torch.cat(parts)


def unflatten(cfg: Config, flat: torch.Tensor) -> list[torch.Tensor]:
    """(..., D) -> one tensor per layer, (..., *shape)."""
    out, start = [], 0
    for shape in layer_shapes(cfg):
        size = math.prod(shape)
        out.append(flat[..., start:start + size].reshape(*flat.shape[:-1], *shape))
        start += size
    return out


def logits(cfg: Config, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = unflatten(cfg, flat)
    return torch.relu(x @ w1 + b1) @ w2 + b2


def accuracy(cfg: Config, model: torch.Tensor, data: Data) -> float:
    with torch.no_grad():
        pred = logits(cfg, model, data.x_test).argmax(dim=-1)
    return float((pred == data.y_test).float().mean())


def local_deltas(cfg: Config, model: torch.Tensor, data: Data, clients: np.ndarray,
                 generator: torch.Generator) -> np.ndarray:
    """One epoch of minibatch SGD on each client, all at once; (clients, D) float64 deltas."""
    idx = torch.from_numpy(clients)
    x, y = data.x[idx], data.y[idx]
    m, s = y.shape
    params = model.repeat(m, 1).clone().requires_grad_(True)
    order = torch.argsort(torch.rand(m, s, generator=generator), dim=1)
    for start in range(0, s, cfg.batch_size):
        batch = order[:, start:start + cfg.batch_size]
        xb = torch.gather(x, 1, batch[..., None].expand(-1, -1, cfg.features))
        yb = torch.gather(y, 1, batch)
        out = logits(cfg, params, xb)  # (clients, batch, classes): batched matmuls
        # Summing the clients' mean losses gives each client its own gradient.
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, cfg.classes), yb.reshape(-1),
                                                 reduction="sum") / batch.shape[1]
        (grad,) = torch.autograd.grad(loss, params)
        with torch.no_grad():
            params -= cfg.lr * grad
    deltas: np.ndarray = (params.detach() - model).double().numpy()
    return deltas


def clip_rows(deltas: np.ndarray, clip: float) -> np.ndarray:
    norms = np.linalg.norm(deltas, axis=1, keepdims=True)
    clipped: np.ndarray = deltas * np.minimum(1.0, clip / np.maximum(norms, 1e-300))
    return clipped


def dp_config(cfg: Config, z: float) -> DPConfig:
    return DPConfig(noise_multiplier=z, clip=cfg.clip, delta=cfg.delta)


def dp_parameters(cfg: Config, z: float) -> DPParameters:
    """What the protocol's server derives for the round (and the accountant uses)."""
    return DPParameters.derive(cfg.clients, default_threshold(cfg.clients), model_dim(cfg),
                               dp_config(cfg, z))


def private_mean(cfg: Config, variant: str, z: float, deltas: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """(noisy mean of the contributors' deltas, noise stddev per coordinate of the mean)
    for the variants whose noise is added here: central, local and none."""
    m, dim = deltas.shape
    clipped = clip_rows(deltas, cfg.clip)
    if variant == "central":
        total = clipped.sum(axis=0) + rng.normal(0.0, z * cfg.clip, dim)
        return total / m, z * cfg.clip / m
    if variant == "local":
        noisy = clipped + rng.normal(0.0, z * cfg.clip, (m, dim))
        return noisy.sum(axis=0) / m, z * cfg.clip / math.sqrt(m)
    return clipped.sum(axis=0) / m, 0.0


def protocol_round(cfg: Config, z: float, deltas: np.ndarray, alive: np.ndarray,
                   dropouts: dict[int, str], sim_seed: int,
                   ) -> tuple[np.ndarray, int, dict[str, Any]]:
    """One round of the secagg protocol with distributed DP, in the simulator.

    Returns (the server's noisy sum / its contributor count, that count, the
    server's ``stats``). The dropped clients' rows are zeros: they never send them.
    """
    inputs = np.zeros((cfg.clients, deltas.shape[1]))
    inputs[alive] = deltas
    result = run_round(inputs, default_threshold(cfg.clients), dropouts, graph=SIM_GRAPH,
                       seed=sim_seed, dp=dp_config(cfg, z), encode_frames=SIM_ENCODE_FRAMES)
    if result.status != "ok" or result.aggregate is None:
        raise RuntimeError(f"protocol round failed: {result.status}: {result.reason}")
    if result.contributors != alive.tolist():
        # Every variant must average the same clients, or the comparison is off.
        raise RuntimeError(f"the protocol summed {len(result.contributors)} contributors, "
                           f"but {alive.size} clients survived: dropped {result.dropped}")
    m = len(result.contributors)
    return result.aggregate / m, m, result.stats


def train(cfg: Config, data: Data, variant: str, z: float, seed: int) -> TrainResult:
    """Train one model with FedAvg under ``variant`` at noise multiplier ``z``."""
    model = initial_model(cfg, seed)
    params = dp_parameters(cfg, z) if variant == "distributed" else None
    # Dropouts and local shuffling depend only on (seed, round): equal in every variant.
    # The noise generator is seeded for reproducibility; a real peer seeds from os.urandom.
    contributors, noise_stds, reports = [], [], []
    rng = np.random.default_rng([seed, 7, int(z * 1000), len(variant)])
    for r in range(cfg.rounds):
        drops = np.random.default_rng([seed, r]).random(cfg.clients) < cfg.drop_rate
        alive = np.flatnonzero(~drops)
        generator = torch.Generator().manual_seed(seed * 1000 + r)
        deltas = local_deltas(cfg, model, data, alive, generator)
        if params is not None:
            phases = np.random.default_rng([seed, r, 2]).integers(len(DROP_PHASES),
                                                                   size=cfg.clients)
            dropouts = {int(i): DROP_PHASES[phases[i]] for i in np.flatnonzero(drops)}
            # The peers' and server's randomness (keys, masks, noise) is seeded by this.
            sim_seed = int(np.random.default_rng([seed, r, int(z * 1000), 3]).integers(2**62))
            mean, m, stats = protocol_round(cfg, z, deltas, alive, dropouts, sim_seed)
            dp = stats["dp"]
            if not math.isclose(dp["scale"], params.scale, rel_tol=1e-12):
                raise RuntimeError(f"the server's DP scale {dp['scale']} is not the one "
                                   f"accounted for ({params.scale})")
            noise_std = dp["noise_stddev"] / m
            reports.append({**dp, "wall_seconds": stats["wall_seconds"],
                            "degree": stats["degree"], "registered": stats["registered"]})
        else:
            mean, noise_std = private_mean(cfg, variant, z, deltas, rng)
            m = int(alive.size)
        model = model + torch.from_numpy(mean).float()
        contributors.append(m)
        noise_stds.append(noise_std)
    return TrainResult(accuracy(cfg, model, data), contributors, float(np.mean(noise_stds)),
                       summarize_protocol(reports) if reports else None)


def summarize_protocol(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's protocol rounds: the noise the server reported, per round."""
    first = reports[0]
    return {"rounds": len(reports), "mechanism": first["mechanism"], "bits": first["bits"],
            "delta": first["delta"], "scale": first["scale"], "graph_degree": first["degree"],
            "achieved_noise_multiplier": [r["achieved_noise_multiplier"] for r in reports],
            "noise_variance_over_target": [r["noise_variance_over_target"] for r in reports],
            "noise_stddev": [r["noise_stddev"] for r in reports],
            "registered": [r["registered"] for r in reports],
            "wall_seconds": round(sum(r["wall_seconds"] for r in reports), 2)}


def account(cfg: Config, variant: str, z: float, contributors: list[int]) -> float:
    """Epsilon of one run: Skellam RDP bound (distributed) or the Gaussian's."""
    if variant == "distributed":
        return distributed_epsilon(dp_parameters(cfg, z), contributors=contributors)
    return gaussian_epsilon(z, rounds=cfg.rounds, delta=cfg.delta)


Task = tuple[str, float, int]  # (variant, noise multiplier, seed)


def run_task(cfg: Config, task: Task) -> TrainResult:
    variant, z, seed = task
    return train(cfg, make_data(cfg, seed), variant, z, seed)


class _ClipNotices(logging.Filter):
    """Drops the peers' per-round clipping warnings: clipping every update to L2 norm
    ``c`` is part of DP-FedAvg, not a misconfiguration (and in a DP round the peer
    reports its one L2 clip as "1 of D input coordinates were clipped")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "input coordinates were clipped" not in str(record.msg)


def _init_worker() -> None:
    torch.set_num_threads(1)  # small matrices: threads only add overhead
    logging.getLogger("secagg.peer").addFilter(_ClipNotices())


def run_tasks(cfg: Config, tasks: list[Task], jobs: int) -> dict[Task, TrainResult]:
    """Every task, in ``jobs`` processes; the results do not depend on ``jobs``."""
    # Longest first: a distributed run spends ~2 s per round in the protocol.
    ordered = sorted(tasks, key=lambda task: task[0] != "distributed")
    if jobs <= 1:
        return {task: run_task(cfg, task) for task in ordered}
    # fork: the workers inherit the imports (torch used single-threaded only).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context(method),
                             initializer=_init_worker) as pool:
        futures = {task: pool.submit(run_task, cfg, task) for task in ordered}
        return {task: future.result() for task, future in futures.items()}


def run_all(cfg: Config, jobs: int = 1) -> dict[str, Any]:
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    tasks: list[Task] = [("none", 0.0, s) for s in seeds]
    tasks += [(v, z, s) for v in VARIANTS for z in cfg.noise_multipliers for s in seeds]
    results = run_tasks(cfg, tasks, jobs)
    baseline = [results["none", 0.0, s].accuracy for s in seeds]
    runs: list[Run] = []
    for variant in VARIANTS:
        for z in cfg.noise_multipliers:
            per_seed = [results[variant, z, s] for s in seeds]
            accs = [res.accuracy for res in per_seed]
            # Dropouts differ between seeds: report the largest epsilon.
            eps = max(account(cfg, variant, z, res.contributors) for res in per_seed)
            protocol = [res.protocol for res in per_seed if res.protocol is not None]
            runs.append(Run(variant=variant, noise_multiplier=z, epsilon=eps,
                            accuracy=float(np.mean(accs)), accuracies=accs,
                            noise_std_of_mean=float(np.mean([r.noise_std_of_mean
                                                             for r in per_seed])),
                            contributors=[res.contributors for res in per_seed],
                            protocol=protocol or None))
    sim_seconds = sum(p["wall_seconds"] for run in runs for p in run.protocol or [])
    return {"config": asdict(cfg), "dim": model_dim(cfg),
            "threshold": default_threshold(cfg.clients),
            "no_dp_accuracy": float(np.mean(baseline)), "no_dp_accuracies": baseline,
            "runs": [asdict(run) for run in runs],
            "distributed_protocol": {
                "runner": "secagg.sim.run_round (every training round: masks, tree, "
                          "dropouts, unmasking, decoding)",
                "graph": SIM_GRAPH, "encode_frames": SIM_ENCODE_FRAMES,
                "threat_model": "honest-but-curious", "drop_phases": list(DROP_PHASES),
                "rounds_run": sum(p["rounds"] for run in runs for p in run.protocol or []),
                "wall_seconds": round(sim_seconds, 2),
                "why": "the complete graph costs ~5 s per round at 120 clients and the sparse "
                       "graph ~2 s; encode_frames=False skips wire serialization"},
            "jobs": jobs}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    fig, ax = plt.subplots(figsize=(8, 5.2))
    graph = report["distributed_protocol"]["graph"]
    styles = {"central": ("o-", "central DP (trusted server adds Gaussian noise)"),
              "distributed": ("s--", f"distributed DP (Skellam shares, secagg rounds, "
                                     f"{graph} graph)"),
              "local": ("^-", "local DP (each client adds the full noise)")}
    for variant, (style, label) in styles.items():
        rows = sorted((r for r in report["runs"] if r["variant"] == variant),
                      key=lambda r: r["epsilon"])
        ax.plot([r["epsilon"] for r in rows], [r["accuracy"] for r in rows], style,
                label=label, markersize=7)
    ax.axhline(report["no_dp_accuracy"], color="gray", linestyle=":",
               label=f"no DP ({report['no_dp_accuracy']:.3f})")
    ax.axhline(1.0 / cfg["classes"], color="black", linewidth=0.8, alpha=0.4, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon after {cfg['rounds']} rounds (delta = {cfg['delta']:g})")
    ax.set_ylabel("test accuracy (final model)")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(f"FedAvg, {cfg['clients']} clients/round (~{cfg['drop_rate']:.0%} drop), "
                 f"synthetic {cfg['classes']}-class task")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def print_table(report: dict[str, Any]) -> None:
    print(f"no DP: accuracy {report['no_dp_accuracy']:.3f}")
    print(f"{'variant':12s} {'z':>5s} {'epsilon':>9s} {'accuracy':>9s} {'noise/coord':>12s}")
    for r in report["runs"]:
        print(f"{r['variant']:12s} {r['noise_multiplier']:5.2f} {r['epsilon']:9.3f} "
              f"{r['accuracy']:9.3f} {r['noise_std_of_mean']:12.2e}")
    sim = report["distributed_protocol"]
    print(f"distributed: {sim['rounds_run']} protocol rounds in secagg.sim "
          f"(graph={sim['graph']}, encode_frames={sim['encode_frames']}), "
          f"{sim['wall_seconds']:.1f} s of simulation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scenarios.fedavg_dp",
        description="FedAvg accuracy vs epsilon: central, distributed (the secagg protocol "
                    "with distributed DP, in the simulator) and local DP")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds, noise levels and examples: ~20-30 s (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes (default: min(2, CPUs)); 1 runs in-process")
    parser.add_argument("--out", type=Path, default=Path("results/fedavg_dp"),
                        help="directory for report.json")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG path (default docs/fedavg_dp.png; --quick: <out>/fedavg_dp.png)")
    args = parser.parse_args(argv)
    cfg = Config(seed=args.seed)
    if args.quick:
        cfg = Config(seed=args.seed, clients=100, samples_per_client=200, test_samples=2000,
                     rounds=5, noise_multipliers=(1.0, 4.0, 12.0), seeds=1)
    started = time.perf_counter()
    _init_worker()
    report = run_all(cfg, jobs=max(1, args.jobs))
    report["runtime_seconds"] = round(time.perf_counter() - started, 2)
    png = args.plot or (args.out / PLOT_NAME if args.quick else ROOT / "docs" / PLOT_NAME)
    plot(report, png)
    args.out.mkdir(parents=True, exist_ok=True)
    report["files"] = {"report": str(args.out / REPORT_NAME), "plot": str(png)}
    (args.out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"{report['runtime_seconds']:.1f} s; wrote {report['files']['report']} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
