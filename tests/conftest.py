"""Shared fixtures. Every test runs torch on one thread: small nets run faster and results are bit-identical."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lowrank.engine import config, data
from lowrank.engine.training import TrainingResult

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist_arrays() -> dict[str, np.ndarray]:
    """The real MNIST splits (`data.load_arrays("mnist")`), fetched and cached on first use."""
    data.prepare("mnist")
    return data.load_arrays("mnist")


NETWORKS = {"dense": ("dense", ""), "vanilla": ("lowrank", "rank = 20"), "dynamical": ("dynamical", "rank = 16\nr_max = 32")}


def _result(name: str, seed: int, accuracy: list[float], ranks: list[int], seconds: float = 10.0) -> TrainingResult:
    """A trained-looking result of a 784-64-10 network: the accuracy (fraction) and hidden rank after each epoch."""
    kind, extra = NETWORKS[name.split()[0]]
    model = config.loads(f"""
        [[model]]
        name = "{name} seed={seed}"
        [[model.layer]]
        type = "{kind}"
        dims = [784, 64]
        {extra}
        [[model.layer]]
        type = "dense"
        dims = [64, 10]
        activation = "identity"
        """, "fake.toml").models[0]
    epochs = len(accuracy)
    history = pd.DataFrame({
        "epoch": range(epochs), "train_loss": np.linspace(2.3, 0.1, epochs), "val_loss": np.linspace(2.3, 0.2, epochs),
        "train_accuracy": accuracy, "val_accuracy": accuracy, "parameters": 50_000, "compression": 0.2,
        "flops_per_sample": 1e5, "train_seconds_cum": np.linspace(0, seconds, epochs), "rank_0": ranks, "rank_1": 10,
    })
    return TrainingResult(model, history, test_loss=0.1, test_accuracy=accuracy[-1], model=None, path=Path("."))


@pytest.fixture
def make_result():
    """A builder of trained-looking results without training (for tables, plots and verdicts):
    ``make_result(name, seed, accuracy per epoch, first hidden rank per epoch, seconds)``; ``name`` starts with
    ``dense``, ``vanilla`` or ``dynamical``."""
    return _result


def rotation_tolerance(dtype: torch.dtype) -> float:
    """How far W may drift, relative to its norm, between DLRT runs of two factorisations of the same W over a few
    steps or cycles: the rounding of a step (``eps`` of ``dtype``) as a truncation amplifies it. A cut between
    singular values at least ``CLUSTER_RTOL`` = 1 % apart moves the kept singular vectors by rounding / gap, up
    to 100 times the rounding; the rounding of the ``2r x 2r`` decomposition grows like ``sqrt(2r)`` (16 at the
    ranks of these tests); three truncations in a row add up: ``100 * 16 * 6 ~ 1e4`` eps. Set from that estimate,
    not from measured errors (float32: 1.2e-3, whose worst seen case was 3.3e-4; float64: 2.2e-12)."""
    return 1e4 * torch.finfo(dtype).eps
