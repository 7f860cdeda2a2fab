"""Analysis of trained networks: within-class variability of features, truncation to the epsilon-rank.

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

Truncation: the best rank-``k`` approximation of ``W = P Sigma Q^T`` in every unitarily invariant norm is
``W_k = P_k Sigma_k Q_k^T`` (Eckart-Young), with ``||W - W_k||_F^2 = sum_{i > k} sigma_i^2``. Truncating to the
epsilon-rank ``k = #{i : sigma_i / ||W||_F > eps}`` therefore changes ``W`` by at most
``eps sqrt(min(n_in, n_out) - k) ||W||_F`` in Frobenius norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lowrank import metrics
from lowrank.layers import Dense
from lowrank.linalg import truncated_svd
from lowrank.network import NeuralNetwork, effective_weight

if TYPE_CHECKING:
    import pandas as pd

#: Singular values of the class-mean matrix ``M`` below this times the largest are treated as zero in ``M^+``.
PINV_RTOL = 1e-6


@torch.no_grad()
def layer_inputs(model: NeuralNetwork, x: Tensor) -> list[Tensor]:
    """The input ``A_{l-1}`` of every layer ``l`` for the batch ``x`` (``A_0`` = the flattened images), in eval mode.

    Returns one ``(B, n_in)`` tensor per layer; the training mode of ``model`` is restored.
    """
    was_training = model.training
    model.eval()
    a, inputs = x.flatten(1), []
    for layer, activation in zip(model.layers, model.activations):
        inputs.append(a)
        a = activation(layer(a))
    model.train(was_training)
    return inputs


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


@torch.no_grad()
def truncated_network(model: NeuralNetwork, ranks: Sequence[int]) -> NeuralNetwork:
    """A dense copy of ``model`` whose layer ``l`` has the weight ``W_l`` truncated to rank ``ranks[l]``.

    Every layer (dense or factorised) becomes a :class:`Dense` layer with ``W_k = P_k Sigma_k Q_k^T`` and the
    same bias and activation, so the copy computes what the truncated network computes; ``model`` is unchanged.
    """
    if len(ranks) != len(model.layers):
        raise ValueError(f"{len(ranks)} ranks for {len(model.layers)} layers")
    layers = []
    for layer, rank in zip(model.layers, ranks):
        weight = effective_weight(layer).cpu()
        dense = Dense(layer.in_features, layer.out_features, bias=layer.bias is not None).to(weight.dtype)
        p, sigma, q = truncated_svd(weight, rank)
        dense.weight.copy_((p * sigma) @ q.T)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias.detach().cpu())
        layers.append(dense)
    copy = NeuralNetwork(layers, ["identity"] * len(layers))
    copy.activations = deepcopy(model.activations)
    return copy.eval()


def epsilon_ranks(model: nn.Module, eps: float = metrics.EPSILON_RANK_TOL, relative_to: str = "frobenius") -> list[int]:
    """:func:`lowrank.metrics.epsilon_rank` of every affine layer's ``W`` (default: ``sigma_i / ||W||_F > eps``)."""
    return [metrics.epsilon_rank(metrics.layer_singular_values(layer), eps, relative_to) for layer in metrics.affine_layers(model)]


def truncation_table(model: NeuralNetwork, x: Tensor, y: Tensor, tolerances: Sequence[float],
                     relative_to: str = "frobenius") -> "pd.DataFrame":
    """Accuracy of ``model`` on ``(x, y)`` after truncating every layer to its epsilon-rank, per tolerance.

    One row per ``eps`` in ``tolerances``: ``eps``, the ranks (``rank_0``, ...), the kept fraction of
    parameters of a factorised copy (``sum r (n_in + n_out) / sum n_in n_out`` over the layers, biases
    excluded), ``accuracy`` and ``accuracy_lost = accuracy(model) - accuracy`` (fractions, not %).
    """
    import pandas as pd

    full = metrics.model_accuracy(model, x, y)
    dims = [(layer.in_features, layer.out_features) for layer in model.layers]
    rows = []
    for eps in tolerances:
        ranks = epsilon_ranks(model, eps, relative_to)
        truncated = metrics.model_accuracy(truncated_network(model, ranks), x, y)
        factors = sum(r * (n + m) for r, (n, m) in zip(ranks, dims)) / sum(n * m for n, m in dims)
        rows.append({"eps": eps, **{f"rank_{i}": r for i, r in enumerate(ranks)}, "factor_fraction": factors,
                     "accuracy": truncated, "accuracy_lost": full - truncated})
    return pd.DataFrame(rows)

