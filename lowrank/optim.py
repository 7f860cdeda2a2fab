"""The DLRT step (K, L and S steps, SVD truncation) as a ``torch.optim``-style optimiser.

For a :class:`~lowrank.layers.DynamicalLowRank` layer with ``W = U S V^T``, learning rate ``h`` and the loss
gradient ``G = dL/dW`` (never formed: the layer's backward pass leaves ``G V`` and ``G^T U``), one step is

1. K-step: ``K = U S - h G V``;  L-step: ``L = V S^T - h G^T U``.
2. New bases: rank-adaptive ``U_hat = orth([K, U])``, ``V_hat = orth([L, V])`` (up to ``2r`` columns);
   fixed rank ``U_hat = orth(K)``, ``V_hat = orth(L)``. Then ``M = U_hat^T U``, ``N = V_hat^T V`` and
   ``S_hat = M S N^T``.

   Rank-adaptive, the basis is built as ``U_hat = [U, Q_U]`` with ``Q_U`` an orthonormal basis of
   ``(I - U U^T) D_K``, where ``K = U S - h D_K`` (``D_K`` the update direction, ``G V`` for plain SGD): since
   ``U S`` lies in ``span(U)``, ``span([K, U]) = span([U, D_K])``, and this basis keeps ``U`` as its first
   ``r`` columns, so that ``M = [I; 0]``, ``N = [I; 0]`` and ``S_hat = [[S, 0], [0, 0]]`` need no products.
   ``K`` itself is never formed. ``Q_U`` holds only the numerically independent new directions (possibly
   fewer than ``r``); see :func:`augmented_basis`.
3. S-step: ``S_hat <- S_hat - h U_hat^T G(U_hat S_hat V_hat^T) V_hat``.
4. Rank-adaptive only: truncate ``S_hat = P diag(d) Q^T`` to the smallest ``r1`` with
   ``||d[r1:]|| <= tau ||d||``, clamped to ``[r_min, r_max]`` and moved to the edge of a cluster of nearly
   equal singular values (within :data:`CLUSTER_RTOL`), so that rounding never chooses among them;
   ``U = U_hat P_r1``, ``S = diag(d[:r1])``, ``V = V_hat Q_r1``.

``G V`` and ``G^T U`` are the exact gradients of the loss with respect to ``K`` (``W = K V^T``) and ``L``
(``W = U L^T``); the factor gradient ``dL/dU = G V S^T`` is not (``(dL/dU) S^{-T}`` would be, at a cost
and a risk when ``S`` is ill-conditioned).

Two integrators compute the S-step gradient of step 3:

``"kls"``
    the classic one: after steps 1-2 the optimiser installs ``(U_hat, S_hat, V_hat)`` and calls the
    closure again (a second forward and backward pass), then reads ``dL/dS_hat``.
``"single-pass"``
    reuses the first pass. Rank-adaptive: ``U_hat S_hat V_hat^T = U S V^T`` because ``U`` and ``V`` lie in
    the spans of ``U_hat`` and ``V_hat``, so ``G`` is unchanged and ``U_hat^T G V_hat = sum (X U_hat)^T
    (Delta V_hat)`` from the layer inputs ``X`` and output gradients ``Delta`` of that pass: the same step
    as ``"kls"`` for one backward pass. With ``U_hat = [U, Q_U]`` the products ``X U`` and ``Delta V`` of the
    pass are reused, so only ``X Q_U`` and ``Delta Q_V`` are new. Fixed rank: ``S_hat`` changes ``W``, and the
    single pass uses the gradient at the old weights (an explicit, first-order-consistent variant, like the
    parallel BUG integrator of Ceruti, Kusch and Lubich).

Update rules for the three factors: ``"sgd"`` (optionally with momentum) or ``"adam"``. Their state
(momentum, Adam's first and second moments) is expressed in the current bases, so when the bases change
it must follow them. ``basis_state="project"`` (default) maps first moments to the new coordinates
(``m_K <- m_K V^T V_new``, ``m_L <- m_L U^T U_new``, ``m_S <- U_new^T U m_S V^T V_new``; rank-adaptive, with
``U_new = U_hat P_r1``, ``U^T U_new`` is the first ``r`` rows of ``P_r1``) and second moments
with the element-wise squares of the same matrices (exact for a permutation of basis vectors, a
non-negative approximation otherwise); ``basis_state="reset"`` drops the state at every step, which turns
Adam into a sign-like update of the first step.

Augmented local iterations, for ``basis_interval = k`` (the schedule of the public RobustDLRT code): cycles of
``k`` steps, one forward and backward pass each, with no QR or SVD between the first and the last step of a
cycle. ``k = 1`` is the step above.

1. Step 1 of a cycle augments, ``U_hat = [U, Q_U]``, ``V_hat = [V, Q_V]`` (:func:`augmented_basis` of the K- and
   L-step directions, as above) and ``S_hat = [[S, 0], [0, 0]]``, which leaves ``W = U_hat S_hat V_hat^T =
   U S V^T`` unchanged, installs ``(U_hat, S_hat, V_hat)`` as the layer's factors and takes the S-step with
   ``U_hat^T G V_hat`` (single pass or kls, as above).
2. Steps 2 to ``k`` are S-steps on the fixed augmented bases. The layer's parameters are the augmented factors,
   so autograd's ``S.grad = (X U_hat)^T (Delta V_hat) = U_hat^T G V_hat`` is the S-step gradient and each step
   is the SGD or Adam step of ``torch.optim`` on ``S_hat`` with ``U_hat``, ``V_hat`` fixed.
3. After the S-step of step ``k``, the truncation of step 4 above: ``U = U_hat P_r1``, ``S = diag(d[:r1])``,
   ``V = V_hat Q_r1``, with the rank ``r1`` of the rank test below.

Between steps 1 and ``k`` the layer holds the augmented factors (``layer.rank`` is then the number of columns
of ``U_hat``, and ``S`` may be rectangular); the layer's and the optimiser's ``state_dict`` taken there load
into a new layer and optimiser that continue the run bit-identically. :meth:`DLRT.finish_cycle` truncates at
once (an epoch's end, before an evaluation that should see the truncated network); the next step starts a
new cycle. Fixed-rank layers take the step above (new bases) on step 1 of a cycle and S-steps on those bases
until its end.

The rank test (``rank_test=``) at the end of a cycle of ``j`` S-steps. The coefficients outside the cycle's
starting ``r x r`` block (the *new block*) held zero at the augmentation, so what they hold at the end is the
sum of ``j`` steps. Under Adam a step moves every coordinate by about ``h`` whatever the size of its gradient
(``m_hat / sqrt(v_hat)`` is about the sign of ``g`` for a coordinate without history), so the new block's norm
grows with ``j`` and with its number of coordinates, about ``3 r^2``, even where the gradient is noise:
steps of independent signs add to ``sqrt(j) h`` per coordinate, ``sqrt(3 j) h r`` in all. The truncation
keeps the new directions unless that norm is below ``tau ||S_hat||_F``, so the rank grows once
``r > tau ||S_hat||_F / (sqrt(3 j) h)``, and a larger rank adds a larger new block: the rank runs away to
``r_max`` when ``||S||_F`` is small (a small ``init_scale``) or ``j h`` large.

``"per-step"`` (default)
    ``r1`` is the rank that the tolerance gives for ``S_hat`` with its new block divided by ``sqrt(j)``: the
    new block's noise is then that of one step, as in the step above (``k = 1``), whose ranks do not run
    away, while a direction that the ``j`` steps moved coherently still counts ``sqrt(j)`` times one step.
    The truncation keeps the ``r1`` leading singular triplets of ``S_hat`` itself (clusters kept whole, as
    above); only the choice of ``r1`` sees the scaled block. Its singular values cost one more ``2r x 2r``
    decomposition per cycle. For ``j = 1`` it is the plain rule.
``"accumulated"``
    ``r1`` from the singular values of ``S_hat`` itself (the rule of the step above applied once per cycle).

The state (``basis_state="project"``): the augmentation maps ``m_S`` to ``[[m_S, 0], [0, 0]]`` (the change of
basis with ``M = [I; 0]``, ``N = [I; 0]``: the old coordinates keep their vectors, the new ones start empty),
and, when the cycle goes on (``k > 1``), pads the K state (``(n_in, r)``, in the coordinates of ``V``) with zero
columns for ``Q_V`` and the L state with zero columns for ``Q_U``, so that until the truncation every state
is in the coordinates of ``U_hat`` and ``V_hat``. The truncation maps ``m_S <- P_r1^T m_S Q_r1``,
``m_K <- m_K Q_r1`` (``V_hat^T V_new = Q_r1``), ``m_L <- m_L P_r1``, and the second moments with the squares of
the same matrices. ``basis_state="reset"`` drops the state at the truncation.

Adam's step count of the coefficients (``new_coordinates=``):

``"shared"`` (default)
    one count ``t`` per tensor, as ``torch.optim.Adam`` keeps it. A coordinate that the augmentation adds
    starts with ``m = v = 0`` but the count of ``S``, so its first direction is
    ``(1 - beta1) g / (1 - beta1^t) / (sqrt((1 - beta2) g^2 / (1 - beta2^t)) + eps)``, about
    ``(1 - beta1) / sqrt(1 - beta2) = 3.2`` times the sign of ``g`` at large ``t`` (1.35 at ``t = 200``)
    instead of 1.
``"per-coordinate"``
    ``S`` carries a count ``t_ij`` per coordinate (state ``"coordinate_steps"``, of the shape of ``S``): every
    step advances it by one and the bias corrections ``1 - beta^t_ij`` are taken element-wise
    (:func:`lowrank.torch_compat.adam_directions_per_coordinate`). The augmentation gives the new block
    ``t = 0`` with its zero moments, so a new coordinate's first direction is ``g / (|g| + eps)``: a step of
    ``h``, as for a new parameter of ``torch.optim.Adam``. The truncation maps ``t`` like the second moment,
    ``t <- (P_r1^T)^2 t Q_r1^2``: the columns of ``P_r1`` and ``Q_r1`` are unit vectors, so each new count is
    a weighted mean of the old ones, with the weights of the second moment, and a permutation of the basis
    carries the counts exactly. (The fixed-rank change of basis maps ``t`` with ``M^2``, ``N^2`` alike: a
    coordinate partly outside the old span counts as partly new, as its second moment does.) The K and L
    states keep one count per tensor.

Weight decay ``lambda`` on ``W`` adds ``lambda W`` to ``G``, that is ``lambda K``, ``lambda L`` and
``lambda S_hat`` to the three gradients.

Ordinary parameters (dense layers, vanilla low-rank factors, the biases of dynamical layers) are left to a
``torch.optim`` optimiser; :func:`build_optimizer` pairs the two.

Cost, per rank-adaptive layer and step, besides the forward/backward pass: two Householder QRs of
``n x r`` matrices (instead of ``n x 2r``) and the two ``r x r`` SVDs of their ``R`` factors that reveal
their numerical rank, about a dozen ``(n, r) x (r, r)`` products (projections, ``U_hat P``, the state's
change of basis), one ``2r x 2r`` decomposition (:func:`truncate`: the eigendecomposition of a Gram matrix
in float64 for float32 training, an SVD otherwise), and for the single-pass integrator ``X Q_U`` and
``Delta Q_V`` (``B n r`` each). The Adam directions of all factors are computed by one fused kernel call.
With ``basis_interval = k`` this work is done once per cycle (the QRs on its first step, the decompositions
on its last). ``python -m lowrank benchmark``
(:mod:`lowrank.engine.experiments.benchmark`) measures the step against a dense network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowrank.choices import BASIS_STATES, INTEGRATORS, NEW_COORDINATES, OPTIMIZERS, RANK_TESTS
from lowrank.layers import DynamicalLowRank
from lowrank.torch_compat import adam_directions, adam_directions_per_coordinate, momentum_update_

# Rank-adaptive steps check (and restore) the orthonormality of U and V every this many steps; the drift of
# a step is ~2-3 eps in float32, so between checks U^T U - I stays below ~30 eps.
ORTHONORMALITY_CHECK_INTERVAL = 4
# Singular values within this fraction of each other are one cluster, kept or dropped whole by the
# truncation (truncated_rank): rounding of relative size eps then moves the kept part by at most about
# eps / 1e-2 (1e-5 for float32's 1e-7), however close the singular values inside the cluster are.
CLUSTER_RTOL = 1e-2
# gram_truncation is used only when every kept singular value is at least this fraction of the largest:
# its errors, eps64 (d_1 / d_i)^2 <= 2e-10, then stay below float32's rounding.
GRAM_MIN_RATIO = 1e-3


def orthonormal_basis(columns: Tensor) -> Tensor:
    """Orthonormal basis of the column space of ``columns`` (reduced QR), shape ``(n, min(n, k))``."""
    return torch.linalg.qr(columns).Q


def augmented_basis(u: Tensor, directions: Tensor) -> Tensor:
    """Orthonormal ``Q`` with ``[U, Q]`` an orthonormal basis of ``span([U, D])``, for ``U`` with orthonormal columns.

    ``U`` ``(n, r)``, ``D`` ``(n, k)``; returns ``(n, k')`` with ``k' <= min(k, n - r)`` the numerical rank of the
    new part of ``D``. Steps: two Gram-Schmidt projections ``P = (I - U U^T)^2 D`` (the second brings
    ``U^T P`` from ``eps ||D|| ||U^T D||`` to ``eps ||D||``), a Householder QR ``P = Q_P R``, and the SVD
    ``R = A diag(sigma) B^T`` of the small ``R`` (:func:`robust_svd`), so that ``P = (Q_P A) diag(sigma) B^T``. Only the
    columns of ``Q_P A`` with ``sigma_i > max(n, k) eps ||D||_F`` are kept: the others are rounding.

    Why not all ``k`` columns: when ``P`` is numerically rank-deficient (a batch smaller than the rank, a
    direction that lies in ``span(U)``), the columns of a QR basis beyond its numerical rank are set by
    rounding, and the S-step gives them gradient (``U_hat^T G V_hat`` is not zero on them): two
    factorisations of the same ``W``, or two CPUs, would then take different steps (measured: 1e-3 relative
    in ``W`` after three steps at ``tau = 0``, in float32 and float64 alike). A last projection
    ``Q <- Q - U (U^T Q)`` (skipped when ``max |U^T Q| <= 4 eps``, the usual case) keeps ``[U, Q]``
    orthonormal to ``O(eps)``.
    """
    r, n = u.shape[1], u.shape[0]
    p = torch.addmm(directions, u, u.T @ directions, alpha=-1)
    p = torch.addmm(p, u, u.T @ p, alpha=-1)
    q, upper = torch.linalg.qr(p)
    left, sigma, _ = robust_svd(upper)
    noise = max(n, directions.shape[1]) * torch.finfo(directions.dtype).eps
    kept = min(int((sigma > noise * float(torch.linalg.matrix_norm(directions))).sum()), n - r)
    q = q @ left[:, :kept]
    overlap = u.T @ q
    if kept and float(torch.linalg.vector_norm(overlap, float("inf"))) > 4 * torch.finfo(q.dtype).eps:
        q = torch.addmm(q, u, overlap, alpha=-1)
    return q


def restore_orthonormality(u: Tensor, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The same ``W = U S V^T`` with ``U^T U = V^T V = I`` to ``16 eps``: ``U = U_o R_U`` (Cholesky QR) if it drifted.

    ``U_new = [U, Q_U] P`` carries the rounding of every step into ``U^T U - I`` (``~3e-7`` a step in
    float32), which a fresh QR of ``[K, U]`` would reset; the DLRT step calls this every
    ``ORTHONORMALITY_CHECK_INTERVAL`` steps. When ``max |U^T U - I| > 16 eps``, ``R_U`` is the Cholesky factor
    of ``U^T U = R_U^T R_U``, ``U <- U R_U^{-1}`` and ``S <- R_U S`` (likewise ``V``, ``S <- S R_V^T``), so ``W``
    is unchanged. The optimiser state is not mapped for this ``I + O(1e-6)`` change of basis.
    """
    tolerance = 16 * torch.finfo(u.dtype).eps
    factors = []
    for basis in (u, v):
        gram = basis.T @ basis
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        if float(torch.dist(gram, eye, float("inf"))) <= tolerance:
            factors.append((basis, None))
            continue
        upper = torch.linalg.cholesky(gram, upper=True)
        factors.append((torch.linalg.solve_triangular(upper, basis, upper=True, left=False), upper))
    (u, r_u), (v, r_v) = factors
    if r_u is not None:
        s = r_u @ s
    if r_v is not None:
        s = s @ r_v.T
    return u, s, v


def truncated_rank(singular_values: Tensor, tau: float, r_min: int, r_max: int, cluster_gap: float = 0.0,
                   rank: int | None = None) -> int:
    """Smallest ``r1`` with ``||d[r1:]||_2 <= tau ||d||_2``, clamped to ``[r_min, min(r_max, len(d))]``, that
    does not split a cluster of nearly equal singular values.

    ``singular_values`` is ``d``, sorted in decreasing order. The tail norms ``||d[i:]||`` decrease with
    ``i``, so the tolerance alone gives ``r1`` = the number of them above ``tau ||d||``. ``rank``, if given,
    replaces that count (a rank decided by another rule, :func:`cycle_rank`); the clamp and the clusters apply
    as below.

    Clusters: ``d[i]`` and ``d[i + 1]`` belong together when ``d[i] - d[i + 1] <= cluster_gap * d[i]``. Which of
    two nearly equal singular values is kept is decided by rounding, and the kept singular vectors move by
    ``(rounding) / (gap)``: a cut inside a cluster makes the step depend on the factorisation of ``W`` and on
    the CPU's kernels. So ``r1`` moves up to the end of its cluster (the error only shrinks); if ``r_max``
    cuts the cluster, down to its start instead (the clamp, not ``tau``, sets the error then), but not below
    ``r_min``. ``cluster_gap = 0`` cuts anywhere.
    """
    values = singular_values.tolist()  # d is short (2r): plain Python is faster
    r1 = tolerance_rank(values, tau) if rank is None else rank
    upper = min(r_max, len(values))
    r1 = max(r_min, min(r1, upper))

    def inside_cluster(cut: int) -> bool:  # the cut between d[cut - 1] and d[cut] splits a cluster
        return 0 < cut < len(values) and values[cut - 1] - values[cut] <= cluster_gap * values[cut - 1]

    end = r1
    while end < upper and inside_cluster(end):
        end += 1
    if not inside_cluster(end):
        return end
    while r1 > r_min and inside_cluster(r1):
        r1 -= 1
    return r1


def tolerance_rank(values: list[float], tau: float) -> int:
    """The number of tail norms ``||d[i:]||_2`` above ``tau ||d||_2``: the smallest ``r1`` with
    ``||d[r1:]|| <= tau ||d||``, for ``d`` (``values``) sorted in decreasing order."""
    tail = [value * value for value in values]
    for i in range(len(tail) - 2, -1, -1):
        tail[i] += tail[i + 1]
    return sum(1 for value in tail if math.sqrt(value) > tau * math.sqrt(tail[0])) if tail else 0


def cycle_rank(s_hat: Tensor, start: tuple[int, int], steps: int, tau: float) -> int:
    """The rank test of an augmented cycle (``rank_test="per-step"``, module docstring): :func:`tolerance_rank`
    of the singular values of ``S_hat`` with its new block divided by ``sqrt(steps)``.

    ``S_hat`` ``(r_U, r_V)`` holds the cycle's starting coefficients in its leading ``start = (r, c)`` block and
    what ``steps`` S-steps added everywhere else (the new block, zero at the augmentation). The scaled matrix
    ``T = S_hat / sqrt(steps)`` with ``T[:r, :c] = S_hat[:r, :c]`` is decomposed in float64.
    """
    rows, cols = start
    test = s_hat.double() / math.sqrt(steps)
    test[:rows, :cols] = s_hat[:rows, :cols]
    return tolerance_rank(torch.linalg.svdvals(test).tolist(), tau)


def truncate(s_hat: Tensor, tau: float, r_min: int, r_max: int, rank: int | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
    """SVD truncation of the coefficient matrix: ``(P_r1, d[:r1], Q_r1)`` with ``S_hat ~ P diag(d) Q^T``.

    ``r1`` is :func:`truncated_rank` (of ``rank``, if given, instead of the tolerance's count) with clusters of
    relative gap :data:`CLUSTER_RTOL` kept whole. Without ``rank``, the discarded part has Frobenius norm
    ``||d[r1:]|| <= tau ||S_hat||_F`` unless the clamp to ``r_max`` forces a larger error.

    The decomposition is computed in float64 whatever the dtype of ``S_hat``: its singular vectors become
    the next bases, and a float32 SVD made the step depend more on the factorisation of ``W``. Measured with
    ``test_a_step_depends_on_w_not_on_its_factorisation`` over 48 float32 cases (seeds 0-5): the relative
    difference of ``W`` after three steps has median 7e-7 with a float64 decomposition and 4e-6 with a
    float32 SVD (9 cases above 3e-5 instead of 5). For float32 (or lower) ``S_hat`` the float64
    decomposition is :func:`gram_truncation`, 1.4-1.8x faster than the SVD, when it is accurate enough.
    """
    if s_hat.dtype != torch.float64:
        truncated = gram_truncation(s_hat, tau, r_min, r_max, rank)
        if truncated is not None:
            return truncated
    p, d, qt = robust_svd(s_hat, torch.float64)
    r1 = truncated_rank(d, tau, r_min, r_max, CLUSTER_RTOL, rank)
    return p[:, :r1], d[:r1], qt[:r1].T


def gram_truncation(s_hat: Tensor, tau: float, r_min: int, r_max: int, rank: int | None = None
                    ) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`truncate` of a single-precision ``S_hat`` from the eigendecomposition of its Gram matrix, in float64;
    ``None`` when that is not accurate to the precision of ``S_hat``.

    With ``A = S_hat`` in float64 (exact) and ``A^T A = Q diag(lambda) Q^T`` (``lambda`` decreasing; the smaller
    side's Gram matrix, ``A A^T`` for a wide ``A``), ``d = sqrt(lambda)`` and the kept left vectors are
    ``P_r1 = A Q_r1 diag(d[:r1])^{-1}``. The eigensolver's errors are ``eps64 d_1^2`` in ``lambda``, so ``d_i``
    and the orthonormality of ``P_r1`` are off by about ``eps64 (d_1 / d_i)^2``: below float32's rounding
    (``6e-8``) when every kept ``d_i >= GRAM_MIN_RATIO d_1``, the case of every truncation at ``tau > 0`` in
    the report's training runs. A smaller kept singular value, or a failed eigensolver, returns ``None``
    and the caller takes the SVD.
    """
    a = s_hat.double()
    wide = a.shape[0] < a.shape[1]
    if wide:
        a = a.T
    try:
        eigenvalues, vectors = torch.linalg.eigh(a.T @ a)
    except torch.linalg.LinAlgError:
        return None
    d = eigenvalues.flip(0).clamp_min(0).sqrt()
    r1 = truncated_rank(d, tau, r_min, r_max, CLUSTER_RTOL, rank)
    if r1 == 0 or not float(d[r1 - 1]) >= GRAM_MIN_RATIO * float(d[0]):
        return None
    right = vectors.flip(1)[:, :r1]
    left = (a @ right) / d[:r1]
    if wide:
        left, right = right, left
    return left.to(s_hat.dtype), d[:r1].to(s_hat.dtype), right.to(s_hat.dtype)


def robust_svd(matrix: Tensor, precision: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd`` of a small matrix computed in ``precision`` (default: its own dtype), and again in
    float64 if that fails; the factors are returned in the matrix's dtype.

    Single precision is 1.5-2x faster than float64 at sizes 100-256 on one thread, but not always robust: an
    augmented ``S_hat`` whose old block has many equal singular values (the flat ``kaiming-flat`` start,
    ``S = c I``) made float32 ``gesdd`` stop with "failed to converge", and the student study's ``N(0, 1)``
    start made MKL's float32 solver report invalid scaling parameters and return NaN. So a
    :class:`torch.linalg.LinAlgError` or a non-finite singular value sends the matrix to float64.
    """
    if precision is None:
        precision = matrix.dtype
    if precision != torch.float64:
        try:
            p, d, qt = torch.linalg.svd(matrix.to(precision), full_matrices=False)
            if bool(torch.isfinite(d).all()):  # a failed solve leaves NaN in the singular values too
                return p.to(matrix.dtype), d.to(matrix.dtype), qt.to(matrix.dtype)
        except torch.linalg.LinAlgError:
            pass
    p, d, qt = torch.linalg.svd(matrix.double(), full_matrices=False)
    return p.to(matrix.dtype), d.to(matrix.dtype), qt.to(matrix.dtype)


def _change_basis(state: dict[str, Any], left: Tensor | None, right: Tensor | None) -> None:
    """Express optimiser state in new coordinates: ``m <- left m right``, ``v <- left^2 v right^2`` (and Adam's
    per-coordinate step counts like ``v``)."""

    def apply(x: Tensor, power: int) -> Tensor:
        if left is not None:
            x = (left if power == 1 else left.square()) @ x
        if right is not None:
            x = x @ (right if power == 1 else right.square())
        return x

    for key, power in (("momentum_buffer", 1), ("exp_avg", 1), ("exp_avg_sq", 2), ("coordinate_steps", 2)):
        if key in state:
            state[key] = apply(state[key], power)


def _pad_state(state: dict[str, Any], rows: int, cols: int) -> None:
    """``m <- [[m, 0], [0, 0]]`` of shape ``(rows, cols)`` for every moment (and per-coordinate step count):
    ``_change_basis`` with ``[I; 0]``."""
    for key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "coordinate_steps"):
        if key in state:
            old = state[key]
            state[key] = old.new_zeros(rows, cols)
            state[key][: old.shape[0], : old.shape[1]] = old


@dataclass
class _Bases:
    """One layer's step between the basis update and the coefficient update.

    Rank-adaptive: ``U_hat = [u, u_extra]``, ``V_hat = [v, v_extra]``. Fixed rank: ``U_hat = u_hat``,
    ``V_hat = v_hat`` and ``m = U_hat^T U``, ``n = V_hat^T V``. ``u``, ``v`` are the old bases.
    """

    u: Tensor
    v: Tensor
    u_extra: Tensor | None = None
    v_extra: Tensor | None = None
    m: Tensor | None = None
    n: Tensor | None = None


class DLRT(torch.optim.Optimizer):
    """Dynamical low-rank training (DLRT) of :class:`~lowrank.layers.DynamicalLowRank` layers ``W = U S V^T``.

    One step, for the loss gradient ``G = dL/dW`` (never formed) and the step size ``h``: the K-step
    ``K = U S - h D_K`` and L-step ``L = V S^T - h D_L`` (``D_K``, ``D_L`` the update directions of ``G V`` and
    ``G^T U``) give new bases, rank-adaptive ``U_hat = [U, orth((I - U U^T) D_K)]`` (up to ``2r`` columns; ``V_hat``
    alike) with ``S_hat = [[S, 0], [0, 0]]``, which leaves ``W`` unchanged; the S-step
    ``S_hat <- S_hat - h D_S`` with ``D_S`` the update direction of ``U_hat^T G V_hat``; and the truncation
    ``S_hat = P diag(d) Q^T``, keeping the smallest rank ``r1`` with ``||d[r1:]|| <= tau ||d||`` (clamped to
    ``[r_min, r_max]``): ``U = U_hat P_r1``, ``S = diag(d[:r1])``, ``V = V_hat Q_r1``. A fixed-rank layer takes
    ``U_hat = orth(K)``, ``V_hat = orth(L)`` and no truncation. ``help(lowrank.optim)`` derives the step and its
    costs.

    Args:
        layers: the dynamical layers to train, ``lowrank.dynamical_layers(model)`` (their ``U``, ``S``, ``V``;
            biases and every other parameter belong to a ``torch.optim`` optimiser, which
            ``lowrank.dlrt_optimizer(model)`` pairs with this one).
        lr: the step size ``h``.
        method: ``"sgd"`` or ``"adam"``, the update that turns the K, L and S gradients into directions ``D``.
        momentum: SGD momentum, ``0 <= momentum < 1``.
        betas, eps: Adam's coefficients.
        weight_decay: ``lambda >= 0``, decay of ``W``: adds ``lambda K``, ``lambda L`` and ``lambda S_hat`` to the
            three gradients.
        integrator: ``"kls"`` (the S-step gradient from a second forward and backward pass on the new factors;
            the closure is called twice) or ``"single-pass"`` (from the first pass: the same step for rank-adaptive
            layers, since ``U_hat S_hat V_hat^T = U S V^T``).
        basis_state: ``"project"`` (the optimiser's moments are carried to the new bases: ``m <- M m N^T`` and the
            second moments with the squares of the same matrices) or ``"reset"`` (dropped at every new basis).
        basis_interval: ``k >= 1``, the length of a cycle of augmented local iterations: the K- and L-steps and
            the augmentation on step 1 of a cycle, the S-step on the fixed augmented bases at every step of it,
            the truncation after step ``k``; no QR or SVD inside a cycle. ``k = 1`` is the step above. Inside a
            cycle the layers hold the augmented factors; :meth:`finish_cycle` truncates at once.
        rank_test: how the truncation at the end of a cycle of ``j`` steps picks ``r1``: ``"per-step"`` decides it
            on ``S_hat`` with the coefficients that the cycle added to the new coordinates divided by
            ``sqrt(j)`` (one step's worth; under Adam those coordinates move by about ``h`` a step whatever their
            gradient, which without it lets the rank run away to ``r_max``), ``"accumulated"`` on ``S_hat`` as it
            is. The two agree for ``k = 1``.
        new_coordinates: Adam's step count of ``S``: ``"shared"`` (one per tensor, as ``torch.optim.Adam``; a
            coordinate that the augmentation adds starts with zero moments but the shared count, so its first
            step is about ``3.2 h``) or ``"per-coordinate"`` (a count per coefficient, 0 for new ones: first step
            ``h``).

    ``step(closure)``: the closure clears gradients, evaluates the loss, calls ``backward()`` and returns the
    loss, as for ``torch.optim.LBFGS``. ``step`` calls it once (twice with ``"kls"``) and returns the loss of
    the first call. With ``"single-pass"`` the closure may be omitted if ``backward()`` was already called.

    ``gradient_average``: ``None``, or a callable that averages a list of tensors over processes in place, applied
    to the single-pass S-gradients (:mod:`lowrank.engine.distributed`; the closure averages the other gradients).
    """

    def __init__(
        self,
        layers: Iterable[DynamicalLowRank],
        lr: float = 1e-3,
        method: str = "sgd",
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        integrator: str = "kls",
        basis_state: str = "project",
        basis_interval: int = 1,
        rank_test: str = "per-step",
        new_coordinates: str = "shared",
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if method not in OPTIMIZERS:
            raise ValueError(f"Invalid method: {method!r}; allowed: {OPTIMIZERS}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"Invalid betas: {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if integrator not in INTEGRATORS:
            raise ValueError(f"Invalid integrator: {integrator!r}; allowed: {INTEGRATORS}")
        if basis_state not in BASIS_STATES:
            raise ValueError(f"Invalid basis_state: {basis_state!r}; allowed: {BASIS_STATES}")
        if not (isinstance(basis_interval, int) and basis_interval >= 1):
            raise ValueError(f"Invalid basis_interval: {basis_interval!r}; allowed: an integer >= 1")
        if rank_test not in RANK_TESTS:
            raise ValueError(f"Invalid rank_test: {rank_test!r}; allowed: {RANK_TESTS}")
        if new_coordinates not in NEW_COORDINATES:
            raise ValueError(f"Invalid new_coordinates: {new_coordinates!r}; allowed: {NEW_COORDINATES}")
        if isinstance(layers, nn.Module):
            raise TypeError(f"DLRT takes a model's dynamical layers, not the model ({type(layers).__name__}): pass "
                            "lowrank.dynamical_layers(model), or use lowrank.dlrt_optimizer(model), which also "
                            "builds the optimiser of the other parameters")
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("DLRT got an empty list of layers: a model without dynamical layers needs no DLRT (convert "
                             "it with lowrank.convert(model, rank=..., tau=...) first)")
        strangers = sorted({type(layer).__name__ for layer in self.layers if not isinstance(layer, DynamicalLowRank)})
        if strangers:
            raise TypeError(f"DLRT trains DynamicalLowRank layers (and their convolutions), got {', '.join(strangers)}: "
                            "pass lowrank.dynamical_layers(model), not model.parameters(); the other parameters "
                            "belong to a torch.optim optimiser (lowrank.dlrt_optimizer(model) pairs the two)")
        frozen = [layer for layer in self.layers if not all(p.requires_grad for p in (layer.U, layer.S, layer.V))]
        if frozen:
            raise ValueError(f"{frozen[0]} has factors with requires_grad=False: DLRT cannot train a frozen layer; "
                             "leave it out of the layers (or unfreeze it)")
        defaults = dict(lr=lr, method=method, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__([{"params": [layer.U, layer.S, layer.V]} for layer in self.layers], defaults)
        self.integrator = integrator
        self.basis_state = basis_state
        self.basis_interval = basis_interval
        self.rank_test = rank_test
        self.new_coordinates = new_coordinates
        # Saved in state_dict: the step of the cycle that comes next (0 = an augmentation), and the number of
        # cycles ended so far (the truncation of every ORTHONORMALITY_CHECK_INTERVAL-th one checks the bases).
        self._position = 0
        self._truncations = 0
        # Averages a list of tensors over processes, in place; set by lowrank.engine.distributed.World.prepare.
        self.gradient_average: Callable[[list[Tensor]], None] | None = None
        for layer in self.layers:
            layer.sink.record_activations = integrator == "single-pass"
            layer.sink.basis_grads = False  # the step reads k_grad, l_grad and S.grad only

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for layer in self.layers:
            layer.sink.clear()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "dlrt_cycle_position": self._position, "dlrt_truncations": self._truncations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self._position = state_dict.pop("dlrt_cycle_position", 0)
        self._truncations = state_dict.pop("dlrt_truncations", 0)
        super().load_state_dict(state_dict)

    @property
    def mid_cycle(self) -> bool:
        """Whether the layers hold the augmented factors of an unfinished cycle (``k > 1``)."""
        return self._position != 0

    @torch.no_grad()
    def finish_cycle(self) -> None:
        """End the current cycle now: truncate every rank-adaptive layer that holds augmented factors (rank test
        after the S-steps taken so far); the next step starts a new cycle. Nothing happens between cycles."""
        if self._position:
            self._truncations += 1
            self._end_cycle(steps=self._position)
            self._position = 0

    def _evaluate(self, closure: Callable[[], Tensor], basis_step: bool = True) -> Tensor:
        for layer in self.layers:
            layer.sink.clear()
            layer.sink.active = basis_step  # an S-step on fixed bases reads S.grad only
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            for layer in self.layers:
                layer.sink.active = True
        if not isinstance(loss, Tensor):
            raise TypeError(f"the closure returned {type(loss).__name__}: it must call loss.backward() and return the "
                            "loss tensor (DLRT reports it and, with integrator='kls', calls the closure twice)")
        # Detached, so the graph (which records the factors' shapes) is freed before ranks change.
        return loss.detach()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        if closure is None and self.integrator == "kls":
            raise ValueError("DLRT(integrator='kls') needs a closure: its S-step runs a second forward/backward")
        starting = self._position == 0
        ending = self._position == self.basis_interval - 1
        loss = self._evaluate(closure, basis_step=starting) if closure is not None else None
        self._truncations += ending
        if starting:
            self._start_cycle(closure, truncating=ending)
        else:
            self._cycle_s_step()
            if ending:
                self._end_cycle(steps=self.basis_interval)
        self._position = 0 if ending else self._position + 1
        for layer in self.layers:  # the batch's activations and gradients: not kept (copy.deepcopy, memory)
            layer.sink.clear()
        return loss

    def _start_cycle(self, closure: Callable[[], Tensor] | None, truncating: bool) -> None:
        """Step 1 of a cycle: K- and L-steps, new (augmented) bases and the S-step; with ``k = 1`` (``truncating``)
        the truncation too, the classic step."""
        pairs = list(zip(self.layers, self.param_groups))
        # K- and L-steps; the update directions of all layers are computed together (_directions).
        gradients = []
        for layer, group in pairs:
            if layer.sink.k_grad is None:
                raise _no_gradient(layer)
            k_grad, l_grad, decay = layer.sink.k_grad, layer.sink.l_grad, group["weight_decay"]
            if decay:
                k_grad = k_grad + decay * (layer.U.data @ layer.S.data)
                l_grad = l_grad + decay * (layer.V.data @ layer.S.data.T)
            gradients += [(layer.U, k_grad, group), (layer.V, l_grad, group)]
        directions = self._directions(gradients)
        bases = [self._basis_update(layer, group, directions[2 * i], directions[2 * i + 1], truncating)
                 for i, (layer, group) in enumerate(pairs)]
        if self.integrator == "kls":  # a pass for S.grad only: G V and G^T U are not needed
            self._evaluate(closure, basis_step=False)
        gradients = []
        for (layer, group), basis in zip(pairs, bases):
            if self.integrator == "kls":
                s_grad = layer.S.grad
            elif layer.adaptive:
                s_grad = layer.sink.augmented_gradient(basis.u_extra, basis.v_extra)
            else:
                s_grad = layer.sink.projected_gradient(layer.U, layer.V)
            if group["weight_decay"]:
                s_grad = s_grad + group["weight_decay"] * layer.S.data
            gradients.append((layer.S, s_grad, group))
        if self.gradient_average is not None and self.integrator != "kls":
            # Several processes: these S-gradients come from each one's own recorded activations (the same
            # weight-decay term is averaged along); kls's S.grad was averaged after its backward pass.
            self.gradient_average([s_grad for _, s_grad, _ in gradients])
        for (layer, group), basis, direction in zip(pairs, bases, self._coefficient_directions(gradients)):
            self._coefficient_update(layer, group, direction, basis, truncating)

    def _end_cycle(self, steps: int) -> None:
        """Truncate every rank-adaptive layer, which holds ``U_hat``, ``S_hat``, ``V_hat`` after ``steps`` S-steps."""
        for layer in self.layers:
            if layer.adaptive:
                self._truncate(layer, layer.S.data, steps=steps)

    def _cycle_s_step(self) -> None:
        """``S <- S - h D_S`` for every layer, from ``S.grad = U^T G V`` (plus ``lambda S``) on the cycle's bases."""
        gradients = []
        for layer, group in zip(self.layers, self.param_groups):
            if layer.S.grad is None:
                raise _no_gradient(layer)
            s_grad = layer.S.grad
            if group["weight_decay"]:
                s_grad = s_grad + group["weight_decay"] * layer.S.data
            gradients.append((layer.S, s_grad, group))
        for (s, _, group), direction in zip(gradients, self._coefficient_directions(gradients)):
            s.data.add_(direction, alpha=-group["lr"])

    def _coefficient_directions(self, items: list[tuple[Tensor, Tensor, dict[str, Any]]]) -> list[Tensor]:
        """:meth:`_directions` of the ``(S, grad, group)`` items, with Adam's step count after ``new_coordinates``."""
        return self._directions(items, coordinate_steps=self.new_coordinates == "per-coordinate")

    def _directions(self, items: list[tuple[Tensor, Tensor, dict[str, Any]]],
                    coordinate_steps: bool = False) -> list[Tensor]:
        """The update directions of ``(param, grad, group)`` items under their groups' methods.

        Adam: ``m <- beta1 m + (1 - beta1) g``, ``v <- beta2 v + (1 - beta2) g^2`` and the direction
        ``m_hat / (sqrt(v_hat) + eps)`` with the bias corrections ``m_hat = m / (1 - beta1^t)``,
        ``v_hat = v / (1 - beta2^t)``; ``t`` counts the param's steps, or, with ``coordinate_steps``, each
        coordinate's (state ``"coordinate_steps"``, the param's shape; one that has none yet starts from the
        shared count, the coordinates of a fresh state from zero). SGD: ``buf <- momentum buf + g`` (the
        direction), or ``g``. State is kept under ``param`` and updated in place. Items whose groups share
        the method and its coefficients are processed together (:mod:`lowrank.torch_compat`).
        """
        directions: list[Tensor | None] = [None] * len(items)
        batches: dict[tuple, list[int]] = {}
        for index, (_, _, group) in enumerate(items):
            key = (group["method"], group["momentum"], tuple(group["betas"]), group["eps"])
            batches.setdefault(key, []).append(index)
        for (method, momentum, (beta1, beta2), eps), indices in batches.items():
            params = [items[i][0] for i in indices]
            grads = [items[i][1] for i in indices]
            states = [self.state[param] for param in params]
            if method == "adam":
                for state, grad in zip(states, grads):
                    if coordinate_steps:
                        if "coordinate_steps" not in state:
                            state["coordinate_steps"] = torch.full(grad.shape, float(state.pop("step", 0)),
                                                                   dtype=grad.dtype, device=grad.device)
                        state["coordinate_steps"] += 1
                    else:
                        state["step"] = state.get("step", 0) + 1
                    if "exp_avg" not in state:  # contiguous, as _adam_directions needs
                        zeros = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
                        state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
                moments = [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states]
                if coordinate_steps:
                    batch = adam_directions_per_coordinate(grads, *moments,
                                                           [state["coordinate_steps"] for state in states],
                                                           beta1, beta2, eps)
                else:
                    batch = adam_directions(grads, *moments, [state["step"] for state in states], beta1, beta2, eps)
            elif momentum > 0:
                fresh = [i for i, state in enumerate(states) if "momentum_buffer" not in state]
                for i in fresh:
                    states[i]["momentum_buffer"] = grads[i].clone()
                old = [i for i in range(len(states)) if i not in fresh]
                momentum_update_([states[i]["momentum_buffer"] for i in old], [grads[i] for i in old], momentum)
                batch = [state["momentum_buffer"] for state in states]
            else:
                batch = grads
            for i, direction in zip(indices, batch):
                directions[i] = direction
        return directions

    def _basis_update(self, layer: DynamicalLowRank, group: dict[str, Any], k_direction: Tensor,
                      l_direction: Tensor, truncating: bool) -> _Bases:
        """K- and L-steps for the directions ``D_K``, ``D_L``: installs ``(U_hat, S_hat, V_hat)`` in the layer.

        Rank-adaptive, the layer keeps ``U`` and ``V`` when the single-pass step truncates at once (its S-step
        gradient comes from the recorded pass) and takes the concatenated bases otherwise (kls's second pass, an
        augmented cycle's S-steps), the K and L state then padded into their coordinates when the cycle goes on
        (module docstring). Returns what the S-step needs (:class:`_Bases`).
        """
        u, s, v = layer.U.data, layer.S.data, layer.V.data
        if layer.adaptive:
            # span([U S - h D_K, U]) = span([U, D_K]): U_hat = [U, Q_U], M = U_hat^T U = [I; 0] and
            # S_hat = M S N^T = [[S, 0], [0, 0]].
            u_extra, v_extra = augmented_basis(u, k_direction), augmented_basis(v, l_direction)
            rows, cols = u.shape[1] + u_extra.shape[1], v.shape[1] + v_extra.shape[1]
            s_hat = s.new_zeros(rows, cols)
            s_hat[: s.shape[0], : s.shape[1]] = s
            _pad_state(self.state[layer.S], rows, cols)
            if not truncating:  # where the new block starts, for the rank test at the end of the cycle
                self.state[layer.S]["cycle_start"] = tuple(s.shape)
            if self.integrator == "kls" or not truncating:
                layer.set_factors(torch.cat([u, u_extra], 1), s_hat, torch.cat([v, v_extra], 1))
            else:
                layer.S.data = s_hat
            if not truncating:
                _pad_state(self.state[layer.U], u.shape[0], cols)
                _pad_state(self.state[layer.V], v.shape[0], rows)
            return _Bases(u, v, u_extra=u_extra, v_extra=v_extra)
        u_hat = orthonormal_basis(torch.add(u @ s, k_direction, alpha=-group["lr"]))
        v_hat = orthonormal_basis(torch.add(v @ s.T, l_direction, alpha=-group["lr"]))
        m, n = u_hat.T @ u, v_hat.T @ v
        _change_basis(self.state[layer.S], m, n.T)
        layer.set_factors(u_hat, m @ s @ n.T, v_hat)
        return _Bases(u, v, m=m, n=n)

    def _coefficient_update(self, layer: DynamicalLowRank, group: dict[str, Any], direction: Tensor,
                            basis: _Bases, truncating: bool) -> None:
        """S-step along ``direction``, then (rank-adaptive, if ``truncating``) the truncation to the new rank, with
        the state's change of basis."""
        s_hat = torch.add(layer.S.data, direction, alpha=-group["lr"])
        if not layer.adaptive:
            layer.set_factors(layer.U.data, s_hat, layer.V.data)
            # K = W V, L = W^T U: the K state follows V^T V_hat = N^T, the L state U^T U_hat = M^T.
            self._follow_bases(layer, basis.n.T, basis.m.T)
        elif truncating:
            self._truncate(layer, s_hat, basis)
        else:  # an augmented cycle goes on: the layer holds U_hat and V_hat (_basis_update)
            layer.S.data = s_hat

    def _truncate(self, layer: DynamicalLowRank, s_hat: Tensor, basis: _Bases | None = None, steps: int = 1) -> None:
        """Truncate ``S_hat = P diag(d) Q^T`` (:func:`truncate`) and install ``U_hat P_r1``, ``diag(d[:r1])``,
        ``V_hat Q_r1``, the state following the bases.

        ``basis``: the step's old bases ``U``, ``V`` and new directions ``Q_U``, ``Q_V`` (``U_hat = [U, Q_U]``, the K
        and L state in the coordinates of ``V`` and ``U``; ``k = 1``); ``None`` at the end of a cycle of ``steps``
        S-steps, where the layer holds ``U_hat``, ``V_hat`` and the K and L state is in their coordinates.
        """
        start = self.state[layer.S].pop("cycle_start", None)
        rank = None
        if basis is None and self.rank_test == "per-step" and steps > 1:
            rank = cycle_rank(s_hat, start, steps, layer.tau)
        # grow=False: never more than the rank the step or cycle started from (clusters then cut downwards).
        r_max = layer.r_max if layer.grow else min(layer.r_max, basis.u.shape[1] if basis is not None else start[0])
        p, d, q = truncate(s_hat, layer.tau, min(layer.r_min, r_max), r_max, rank)
        _change_basis(self.state[layer.S], p.T, q)
        if basis is None:
            u_new, v_new, u_change, v_change = layer.U.data @ p, layer.V.data @ q, p, q
        else:
            r_u, r_v = basis.u.shape[1], basis.v.shape[1]
            # U_new = [U, Q_U] P = U P[:r] + Q_U P[r:]; U^T U_new = P[:r] (and V^T V_new = Q[:r]) as U^T Q_U = 0.
            u_new = torch.addmm(basis.u_extra @ p[r_u:], basis.u, p[:r_u])
            v_new = torch.addmm(basis.v_extra @ q[r_v:], basis.v, q[:r_v])
            u_change, v_change = p[:r_u], q[:r_v]
        s_new = torch.diag(d)
        if self._truncations % ORTHONORMALITY_CHECK_INTERVAL == 0:
            u_new, s_new, v_new = restore_orthonormality(u_new, s_new, v_new)
        layer.set_factors(u_new, s_new, v_new)
        self._follow_bases(layer, v_change, u_change)

    def _follow_bases(self, layer: DynamicalLowRank, v_change: Tensor, u_change: Tensor) -> None:
        """Map the K and L state to the new bases (``m_K <- m_K V^T V_new``, ``m_L <- m_L U^T U_new``), or drop all.

        ``v_change = V^T V_new`` and ``u_change = U^T U_new`` for the old bases ``U``, ``V``.
        """
        if self.basis_state == "reset":
            for param in (layer.U, layer.S, layer.V):
                self.state.pop(param, None)
            return
        _change_basis(self.state[layer.U], None, v_change)
        _change_basis(self.state[layer.V], None, u_change)


def _no_gradient(layer: DynamicalLowRank) -> RuntimeError:
    """The error of a step that finds no gradient for ``layer``: frozen factors, or no backward pass."""
    if not all(p.requires_grad for p in (layer.U, layer.S, layer.V)):
        return RuntimeError(f"{layer} has factors with requires_grad=False: DLRT cannot train a frozen layer; leave "
                            "it out of DLRT's layers (or unfreeze it)")
    return RuntimeError(f"no gradient for {layer}: call loss.backward() before step(), or pass a closure that does")


class Optimizers:
    """A ``torch.optim`` optimiser for ordinary parameters paired with :class:`DLRT` for dynamical layers.

    ``step(closure)`` runs the DLRT step (which evaluates the closure) and then steps the ordinary
    parameters with the gradients of the last evaluation; without dynamical layers it is the ordinary
    optimiser's ``step(closure)``.
    """

    def __init__(self, ordinary: torch.optim.Optimizer | None, dlrt: DLRT | None) -> None:
        self.ordinary, self.dlrt = ordinary, dlrt

    @property
    def members(self) -> list[torch.optim.Optimizer]:
        return [opt for opt in (self.ordinary, self.dlrt) if opt is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.members:
            opt.zero_grad(set_to_none)

    def finish_cycle(self) -> None:
        """:meth:`DLRT.finish_cycle` (the end of an epoch: truncated factors for evaluation and checkpoints)."""
        if self.dlrt is not None:
            self.dlrt.finish_cycle()

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        if self.dlrt is None:
            return self.ordinary.step(closure)
        loss = self.dlrt.step(closure)
        if self.ordinary is not None:
            self.ordinary.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in (("ordinary", self.ordinary), ("dlrt", self.dlrt)) if opt}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt in (("ordinary", self.ordinary), ("dlrt", self.dlrt)):
            if opt is not None:
                opt.load_state_dict(state[name])


def dynamical_layers(model: nn.Module) -> list[DynamicalLowRank]:
    """Every layer of ``model`` that DLRT trains (:class:`~lowrank.layers.DynamicalLowRank` and its convolution,
    :class:`~lowrank.conv.DynamicalLowRankConv2d`), in module order."""
    return [m for m in model.modules() if isinstance(m, DynamicalLowRank)]


def dlrt_optimizer(model: nn.Module, lr: float = 1e-3, method: str = "adam",
                   ordinary: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                   **dlrt_options) -> Optimizers:
    """:class:`DLRT` for the factors ``U, S, V`` of ``model``'s dynamical layers, paired with a ``torch.optim``
    optimiser for every other parameter (biases, dense and vanilla low-rank layers, normalisation layers).

    Args:
        model: any module (a :class:`~lowrank.network.NeuralNetwork`, or one made by :func:`lowrank.convert`).
        lr, method: the step size and the update rule (``"sgd"`` / ``"adam"``) of both optimisers.
        ordinary: builds the optimiser of the other parameters from their list; default ``torch.optim.Adam``
            (the fused kernel where the parameters allow) or ``torch.optim.SGD`` after ``method``, with ``lr``
            and DLRT's ``momentum`` and ``weight_decay``.
        dlrt_options: DLRT's other arguments (``momentum``, ``weight_decay``, ``integrator``, ``basis_state``,
            ``basis_interval``, ``rank_test``, ``new_coordinates``).

    ``step(closure)`` of the result runs the DLRT step, which evaluates the closure, then the other optimiser.
    A model without dynamical layers is an error (convert it first, or use a ``torch.optim`` optimiser).
    """
    if not dynamical_layers(model):
        raise ValueError(f"{type(model).__name__} has no dynamical low-rank layers, so DLRT has nothing to train: "
                         "convert it first (lowrank.convert(model, rank=..., tau=...)) or use a torch.optim optimiser")
    return _paired(model, lr, method, ordinary, **dlrt_options)


def _paired(model: nn.Module, lr: float, method: str,
            ordinary: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
            **dlrt_options) -> Optimizers:
    """:class:`DLRT` for ``model``'s dynamical layers (none: no DLRT) and ``ordinary`` for the other parameters."""
    layers = dynamical_layers(model)
    factors = {id(p) for layer in layers for p in (layer.U, layer.S, layer.V)}
    rest = [p for p in model.parameters() if id(p) not in factors and p.requires_grad]
    if ordinary is None:
        ordinary = _default_optimizer(lr, method, dlrt_options.get("momentum", 0.0),
                                      dlrt_options.get("weight_decay", 0.0))
    dlrt = DLRT(layers, lr=lr, method=method, **dlrt_options) if layers else None
    return Optimizers(ordinary(rest) if rest else None, dlrt)


def _default_optimizer(lr: float, method: str, momentum: float, weight_decay: float
                       ) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    def build(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if method == "adam":
            # The fused kernel (one call for all tensors) is several times faster than the default loop on CPU.
            fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    return build


def build_optimizer(model: nn.Module, settings: Any) -> Optimizers:
    """:func:`dlrt_optimizer` for ``model`` from a :class:`lowrank.engine.config.Settings`-like object; a model
    without dynamical layers (a dense or vanilla low-rank network of a configuration) gets the ordinary optimiser
    alone.

    Uses ``settings.learning_rate``, ``optimizer`` (``"sgd"`` / ``"adam"``), ``momentum``,
    ``weight_decay``, ``integrator``, ``basis_state``, ``basis_interval``, ``rank_test`` and ``new_coordinates``.
    """
    return _paired(model, lr=settings.learning_rate, method=settings.optimizer, momentum=settings.momentum,
                   weight_decay=settings.weight_decay, integrator=settings.integrator,
                   basis_state=settings.basis_state, basis_interval=settings.basis_interval,
                   rank_test=settings.rank_test, new_coordinates=settings.new_coordinates)
