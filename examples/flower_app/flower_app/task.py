"""The learning task: a linear regression on synthetic data, one partition per node.

Each node holds its own data (drawn from its partition id), so the example needs no
data set download. ``local_update`` is a few steps of gradient descent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient

TRUE_SEED = 2017


def true_weights(num_features: int) -> np.ndarray:
    return np.random.default_rng(TRUE_SEED).uniform(-1, 1, size=num_features)


def partition(pid: int, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """This node's data: 20 to 80 examples of y = x · w + noise."""
    rng = np.random.default_rng(pid)
    count = 20 + (pid * 13) % 61
    x = rng.normal(size=(count, num_features))
    y = x @ true_weights(num_features) + rng.normal(scale=0.1, size=count)
    return x, y


def local_update(weights: list[np.ndarray], pid: int, num_features: int,
                 steps: int = 5, lr: float = 0.05) -> tuple[list[np.ndarray], int]:
    """Gradient descent on this node's data from the global model; (model, examples)."""
    x, y = partition(pid, num_features)
    w = weights[0].astype(np.float64)
    for _ in range(steps):
        w = w - lr * x.T @ (x @ w - y) / len(y)
    return [w], len(y)


def initial_model(num_features: int) -> list[np.ndarray]:
    return [np.zeros(num_features)]


class Client(NumPyClient):  # type: ignore[misc]
    def __init__(self, pid: int, num_features: int) -> None:
        self.pid = pid
        self.num_features = num_features

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        model, count = local_update(parameters, self.pid, self.num_features)
        return model, count, {"partition-id": self.pid}


def client_fn(context: Context) -> Any:
    pid = int(context.node_config["partition-id"])
    return Client(pid, int(context.run_config["num-features"])).to_client()
