"""Low-rank layers in any PyTorch model: :func:`convert`, :func:`to_dense` and :func:`dlrt_optimizer`.

:func:`convert` replaces the ``torch.nn.Linear`` and ``torch.nn.Conv2d`` modules of a model by low-rank ones,
each initialised from the truncated SVD of its weight matrix (``W = weight^T`` for a linear layer, the
``(c_in k_h k_w) x c_out`` kernel matrix for a convolution, :mod:`lowrank.conv`):

- ``convert(model, rank=r)``: vanilla layers (:class:`~lowrank.layers.LowRank`,
  :class:`~lowrank.conv.LowRankConv2d`) of fixed rank ``r`` (capped at ``min(n_in, n_out)``; a float in
  ``(0, 1]`` is a fraction of it), trained by any ``torch.optim`` optimiser;
- ``convert(model, tau=t)``: dynamical layers (:class:`~lowrank.layers.DynamicalLowRank`,
  :class:`~lowrank.conv.DynamicalLowRankConv2d`), rank-adaptive with tolerance ``t``, trained by
  :class:`~lowrank.optim.DLRT` (:func:`lowrank.optim.dlrt_optimizer`); each starts at the rank the truncation criterion
  gives for its weight (``||sigma[r:]|| <= t ||sigma||``), or at ``rank`` when both are given.

At full rank (``tau=0``, or ``rank`` at least every ``min(n_in, n_out)``) the converted model computes what the
original does, up to rounding. ``include`` / ``exclude`` select modules by their qualified names
(``fnmatch`` patterns such as ``"layer4.*"`` or ``"fc"``). Left as they are: convolutions with
``groups != 1`` or a padding mode other than zeros, and the linear children of the modules in
:data:`WEIGHT_READERS` (``torch.nn.MultiheadAttention``'s output projection, the feed-forward layers of
``torch.nn.TransformerEncoderLayer`` / ``DecoderLayer``), whose fused code paths read the weights directly;
a transformer built from ``torch.nn.Linear`` layers converts fully.

:func:`to_dense` turns every low-rank layer back into ``torch.nn.Linear`` / ``torch.nn.Conv2d``;
:func:`lowrank.optim.dlrt_optimizer` trains the result.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

from lowrank.conv import DynamicalLowRankConv2d, LowRankConv2d
from lowrank.layers import Dense, DynamicalLowRank, LowRank
from lowrank.optim import truncated_rank


def _matrix(module: nn.Linear | nn.Conv2d) -> torch.Tensor:
    """The weight of ``module`` as the ``n_in x n_out`` matrix ``W`` of ``y = x W + b``."""
    return module.weight.detach().reshape(module.weight.shape[0], -1).T


#: Modules whose fused code paths read their linear children's ``weight`` instead of calling them.
WEIGHT_READERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _convertible(module: nn.Module, parent: nn.Module | None) -> bool:
    if isinstance(parent, WEIGHT_READERS):
        return False
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return isinstance(module, nn.Linear)


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return (any(fnmatch.fnmatchcase(name, p) for p in include)
            and not any(fnmatch.fnmatchcase(name, p) for p in exclude))


def _start_rank(matrix: torch.Tensor, rank: int | float | None, tau: float | None) -> int:
    """The rank a converted layer starts at: ``rank`` (a fraction of ``min(n_in, n_out)`` if a float), else the
    truncation rank of ``matrix`` at ``tau``."""
    full = min(matrix.shape)
    if rank is None:
        sigma = torch.linalg.svdvals(matrix.double())
        return truncated_rank(sigma, tau, 1, full)
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"rank = {rank} as a fraction of min(n_in, n_out) must be in (0, 1]")
        return max(1, int(rank * full))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank = {rank!r} must be an integer >= 1 or a fraction in (0, 1]")
    return min(rank, full)


def _low_rank(module: nn.Linear | nn.Conv2d, rank: int | float | None, tau: float | None,
              options: dict) -> nn.Module:
    """``module`` as a low-rank layer: vanilla without ``tau``, dynamical with it."""
    start = _start_rank(_matrix(module), rank, tau)
    options = options if tau is None else {**options, "tau": tau}
    if isinstance(module, nn.Conv2d):
        cls = LowRankConv2d if tau is None else DynamicalLowRankConv2d
        return cls.from_dense(module, start, **options)
    dense = Dense.from_linear(module)
    return (LowRank if tau is None else DynamicalLowRank).from_dense(dense, start, **options)


def convert(model: nn.Module, rank: int | float | None = None, tau: float | None = None,
            include: Sequence[str] = ("*",), exclude: Sequence[str] = (), inplace: bool = False,
            **options) -> nn.Module:
    """``model`` with its linear and convolution layers replaced by low-rank ones (module docstring).

    Args:
        model: any ``torch.nn.Module``.
        rank: vanilla layers of this rank (an int, capped at ``min(n_in, n_out)``, or a fraction of it in
            ``(0, 1]``); with ``tau``, the starting rank of the dynamical layers.
        tau: dynamical, rank-adaptive layers with this truncation tolerance, ``0 <= tau < 1``.
        include, exclude: ``fnmatch`` patterns of qualified module names (``model.named_modules()``) to
            convert and to leave alone.
        inplace: change ``model`` itself instead of a copy.
        options: further arguments of the new layers (``factorization``, ``r_max``, ``r_min``, ``init``, ...).

    Returns the converted model, in the mode, dtype and device of ``model``. Raises ``ValueError`` if neither
    ``rank`` nor ``tau`` is given or a value is out of range, and if no module was selected.
    """
    if rank is None and tau is None:
        raise ValueError("give rank= (vanilla low-rank layers) or tau= (dynamical layers), or both")
    if tau is not None and not 0.0 <= tau < 1.0:
        raise ValueError(f"tau = {tau} must be in [0, 1)")
    model = model if inplace else copy.deepcopy(model)
    parents = {name: module for name, module in model.named_modules()}
    targets = [(name, module) for name, module in model.named_modules()
               if _selected(name, include, exclude) and _convertible(module, parents.get(name.rpartition(".")[0]))]
    if not targets:
        raise ValueError(f"no torch.nn.Linear or torch.nn.Conv2d module matches include={list(include)} and "
                         f"exclude={list(exclude)}")
    for name, module in targets:
        replacement = _low_rank(module, rank, tau, options).train(module.training)
        _replace(model, name, replacement)
    return model


def to_dense(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every low-rank layer (of :mod:`lowrank.layers` or :mod:`lowrank.conv`) replaced by the
    ``torch.nn.Linear`` or ``torch.nn.Conv2d`` that computes the same map: the inverse of :func:`convert`."""
    model = model if inplace else copy.deepcopy(model)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, (LowRank, DynamicalLowRank))]:
        dense = module.to_dense()
        dense = dense.to_linear() if isinstance(dense, Dense) else dense
        _replace(model, name, dense.train(module.training))
    return model


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
