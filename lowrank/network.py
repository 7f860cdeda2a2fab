"""Multilayer perceptrons of dense, low-rank and dynamical low-rank layers, built from a config.

A network of ``L`` layers maps a batch of images, flattened to rows ``A_0`` of shape ``(B, 784)``, to logits
``Z_L`` by ``Z_l = A_{l-1} W_l + b_l`` and ``A_l = sigma_l(Z_l)``; the output activation is the identity
and the loss is the cross-entropy of ``softmax(Z_L)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from lowrank.layers import Dense, DynamicalLowRank, LowRank

#: The module of each name in :data:`lowrank.choices.ACTIVATIONS`.
ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "identity": nn.Identity,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def build_layer(spec) -> nn.Module:
    """One layer from a :class:`lowrank.engine.config.LayerConfig` (``type``, ``dims`` and its type's options)."""
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
        self.activations = nn.ModuleList(ACTIVATION_MODULES[name]() for name in activations)

    @classmethod
    def from_config(cls, layer_specs: Sequence) -> "NeuralNetwork":
        """Build from :class:`lowrank.engine.config.LayerConfig` entries (e.g. ``ModelConfig.layers``)."""
        return cls([build_layer(spec) for spec in layer_specs], [spec.activation for spec in layer_specs])

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        """The logits ``A_L`` of ``x``; with ``start = l``, ``x`` is the input ``A_l`` of layer ``l`` (0-based) and
        only layers ``l, l+1, ...`` are applied."""
        *_, logits = self._propagate(x, start)
        return logits

    @torch.no_grad()
    def layer_inputs(self, x: Tensor) -> list[Tensor]:
        """The input ``A_l`` of every layer ``l`` for the batch ``x`` (``A_0`` = the flattened images), in eval
        mode: one ``(B, n_in)`` tensor per layer. The training mode is restored."""
        was_training = self.training
        self.eval()
        *inputs, _ = self._propagate(x)
        self.train(was_training)
        return inputs

    def _propagate(self, x: Tensor, start: int = 0) -> Iterator[Tensor]:
        """``A_start, ..., A_L`` with ``A_0 = x.flatten(1)`` and ``A_{l+1} = sigma_l(layer_l(A_l))``."""
        a = x.flatten(1)
        for layer, activation in zip(self.layers[start:], self.activations[start:]):
            yield a
            a = activation(layer(a))
        yield a

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
