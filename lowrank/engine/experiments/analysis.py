"""Analysis of trained networks (figures h, i): truncation to the epsilon-rank, and its cost in accuracy.

The within-class variability NC1 of a layer's features is :func:`lowrank.metrics.nc1`.

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

