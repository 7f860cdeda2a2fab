"""Networks of dense, low-rank and dynamical low-rank layers, built from a config: multilayer perceptrons, and
convolutional networks (convolutions first, each optionally max-pooled, then linear layers).

A network of ``L`` layers maps a batch of images, flattened to rows ``A_0`` of shape ``(B, 784)``, to logits
``Z_L`` by ``Z_l = A_{l-1} W_l + b_l`` and ``A_l = sigma_l(Z_l)``; the output activation is the identity
and the loss is the cross-entropy of ``softmax(Z_L)``. With convolutions (:mod:`lowrank.conv`) the images keep
their shape ``(B, C, H, W)``, ``Z_l`` is the convolution of ``A_{l-1}``, ``A_l`` is ``sigma_l(Z_l)`` max-pooled
over ``p_l x p_l`` windows, and the first linear layer takes the flattened ``A_{l-1}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowrank.conv import CONVOLUTIONS, DenseConv2d, DynamicalLowRankConv2d, LowRankConv2d
from lowrank.layers import Dense, DynamicalLowRank, LowRank

#: The module of each name in :data:`lowrank.choices.ACTIVATIONS`.
ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "identity": nn.Identity,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def build_layer(spec) -> nn.Module:
    """One layer from a :class:`lowrank.engine.config.LayerConfig` (``type``, ``dims``, its type's options, and a
    convolution's ``kernel_size``, ``stride`` and ``padding``)."""
    n_in, n_out = spec.dims
    if spec.kernel_size is not None:
        geometry = dict(in_channels=n_in, out_channels=n_out, kernel_size=spec.kernel_size, stride=spec.stride,
                        padding=spec.padding, bias=spec.bias)
        dense, lowrank, dynamical = DenseConv2d, LowRankConv2d, DynamicalLowRankConv2d
    else:
        geometry = dict(in_features=n_in, out_features=n_out, bias=spec.bias)
        dense, lowrank, dynamical = Dense, LowRank, DynamicalLowRank
    if spec.type == "dense":
        return dense(**geometry, init=spec.init, init_scale=spec.init_scale)
    if spec.type == "lowrank":
        return lowrank(**geometry, rank=spec.rank, factorization=spec.factorization, init=spec.init,
                       init_scale=spec.init_scale)
    if spec.type == "dynamical":
        return dynamical(**geometry, rank=spec.rank, r_max=spec.r_max, r_min=spec.r_min, tau=spec.tau,
                         adaptive=spec.adaptive, init=spec.init, init_scale=spec.init_scale, grow=spec.grow)
    raise ValueError(f"layer type {spec.type!r} is not one of ('dense', 'lowrank', 'dynamical')")


class NeuralNetwork(nn.Module):
    """A network ``x -> sigma_L(... sigma_1(x W_1 + b_1) ...)`` of linear layers, after convolutions if any, each
    convolution's activation max-pooled over ``p x p`` windows (``help(lowrank.network)``).

    Args:
        layers: the layers, each mapping ``n_{l-1}`` to ``n_l`` features (or channels).
        activations: one activation name per layer (``"relu"``, ``"identity"``, ``"tanh"``, ``"sigmoid"``).
        pools: the max-pool window after each layer's activation (convolutions; 1 = none); default all 1.
        image_shape: ``(C, H, W)`` of the input images, needed when the first layer is a convolution.

    Input ``(B, *)`` is flattened to ``(B, n_0)`` (or shaped ``(B, C, H, W)`` for a first convolution); output
    ``(B, n_L)`` logits.
    """

    def __init__(self, layers: Sequence[nn.Module], activations: Sequence[str], pools: Sequence[int] | None = None,
                 image_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        pools = [1] * len(layers) if pools is None else list(pools)
        if not len(layers) == len(activations) == len(pools):
            raise ValueError(f"{len(layers)} layers but {len(activations)} activations and {len(pools)} pools")
        if isinstance(layers[0], CONVOLUTIONS) and image_shape is None:
            raise ValueError("the first layer is a convolution: give image_shape = (channels, height, width)")
        self.layers = nn.ModuleList(layers)
        self.activations = nn.ModuleList(ACTIVATION_MODULES[name]() for name in activations)
        self.pools = pools
        self.image_shape = tuple(image_shape) if image_shape is not None else None

    @classmethod
    def from_config(cls, layer_specs: Sequence, image_shape: Sequence[int] | None = None) -> "NeuralNetwork":
        """Build from :class:`lowrank.engine.config.LayerConfig` entries (e.g. ``ModelConfig.layers``); the
        ``image_shape`` of the dataset is kept only if the network has convolutions."""
        convolutional = any(spec.kernel_size is not None for spec in layer_specs)
        return cls([build_layer(spec) for spec in layer_specs], [spec.activation for spec in layer_specs],
                   [spec.pool for spec in layer_specs], image_shape if convolutional else None)

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        """The logits ``A_L`` of ``x``; with ``start = l``, ``x`` is the input ``A_l`` of layer ``l`` (0-based) and
        only layers ``l, l+1, ...`` are applied."""
        *_, logits = self._propagate(x, start)
        return logits

    @torch.no_grad()
    def layer_inputs(self, x: Tensor) -> list[Tensor]:
        """The input ``A_l`` of every layer ``l`` for the batch ``x`` (``A_0`` = the flattened images), in eval
        mode: one ``(B, n_in)`` tensor per layer (``(B, C, H, W)`` for a convolution). The training mode is
        restored."""
        was_training = self.training
        self.eval()
        *inputs, _ = self._propagate(x)
        self.train(was_training)
        return inputs

    def _propagate(self, x: Tensor, start: int = 0) -> Iterator[Tensor]:
        """``A_start, ..., A_L`` with ``A_0`` the images (flattened, or shaped for a first convolution) and
        ``A_{l+1} = pool_l(sigma_l(layer_l(A_l)))``, flattened before a linear layer."""
        if start > 0:
            a = x
        else:
            a = x.reshape(len(x), *self.image_shape) if self.image_shape is not None else x.flatten(1)
        for layer, activation, pool in zip(self.layers[start:], self.activations[start:], self.pools[start:]):
            if a.dim() > 2 and not isinstance(layer, CONVOLUTIONS):
                a = a.flatten(1)
            yield a
            a = activation(layer(a))
            if pool > 1:
                a = F.max_pool2d(a, pool)
        yield a

    def positions(self) -> list[int]:
        """The output positions of every layer: ``H' W'`` for a convolution (before its pooling), 1 for a linear
        layer; the multiplier of :func:`lowrank.metrics.layer_flops` in a forward pass."""
        counts, size = [], self.image_shape[1:] if self.image_shape is not None else ()
        for layer, pool in zip(self.layers, self.pools):
            if not isinstance(layer, CONVOLUTIONS):
                counts.append(1)
                continue
            size = [(n + 2 * p - d * (k - 1) - 1) // s + 1
                    for n, p, d, k, s in zip(size, layer.padding, layer.dilation, layer.kernel_size, layer.stride)]
            counts.append(size[0] * size[1])
            size = [n // pool for n in size]
        return counts

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
            device = next(layer.parameters()).device
            if isinstance(layer, (Dense, DenseConv2d)):
                layer.weight.copy_(source.weight.detach().to(device))
            else:
                layer.approximate_(effective_weight(source).to(device))
            if layer.bias is not None:
                layer.bias.copy_(source.bias.detach())
        return self

    @torch.no_grad()
    def weight_matrices(self) -> list[Tensor]:
        """Each layer's ``W`` of shape ``(n_in, n_out)``, formed explicitly (for analysis, not training)."""
        return [effective_weight(layer) for layer in self.layers]


def effective_weight(layer: nn.Module) -> Tensor:
    """``W`` of a layer, ``(n_in, n_out)``: ``weight`` for :class:`Dense`, the kernel matrix of a convolution,
    ``U S V^T`` (or ``U V^T``) for low-rank layers."""
    return layer.weight_matrix()
