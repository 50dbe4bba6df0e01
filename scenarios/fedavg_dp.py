"""Federated averaging with differential privacy: central vs distributed vs local DP.

A 20-32-5 MLP (PyTorch, CPU) is trained with FedAvg on a synthetic
scikit-learn ``make_classification`` task (nothing is downloaded), split IID
into equal client shards of a few hundred examples. Every round, every client
trains one local epoch from the global model (all clients at once, as a batch
of independent models) and its model delta is clipped to L2 norm ``c``; about
10 % of the clients drop out each round (the same ones in every variant). The
server adds the mean of the surviving clients' deltas to the model. The
variants differ only in how that mean is made private:

``central``      the server sums the clipped deltas in the clear and adds Gaussian
                 noise of stddev ``z c`` (a trusted curator).
``distributed``  each client runs :func:`secagg.dp.encode_update` (rotation, clip,
                 scale, stochastic rounding, a Skellam share of variance
                 ``sigma^2 / t``, wrap into Z_{2^32}); the ring vectors of the
                 survivors are summed in the ring by :func:`secure_sum` and the
                 server runs :func:`secagg.dp.decode_sum`. With ``m >= t``
                 survivors the sum carries ``m/t sigma^2`` of noise, and its
                 privacy is accounted with that actual noise.
``local``        each client adds the full Gaussian noise ``z c`` to its own delta
                 (no trust in anyone), so the mean carries ``m`` times more noise.
``none``         no noise (the accuracy ceiling).

Threshold ``t = floor(n/2) + 1``. Epsilon (delta 1e-5, all rounds, no client
sampling): central and local use the Gaussian mechanism via ``dp_accounting``;
distributed uses the Skellam RDP bound of :mod:`secagg.dp.accounting` with each
round's contributor count.

NOTE, honestly: :func:`secure_sum` sums the ring vectors directly with numpy
(wrapping uint32 adds). That is exactly the value secure aggregation releases
(the server learns the wrapped sum of the contributors' vectors and nothing
else), so the accuracy and privacy numbers are those of the real protocol, but
this script does not run the masking protocol; ``secure_sum`` is the one place
to switch to :mod:`secagg.sim` when the protocol integration lands.

Usage: ``python -m scenarios.fedavg_dp [--quick] [--seed 0] [--out results/fedavg_dp]
[--plot PNG]``. Writes ``report.json`` into ``--out`` and the accuracy-vs-epsilon
plot to ``--plot`` (default ``docs/fedavg_dp.png``; ``--quick``: ``<out>/fedavg_dp.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("scenarios.fedavg_dp needs PyTorch: pip install torch==2.13.0 (CPU build) "
             "or the project's 'torch' extra")

from scenarios.common import default_threshold
from secagg.dp import DPConfig, DPParameters, decode_sum, encode_update, noise_report
from secagg.dp.accounting import epsilon as distributed_epsilon
from secagg.dp.accounting import gaussian_epsilon

ROOT = Path(__file__).resolve().parents[1]
REPORT_NAME = "report.json"
PLOT_NAME = "fedavg_dp.png"
VARIANTS = ("central", "distributed", "local")


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
    seeds: int = 2  # runs per point, averaged
    seed: int = 0


@dataclass
class Run:
    variant: str
    noise_multiplier: float
    epsilon: float  # the largest over the seeds
    accuracy: float  # final test accuracy, mean over the seeds
    accuracies: list[float] = field(default_factory=list)
    noise_std_of_mean: float = 0.0  # noise stddev on one coordinate of the mean update


@dataclass
class Data:
    x: torch.Tensor  # (clients, samples, features)
    y: torch.Tensor  # (clients, samples)
    x_test: torch.Tensor
    y_test: torch.Tensor


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


def secure_sum(ring_vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The wrapping sum of the ring vectors: what secure aggregation releases.

    Placeholder: summed directly with numpy here (see the module docstring); the
    protocol integration replaces this with a round of :mod:`secagg.sim`.
    """
    total: np.ndarray = np.sum(np.stack(ring_vectors), axis=0, dtype=ring_vectors[0].dtype)
    return total


def private_mean(cfg: Config, variant: str, z: float, deltas: np.ndarray,
                 params: DPParameters | None, rng: np.random.Generator, round_seed: bytes,
                 ) -> tuple[np.ndarray, float]:
    """(noisy mean of the contributors' deltas, noise stddev per coordinate of the mean)."""
    m, dim = deltas.shape
    if variant == "distributed":
        assert params is not None
        rings = [encode_update(delta, params, round_seed, rng)[0] for delta in deltas]
        total = decode_sum(secure_sum(rings), params, round_seed)
        return total / m, noise_report(params, m).noise_stddev / m
    clipped = clip_rows(deltas, cfg.clip)
    if variant == "central":
        total = clipped.sum(axis=0) + rng.normal(0.0, z * cfg.clip, dim)
        return total / m, z * cfg.clip / m
    if variant == "local":
        noisy = clipped + rng.normal(0.0, z * cfg.clip, (m, dim))
        return noisy.sum(axis=0) / m, z * cfg.clip / math.sqrt(m)
    return clipped.sum(axis=0) / m, 0.0


def train(cfg: Config, data: Data, variant: str, z: float, seed: int,
          ) -> tuple[float, list[int], float]:
    """(final accuracy, contributors per round, mean noise stddev of the mean)."""
    model = initial_model(cfg, seed)
    params = None
    if variant == "distributed":
        config = DPConfig(noise_multiplier=z, clip=cfg.clip, delta=cfg.delta)
        params = DPParameters.derive(cfg.clients, default_threshold(cfg.clients),
                                     model.numel(), config)
    # Dropouts and local shuffling depend only on (seed, round): equal in every variant.
    # The noise generator is seeded for reproducibility; a real peer seeds from os.urandom.
    contributors, noise_stds = [], []
    rng = np.random.default_rng([seed, 7, int(z * 1000), len(variant)])
    for r in range(cfg.rounds):
        drops = np.random.default_rng([seed, r]).random(cfg.clients) < cfg.drop_rate
        alive = np.flatnonzero(~drops)
        generator = torch.Generator().manual_seed(seed * 1000 + r)
        deltas = local_deltas(cfg, model, data, alive, generator)
        round_seed = np.random.default_rng([seed, r, 1]).bytes(32)  # public per-round seed
        mean, noise_std = private_mean(cfg, variant, z, deltas, params, rng, round_seed)
        model = model + torch.from_numpy(mean).float()
        contributors.append(int(alive.size))
        noise_stds.append(noise_std)
    return accuracy(cfg, model, data), contributors, float(np.mean(noise_stds))


def account(cfg: Config, variant: str, z: float, dim: int, contributors: list[int]) -> float:
    """Epsilon of one run: Skellam RDP bound (distributed) or the Gaussian's."""
    if variant == "distributed":
        params = DPParameters.derive(cfg.clients, default_threshold(cfg.clients), dim,
                                     DPConfig(noise_multiplier=z, clip=cfg.clip, delta=cfg.delta))
        return distributed_epsilon(params, contributors=contributors)
    return gaussian_epsilon(z, rounds=cfg.rounds, delta=cfg.delta)


def run_all(cfg: Config) -> dict[str, Any]:
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    datasets = {s: make_data(cfg, s) for s in seeds}
    dim = initial_model(cfg, 0).numel()
    baseline = [train(cfg, datasets[s], "none", 0.0, s)[0] for s in seeds]
    runs: list[Run] = []
    for variant in VARIANTS:
        for z in cfg.noise_multipliers:
            results = [train(cfg, datasets[s], variant, z, s) for s in seeds]
            accs = [acc for acc, _, _ in results]
            # Dropouts differ between seeds: report the largest epsilon.
            eps = max(account(cfg, variant, z, dim, counts) for _, counts, _ in results)
            runs.append(Run(variant=variant, noise_multiplier=z, epsilon=eps,
                            accuracy=float(np.mean(accs)), accuracies=accs,
                            noise_std_of_mean=float(np.mean([n for _, _, n in results]))))
    return {"config": asdict(cfg), "dim": dim, "threshold": default_threshold(cfg.clients),
            "no_dp_accuracy": float(np.mean(baseline)), "no_dp_accuracies": baseline,
            "runs": [asdict(run) for run in runs],
            "secure_sum": "numpy wrapping sum of the ring vectors (placeholder for secagg.sim)"}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    fig, ax = plt.subplots(figsize=(8, 5.2))
    styles = {"central": ("o-", "central DP (trusted server adds Gaussian noise)"),
              "distributed": ("s--", "distributed DP (Skellam shares + secure sum)"),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scenarios.fedavg_dp",
        description="FedAvg accuracy vs epsilon: central, distributed (secagg.dp) and local DP")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds, noise levels and examples: a few seconds (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/fedavg_dp"),
                        help="directory for report.json")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG path (default docs/fedavg_dp.png; --quick: <out>/fedavg_dp.png)")
    args = parser.parse_args(argv)
    cfg = Config(seed=args.seed)
    if args.quick:
        cfg = Config(seed=args.seed, clients=100, samples_per_client=200, test_samples=2000,
                     rounds=8, noise_multipliers=(1.0, 4.0, 12.0), seeds=1)
    started = time.perf_counter()
    torch.set_num_threads(1)  # small matrices: threads only add overhead
    report = run_all(cfg)
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
