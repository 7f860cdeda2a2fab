"""Metrics of a network, of its weight matrices and of its features: accuracy, sizes, cost, spectra, NC1.

For a layer ``z = x W + b`` with ``W`` in ``R^{n_in x n_out}`` (see :mod:`lowrank.layers`):

- dense: parameters ``n_in n_out (+ n_out)``, FLOPs per sample ``2 n_in n_out (+ n_out)``;
- low-rank ``W = U S V^T`` (vanilla ``"usv"`` and dynamical): parameters ``r (n_in + n_out + r) (+ n_out)``,
  FLOPs ``2 r (n_in + n_out + r) (+ n_out)``;
- low-rank ``W = U V^T`` (``"uv"``): parameters ``r (n_in + n_out) (+ n_out)``, FLOPs ``2 r (n_in + n_out) (+ n_out)``.

The terms in brackets are the bias. FLOPs count one multiply-add as two operations (the product
``((x U) S) V^T`` costs ``r n_in + r^2 + r n_out`` multiply-adds per sample) and the bias as one
addition per output; activations and the loss are not counted.

Spectra: ``sigma_1 >= sigma_2 >= ... >= 0`` are the singular values of ``W``;

- effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p_i = sigma_i / ||sigma||_1`` and the Shannon
  entropy ``H(p) = -sum_i p_i log p_i`` (``0 log 0 = 0``); ``k`` equal non-zero singular values give ``k``;
- epsilon-rank: ``#{i : sigma_i / sigma_1 > eps}``, the number of directions above a relative threshold;
  with ``relative_to="frobenius"``, ``#{i : sigma_i / ||W||_F > eps}``, the singular values of ``W / ||W||_F``
  above ``eps`` (Galanti et al.; the training history's ``epsrank_*`` columns use ``eps = 1e-3``,
  :data:`EPSILON_RANK_TOL`).

:func:`layer_singular_values` gets the singular values of a factorised layer without forming ``W``: with
``U = Q_U R_U`` and ``V = Q_V R_V`` (thin QR), ``W = Q_U (R_U S R_V^T) Q_V^T`` and ``Q_U``, ``Q_V`` have
orthonormal columns, so ``W`` has the singular values of the ``r x r`` matrix ``R_U S R_V^T``.

Within-class variability (neural collapse, Papyan, Han & Donoho 2020). For features ``h_i`` in ``R^d`` of
``N`` samples with labels ``y_i`` in ``C`` classes, class means ``mu_c`` (over the ``N_c`` samples of class
``c``) and their mean ``mu = (1/C) sum_c mu_c``::

    Sigma_W = (1/N) sum_i (h_i - mu_{y_i}) (h_i - mu_{y_i})^T          within-class covariance
    Sigma_B = (1/C) sum_c (mu_c - mu) (mu_c - mu)^T                    between-class covariance
    NC1     = (1/C) tr(Sigma_W Sigma_B^+)                              (^+: Moore-Penrose pseudo-inverse)

NC1 measures the spread of each class around its mean in units of the distances between the means; it
tends to 0 as the features of each class collapse to their mean. ``Sigma_B = M M^T / C`` with the
``d x C`` matrix ``M = [mu_c - mu]`` (rank ``<= C - 1``), so ``Sigma_B^+ = C (M^+)^T M^+`` and

    NC1 = (1/N) ||M^+ (H - mu_Y)^T||_F^2

(``H - mu_Y``: each row ``h_i - mu_{y_i}``): a ``C x d`` pseudo-inverse and ``C x N`` products, never a
``d x d`` matrix. Directions of ``M`` whose singular value is below ``1e-6`` times the largest count as null.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lowrank.conv import DenseConv2d
from lowrank.layers import Dense, DynamicalLowRank, LowRank

if TYPE_CHECKING:
    import pandas as pd

#: Tolerance of the training history's epsilon-ranks ``epsrank_*``: singular values of ``W / ||W||_F`` above it.
EPSILON_RANK_TOL = 1e-3
RELATIVE_TO = ("max", "frobenius")
#: Singular values of the class-mean matrix ``M`` below this times the largest are treated as zero in ``M^+``.
PINV_RTOL = 1e-6


def correct_predictions(logits: Tensor, labels: Tensor) -> int:
    """``#{i : argmax_k z_ik = y_i}`` for logits ``(B, C)`` and class indices ``(B,)``."""
    return int((logits.argmax(dim=-1) == labels).sum())


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose largest logit is the label: ``mean_i [argmax_k z_ik = y_i]``.

    ``logits`` ``(B, C)``, ``labels`` ``(B,)`` class indices; returns a float in ``[0, 1]`` (0 for ``B = 0``).
    """
    if labels.numel() == 0:
        return 0.0
    return correct_predictions(logits, labels) / labels.numel()


@torch.no_grad()
def model_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 10_000) -> float:
    """:func:`accuracy` of ``model`` on the images ``x`` with labels ``y``, in eval mode, ``batch_size`` at a time.

    ``x`` is converted to the floating-point type of ``model``'s parameters first.
    """
    model.eval()
    x = x.to(next(model.parameters()).dtype)
    correct = sum(correct_predictions(model(x[i:i + batch_size]), y[i:i + batch_size])
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


def parameter_count(module: nn.Module) -> int:
    """Number of trainable scalars of ``module`` at its current shapes (ranks), ``sum numel(p)``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def affine_layers(model: nn.Module) -> list[nn.Module]:
    """The :class:`Dense`, :class:`LowRank` and :class:`DynamicalLowRank` layers of ``model`` and their convolutions
    (:mod:`lowrank.conv`), in module order."""
    return [m for m in model.modules() if isinstance(m, (Dense, DenseConv2d, LowRank, DynamicalLowRank))]


def _bias(layer: nn.Module) -> int:
    return layer.out_features if layer.bias is not None else 0


def factorised_layers(model: nn.Module) -> list[nn.Module]:
    """The :class:`LowRank` and :class:`DynamicalLowRank` layers of ``model`` (convolutions too), in module order."""
    return [m for m in model.modules() if isinstance(m, (LowRank, DynamicalLowRank))]


def _dense_size(layer: nn.Module) -> int:
    """``n_in n_out (+ n_out)``: the parameters of a dense layer of ``layer``'s shape."""
    return layer.in_features * layer.out_features + _bias(layer)


def dense_parameter_count(model: nn.Module) -> int:
    """Parameters of the dense twin of any ``model``: each low-rank layer (:func:`factorised_layers`) counted as the
    dense layer of its shape, ``n_in n_out (+ n_out)`` (the bias where it has one), every other trainable parameter
    (dense layers, normalisation, ...) as it is."""
    layers = factorised_layers(model)
    return parameter_count(model) + sum(_dense_size(layer) - parameter_count(layer) for layer in layers)


def compression(model: nn.Module) -> float:
    """``1 - params(model) / params(dense twin)`` (:func:`dense_parameter_count`) for any model: 0 for a dense net,
    close to 1 for small ranks.

    Negative when the factors hold more scalars than ``W`` (large ranks).
    """
    return 1.0 - parameter_count(model) / dense_parameter_count(model)


def ranks(model: nn.Module) -> dict[str, int]:
    """The current rank of every low-rank layer of any ``model`` (:func:`factorised_layers`), by qualified name
    (``""`` for a model that is itself such a layer)."""
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, (LowRank, DynamicalLowRank))}


@dataclass(frozen=True)
class LayerSummary:
    """One layer ``z = x W + b`` in a :class:`ModelSummary`: ``shape`` is ``(n_in, n_out)`` of ``W`` (``(c_in k_h k_w,
    c_out)`` for a convolution), ``rank`` its current rank (``min(n_in, n_out)`` for a dense layer),
    ``parameters`` its trainable scalars, ``dense_parameters`` those of its dense twin."""

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    parameters: int
    dense_parameters: int

    @property
    def share(self) -> float:
        """``parameters / dense_parameters`` (``nan`` for a frozen dense layer, which counts 0 of 0)."""
        return self.parameters / self.dense_parameters if self.dense_parameters else math.nan


@dataclass(frozen=True)
class ModelSummary:
    """What :func:`summary` reports: one :class:`LayerSummary` per linear or convolution layer, and the trainable
    parameters outside them (``other_parameters``: normalisation, embeddings, ...). ``str()`` is a table."""

    layers: tuple[LayerSummary, ...]
    other_parameters: int

    @property
    def parameters(self) -> int:
        """Trainable parameters of the model (:func:`parameter_count`)."""
        return sum(layer.parameters for layer in self.layers) + self.other_parameters

    @property
    def dense_parameters(self) -> int:
        """Parameters of its dense twin (:func:`dense_parameter_count`)."""
        return sum(layer.dense_parameters for layer in self.layers) + self.other_parameters

    @property
    def compression(self) -> float:
        """``1 - parameters / dense_parameters`` (:func:`compression`)."""
        return 1.0 - self.parameters / self.dense_parameters

    def __str__(self) -> str:
        rows = [("layer", "type", "W (n_in x n_out)", "rank", "parameters", "of dense")]
        rows += [(layer.name or "(model)", layer.kind, f"{layer.shape[0]} x {layer.shape[1]}", str(layer.rank),
                  f"{layer.parameters:,}", f"{layer.share:.1%}") for layer in self.layers]
        rows += [("other", "", "", "", f"{self.other_parameters:,}", ""),
                 ("total", "", "", "", f"{self.parameters:,}", f"{self.parameters / self.dense_parameters:.1%}")]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.rjust(w) if i >= 3 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                 .rstrip() for row in rows]
        return "\n".join(lines + [f"dense twin: {self.dense_parameters:,} parameters; compression "
                                   f"{self.compression:.1%}"])

    __repr__ = __str__


def summary(model: nn.Module) -> ModelSummary:
    """Every linear and convolution layer of any ``model`` (the library's layers and ``torch.nn.Linear`` /
    ``torch.nn.Conv2d``), in module order: name, type, shape of ``W``, rank, trainable parameters and their share of
    the dense layer's; and the totals against the dense twin. In the spirit of peft's
    ``print_trainable_parameters``, but returned: ``print(lowrank.summary(model))`` shows the table.

    Each low-rank layer's dense twin has ``n_in n_out (+ n_out)`` parameters; a dense layer is its own twin.
    """
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, (LowRank, DynamicalLowRank)):
            shape, rank, dense = (m.in_features, m.out_features), m.rank, _dense_size(m)
        elif isinstance(m, (Dense, nn.Linear, nn.Conv2d)):
            shape = (m.in_features, m.out_features) if hasattr(m, "in_features") else (m.weight[0].numel(),
                                                                                         m.weight.shape[0])
            rank, dense = min(shape), parameter_count(m)
        else:
            continue
        layers.append(LayerSummary(name, type(m).__name__, shape, rank, parameter_count(m), dense))
    return ModelSummary(tuple(layers), parameter_count(model) - sum(layer.parameters for layer in layers))


def layer_flops(layer: nn.Module) -> int:
    """FLOPs per sample of one layer's forward pass (see the module docstring for the formulas); for the
    convolutions of :mod:`lowrank.conv`, whose ``in_features`` is the patch size, per output position."""
    n_in, n_out = layer.in_features, layer.out_features
    if isinstance(layer, (Dense, DenseConv2d)):
        products = n_in * n_out
    elif isinstance(layer, LowRank) and layer.factorization == "uv":
        products = layer.rank * (n_in + n_out)
    elif isinstance(layer, (LowRank, DynamicalLowRank)):
        products = layer.rank * (n_in + n_out + layer.rank)
    else:
        raise TypeError(f"no FLOP formula for {type(layer).__name__}")
    return 2 * products + _bias(layer)


def flops_per_sample(model: nn.Module) -> int:
    """FLOPs of one sample's forward pass through every layer at the current ranks (``sum`` of :func:`layer_flops`,
    times each layer's output positions for a :class:`lowrank.network.NeuralNetwork` with convolutions)."""
    layers = affine_layers(model)
    positions = model.positions() if hasattr(model, "positions") else [1] * len(layers)
    return sum(layer_flops(layer) * count for layer, count in zip(layers, positions, strict=True))


def singular_values(weight: Tensor) -> Tensor:
    """Singular values of a matrix, in decreasing order, as a 1-D CPU tensor (float64 for accuracy)."""
    return torch.linalg.svdvals(weight.detach().to("cpu", torch.float64))


def effective_rank(sigma: Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(-sum_i p_i log p_i)``, ``p = sigma / ||sigma||_1``.

    Zero singular values contribute nothing (``0 log 0 = 0``); the zero matrix has effective rank 0.
    ``1 <= effective_rank <= #{sigma_i > 0}``, with equality on the right iff the non-zero values are equal.
    """
    sigma = sigma.detach().to("cpu", torch.float64).abs().flatten()
    total = sigma.sum()
    if total == 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return math.exp(-(p * p.log()).sum().item())


def epsilon_rank(sigma: Tensor, eps: float = 1e-2, relative_to: str = "max") -> int:
    """``#{i : sigma_i / sigma_1 > eps}`` with ``sigma_1 = max sigma``; 0 for the zero matrix.

    ``relative_to="frobenius"``: ``#{i : sigma_i / ||sigma||_2 > eps}`` instead, i.e. relative to
    ``||W||_F = (sum_i sigma_i^2)^{1/2}``, the singular values of ``W / ||W||_F`` above ``eps``.
    """
    if relative_to not in RELATIVE_TO:
        raise ValueError(f"relative_to = {relative_to!r} is not one of {RELATIVE_TO}")
    sigma = sigma.detach().abs().flatten()
    if sigma.numel() == 0 or sigma.max() == 0:
        return 0
    scale = sigma.max() if relative_to == "max" else sigma.double().square().sum().sqrt()
    return int((sigma / scale > eps).sum())


def layer_singular_values(layer: nn.Module) -> Tensor:
    """Singular values of a layer's ``W`` (float64, decreasing; ``min(n_in, n_out)`` values for dense layers,
    ``r`` for factorised ones), from the ``r x r`` core ``R_U S R_V^T`` of a factorised layer (module docstring).
    """
    if isinstance(layer, (Dense, DenseConv2d)):
        return singular_values(layer.weight_matrix())
    u = layer.U.detach().to("cpu", torch.float64)
    v = layer.V.detach().to("cpu", torch.float64)
    core = torch.linalg.qr(u).R @ torch.linalg.qr(v).R.T if layer.S is None else (
        torch.linalg.qr(u).R @ layer.S.detach().to("cpu", torch.float64) @ torch.linalg.qr(v).R.T)
    return torch.linalg.svdvals(core)


def layer_spectra(model: nn.Module) -> "pd.DataFrame":
    """Singular values of every layer's ``W`` as a tidy table: columns ``layer``, ``index``, ``singular_value``.

    ``layer`` counts the affine layers from 0, ``index`` the singular values from 0 (largest first).
    """
    import pandas as pd

    from lowrank.network import effective_weight

    rows = [
        (i, k, value)
        for i, layer in enumerate(affine_layers(model))
        for k, value in enumerate(singular_values(effective_weight(layer)).tolist())
    ]
    return pd.DataFrame(rows, columns=["layer", "index", "singular_value"])


def nc1(features: Tensor, labels: Tensor) -> float:
    """Within-class variability ``(1/C) tr(Sigma_W Sigma_B^+)`` of ``features`` ``(N, d)`` (module docstring).

    ``labels`` ``(N,)`` are class indices; classes without a sample are left out (``C`` counts the others).
    Needs two classes or more. Computed in float64.
    """
    h = features.detach().to("cpu", torch.float64).flatten(1)
    present, y = torch.unique(labels.detach().cpu(), return_inverse=True)  # y: 0..C-1
    if len(present) < 2:
        raise ValueError(f"NC1 needs samples of two classes or more, got classes {present.tolist()}")
    counts = torch.bincount(y).to(torch.float64)
    means = torch.zeros(len(present), h.shape[1], dtype=torch.float64).index_add_(0, y, h) / counts[:, None]
    centred_means = means - means.mean(0)  # rows mu_c - mu: M^T
    pinv = torch.linalg.pinv(centred_means.T, rtol=PINV_RTOL)  # M^+, (C, d)
    projected = pinv @ h.T - (pinv @ means.T)[:, y]  # M^+ (h_i - mu_{y_i}) for every i, (C, N)
    return float(projected.square().sum() / len(y))
