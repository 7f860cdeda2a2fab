"""Multilayer perceptrons of dense, low-rank and dynamical low-rank layers, built from a config.

A network of ``L`` layers maps a batch of images, flattened to rows ``A_0`` of shape ``(B, 784)``, to logits
``Z_L`` by ``Z_l = A_{l-1} W_l + b_l`` and ``A_l = sigma_l(Z_l)``; the output activation is the identity
and the loss is the cross-entropy of ``softmax(Z_L)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lowrank.layers import Dense, DynamicalLowRank, LowRank

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "identity": nn.Identity,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def build_layer(spec) -> nn.Module:
    """One layer from a :class:`lowrank.config.LayerConfig` (``type``, ``dims`` and its type's options)."""
    in_features, out_features = spec.dims
    if spec.type == "dense":
        return Dense(in_features, out_features, bias=spec.bias, init=spec.init, init_scale=spec.init_scale)
    if spec.type == "lowrank":
        return LowRank(in_features, out_features, spec.rank, bias=spec.bias, factorization=spec.factorization,
                       init=spec.init, init_scale=spec.init_scale)
    if spec.type == "dynamical":
        return DynamicalLowRank(in_features, out_features, spec.rank, bias=spec.bias, r_max=spec.r_max,
                                r_min=spec.r_min, tau=spec.tau, adaptive=spec.adaptive, init=spec.init,
                                init_scale=spec.init_scale)
    raise ValueError(f"layer type {spec.type!r} is not one of ('dense', 'lowrank', 'dynamical')")


class NeuralNetwork(nn.Module):
    """A multilayer perceptron ``x -> sigma_L(... sigma_1(x W_1 + b_1) ...)``.

    Args:
        layers: the affine layers, each mapping ``n_{l-1}`` to ``n_l`` features.
        activations: one activation name per layer (``"relu"``, ``"identity"``, ``"tanh"``, ``"sigmoid"``).

    Input ``(B, *)`` is flattened to ``(B, n_0)``; output ``(B, n_L)`` logits.
    """

    def __init__(self, layers: Sequence[nn.Module], activations: Sequence[str]) -> None:
        super().__init__()
        if len(layers) != len(activations):
            raise ValueError(f"{len(layers)} layers but {len(activations)} activations")
        self.layers = nn.ModuleList(layers)
        self.activations = nn.ModuleList(ACTIVATIONS[name]() for name in activations)

    @classmethod
    def from_config(cls, layer_specs: Sequence) -> "NeuralNetwork":
        """Build from :class:`lowrank.config.LayerConfig` entries (e.g. ``ModelConfig.layers``)."""
        return cls([build_layer(spec) for spec in layer_specs], [spec.activation for spec in layer_specs])

    def forward(self, x: Tensor) -> Tensor:
        a = x.flatten(1)
        for layer, activation in zip(self.layers, self.activations):
            a = activation(layer(a))
        return a

    def dynamical_layers(self) -> list[DynamicalLowRank]:
        return [layer for layer in self.layers if isinstance(layer, DynamicalLowRank)]

    def ranks(self) -> list[int]:
        """Current rank of every layer: ``r`` for low-rank layers, ``min(n_in, n_out)`` for dense ones."""
        return [getattr(layer, "rank", min(layer.in_features, layer.out_features)) for layer in self.layers]

    @torch.no_grad()
    def copy_from_dense(self, dense: "NeuralNetwork") -> "NeuralNetwork":
        """Set every layer from the layer of ``dense`` in the same position (same ``dims``), in place: a
        :class:`Dense` layer copies its ``W``, a factorised layer of rank ``r`` becomes the best rank-``r``
        approximation of it (the truncated SVD, the layer's ``approximate_``); biases are copied. Returns self."""
        for source, layer in zip(dense.layers, self.layers, strict=True):
            weight = source.weight.detach().to(next(layer.parameters()).device)
            if isinstance(layer, Dense):
                layer.weight.copy_(weight)
            else:
                layer.approximate_(weight)
            if layer.bias is not None:
                layer.bias.copy_(source.bias.detach())
        return self

    @torch.no_grad()
    def weight_matrices(self) -> list[Tensor]:
        """Each layer's ``W`` of shape ``(n_in, n_out)``, formed explicitly (for analysis, not training)."""
        return [effective_weight(layer) for layer in self.layers]


def effective_weight(layer: nn.Module) -> Tensor:
    """``W`` of a layer: ``weight`` for :class:`Dense`, ``U S V^T`` (or ``U V^T``) for low-rank layers."""
    return layer.weight.detach() if isinstance(layer, Dense) else layer.weight_matrix()
