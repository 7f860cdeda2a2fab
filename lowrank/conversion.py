"""Low-rank layers in any PyTorch model: :func:`convert` and :func:`to_dense`.

:func:`convert` replaces the ``torch.nn.Linear`` and ``torch.nn.Conv2d`` modules of a model by low-rank ones,
each initialised from the truncated SVD of its weight matrix (``W = weight^T`` for a linear layer, the
``(c_in k_h k_w) x c_out`` kernel matrix for a convolution, :mod:`lowrank.conv`):

- ``convert(model, rank=r)``: vanilla layers (:class:`~lowrank.layers.LowRank`,
  :class:`~lowrank.conv.LowRankConv2d`) of fixed rank, trained by any ``torch.optim`` optimiser;
- ``convert(model, tau=t)``: dynamical layers (:class:`~lowrank.layers.DynamicalLowRank`,
  :class:`~lowrank.conv.DynamicalLowRankConv2d`), rank-adaptive with tolerance ``t``, trained by
  :class:`~lowrank.optim.DLRT` (:func:`lowrank.optim.dlrt_optimizer`); each starts at the rank the truncation
  criterion gives for its weight (the smallest ``r`` with ``||sigma[r:]|| <= t ||sigma||``), or at ``rank`` when
  both are given.

Ranks and limits (``rank``, ``r_max``, ``r_min``) are given for the whole model and resolved per layer, against
that layer's full rank ``n = min(n_in, n_out)``: an ``int`` is a rank, capped at ``n``; a ``float`` in ``(0, 1]``
is a fraction of ``n``, ``max(1, floor(fraction n))``. So ``rank=1`` is rank 1 and ``rank=1.0`` full rank;
any other float is an error.

What ``tau`` does depends on the spectrum, so on whether the model was trained. ``tau`` drops the smallest
singular values that hold at most ``tau^2`` of ``||W||_F^2``. The singular values of a randomly initialised ``m x
n`` weight (``m >= n``, independent entries) spread over ``[1 - sqrt(n / m), 1 + sqrt(n / m)]`` times a common
scale (Marchenko-Pastur), without a tail of small ones, so ``tau = 0.1`` (1 % of the energy) keeps nearly all.
Measured on untrained models (torch's default initialisation): torchvision's ResNet-18 (10 classes) at ``tau =
0.1`` keeps 92-100 % of each layer's full rank and has 13.79 M parameters against 11.18 M dense (+23 %); ``tau =
0.3`` 68-90 % (11.49 M), ``tau = 0.5`` 45-80 % (8.27 M); a 784-512-512-10 MLP at ``tau = 0.1`` keeps 77-100 % and
doubles its parameters. A rank-``r`` factorisation ``U S V^T`` of an ``n_in x n_out`` matrix holds ``r (n_in +
n_out + r)`` scalars, fewer than ``n_in n_out`` only below ``r = (sqrt(2) - 1) n = 0.41 n`` for a square matrix
(0.51 n for 784 x 512, 0.83 n for ResNet-18's 4608 x 512 kernels). ``tau`` compresses a model whose training has
concentrated ``||W||_F`` in few directions; plain training often does not (the report's figure (i): MNIST MLPs
trained without weight decay keep effective ranks near full, with weight decay they fall to a fraction of it). To
compress an untrained model, give ``rank`` (a fraction, e.g. ``rank=0.25``), with ``tau`` to let DLRT adapt the
ranks from there. :func:`convert` warns when the result has more parameters than the model it was given, and
:func:`lowrank.metrics.summary` lists every layer's rank and size.

At full rank (``tau=0``, or ``rank`` at least every ``min(n_in, n_out)``) the converted model computes what the
original does, up to rounding. ``include`` / ``exclude`` select modules by their qualified names
(``fnmatch`` patterns such as ``"layer4.*"`` or ``"fc"``). Left as they are: convolutions with
``groups != 1`` or a padding mode other than zeros, and the linear children of the modules in
:data:`WEIGHT_READERS` (``torch.nn.MultiheadAttention``'s output projection, the feed-forward layers of
``torch.nn.TransformerEncoderLayer`` / ``DecoderLayer``), whose fused code paths read the weights directly;
a transformer built from ``torch.nn.Linear`` layers converts fully. A model that is itself a ``torch.nn.Linear``
or ``torch.nn.Conv2d`` is converted too: the new layer is returned.

:func:`to_dense` turns every low-rank layer back into ``torch.nn.Linear`` / ``torch.nn.Conv2d``;
:func:`lowrank.optim.dlrt_optimizer` trains the result.
"""

from __future__ import annotations

import copy
import fnmatch
import numbers
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from lowrank.conv import DynamicalLowRankConv2d, LowRankConv2d
from lowrank.layers import Dense, DynamicalLowRank, LowRank
from lowrank.metrics import parameter_count
from lowrank.optim import truncated_rank

#: Modules whose fused code paths read their linear children's ``weight`` instead of calling them.
WEIGHT_READERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
#: The limits of dynamical layers that :func:`convert` resolves per layer, like ``rank``.
DYNAMICAL_LIMITS = ("r_max", "r_min")


def _matrix(module: nn.Linear | nn.Conv2d) -> torch.Tensor:
    """The weight of ``module`` as the ``n_in x n_out`` matrix ``W`` of ``y = x W + b``."""
    return module.weight.detach().reshape(module.weight.shape[0], -1).T


def _convertible(module: nn.Module, parent: nn.Module | None) -> bool:
    if isinstance(parent, WEIGHT_READERS):
        return False
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return isinstance(module, nn.Linear)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_rank(key: str, value: int | float) -> None:
    """Raise a ``ValueError`` unless ``value`` is a rank (an int >= 1) or a fraction (a float in ``(0, 1]``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key} = {value!r} must be an int >= 1 (a rank) or a float in (0, 1] (a fraction of each "
                         f"layer's full rank min(n_in, n_out))")
    if isinstance(value, numbers.Integral) and value < 1:
        raise ValueError(f"{key} = {value} must be an int >= 1 (a rank) or a float in (0, 1] (a fraction)")
    if not isinstance(value, numbers.Integral) and not 0.0 < value <= 1.0:
        raise ValueError(f"{key} = {value} as a fraction of each layer's full rank min(n_in, n_out) must be in "
                         f"(0, 1]; a rank is an int ({key}={max(1, round(value))})")


def _layer_rank(value: int | float, full: int) -> int:
    """``value`` (checked by :func:`_check_rank`) for a layer of full rank ``full``: an int capped at ``full``, a
    float the fraction ``max(1, floor(value full))``."""
    if isinstance(value, numbers.Integral):
        return min(int(value), full)
    return max(1, int(value * full))


def _low_rank(module: nn.Linear | nn.Conv2d, rank: int | float | None, tau: float | None,
              options: dict) -> nn.Module:
    """``module`` as a low-rank layer: vanilla without ``tau``, dynamical with it; ``rank``, ``r_max`` and ``r_min``
    resolved against the layer's full rank (module docstring); the start rank of a dynamical layer clamped to
    ``[r_min, r_max]``."""
    matrix = _matrix(module)
    full = min(matrix.shape)
    if tau is None:
        start = _layer_rank(rank, full)
    else:
        r_max = _layer_rank(options.get("r_max", full), full)
        r_min = min(_layer_rank(options.get("r_min", 1), full), r_max)
        if rank is None:
            start = truncated_rank(torch.linalg.svdvals(matrix.double()), tau, r_min, r_max)
        else:
            start = min(max(_layer_rank(rank, full), r_min), r_max)
        options = {**options, "tau": tau, "r_max": r_max, "r_min": r_min}
    if isinstance(module, nn.Conv2d):
        cls = LowRankConv2d if tau is None else DynamicalLowRankConv2d
        return cls.from_dense(module, start, **options)
    dense = Dense.from_linear(module)
    return (LowRank if tau is None else DynamicalLowRank).from_dense(dense, start, **options)


def _label(name: str, module: nn.Module) -> str:
    """How an error names a module: its qualified name (or "the model itself"), its type and matrix shape."""
    n_out, n_in = module.weight.shape[0], module.weight[0].numel()
    return f"{name or 'the model itself'} ({type(module).__name__}, W {n_in} x {n_out})"


def convert(model: nn.Module, rank: int | float | None = None, tau: float | None = None,
            include: Sequence[str] = ("*",), exclude: Sequence[str] = (), inplace: bool = False,
            **options) -> nn.Module:
    """``model`` with its ``torch.nn.Linear`` and ``torch.nn.Conv2d`` layers replaced by low-rank ones, each the
    truncated SVD ``U S V^T`` of the layer's weight matrix ``W`` (``n_in x n_out``; ``(c_in k_h k_w) x c_out`` for a
    convolution): vanilla layers of fixed rank with ``rank`` alone, dynamical (DLRT, rank-adaptive) layers with
    ``tau``. At full rank the result computes what ``model`` does, to rounding. Left alone: convolutions with
    ``groups != 1`` or non-zero padding modes, and the linear layers that ``torch.nn.MultiheadAttention`` and
    ``torch.nn.Transformer*Layer`` read as raw weights (:data:`WEIGHT_READERS`).

    Args:
        model: any ``torch.nn.Module``; a ``torch.nn.Linear`` or ``torch.nn.Conv2d`` itself, too.
        rank: vanilla layers of this rank; with ``tau``, the starting rank of the dynamical layers. An int is a
            rank, capped at each layer's full rank ``min(n_in, n_out)``; a float in ``(0, 1]`` is a fraction of
            it, ``max(1, floor(rank min(n_in, n_out)))`` (``rank=1`` is rank 1, ``rank=1.0`` full rank).
        tau: dynamical, rank-adaptive layers with this truncation tolerance, ``0 <= tau < 1``: each starts at the
            smallest ``r`` with ``||sigma[r:]|| <= tau ||sigma||`` for its singular values ``sigma``. On an untrained
            model that is nearly full rank (a random weight's singular values are all of one size; ResNet-18 at
            ``tau = 0.1`` keeps 92-100 % of each layer's rank, +23 % parameters, measured in
            :mod:`lowrank.conversion`): give ``rank`` too (e.g. ``rank=0.25``) to compress one.
        include, exclude: ``fnmatch`` patterns of qualified module names (``model.named_modules()``) to
            convert and to leave alone; each pattern of ``exclude`` must leave out a module that ``include``
            selects (``"layer4.*"``, not ``"layer4"``, leaves out the modules inside ``layer4``).
        inplace: change ``model`` itself instead of a copy (a model that is itself a layer is returned new).
        options: further arguments of the new layers (``factorization``, ``init``, ...); the dynamical layers'
            limits ``r_max`` and ``r_min`` (with ``tau`` only) are ints or fractions like ``rank``, resolved per
            layer, and each layer starts within them.

    Returns the converted model, in the mode, dtype and device of ``model``. Raises ``ValueError`` if neither
    ``rank`` nor ``tau`` is given, a value is out of range (naming the module whose layer it could not make), a
    pattern of ``exclude`` leaves nothing out, or no module is selected. Warns (``UserWarning``) when the result
    has more parameters than ``model``.
    """
    if rank is None and tau is None:
        raise ValueError("give rank= (vanilla low-rank layers) or tau= (dynamical layers), or both")
    if tau is not None and not 0.0 <= tau < 1.0:
        raise ValueError(f"tau = {tau} must be in [0, 1)")
    limits = {key: options[key] for key in DYNAMICAL_LIMITS if key in options}
    if limits and tau is None:
        raise ValueError(f"{' and '.join(limits)}: r_max and r_min limit the ranks of dynamical layers; give tau= "
                         f"too, or leave them out for vanilla layers of fixed rank")
    for key, value in ({"rank": rank} if rank is not None else {}).items() | limits.items():
        _check_rank(key, value)
    before = parameter_count(model)
    model = model if inplace else copy.deepcopy(model)
    modules = dict(model.named_modules())
    selected = [(name, module) for name, module in modules.items()
                if _matches(name, include) and _convertible(module, modules[name.rpartition(".")[0]] if name else None)]
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in selected):
            examples = ", ".join([repr(name) for name, _ in selected[:4]] + ["..."] * (len(selected) > 4))
            raise ValueError(f"exclude pattern {pattern!r} leaves out none of the torch.nn.Linear and torch.nn.Conv2d "
                             f"modules that include={list(include)} selects ({examples}); patterns match their "
                             f"qualified names, e.g. 'layer4.*' for every module inside layer4")
    targets = [(name, module) for name, module in selected if not _matches(name, exclude)]
    if not targets:
        raise ValueError(f"no torch.nn.Linear or torch.nn.Conv2d module matches include={list(include)} and "
                         f"exclude={list(exclude)}")
    for name, module in targets:
        try:
            replacement = _low_rank(module, rank, tau, options).train(module.training)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{_label(name, module)}: {error}") from error
        model = _replace(model, name, replacement)
    after = parameter_count(model)
    if after > before:
        warnings.warn(f"the converted model has {after:,} parameters, {after / before - 1:.0%} more than the "
                      f"{before:,} of the model given: a rank-r factorisation of an n_in x n_out matrix holds "
                      f"r (n_in + n_out + r) scalars, and tau= keeps nearly full rank on weights whose singular values are all of one "
                      f"size, as a random initialisation's are. Give rank= a fraction (rank=0.25) or a larger tau; "
                      f"lowrank.summary(model) lists every layer", UserWarning, stacklevel=2)
    return model


def to_dense(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every low-rank layer (of :mod:`lowrank.layers` or :mod:`lowrank.conv`) replaced by the
    ``torch.nn.Linear`` or ``torch.nn.Conv2d`` that computes the same map: the inverse of :func:`convert` (a model
    that is itself a low-rank layer is returned as a new dense one)."""
    model = model if inplace else copy.deepcopy(model)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, (LowRank, DynamicalLowRank))]:
        dense = module.to_dense()
        dense = dense.to_linear() if isinstance(dense, Dense) else dense
        model = _replace(model, name, dense.train(module.training))
    return model


def _replace(model: nn.Module, name: str, replacement: nn.Module) -> nn.Module:
    """Put ``replacement`` at the qualified ``name`` in ``model``; the model to use from then on (``replacement``
    itself where ``name`` is ``""``, the model)."""
    if not name:
        return replacement
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return model
