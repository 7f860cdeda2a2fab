"""lowrank: dense, vanilla low-rank and dynamical low-rank (DLRT) layers for PyTorch.

The library: layers (:mod:`lowrank.layers`, :mod:`lowrank.conv`), the DLRT optimiser (:mod:`lowrank.optim`),
networks, regularisers, metrics, and :func:`convert` for any model. The experiment engine that drives the
report is :mod:`lowrank.engine`; the library never imports it. Names are imported lazily, so
``lowrank.engine.config`` (and ``python -m lowrank --help``) load without torch.
"""

__version__ = "0.5.0"

_EXPORTS = {
    "Dense": "lowrank.layers",
    "LowRank": "lowrank.layers",
    "DynamicalLowRank": "lowrank.layers",
    "LowRankConv2d": "lowrank.conv",
    "DynamicalLowRankConv2d": "lowrank.conv",
    "DLRT": "lowrank.optim",
    "dlrt_optimizer": "lowrank.optim",
    "build_optimizer": "lowrank.optim",
    "NeuralNetwork": "lowrank.network",
    "convert": "lowrank.conversion",
    "to_dense": "lowrank.conversion",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lowrank' has no attribute {name!r}")
