"""lowrank: dense, vanilla low-rank and dynamical low-rank (DLRT) layers for PyTorch.

A layer ``z = x W + b`` stores ``W`` (``n_in x n_out``) as ``U S V^T`` of rank ``r``: ``r (n_in + n_out + r)``
parameters instead of ``n_in n_out``. The names below load on first use:

- layers: :class:`Dense`, :class:`LowRank` (vanilla: fixed rank, any ``torch.optim`` optimiser),
  :class:`DynamicalLowRank` (DLRT: rank-adaptive), and the convolutions :class:`LowRankConv2d`,
  :class:`DynamicalLowRankConv2d`; :class:`NeuralNetwork` builds a network of them;
- training: :class:`DLRT` (the optimiser of the dynamical layers), :func:`dlrt_optimizer` (DLRT for the
  factors, ``torch.optim`` for every other parameter), :func:`build_optimizer` (the same from a config),
  :func:`dynamical_layers` (the layers DLRT trains);
- any model: :func:`convert` (its ``torch.nn.Linear`` / ``Conv2d`` layers made low-rank), :func:`to_dense` (back),
  :func:`summary` (per layer: type, shape, rank, parameters, share of dense; totals), :func:`ranks` (name -> rank
  of each low-rank layer), :func:`compression` (``1 - params / params of the dense twin``).

Submodules are attributes too (``lowrank.optim``, ``lowrank.metrics``, ...: :data:`SUBMODULES`). The experiment
engine that drives the report is :mod:`lowrank.engine`; the library never imports it. ``import lowrank`` loads
nothing else, so ``lowrank.engine.config`` (and ``python -m lowrank --help``) load without torch.
"""

__version__ = "0.6.0"

_EXPORTS = {
    "Dense": "lowrank.layers",
    "LowRank": "lowrank.layers",
    "DynamicalLowRank": "lowrank.layers",
    "LowRankConv2d": "lowrank.conv",
    "DynamicalLowRankConv2d": "lowrank.conv",
    "DLRT": "lowrank.optim",
    "dlrt_optimizer": "lowrank.optim",
    "build_optimizer": "lowrank.optim",
    "dynamical_layers": "lowrank.optim",
    "NeuralNetwork": "lowrank.network",
    "convert": "lowrank.conversion",
    "to_dense": "lowrank.conversion",
    "summary": "lowrank.metrics",
    "ranks": "lowrank.metrics",
    "compression": "lowrank.metrics",
}
#: The modules of the package, each reachable as ``lowrank.<name>`` (imported on first use).
SUBMODULES = ("choices", "conv", "conversion", "engine", "layers", "linalg", "metrics", "network", "optim",
              "regularizers", "torch_compat")

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    import importlib

    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in SUBMODULES:
        return importlib.import_module(f"lowrank.{name}")
    raise AttributeError(f"module 'lowrank' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *SUBMODULES})
