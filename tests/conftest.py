"""Shared fixtures. Every test runs torch on one thread: small nets run faster and results are bit-identical."""

import numpy as np
import pytest
import torch

from lowrank.engine import data

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist_arrays() -> dict[str, np.ndarray]:
    """The real MNIST splits (`data.load_arrays("mnist")`), fetched and cached on first use."""
    data.prepare("mnist")
    return data.load_arrays("mnist")
