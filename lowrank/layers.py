"""Dense, vanilla low-rank and dynamical low-rank (DLRT) layers.

All three map a batch of row vectors ``x`` of shape ``(*, in_features)`` to ``(*, out_features)`` by

.. math::  z = x W + b, \\qquad W \\in \\mathbb{R}^{n_{in} \\times n_{out}},

the convention of the book (``Z_l = A_{l-1} W_l + b_l``). The low-rank layers never form ``W``: they
store factors ``W = U S V^T`` and compute ``((x U) S) V^T``, which costs ``2 r (n_in + n_out + r)``
multiply-adds per sample instead of ``2 n_in n_out``.

Initialisations (``init=``):

``"kaiming"``
    the default that trains well with ReLU. Dense: ``W_ij ~ N(0, 2 / n_in)``. Factorised: ``U`` and ``V``
    random orthonormal columns and ``S_ij ~ N(0, 2 n_out / r^2)``, so that ``E||W||_F^2 = 2 n_out`` as for
    the dense Kaiming matrix (``E||W||_F^2 = n_in n_out * 2 / n_in``). ``S`` is a Gaussian matrix, not
    ``c I``: its singular values spread over ``[0, ~2 sqrt(2 n_out / r)]`` (quarter-circle law) with gaps of
    order ``||S|| / r``, so no truncation has to choose among equal singular values by rounding.
``"kaiming-flat"``
    factorised layers only: the same random orthonormal ``U``, ``V`` with ``S = sqrt(2 n_out / r) I``
    (``||W||_F^2 = 2 n_out`` exactly, every singular value equal), the default of lowrank 0.1; kept to
    measure what the flat spectrum does to the truncation (figure (l)).
``"normal"``
    the student study's plain ``N(0, 1)`` entries for every weight factor (kept to reproduce it).
    Dynamical layers orthonormalise ``U`` and ``V`` (QR) since DLRT needs orthonormal bases.
``"spectral"``
    the SVD of a Kaiming dense matrix, ``W_0 = P Sigma Q^T``, truncated to rank ``r``:
    ``U = P_r, S = Sigma_r, V = Q_r`` (``U = P_r Sigma_r^{1/2}, V = Q_r Sigma_r^{1/2}`` in the ``U V^T``
    form), as in Khodak et al. 2021 and Kamalakara et al. 2022.
``"spectral-ones"``
    the same singular vectors with every singular value set to one.
``"sorted-normal"``
    random orthonormal ``U``, ``V`` and ``S = diag(|N(0, 1)|)`` sorted in decreasing order, the start of the DLRT
    authors' LeNet5 code (figure (o)).

Every layer also takes ``init_scale`` (``c > 0``), which multiplies the initial ``W`` (``S``, or ``U`` and
``V`` by ``sqrt(c)`` each without ``S``; a dense layer's ``W``). With its default ``"kaiming"`` init,
:class:`DynamicalLowRank` defaults to ``c =`` :data:`DYNAMICAL_INIT_SCALE` = 0.2; every other layer and init
to 1 (``"normal"`` stays the student study's ``N(0, 1)``, ``"spectral"`` the dense scale). Why: under Adam a new
direction enters the augmented ``S_hat`` with singular values of order ``h r`` (each coefficient moves by about
``h`` per step), and the truncation keeps it only if that exceeds ``tau ||W||_F``. At the Kaiming scale
(``||W_0||_F = sqrt(2 n_out)``, which steps of ``h = 1e-3`` change slowly) nothing new survives: the ranks only
fall, and what they cut is the random draw. Far below it every direction survives, Adam's normalised noise
included, and the ranks run to ``r_max``. At ``c = 0.2`` the first steps can add directions, and the spectrum
that the truncation ranks is built by the gradients as much as by the draw (the book, section "The initial
scale decides whether ranks can grow").

Biases start at zero, except with ``init="normal"`` where they are ``N(0, 1)`` like the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowrank.choices import DENSE_INITS, DYNAMICAL_INIT_SCALE, FACTORIZATIONS, INITS
from lowrank.linalg import truncated_svd


@torch.no_grad()
def copy_parameters(target: nn.Module, weight: Tensor | None, bias: Tensor | None) -> nn.Module:
    """Copy ``weight`` (unless None) and ``bias`` (if the target has one) into ``target``, in place; returns it."""
    if weight is not None:
        target.weight.copy_(weight)
    if bias is not None and target.bias is not None:
        target.bias.copy_(bias)
    return target


def check_init(init: str, init_scale: float, allowed: tuple[str, ...] = INITS) -> None:
    """Raise ``ValueError`` unless ``init`` is one of ``allowed`` and ``init_scale > 0``."""
    if init not in allowed:
        raise ValueError(f"init = {init!r} is not one of {allowed}")
    if not init_scale > 0:
        raise ValueError(f"init_scale = {init_scale} must be positive")


def kaiming_dense(in_features: int, out_features: int, **factory: object) -> Tensor:
    """A dense ``(in_features, out_features)`` matrix with ``N(0, 2 / in_features)`` entries."""
    return torch.randn(in_features, out_features, **factory) * math.sqrt(2.0 / in_features)


def random_orthonormal(rows: int, cols: int, **factory: object) -> Tensor:
    """A ``(rows, cols)`` matrix with orthonormal columns (QR of a Gaussian matrix), ``cols <= rows``."""
    return torch.linalg.qr(torch.randn(rows, cols, **factory)).Q


def initial_factors(
    in_features: int, out_features: int, rank: int, init: str, init_scale: float = 1.0, **factory: object
) -> tuple[Tensor, Tensor, Tensor]:
    """Factors ``(U, S, V)`` of shapes ``(n_in, r), (r, r), (n_out, r)`` for ``init``, with ``S`` times ``init_scale``.

    For every init except ``"normal"``, ``U`` and ``V`` have orthonormal columns.
    """
    check_init(init, init_scale)
    if init == "normal":
        u = torch.randn(in_features, rank, **factory)
        s = torch.randn(rank, rank, **factory)
        v = torch.randn(out_features, rank, **factory)
    elif init == "sorted-normal":
        u = random_orthonormal(in_features, rank, **factory)
        s = torch.diag(torch.randn(rank, **factory).abs().sort(descending=True).values)
        v = random_orthonormal(out_features, rank, **factory)
    elif init in ("kaiming", "kaiming-flat"):
        u = random_orthonormal(in_features, rank, **factory)  # drawn first, then S, then V
        s = (torch.randn(rank, rank, **factory) * (math.sqrt(2.0 * out_features) / rank) if init == "kaiming"
             else torch.eye(rank, **factory) * math.sqrt(2.0 * out_features / rank))
        v = random_orthonormal(out_features, rank, **factory)
    else:
        p, sigma, qt = torch.linalg.svd(kaiming_dense(in_features, out_features, **factory), full_matrices=False)
        singular_values = sigma[:rank] if init == "spectral" else torch.ones(rank, **factory)
        u, s, v = p[:, :rank], torch.diag(singular_values), qt[:rank].T
    return u, s * init_scale, v


def skinny_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``, computed as ``(b^T a^T)^T`` when ``b`` has fewer than 16 columns.

    The two are the same matrix (the second a transposed view), but MKL, the BLAS of PyTorch's x86 wheels,
    is 2-7x slower on ``(m, k) @ (k, n)`` with ``n < 16`` and a large ``k`` (the logits ``A W`` of a 10-class
    output layer, ``X U`` at rank 10) than on the transposed product (measured in the book chapter "What a
    training step costs", ``notebooks/fig_n.ipynb``).
    """
    if b.shape[-1] < 16:
        return (b.mT @ a.mT).mT
    return a @ b


def weight_gradient(x: Tensor, dy: Tensor) -> Tensor:
    """``x^T dy`` for batches ``x`` ``(B, n)`` and ``dy`` ``(B, k)``: the gradient of a ``(n, k)`` weight.

    For ``k <= 128`` it is computed as ``(dy^T x)^T`` (a transposed view of a contiguous ``(k, n)`` product):
    MKL is up to 7x faster that way when ``k`` is small (``G V`` and ``G^T U`` at rank ``r``, the weight of
    an output layer); for wide ``dy`` the plain product is as fast and keeps the result contiguous.
    """
    if dy.shape[-1] <= 128:
        return (dy.mT @ x).mT
    return x.mT @ dy


@dataclass
class GradientSink:
    """What a low-rank product leaves behind in its backward pass, for the DLRT optimiser.

    With ``G = dL/dW = X^T Delta`` (layer input ``X``, output gradient ``Delta``, both flattened to 2-D):

    - ``k_grad = G V`` of shape ``(n_in, r)``: the exact gradient of the K-step (``W = K V^T``);
    - ``l_grad = G^T U`` of shape ``(n_out, r)``: the exact gradient of the L-step (``W = U L^T``);
    - ``inputs`` / ``output_grads``: the pairs ``(X, Delta)`` of each backward pass, and ``input_coords`` /
      ``output_coords`` the products ``X U`` and ``Delta V`` that the pass computed anyway, kept only when
      ``record_activations`` is set, so ``U_hat^T G V_hat = sum (X U_hat)^T (Delta V_hat)`` can be formed
      for new bases without another pass (the single-pass integrator).

    ``basis_grads``: whether the backward pass also returns ``dL/dU = (G V) S^T`` and ``dL/dV = (G^T U) S``
    (``U.grad``, ``V.grad``). The DLRT optimiser reads only ``k_grad``, ``l_grad`` and ``S.grad`` and turns
    them off, which saves two ``(n, r) x (r, r)`` products per layer and pass.

    ``active``: when off, a backward pass leaves nothing here and skips ``G V`` and ``G^T U`` (two
    ``(n, B) x (B, r)`` products) unless ``basis_grads`` needs them: the kls integrator's second pass, which
    only reads ``S.grad``.

    Gradients accumulate over backward passes, like ``Tensor.grad``; ``clear()`` resets them.
    """

    record_activations: bool = False
    basis_grads: bool = True
    active: bool = True
    k_grad: Tensor | None = None
    l_grad: Tensor | None = None
    inputs: list[Tensor] = field(default_factory=list)
    output_grads: list[Tensor] = field(default_factory=list)
    input_coords: list[Tensor] = field(default_factory=list)
    output_coords: list[Tensor] = field(default_factory=list)

    def clear(self) -> None:
        self.k_grad = self.l_grad = None
        for records in (self.inputs, self.output_grads, self.input_coords, self.output_coords):
            records.clear()

    def add(self, x: Tensor, dy: Tensor, k_grad: Tensor, l_grad: Tensor, xu: Tensor | None = None,
            dy_v: Tensor | None = None) -> None:
        """Accumulate one backward pass: ``x``, ``dy`` and their coordinates ``xu = x U``, ``dy_v = dy V``."""
        self.k_grad = k_grad if self.k_grad is None else self.k_grad + k_grad
        self.l_grad = l_grad if self.l_grad is None else self.l_grad + l_grad
        if self.record_activations:
            self.inputs.append(x)
            self.output_grads.append(dy)
            self.input_coords.append(xu)
            self.output_coords.append(dy_v)

    def _check_recorded(self) -> None:
        if not self.inputs:
            raise RuntimeError("no recorded backward pass: set record_activations and run backward first")

    def projected_gradient(self, u: Tensor, v: Tensor) -> Tensor:
        """``U^T G V = sum (X U)^T (Delta V)`` from the recorded passes, shape ``(u.shape[1], v.shape[1])``."""
        self._check_recorded()
        return sum((skinny_mm(x, u)).mT @ skinny_mm(dy, v) for x, dy in zip(self.inputs, self.output_grads))

    def augmented_gradient(self, u_extra: Tensor, v_extra: Tensor) -> Tensor:
        """``[U, U_e]^T G [V, V_e] = sum [X U, X U_e]^T [Delta V, Delta V_e]``, reusing ``X U`` and ``Delta V``.

        ``U`` and ``V`` are the factors of the recorded passes; only ``X U_e`` and ``Delta V_e`` are new products
        (``B n r`` multiply-adds each instead of ``2 B n r`` for :meth:`projected_gradient` of the
        concatenated bases). Shape ``(r + u_extra.shape[1], r + v_extra.shape[1])``.
        """
        self._check_recorded()
        if any(xu is None or dy_v is None for xu, dy_v in zip(self.input_coords, self.output_coords)):
            raise RuntimeError("a recorded pass has no X U / Delta V coordinates (added without xu, dy_v)")
        return sum(
            torch.cat([xu, skinny_mm(x, u_extra)], 1).mT @ torch.cat([dy_v, skinny_mm(dy, v_extra)], 1)
            for x, dy, xu, dy_v in zip(self.inputs, self.output_grads, self.input_coords, self.output_coords)
        )


class _LowRankProduct(torch.autograd.Function):
    """``y = ((x U) S) V^T (+ b)`` for 2-D ``x``, with a backward that reuses ``G V`` and ``G^T U``.

    Backward, for ``Delta = dL/dy`` and ``G = x^T Delta`` (never formed):
    ``G V = x^T (Delta V)``, ``G^T U = Delta^T (x U)``, and
    ``dL/dx = Delta V S^T U^T``, ``dL/dU = (G V) S^T``, ``dL/dS = (x U)^T (Delta V)``, ``dL/dV = (G^T U) S``,
    ``dL/db = sum_rows Delta``. ``G V`` and ``G^T U`` go to the ``sink``; ``dL/dU`` and ``dL/dV`` are skipped
    when the sink's ``basis_grads`` is off.
    """

    @staticmethod
    def forward(ctx, x: Tensor, u: Tensor, s: Tensor, v: Tensor, bias: Tensor | None,
                sink: GradientSink | None) -> Tensor:
        xu = skinny_mm(x, u)
        ctx.save_for_backward(x, xu, u, s, v)
        ctx.sink = sink
        return _affine(xu @ s, v.T, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, xu, u, s, v = ctx.saved_tensors
        sink, need = ctx.sink, ctx.needs_input_grad
        collect = sink is not None and sink.active
        basis_grads = sink is None or sink.basis_grads
        dy_v = skinny_mm(dy, v)
        k_grad = weight_gradient(x, dy_v) if collect or (need[1] and basis_grads) else None
        l_grad = weight_gradient(dy, xu) if collect or (need[3] and basis_grads) else None
        if collect:
            sink.add(x, dy, k_grad, l_grad, xu, dy_v)
        grad_x = skinny_mm(dy_v @ s.T, u.T) if need[0] else None
        grad_u = k_grad @ s.T if need[1] and basis_grads else None
        grad_s = xu.T @ dy_v if need[2] else None
        grad_v = l_grad @ s if need[3] and basis_grads else None
        grad_b = dy.sum(0) if need[4] else None
        return grad_x, grad_u, grad_s, grad_v, grad_b, None


def _affine(a: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """``a w + b``; the bias is fused into the product (``addmm``) unless ``w`` is skinny (:func:`skinny_mm`)."""
    if bias is None:
        return skinny_mm(a, w)
    if w.shape[-1] < 16:
        return skinny_mm(a, w) + bias
    return torch.addmm(bias, a, w)


def low_rank_product(x: Tensor, u: Tensor, s: Tensor, v: Tensor, sink: GradientSink | None = None,
                     bias: Tensor | None = None) -> Tensor:
    """``x U S V^T (+ b)`` for ``x`` of shape ``(*, n_in)``, never forming ``U S V^T``."""
    if x.dim() == 2:  # no reshapes (and no view nodes in the autograd graph) for the usual batch of rows
        return _LowRankProduct.apply(x, u, s, v, bias, sink)
    flat = x.reshape(-1, x.shape[-1])
    return _LowRankProduct.apply(flat, u, s, v, bias, sink).reshape(*x.shape[:-1], v.shape[0])


class _DenseProduct(torch.autograd.Function):
    """``y = x W (+ b)`` for 2-D ``x``: ``dL/dx = Delta W^T``, ``dL/dW = x^T Delta``, ``dL/db = sum_rows Delta``.

    The same map and gradients as autograd's ``x @ W + b``, with the products ordered for speed
    (:func:`skinny_mm`, :func:`weight_gradient`) and the bias fused into the forward product.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        return _affine(x, w, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x = dy @ w.T if need[0] else None
        grad_w = weight_gradient(x, dy) if need[1] else None
        grad_b = dy.sum(0) if need[2] else None
        return grad_x, grad_w, grad_b


def dense_product(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x W (+ b)`` for ``x`` of shape ``(*, n_in)`` and ``W`` of shape ``(n_in, n_out)``."""
    if x.dim() == 2:
        return _DenseProduct.apply(x, w, bias)
    flat = x.reshape(-1, x.shape[-1])
    return _DenseProduct.apply(flat, w, bias).reshape(*x.shape[:-1], w.shape[1])


class _Affine(nn.Module):
    """Shared bias handling of the three layers: ``in_features``, ``out_features`` and an optional bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, init: str, init_scale: float) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.init = init
        self.init_scale = init_scale
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def reset_bias(self) -> None:
        if self.bias is None:
            return
        with torch.no_grad():
            if self.init == "normal":
                self.bias.normal_()
            else:
                self.bias.zero_()


class Dense(_Affine):
    """Fully connected layer ``z = x W + b``.

    Args:
        in_features: ``n_in``, size of each input sample.
        out_features: ``n_out``, size of each output sample.
        bias: learn an additive bias ``b`` of shape ``(n_out,)``.
        init: ``"kaiming"`` (``N(0, 2/n_in)``) or ``"normal"`` (``N(0, 1)``).
        init_scale: ``c > 0``, the initial ``W`` is ``c`` times the draw.

    Shapes: input ``(*, n_in)``, output ``(*, n_out)``, ``weight`` ``(n_in, n_out)`` (the transpose of
    ``torch.nn.Linear.weight``, to match ``Z = A W + b``). Parameters ``n_in n_out + n_out``; cost per sample
    ``2 n_in n_out`` multiply-adds.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: str = "kaiming",
                 init_scale: float = 1.0) -> None:
        check_init(init, init_scale, DENSE_INITS)
        super().__init__(in_features, out_features, bias, init, init_scale)
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "normal":
                self.weight.normal_()
            else:
                self.weight.copy_(kaiming_dense(self.in_features, self.out_features))
            self.weight.mul_(self.init_scale)
        self.reset_bias()

    def forward(self, x: Tensor) -> Tensor:
        return dense_product(x, self.weight, self.bias)

    def weight_matrix(self) -> Tensor:
        """``W``, shape ``(n_in, n_out)``, detached."""
        return self.weight.detach()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Dense":
        """The map of ``linear`` as a :class:`Dense`: ``weight = linear.weight^T`` (``(n_in, n_out)``), the same bias,
        dtype and device. The caller's random state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer = layer.to(dtype=linear.weight.dtype, device=linear.weight.device)
        return copy_parameters(layer, linear.weight.T, linear.bias)

    def to_linear(self) -> nn.Linear:
        """The same map as a ``torch.nn.Linear`` (``linear.weight = weight^T``, ``(n_out, n_in)``)."""
        with torch.random.fork_rng(devices=[]):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                               dtype=self.weight.dtype, device=self.weight.device)
        return copy_parameters(linear, self.weight.T, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _Factorised(_Affine):
    """What the two factorised layers share: ``W = U S V^T`` (``U V^T`` without ``S``) and the conversions.

    Each subclass defines ``approximate_(weight)``: set its factors, in place, to the best rank-``r``
    approximation ``P_r Sigma_r Q_r^T`` of a dense ``weight``."""

    def weight_matrix(self) -> Tensor:
        """``W = U S V^T`` (or ``U V^T``), shape ``(n_in, n_out)``, detached."""
        s = self.S if self.S is not None else torch.eye(self.rank, dtype=self.U.dtype, device=self.U.device)
        return (self.U @ s @ self.V.T).detach()

    def to_dense(self) -> Dense:
        """A :class:`Dense` layer with ``W = U S V^T`` and the same bias (the caller's random state is kept)."""
        with torch.random.fork_rng(devices=[]):
            dense = Dense(self.in_features, self.out_features, bias=self.bias is not None)
        dense = dense.to(dtype=self.U.dtype, device=self.U.device)
        return copy_parameters(dense, self.weight_matrix(), self.bias)

    @classmethod
    def from_dense(cls, dense: Dense, rank: int, **kwargs):
        """The best rank-``rank`` approximation of ``dense`` (truncated SVD, :meth:`approximate_`), with its bias.

        ``kwargs`` are the layer's other constructor arguments (``factorization``, ``tau``, ``r_max``, ...); the
        caller's random state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            layer = cls(dense.in_features, dense.out_features, rank, bias=dense.bias is not None, **kwargs)
        layer = layer.to(dtype=dense.weight.dtype, device=dense.weight.device)
        layer.approximate_(dense.weight)
        return copy_parameters(layer, None, dense.bias)


class LowRank(_Factorised):
    """Vanilla low-rank layer of fixed rank: ``z = x U S V^T + b`` (or ``x U V^T + b``).

    All factors are ordinary parameters trained by any ``torch.optim`` optimiser.

    Args:
        in_features, out_features, bias: as in :class:`Dense`.
        rank: ``r``, ``1 <= r <= min(n_in, n_out)``.
        factorization: ``"usv"`` (``W = U S V^T``) or ``"uv"`` (``W = U V^T``, no ``S``).
        init: one of :data:`INITS`, each described in ``help(lowrank.layers)``.
        init_scale: ``c > 0``, the initial ``W`` is ``c`` times the draw.

    Shapes: ``U`` ``(n_in, r)``, ``S`` ``(r, r)``, ``V`` ``(n_out, r)``. Parameters
    ``r (n_in + n_out + r) + n_out`` (``r (n_in + n_out) + n_out`` for ``"uv"``); cost per sample
    ``2 r (n_in + n_out + r)`` multiply-adds.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        factorization: str = "usv",
        init: str = "kaiming",
        init_scale: float = 1.0,
    ) -> None:
        check_init(init, init_scale)
        if factorization not in FACTORIZATIONS:
            raise ValueError(f"factorization = {factorization!r} is not one of {FACTORIZATIONS}")
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank = {rank} must be in 1..min(in_features, out_features) = {min(in_features, out_features)}")
        super().__init__(in_features, out_features, bias, init, init_scale)
        self.rank = rank
        self.factorization = factorization
        self.U = nn.Parameter(torch.empty(in_features, rank))
        self.S = nn.Parameter(torch.empty(rank, rank)) if factorization == "usv" else None
        self.V = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        u, s, v = initial_factors(self.in_features, self.out_features, self.rank, self.init, self.init_scale)
        with torch.no_grad():
            if self.S is None and self.init != "normal":  # S = A diag(sigma) B^T: U A sigma^{1/2}, V B sigma^{1/2}
                left, sigma, right_t = torch.linalg.svd(s)
                u, v = (u @ left) * sigma.sqrt(), (v @ right_t.T) * sigma.sqrt()
            elif self.S is None:  # the student study's N(0, 1) U and V, each scaled by sqrt(c)
                u, v = u * math.sqrt(self.init_scale), v * math.sqrt(self.init_scale)
            if self.S is not None:
                self.S.copy_(s)
            self.U.copy_(u)
            self.V.copy_(v)
        self.reset_bias()

    def forward(self, x: Tensor) -> Tensor:
        s = self.S if self.S is not None else torch.eye(self.rank, dtype=x.dtype, device=x.device)
        return low_rank_product(x, self.U, s, self.V, bias=self.bias)

    @torch.no_grad()
    def approximate_(self, weight: Tensor) -> None:
        """``U = P_r, S = Sigma_r, V = Q_r``, or the balanced ``U = P_r Sigma_r^{1/2}, V = Q_r Sigma_r^{1/2}``
        without ``S``: either way ``U S V^T`` is the best rank-``r`` approximation of ``weight``."""
        p, sigma, q = truncated_svd(weight, self.rank)
        if self.S is None:
            root = sigma.sqrt()
            self.U.copy_(p * root)
            self.V.copy_(q * root)
        else:
            self.U.copy_(p)
            self.S.copy_(torch.diag(sigma))
            self.V.copy_(q)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"factorization={self.factorization!r}, bias={self.bias is not None}"
        )


class DynamicalLowRank(_Factorised):
    """Dynamical low-rank layer ``z = x U S V^T + b``, trained by :class:`lowrank.optim.DLRT`.

    ``U`` and ``V`` keep orthonormal columns; the DLRT optimiser updates them by the K- and L-steps
    (QR of ``[U S - h G V, U]`` and ``[V S^T - h G^T U, V]``), ``S`` by the S-step, and, when
    ``adaptive``, truncates the augmented ``2r x 2r`` coefficient matrix by SVD to the smallest rank
    whose discarded singular values have norm at most ``tau`` times the norm of all of them, clamped to
    ``[r_min, r_max]``. With ``adaptive=False`` the rank stays ``rank`` (no augmentation, no truncation).
    The rank therefore changes during training: ``U``, ``S``, ``V`` keep their ``Parameter`` objects but
    change shape, and ``load_state_dict`` accepts a checkpoint of any rank.

    Args:
        in_features, out_features, bias: as in :class:`Dense`.
        rank: initial rank ``r``, ``r_min <= r <= r_max``.
        r_max: largest rank, ``<= min(n_in, n_out)``; default ``min(n_in, n_out)``.
        r_min: smallest rank after truncation, ``>= 1``.
        tau: relative truncation tolerance, ``0 <= tau < 1``.
        adaptive: rank-adaptive (augment and truncate) or fixed rank.
        grow: whether a truncation may keep more than the rank its step (or cycle) started from; ``False`` is
            the rule of the DLRT authors' LeNet5 code (at most ``floor(len(d) / 2)`` of the ``2r`` singular
            values ``d``): the rank can only fall.
        init: one of :data:`INITS`, each described in ``help(lowrank.layers)``.
        init_scale: ``c > 0``, the initial ``W`` is ``c`` times the draw; default (``None``)
            :data:`DYNAMICAL_INIT_SCALE` for ``"kaiming"``, which leaves the spectrum to training (module
            docstring), 1 for the other inits.

    Shapes: ``U`` ``(n_in, r)``, ``S`` ``(r, r)``, ``V`` ``(n_out, r)``; parameters
    ``r (n_in + n_out + r) + n_out``; cost per sample ``2 r (n_in + n_out + r)`` multiply-adds.

    ``sink`` (a :class:`GradientSink`) receives the exact K- and L-step gradients ``G V`` and ``G^T U``
    of each backward pass.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        r_max: int | None = None,
        r_min: int = 1,
        tau: float = 0.1,
        adaptive: bool = True,
        init: str = "kaiming",
        init_scale: float | None = None,
        grow: bool = True,
    ) -> None:
        if init_scale is None:
            init_scale = DYNAMICAL_INIT_SCALE if init == "kaiming" else 1.0
        check_init(init, init_scale)
        r_max = min(in_features, out_features) if r_max is None else r_max
        if not 1 <= r_min <= rank <= r_max <= min(in_features, out_features):
            raise ValueError(
                f"need 1 <= r_min ({r_min}) <= rank ({rank}) <= r_max ({r_max}) <= min(in_features, "
                f"out_features) ({min(in_features, out_features)})"
            )
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"tau = {tau} must be in [0, 1)")
        super().__init__(in_features, out_features, bias, init, init_scale)
        self.r_max, self.r_min, self.tau, self.adaptive, self.grow = r_max, r_min, tau, adaptive, grow
        self.initial_rank = rank
        self.sink = GradientSink()
        self.U = nn.Parameter(torch.empty(in_features, rank))
        self.S = nn.Parameter(torch.empty(rank, rank))
        self.V = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    @property
    def rank(self) -> int:
        """The current rank ``r`` (number of columns of ``U``)."""
        return self.U.shape[1]

    def reset_parameters(self) -> None:
        u, s, v = initial_factors(self.in_features, self.out_features, self.initial_rank, self.init, self.init_scale)
        if self.init == "normal":  # DLRT needs orthonormal bases; keep the student study's N(0, 1) S
            u, v = torch.linalg.qr(u)[0], torch.linalg.qr(v)[0]
        self.set_factors(u, s, v)
        self.reset_bias()

    @torch.no_grad()
    def set_factors(self, u: Tensor, s: Tensor, v: Tensor) -> None:
        """Replace ``U, S, V`` (any rank), keeping the ``Parameter`` objects the optimiser holds."""
        for param, value in ((self.U, u), (self.S, s), (self.V, v)):
            if value.dtype != param.dtype or value.device != param.device:
                value = value.to(dtype=param.dtype, device=param.device)
            param.data = value.contiguous()
            param.grad = None

    def forward(self, x: Tensor) -> Tensor:
        sink = self.sink if torch.is_grad_enabled() else None
        return low_rank_product(x, self.U, self.S, self.V, sink, self.bias)

    def approximate_(self, weight: Tensor) -> None:
        """``U = P_r, S = Sigma_r, V = Q_r`` at the current rank ``r``: orthonormal bases, as DLRT needs."""
        p, sigma, q = truncated_svd(weight, self.rank)
        self.set_factors(p, torch.diag(sigma), q)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        shapes = [state_dict.get(prefix + name) for name in ("U", "S", "V")]
        if all(t is not None for t in shapes):
            self.set_factors(*(torch.empty_like(t) for t in shapes))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"r_min={self.r_min}, r_max={self.r_max}, tau={self.tau}, adaptive={self.adaptive}, "
            f"{'' if self.grow else 'grow=False, '}bias={self.bias is not None}"
        )

