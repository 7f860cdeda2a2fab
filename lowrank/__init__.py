"""lowrank: dense, vanilla low-rank and dynamical low-rank (DLRT) layers for PyTorch.

The layers and optimisers are imported lazily, so ``lowrank.engine.config`` (and ``python -m lowrank --help``)
load without torch.
"""

__version__ = "0.4.0"

_EXPORTS = {
    "Dense": "lowrank.layers",
    "LowRank": "lowrank.layers",
    "DynamicalLowRank": "lowrank.layers",
    "DLRT": "lowrank.optim",
    "build_optimizer": "lowrank.optim",
    "NeuralNetwork": "lowrank.network",
    "train": "lowrank.engine.training",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lowrank' has no attribute {name!r}")
