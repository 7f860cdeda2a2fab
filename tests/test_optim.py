"""The DLRT optimiser: the KLS step's algebra, truncation, rank adaptation and descent."""

from copy import deepcopy
from types import SimpleNamespace

import pytest
import torch
from conftest import rotation_tolerance
from torch.nn import functional as F

from lowrank import optim
from lowrank.layers import DYNAMICAL_INIT_SCALE, Dense, DynamicalLowRank
from lowrank.network import NeuralNetwork, effective_weight
from lowrank.optim import (
    DLRT,
    GRAM_MIN_RATIO,
    augmented_basis,
    build_optimizer,
    dlrt_optimizer,
    gram_truncation,
    restore_orthonormality,
    robust_svd,
    truncate,
    truncated_rank,
)

torch.set_num_threads(1)


def least_squares(n_in=30, n_out=20, rank_of_target=4, samples=256, seed=0):
    """Inputs X and targets Y = X W* for a rank-``rank_of_target`` matrix W*."""
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(n_in, rank_of_target, generator=gen) @ torch.randn(rank_of_target, n_out, generator=gen)
    x = torch.randn(samples, n_in, generator=gen)
    return x, x @ w_star / n_in**0.5


def step_closure(model, optimizer, x, y, loss_of=F.mse_loss):
    """The closure of one step: zero the gradients, ``loss_of(model(x), y)``, backward, return the loss."""
    def closure():
        optimizer.zero_grad()
        loss = loss_of(model(x), y)
        loss.backward()
        return loss

    return closure


def make_layer(rank=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    return DynamicalLowRank(30, 20, rank, bias=False, **kwargs)


def test_truncated_rank_is_the_smallest_within_tolerance():
    d = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.1])
    for tau in (0.0, 0.05, 0.1, 0.3, 0.5, 0.9):
        r1 = truncated_rank(d, tau, r_min=1, r_max=5)
        assert d[r1:].norm() <= tau * d.norm() + 1e-7
        assert r1 == 1 or d[r1 - 1 :].norm() > tau * d.norm()
    assert truncated_rank(d, 0.9, r_min=2, r_max=5) == 2
    assert truncated_rank(d, 0.0, r_min=1, r_max=3) == 3


@pytest.mark.parametrize("tau", [0.01, 0.1, 0.3])
def test_truncation_error_below_tolerance(tau):
    s_hat = torch.randn(12, 12, generator=torch.Generator().manual_seed(1)) @ torch.diag(0.6 ** torch.arange(12.0))
    p, d, q = truncate(s_hat, tau, r_min=1, r_max=12)
    error = torch.linalg.matrix_norm(s_hat - p @ torch.diag(d) @ q.T)
    assert error <= tau * torch.linalg.matrix_norm(s_hat) + 1e-6
    assert len(d) < 12


def test_bases_stay_orthonormal_over_many_steps():
    x, y = least_squares()
    layer = make_layer(rank=5, tau=0.05)
    opt = DLRT([layer], lr=0.05, method="adam")
    for _ in range(200):
        opt.step(step_closure(layer, opt, x, y))
    eye = torch.eye(layer.rank)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-5, rtol=0)


def test_rank_adaptive_sgd_step_is_the_projected_gradient_step():
    """With tau = 0: W_new = P_U_hat (W - h G) P_V_hat, the new bases containing the old ones and K, L."""
    x, y = least_squares()
    layer = make_layer(rank=3, tau=0.0)
    w, u, v = effective_weight(layer), layer.U.detach().clone(), layer.V.detach().clone()
    w_grad = w.clone().requires_grad_()
    F.mse_loss(x @ w_grad, y).backward()
    h = 0.1
    opt = DLRT([layer], lr=h)
    opt.step(step_closure(layer, opt, x, y))

    project_u, project_v = layer.U @ layer.U.T, layer.V @ layer.V.T
    torch.testing.assert_close(effective_weight(layer), project_u @ (w - h * w_grad.grad) @ project_v, atol=1e-5, rtol=1e-4)
    for old, projector in ((u, project_u), (v, project_v)):
        torch.testing.assert_close(projector @ old, old, atol=1e-5, rtol=0)
    assert layer.rank == 6


def test_single_pass_integrator_matches_classic_kls_when_rank_adaptive():
    x, y = least_squares()
    layers = [make_layer(rank=3, tau=0.05) for _ in range(2)]
    for layer, integrator in zip(layers, ("kls", "single-pass")):
        opt = DLRT([layer], lr=0.05, integrator=integrator)
        for _ in range(5):
            opt.step(step_closure(layer, opt, x, y))
    assert layers[0].rank == layers[1].rank
    torch.testing.assert_close(effective_weight(layers[0]), effective_weight(layers[1]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("integrator", ["kls", "single-pass"])
def test_fixed_rank_step_decreases_least_squares_loss(integrator):
    x, y = least_squares(rank_of_target=4)
    layer = make_layer(rank=4, adaptive=False)
    opt = DLRT([layer], lr=0.2, integrator=integrator)
    closure = step_closure(layer, opt, x, y)
    losses = [opt.step(closure).item() for _ in range(30)]
    assert layer.rank == 4
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]


def test_rank_grows_when_tau_is_small_and_shrinks_when_large():
    x, y = least_squares(rank_of_target=8)
    ranks = {}
    for tau, start in ((0.001, 2), (0.5, 15)):
        layer = make_layer(rank=start, tau=tau)
        opt = DLRT([layer], lr=0.05, method="adam")
        for _ in range(20):
            opt.step(step_closure(layer, opt, x, y))
        ranks[tau] = layer.rank
    assert ranks[0.001] > 2
    assert ranks[0.5] < 15


def test_rank_respects_r_min_and_r_max():
    x, y = least_squares(rank_of_target=10)
    low = make_layer(rank=4, tau=0.9, r_min=3)
    high = make_layer(rank=2, tau=0.0, r_max=5)
    for layer in (low, high):
        opt = DLRT([layer], lr=0.05)
        for _ in range(5):
            opt.step(step_closure(layer, opt, x, y))
    assert low.rank == 3
    assert high.rank == 5


@pytest.mark.parametrize("basis_state", ["project", "reset"])
def test_adam_state_follows_the_rank(basis_state):
    x, y = least_squares()
    layer = make_layer(rank=3, tau=0.05)
    opt = DLRT([layer], lr=0.05, method="adam", basis_state=basis_state)
    for _ in range(10):
        opt.step(step_closure(layer, opt, x, y))
    if basis_state == "reset":
        assert not opt.state
    else:
        assert opt.state[layer.U]["exp_avg"].shape == layer.U.shape
        assert opt.state[layer.V]["exp_avg_sq"].shape == layer.V.shape
        assert opt.state[layer.S]["exp_avg"].shape == layer.S.shape
        assert (opt.state[layer.S]["exp_avg_sq"] >= 0).all()


def test_weight_decay_shrinks_weights_without_gradient():
    layer = make_layer(rank=3, adaptive=False)
    opt = DLRT([layer], lr=0.1, weight_decay=0.5)
    x = torch.zeros(4, 30)
    before = torch.linalg.matrix_norm(effective_weight(layer)).item()
    opt.step(step_closure(layer, opt, x, torch.zeros(4, 20)))
    # The K and L steps only choose the bases (span(K) = span(U)); the S-step gives W <- (1 - h lambda) W.
    assert torch.linalg.matrix_norm(effective_weight(layer)).item() == pytest.approx(before * 0.95, rel=1e-4)


def test_kls_integrator_requires_a_closure():
    layer = make_layer()
    layer(torch.randn(2, 30)).sum().backward()
    with pytest.raises(ValueError, match="closure"):
        DLRT([layer]).step()


def test_step_without_backward_is_an_error():
    with pytest.raises(RuntimeError, match="backward"):
        DLRT([make_layer()], integrator="single-pass").step()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0.0}, "learning rate"),
        ({"method": "rmsprop"}, "method"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"integrator": "euler"}, "integrator"),
        ({"basis_state": "keep"}, "basis_state"),
    ],
)
def test_invalid_hyperparameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DLRT([make_layer()], **kwargs)


def test_build_optimizer_trains_a_mixed_network_and_restores_state():
    torch.manual_seed(0)
    net = NeuralNetwork([DynamicalLowRank(30, 16, 4, tau=0.1), Dense(16, 5)], ["relu", "identity"])
    settings = SimpleNamespace(learning_rate=0.01, optimizer="adam", momentum=0.0, weight_decay=0.0, integrator="kls",
                               basis_state="project", basis_interval=1, rank_test="per-step",
                               new_coordinates="shared")
    opt = build_optimizer(net, settings)
    x, labels = torch.randn(64, 30), torch.randint(0, 5, (64,))
    closure = step_closure(net, opt, x, labels, F.cross_entropy)
    losses = [opt.step(closure).item() for _ in range(40)]
    assert losses[-1] < 0.7 * losses[0]
    restored = build_optimizer(net, settings)
    restored.load_state_dict(opt.state_dict())
    assert restored.state_dict()["dlrt"]["state"].keys() == opt.state_dict()["dlrt"]["state"].keys()
    assert len(opt.dlrt.param_groups) == 1 and opt.ordinary.param_groups[0]["params"][0] is net.layers[0].bias


def test_truncation_falls_back_to_float64_when_the_svd_fails(monkeypatch):
    s_hat = torch.diag(torch.tensor([3.0, 2.0, 1e-3]))
    float32_svd = torch.linalg.svd

    def svd_failing_in_float32(matrix, *args, **kwargs):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return float32_svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd_failing_in_float32)
    p, d, q = truncate(s_hat, tau=0.01, r_min=1, r_max=3)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(p @ torch.diag(d) @ q.T, torch.diag(torch.tensor([3.0, 2.0, 0.0])))


def test_small_svds_run_in_single_precision_and_fall_back_to_float64_on_non_finite_values(monkeypatch):
    matrix = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    svd, dtypes = torch.linalg.svd, []

    def recording_svd(a, *args, **kwargs):
        dtypes.append(a.dtype)
        return svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", recording_svd)
    for precision, expected in ((None, [torch.float32]), (torch.float64, [torch.float64])):
        dtypes.clear()
        p, d, qt = robust_svd(matrix, precision)
        assert dtypes == expected and d.dtype == torch.float32
        torch.testing.assert_close(p @ torch.diag(d) @ qt, matrix)

    def nan_in_float32(a, *args, **kwargs):  # MKL's float32 solver on the student study's N(0, 1) start
        p, d, qt = svd(a, *args, **kwargs)
        return (p, d * float("nan"), qt) if a.dtype == torch.float32 else (p, d, qt)

    monkeypatch.setattr(torch.linalg, "svd", nan_in_float32)
    p, d, qt = robust_svd(matrix)
    assert d.dtype == torch.float32 and bool(torch.isfinite(d).all())
    torch.testing.assert_close(p @ torch.diag(d) @ qt, matrix)


@pytest.mark.parametrize("shape", [(40, 40), (40, 31), (31, 40)], ids=["square", "tall", "wide"])
def test_the_gram_truncation_of_a_float32_matrix_matches_the_float64_svd(shape):
    gen = torch.Generator().manual_seed(0)
    s_hat = torch.randn(*shape, generator=gen) * torch.logspace(0, -2, shape[1])  # decaying column scales
    p, d, q = gram_truncation(s_hat, tau=0.05, r_min=1, r_max=40)
    assert p.dtype == d.dtype == q.dtype == torch.float32
    full_p, full_d, full_qt = torch.linalg.svd(s_hat.double(), full_matrices=False)
    r1 = len(d)
    torch.testing.assert_close(d.double(), full_d[:r1], rtol=1e-6, atol=0)
    eye = torch.eye(r1)
    torch.testing.assert_close(p.T @ p, eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.T @ q, eye, atol=1e-6, rtol=0)
    expected = (full_p[:, :r1] * full_d[:r1]) @ full_qt[:r1]
    torch.testing.assert_close((p * d) @ q.T, expected.float(), atol=1e-6 * float(full_d[0]), rtol=0)


def test_truncation_takes_the_svd_when_a_kept_singular_value_is_too_small_for_the_gram_matrix(monkeypatch):
    s_hat = torch.diag(torch.tensor([1.0, 0.5, GRAM_MIN_RATIO / 10]))
    assert gram_truncation(s_hat, tau=0.0, r_min=1, r_max=3) is None  # tau = 0 keeps the tiny value
    assert gram_truncation(s_hat, tau=0.01, r_min=1, r_max=3) is not None  # it is cut: the Gram matrix will do
    p, d, q = truncate(s_hat, tau=0.0, r_min=1, r_max=3)
    torch.testing.assert_close(d, torch.tensor([1.0, 0.5, GRAM_MIN_RATIO / 10]))
    torch.testing.assert_close(p.T @ p, torch.eye(3))

    def no_gram(*args, **kwargs):
        raise AssertionError("float64 coefficients go to the SVD")

    monkeypatch.setattr(optim, "gram_truncation", no_gram)
    truncate(s_hat.double(), tau=0.0, r_min=1, r_max=3)


def reference_adaptive_sgd_step(layer, x, y, h):
    """The textbook rank-adaptive step (QR of [K, U], M = U_hat^T U, SVD truncation) for plain SGD, returning W."""
    u, s, v = (t.detach().double() for t in (layer.U, layer.S, layer.V))
    w = (u @ s @ v.T).requires_grad_()
    F.mse_loss(x.double() @ w, y.double()).backward()
    g = w.grad
    u_hat = torch.linalg.qr(torch.cat([u @ s - h * g @ v, u], 1)).Q
    v_hat = torch.linalg.qr(torch.cat([v @ s.T - h * g.T @ u, v], 1)).Q
    s_hat = (u_hat.T @ u) @ s @ (v_hat.T @ v).T - h * u_hat.T @ g @ v_hat
    p, d, q = truncate(s_hat, layer.tau, layer.r_min, layer.r_max)
    return u_hat @ p @ torch.diag(d) @ q.T @ v_hat.T


@pytest.mark.parametrize("integrator", ["kls", "single-pass"])
def test_rank_adaptive_step_matches_the_textbook_step(integrator):
    """The augmented basis [U, orth((I - U U^T) G V)] spans the same space as orth([K, U]): same W, same rank."""
    x, y = least_squares()
    layer = make_layer(rank=3, tau=0.1)
    expected = reference_adaptive_sgd_step(layer, x, y, h=0.1)
    opt = DLRT([layer], lr=0.1, integrator=integrator)
    opt.step(step_closure(layer, opt, x, y))
    assert layer.rank == torch.linalg.matrix_rank(expected).item()
    torch.testing.assert_close(effective_weight(layer).double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "make_directions",
    [
        lambda u: torch.randn(40, 5),
        lambda u: torch.cat([u[:, :2] @ torch.randn(2, 2), torch.randn(40, 1).repeat(1, 3)], 1),  # rank-deficient
        lambda u: u @ torch.randn(5, 5),  # inside span(U): nothing new
        lambda u: torch.randn(40, 38),  # more directions than the complement has
    ],
    ids=["random", "rank-deficient", "inside-span", "wide"],
)
def test_augmented_basis_completes_u_to_an_orthonormal_basis_of_the_span(make_directions):
    """[U, Q] is orthonormal, spans D, and Q has as many columns as D has independent directions outside span(U)."""
    torch.manual_seed(2)
    u = torch.linalg.qr(torch.randn(40, 5)).Q
    d = make_directions(u)
    q = augmented_basis(u, d)
    basis = torch.cat([u, q], 1)
    new = d.double() - u.double() @ (u.double().T @ d.double())
    assert q.shape[1] == torch.linalg.matrix_rank(new, atol=1e-4 * torch.linalg.matrix_norm(d.double()), rtol=0).item()
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(basis @ (basis.T @ d), d, atol=1e-4, rtol=1e-4)


def test_restore_orthonormality_keeps_w_and_restores_the_bases():
    torch.manual_seed(3)
    u, v = torch.linalg.qr(torch.randn(30, 4)).Q, torch.linalg.qr(torch.randn(20, 4)).Q
    u_drifted = u @ (torch.eye(4) + 1e-4 * torch.randn(4, 4))
    s = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5]))
    u_new, s_new, v_new = restore_orthonormality(u_drifted, s, v)
    torch.testing.assert_close(u_new.T @ u_new, torch.eye(4), atol=1e-6, rtol=0)
    assert v_new is v
    torch.testing.assert_close(u_new @ s_new @ v_new.T, u_drifted @ s @ v.T, atol=1e-5, rtol=1e-5)
    same = restore_orthonormality(u, s, v)
    assert same[0] is u and same[1] is s


def test_sgd_momentum_step_runs_and_keeps_state_shapes():
    x, y = least_squares()
    layer = make_layer(rank=3, tau=0.05)
    opt = DLRT([layer], lr=0.05, momentum=0.9, integrator="single-pass")
    losses = [opt.step(step_closure(layer, opt, x, y)).item() for _ in range(20)]
    assert losses[-1] < losses[0]
    assert opt.state[layer.U]["momentum_buffer"].shape == layer.U.shape
    assert opt.state[layer.S]["momentum_buffer"].shape == layer.S.shape


def test_build_optimizer_uses_the_fused_adam_kernel_on_cpu():
    net = NeuralNetwork([Dense(8, 4)], ["identity"])
    settings = SimpleNamespace(learning_rate=0.01, optimizer="adam", momentum=0.0, weight_decay=0.0, integrator="kls",
                               basis_state="project", basis_interval=1, rank_test="per-step",
                               new_coordinates="shared")
    assert build_optimizer(net, settings).ordinary.defaults["fused"]


def rotated_copy(model: NeuralNetwork, seed: int) -> NeuralNetwork:
    """The same network with every dynamical layer's factors rotated: ``U Q1, Q1^T S Q2, V Q2`` (the same W)."""
    copy = deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for layer in copy.dynamical_layers():
        r, dtype = layer.rank, layer.S.dtype
        q1, q2 = (torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64)).Q.to(dtype) for _ in range(2))
        layer.set_factors(layer.U.data @ q1, q1.T @ layer.S.data @ q2, layer.V.data @ q2)
    return copy


def trained_weights(model: NeuralNetwork, x, y, steps: int, lr: float) -> list[torch.Tensor]:
    settings = SimpleNamespace(learning_rate=lr, optimizer="sgd", momentum=0.0, weight_decay=0.0, integrator="kls",
                               basis_state="project", basis_interval=1, rank_test="per-step",
                               new_coordinates="shared")
    opt = build_optimizer(model, settings)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return [effective_weight(layer) for layer in model.layers]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("tau, batch", [(0.1, 232), (0.0, 232), (0.1, 64), (0.0, 64)],
                         ids=["tau=0.1", "tau=0", "batch<rank", "tau=0,batch<rank"])
@pytest.mark.parametrize("init_scale", [DYNAMICAL_INIT_SCALE, 1.0], ids=["small start", "kaiming start"])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_step_depends_on_w_not_on_its_factorisation(dtype, tau, batch, init_scale, seed):
    """Two factorisations of the same W (factors rotated by random orthogonal Q1, Q2) take the same DLRT steps.

    The truncation keeps or drops a cluster of nearly equal singular values whole and the augmentation adds only
    the numerically independent new directions, so W after three steps agrees to rounding / (relative gap at
    the cut >= CLUSTER_RTOL): typically about 1e-6 in float32 and 1e-14 in float64, at most the bound of
    conftest.rotation_tolerance, derived per dtype from that amplification (not fitted to these seeds: over
    seeds 0-5, 5 of 48 float32 cases exceeded 3e-5 and one reached 3.3e-4, see lowrank.optim.truncate).
    Without either rule the two runs differ by 1e-4 to 4e-3, in float64 too at tau = 0.
    """
    torch.manual_seed(seed)
    with torch.random.fork_rng():
        torch.set_default_dtype(dtype)
        try:
            model = NeuralNetwork([DynamicalLowRank(784, 512, 128, tau=tau, init_scale=init_scale),
                                   DynamicalLowRank(512, 512, 128, tau=tau, init_scale=init_scale),
                                   Dense(512, 10)], ["relu", "relu", "identity"])
        finally:
            torch.set_default_dtype(torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.rand(batch, 784, generator=gen, dtype=dtype), torch.randint(0, 10, (batch,), generator=gen)
    rotated = rotated_copy(model, seed=seed + 2)
    expected = trained_weights(model, x, y, steps=3, lr=0.1)
    got = trained_weights(rotated, x, y, steps=3, lr=0.1)
    assert model.ranks() == rotated.ranks()
    for w_expected, w_got in zip(expected, got):
        error = torch.linalg.matrix_norm(w_got - w_expected) / torch.linalg.matrix_norm(w_expected)
        assert error <= rotation_tolerance(dtype), (model.ranks(), float(error))


def test_truncation_keeps_or_drops_a_cluster_of_nearly_equal_singular_values_whole():
    d = torch.tensor([10.0, 5.0, 4.99, 4.98, 1.0, 0.1])
    assert truncated_rank(d, 0.5, r_min=1, r_max=6) == 3  # tolerance alone: a cut inside 5, 4.99, 4.98
    assert truncated_rank(d, 0.5, r_min=1, r_max=6, cluster_gap=1e-2) == 4  # the cluster kept whole
    assert truncated_rank(d, 0.5, r_min=1, r_max=3, cluster_gap=1e-2) == 1  # r_max cuts it: dropped whole
    assert truncated_rank(d, 0.5, r_min=2, r_max=3, cluster_gap=1e-2) == 2  # ... but not below r_min
    assert truncated_rank(d, 0.05, r_min=1, r_max=6, cluster_gap=1e-2) == 5  # no cluster at the cut



def test_a_layer_started_below_the_rank_of_its_target_grows():
    """Least squares with a rank-8 target from rank 2: augmentation lets the directions the data need in."""
    x, y = least_squares(rank_of_target=8, samples=512)
    layer = make_layer(rank=2, tau=0.05)
    opt = DLRT([layer], lr=0.5)
    losses = [opt.step(step_closure(layer, opt, x, y)).item() for _ in range(150)]
    assert layer.rank >= 6
    assert losses[-1] < 0.05 * losses[0]


def test_under_adam_a_small_start_grows_to_the_rank_of_its_target_and_a_kaiming_start_does_not():
    """Adam moves each entry of the new block of S_hat by about h per step, so a new direction survives the
    truncation at tau ||S||_F only while W is small: from the default init_scale (||W||_F ~ 1.3) the rank
    grows from 2 to the target's 8; from the Kaiming scale (||W||_F ~ 6.3) it falls to 1 and stays there."""
    x, y = least_squares(rank_of_target=8, samples=512)
    ranks = {}
    for init, scale in (("small", DYNAMICAL_INIT_SCALE), ("kaiming", 1.0)):
        layer = make_layer(rank=2, tau=0.05, init_scale=scale)
        opt = DLRT([layer], lr=3e-2, method="adam")
        losses = [opt.step(step_closure(layer, opt, x, y)).item() for _ in range(300)]
        ranks[init] = layer.rank
        if init == "small":
            assert losses[-1] < 0.01 * losses[0]
    assert ranks["small"] == 8
    assert ranks["kaiming"] < 2


@pytest.mark.parametrize("method, lr", [("sgd", 0.5), ("adam", 0.05)])
def test_a_run_with_basis_interval_descends_and_resumes_from_its_state_dict(method, lr):
    x, y = least_squares(rank_of_target=4)
    layer = make_layer(rank=6, tau=0.05)
    opt = DLRT([layer], lr=lr, method=method, basis_interval=4)
    losses = [opt.step(step_closure(layer, opt, x, y)).item() for _ in range(5)]
    saved_layer, saved_opt = deepcopy(layer.state_dict()), deepcopy(opt.state_dict())
    for _ in range(6):
        losses.append(opt.step(step_closure(layer, opt, x, y)).item())
    resumed = make_layer(rank=6, tau=0.05, seed=1)
    resumed.load_state_dict(saved_layer)
    resumed_opt = DLRT([resumed], lr=lr, method=method, basis_interval=4)
    resumed_opt.load_state_dict(saved_opt)
    for _ in range(6):
        resumed_opt.step(step_closure(resumed, resumed_opt, x, y))
    assert losses[-1] < 0.6 * losses[0]
    torch.testing.assert_close(effective_weight(resumed), effective_weight(layer), rtol=0, atol=0)


def test_basis_interval_must_be_a_positive_integer():
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="basis_interval"):
            DLRT([make_layer()], basis_interval=bad)


def test_mistakes_a_new_user_makes_get_errors_that_say_what_to_do():
    """A model, or model.parameters(), instead of the dynamical layers; a frozen layer; a closure that returns
    nothing; dlrt_optimizer on a model without dynamical layers (build_optimizer still pairs nothing for a dense
    configuration)."""
    net = NeuralNetwork([DynamicalLowRank(30, 16, 4), Dense(16, 5)], ["relu", "identity"])
    with pytest.raises(TypeError, match=r"not the model \(NeuralNetwork\).*lowrank.dynamical_layers\(model\)"):
        DLRT(net)
    with pytest.raises(TypeError, match=r"got Parameter: pass lowrank.dynamical_layers\(model\), not model.parameters"):
        DLRT(net.parameters())
    frozen = make_layer()
    frozen.S.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False: DLRT cannot train a frozen layer"):
        DLRT([frozen])
    layer = make_layer()
    opt = DLRT([layer], lr=0.01)
    layer.U.requires_grad_(False)
    with pytest.raises(RuntimeError, match="frozen layer"):
        opt.step(lambda: layer(torch.randn(4, 30)).sum())
    layer.U.requires_grad_(True)
    x = torch.randn(4, 30)
    with pytest.raises(TypeError, match="the closure returned NoneType: it must call loss.backward"):
        opt.step(lambda: layer(x).sum().backward())
    dense = NeuralNetwork([Dense(30, 16), Dense(16, 5)], ["relu", "identity"])
    with pytest.raises(ValueError, match=r"NeuralNetwork has no dynamical low-rank layers.*lowrank.convert"):
        dlrt_optimizer(dense)
    settings = SimpleNamespace(learning_rate=0.01, optimizer="adam", momentum=0.0, weight_decay=0.0, integrator="kls",
                               basis_state="project", basis_interval=1, rank_test="per-step", new_coordinates="shared")
    paired = build_optimizer(dense, settings)
    assert paired.dlrt is None and isinstance(paired.ordinary, torch.optim.Adam)


@pytest.mark.parametrize("integrator", ["kls", "single-pass"])
def test_after_a_step_the_layers_hold_no_batch_and_the_model_deep_copies(integrator):
    """The gradient sinks (G V, G^T U, and the single-pass activations) are emptied by the step: copy.deepcopy of the
    model works and holds no tensors of the last batch."""
    net = NeuralNetwork([DynamicalLowRank(30, 16, 4), Dense(16, 5)], ["relu", "identity"])
    opt = dlrt_optimizer(net, lr=0.01, integrator=integrator)
    x = torch.randn(8, 30)
    opt.step(step_closure(net, opt, x, torch.randint(0, 5, (8,)), F.cross_entropy))
    sink = net.layers[0].sink
    assert sink.k_grad is None and sink.l_grad is None and not sink.inputs and not sink.output_grads
    copy = deepcopy(net)
    torch.testing.assert_close(copy(x), net(x))
