"""Convolutions with a low-rank kernel: vanilla (fixed rank) and dynamical (DLRT).

A 2-D convolution with kernel ``K`` of shape ``(c_out, c_in, k_h, k_w)`` applies the matrix

.. math::  W = \\operatorname{reshape}(K, (c_{out}, c_{in} k_h k_w))^T \\in \\mathbb{R}^{(c_{in} k_h k_w) \\times c_{out}}

to every input patch ``p`` (the ``c_in k_h k_w`` values under the kernel at one output position, in the order
of ``torch.nn.functional.unfold``): ``y = p W + b`` there. The layers below store ``W = U S V^T``, the
layout of the DLRT paper, with ``U`` of shape ``(c_in k_h k_w, r)``, ``S`` ``(r, r)`` and ``V`` ``(c_out, r)``,
and never form ``K``: the forward pass is

1. a ``k_h x k_w`` convolution of ``x`` to ``r`` channels with the kernel ``reshape(U^T, (r, c_in, k_h, k_w))``
   (stride, padding and dilation of the layer): ``A = p U`` at every position;
2. a ``1 x 1`` convolution by ``S`` (``r -> r``) and one by ``V^T`` (``r -> c_out``), plus the bias.

It costs ``r (c_in k_h k_w + r + c_out)`` multiply-adds per output position instead of
``c_in k_h k_w c_out``. Both layers are the linear layers of :mod:`lowrank.layers` applied to patches, so
everything those do carries over: their initialisations (the Kaiming scale uses the fan-in
``c_in k_h k_w``), ``approximate_``, the truncation, and, for :class:`DynamicalLowRankConv2d`, the DLRT
optimiser with both integrators. ``in_features`` / ``out_features`` are the sizes of ``W``
(``c_in k_h k_w`` and ``c_out``); ``in_channels``, ``out_channels`` and ``kernel_size`` those of ``K``.

Backward of the dynamical layer, for the output gradient ``Delta`` (``(B, c_out, H', W')``) and
``G = dL/dW = sum_positions p^T Delta`` (never formed):

- ``E = Delta V`` (a ``1 x 1`` convolution, ``(B, r, H', W')``);
- ``G V = sum p^T E``: the weight gradient of the step-1 convolution for the output gradient ``E``
  (``torch.nn.grad.conv2d_weight``), the exact K-step gradient;
- ``G^T U = sum Delta^T A`` over batch and positions, the exact L-step gradient;
- ``dL/dS = sum A^T E``, ``dL/dU = (G V) S^T``, ``dL/dV = (G^T U) S``, ``dL/db = sum Delta``;
- ``dL/dx``: the input gradient of the step-1 convolution for the output gradient ``E S^T``.

The single-pass integrator needs each pass's patches and output gradients as rows; the layer then unfolds
its input (``c_in k_h k_w`` values per output position, ``k_h k_w`` times the input's size) and keeps it
until the optimiser step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_input, conv2d_weight

from lowrank.choices import DENSE_INITS
from lowrank.layers import DynamicalLowRank, GradientSink, LowRank, check_init, copy_parameters, kaiming_dense


def _pair(value) -> tuple[int, int]:
    """``3`` -> ``(3, 3)``; ``(3, 5)`` stays, as ``torch.nn.Conv2d`` reads its sizes."""
    return (value, value) if isinstance(value, int) else tuple(value)


def _kernel(u: Tensor, in_channels: int, kernel_size: tuple[int, int]) -> Tensor:
    """``reshape(U^T, (r, c_in, k_h, k_w))``: the ``r`` kernels of the first convolution."""
    return u.T.reshape(u.shape[1], in_channels, *kernel_size)


def _pointwise(matrix: Tensor) -> Tensor:
    """A ``(out, in)`` matrix as the weight of a ``1 x 1`` convolution."""
    return matrix[:, :, None, None]


def _rows(t: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B H W, C)``: one row per position, in the order of ``F.unfold``'s columns."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


class _ConvGeometry:
    """What the two convolution layers share: channels, kernel size, stride, padding and dilation, and the
    conversions from and to ``torch.nn.Conv2d``. Set by :meth:`_set_geometry` after the layer's own ``__init__``."""

    @staticmethod
    def _patch_size(in_channels: int, kernel_size) -> int:
        """``c_in k_h k_w``: the rows of ``W``."""
        k_h, k_w = _pair(kernel_size)
        if min(in_channels, k_h, k_w) < 1:
            raise ValueError(f"in_channels and kernel_size must be >= 1, got {in_channels}, {(k_h, k_w)}")
        return in_channels * k_h * k_w

    def _set_geometry(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        if min(*self.stride, *self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got {self.stride}, {self.dilation}, "
                             f"{self.padding}")

    @property
    def _conv(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def kernel(self) -> Tensor:
        """The kernel ``K = reshape(W^T, (c_out, c_in, k_h, k_w))``, formed explicitly (for analysis, not training)."""
        return self.weight_matrix().T.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def to_dense(self) -> nn.Conv2d:
        """The same map as a ``torch.nn.Conv2d`` with the kernel :meth:`kernel` (the caller's random state is kept)."""
        with torch.random.fork_rng(devices=[]):
            conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None,
                             device=self.U.device, dtype=self.U.dtype, **self._conv)
        return copy_parameters(conv, self.kernel(), self.bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int, **kwargs):
        """The best rank-``rank`` approximation of ``conv``'s kernel (truncated SVD of its matrix ``W``), with its
        bias, stride, padding and dilation; ``kwargs`` are the layer's other arguments. The caller's random state
        is kept. ``conv`` must have ``groups = 1`` and zero padding."""
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"only convolutions with groups=1, padding_mode='zeros' and numeric padding have a "
                             f"low-rank form here; got groups={conv.groups}, padding_mode={conv.padding_mode!r}, "
                             f"padding={conv.padding!r}")
        with torch.random.fork_rng(devices=[]):
            layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, stride=conv.stride,
                        padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None, **kwargs)
        layer = layer.to(dtype=conv.weight.dtype, device=conv.weight.device)
        layer.approximate_(conv.weight.detach().reshape(conv.out_channels, -1).T)
        return copy_parameters(layer, None, conv.bias)

    def _geometry_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}")


class DenseConv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` with the library's initialisations and the matrix view of its kernel: the dense twin of
    the low-rank convolutions (a network's dense layers, and what a warm start trains first).

    Args: as ``torch.nn.Conv2d`` (``groups = 1``), and ``init`` (``"kaiming"``: ``N(0, 2 / (c_in k_h k_w))``, zero
    bias; ``"normal"``: ``N(0, 1)`` weights and bias) and ``init_scale`` as :class:`lowrank.layers.Dense`.
    ``in_features`` / ``out_features``: the shape ``(c_in k_h k_w, c_out)`` of the matrix ``W``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, init: str = "kaiming", init_scale: float = 1.0) -> None:
        check_init(init, init_scale, DENSE_INITS)
        self.init, self.init_scale = init, init_scale  # read by reset_parameters, which nn.Conv2d's __init__ calls
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias)
        self.in_features, self.out_features = in_channels * self.kernel_size[0] * self.kernel_size[1], out_channels

    def reset_parameters(self) -> None:
        fan_in = self.weight[0].numel()
        with torch.no_grad():
            if self.init == "normal":
                self.weight.normal_()
            else:
                self.weight.copy_(kaiming_dense(fan_in, self.out_channels).T.reshape(self.weight.shape))
            self.weight.mul_(self.init_scale)
            if self.bias is not None and self.init == "normal":
                self.bias.normal_()
            elif self.bias is not None:
                self.bias.zero_()

    def weight_matrix(self) -> Tensor:
        """``W = reshape(K, (c_out, c_in k_h k_w))^T``, detached."""
        return self.weight.detach().reshape(self.out_channels, -1).T


class LowRankConv2d(_ConvGeometry, LowRank):
    """A convolution whose kernel matrix is ``W = U S V^T`` (or ``U V^T``) of fixed rank, computed
    as a ``k_h x k_w`` convolution to ``r`` channels and two ``1 x 1`` ones (``help(lowrank.conv)``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as in ``torch.nn.Conv2d``
            (``groups = 1``, zero padding).
        rank: ``r``, ``1 <= r <= min(c_in k_h k_w, c_out)``.
        factorization, init, init_scale: as in :class:`lowrank.layers.LowRank`.

    Shapes: input ``(B, c_in, H, W)``, output ``(B, c_out, H', W')`` as ``torch.nn.Conv2d``; ``U``
    ``(c_in k_h k_w, r)``, ``S`` ``(r, r)``, ``V`` ``(c_out, r)``. Trained by any ``torch.optim`` optimiser.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, factorization: str = "usv", init: str = "kaiming",
                 init_scale: float = 1.0) -> None:
        super().__init__(self._patch_size(in_channels, kernel_size), out_channels, rank, bias=bias,
                         factorization=factorization, init=init, init_scale=init_scale)
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)

    def forward(self, x: Tensor) -> Tensor:
        a = F.conv2d(x, _kernel(self.U, self.in_channels, self.kernel_size), **self._conv)
        if self.S is not None:
            a = F.conv2d(a, _pointwise(self.S.T))
        return F.conv2d(a, _pointwise(self.V), self.bias)

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, rank={self.rank}, factorization={self.factorization!r}, bias={self.bias is not None}"


class _LowRankConv(torch.autograd.Function):
    """``y = conv_1x1(conv_1x1(conv(x, U), S), V^T) + b`` with the backward of the module docstring, which leaves
    ``G V`` and ``G^T U`` in the sink."""

    @staticmethod
    def forward(ctx, x: Tensor, u: Tensor, s: Tensor, v: Tensor, bias: Tensor | None, sink: GradientSink | None,
                layer: "DynamicalLowRankConv2d") -> Tensor:
        kernel = _kernel(u, layer.in_channels, layer.kernel_size)
        a = F.conv2d(x, kernel, **layer._conv)
        ctx.save_for_backward(x, a, u, s, v)
        ctx.sink, ctx.layer = sink, layer
        return F.conv2d(F.conv2d(a, _pointwise(s.T)), _pointwise(v), bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, a, u, s, v = ctx.saved_tensors
        sink, layer, need = ctx.sink, ctx.layer, ctx.needs_input_grad
        collect = sink is not None and sink.active
        basis_grads = sink is None or sink.basis_grads
        kernel_shape = (u.shape[1], layer.in_channels, *layer.kernel_size)
        e = F.conv2d(dy, _pointwise(v.T))  # Delta V
        k_grad = (conv2d_weight(x, kernel_shape, e, **layer._conv).reshape(u.shape[1], -1).T
                  if collect or (need[1] and basis_grads) else None)
        l_grad = torch.einsum("bohw,bjhw->oj", dy, a) if collect or (need[3] and basis_grads) else None
        if collect:
            if sink.record_activations:
                patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
                sink.add(patches.transpose(1, 2).reshape(-1, patches.shape[1]), _rows(dy), k_grad, l_grad,
                         _rows(a), _rows(e))
            else:
                sink.add(x, dy, k_grad, l_grad)
        grad_x = (conv2d_input(x.shape, _kernel(u, layer.in_channels, layer.kernel_size), F.conv2d(e, _pointwise(s)),
                               **layer._conv) if need[0] else None)
        grad_u = k_grad @ s.T if need[1] and basis_grads else None
        grad_s = torch.einsum("bihw,bjhw->ij", a, e) if need[2] else None
        grad_v = l_grad @ s if need[3] and basis_grads else None
        grad_b = dy.sum((0, 2, 3)) if need[4] else None
        return grad_x, grad_u, grad_s, grad_v, grad_b, None, None


class DynamicalLowRankConv2d(_ConvGeometry, DynamicalLowRank):
    """A convolution whose kernel matrix ``W = U S V^T`` is trained by :class:`lowrank.optim.DLRT`: orthonormal
    ``U``, ``V`` updated by the K- and L-steps, ``S`` by the S-step, the rank adapted by truncation at ``tau``
    (computed as :class:`LowRankConv2d`, backward in ``help(lowrank.conv)``; :class:`lowrank.layers.DynamicalLowRank`
    for the rank arguments and the defaults).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: as in ``torch.nn.Conv2d``
            (``groups = 1``, zero padding).
        rank, r_max, r_min, tau, adaptive, init, init_scale, grow: as in :class:`lowrank.layers.DynamicalLowRank`, for
            the ``(c_in k_h k_w) x c_out`` matrix ``W``.

    Shapes: as :class:`LowRankConv2d`. ``sink`` receives the exact K- and L-step gradients of each backward pass.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, r_max: int | None = None, r_min: int = 1, tau: float = 0.1,
                 adaptive: bool = True, init: str = "kaiming", init_scale: float | None = None,
                 grow: bool = True) -> None:
        super().__init__(self._patch_size(in_channels, kernel_size), out_channels, rank, bias=bias, r_max=r_max,
                         r_min=r_min, tau=tau, adaptive=adaptive, init=init, init_scale=init_scale, grow=grow)
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation)

    def forward(self, x: Tensor) -> Tensor:
        sink = self.sink if torch.is_grad_enabled() else None
        return _LowRankConv.apply(x, self.U, self.S, self.V, self.bias, sink, self)

    def extra_repr(self) -> str:
        return (f"{self._geometry_repr()}, rank={self.rank}, r_min={self.r_min}, r_max={self.r_max}, tau={self.tau}, "
                f"adaptive={self.adaptive}, {'' if self.grow else 'grow=False, '}bias={self.bias is not None}")


#: Every convolution a network of the library may hold.
CONVOLUTIONS = (nn.Conv2d, LowRankConv2d, DynamicalLowRankConv2d)
