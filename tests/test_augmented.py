"""DLRT's augmented local iterations (``basis_interval = k``), their rank test and Adam's per-coordinate step
counts (``new_coordinates="per-coordinate"``), checked against references: hand-written cycles, ``torch.optim``'s
SGD and Adam on ``S`` with the bases fixed, the state-mapping formulas, and runs that must agree bit for bit.
(``k = 1`` is checked against the textbook step in test_optim.)"""

import io
from copy import deepcopy

import pytest
import torch
from conftest import rotation_tolerance
from torch.nn import functional as F

from lowrank.conv import DynamicalLowRankConv2d
from lowrank.layers import Dense, DynamicalLowRank
from lowrank.network import NeuralNetwork, effective_weight
from lowrank import optim
from lowrank.optim import (DLRT, _change_basis, _pad_state, augmented_basis, cycle_rank, dlrt_optimizer,
                           tolerance_rank, truncate)
from lowrank.torch_compat import adam_directions_per_coordinate

torch.set_num_threads(1)

# (DLRT arguments, the torch.optim optimiser of S with the same rule)
RULES = {
    "sgd": ({"method": "sgd"}, lambda params, lr: torch.optim.SGD(params, lr=lr)),
    "sgd-momentum-decay": ({"method": "sgd", "momentum": 0.9, "weight_decay": 0.01},
                           lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.01)),
    "adam": ({"method": "adam"}, lambda params, lr: torch.optim.Adam(params, lr=lr, foreach=False)),
    "adam-decay": ({"method": "adam", "weight_decay": 0.01},
                   lambda params, lr: torch.optim.Adam(params, lr=lr, weight_decay=0.01, foreach=False)),
}


def problem(samples=128, seed=0, dtype=torch.float64):
    """Least squares ``X -> X W*`` with a rank-6 ``W*`` of shape (30, 20)."""
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(30, 6, generator=gen, dtype=dtype) @ torch.randn(6, 20, generator=gen, dtype=dtype)
    x = torch.randn(samples, 30, generator=gen, dtype=dtype)
    return x, x @ w_star / 30**0.5


def make_layer(rank=3, seed=0, dtype=torch.float64, **kwargs):
    """A (30, 20) layer drawn in ``dtype``, so that its bases are orthonormal to that precision."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return DynamicalLowRank(30, 20, rank, bias=False, **kwargs)
    finally:
        torch.set_default_dtype(default)


def closure_for(layer, opt, x, y, losses=None):
    def closure():
        opt.zero_grad()
        loss = F.mse_loss(layer(x), y)
        loss.backward()
        if losses is not None:
            losses.append(loss.item())
        return loss

    return closure


def loss_gradient(w, x, y):
    """``G = dL/dW`` at ``W`` by autograd on the dense matrix (independent of the layer's backward)."""
    w = w.detach().clone().requires_grad_()
    F.mse_loss(x @ w, y).backward()
    return w.grad


def padded(t, rows, cols):
    out = t.new_zeros(rows, cols)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def factors(layer):
    return [t.detach().clone() for t in (layer.U, layer.S, layer.V)]


def assert_same_run(layer_a, opt_a, layer_b, opt_b):
    """Bit-identical factors and optimiser state."""
    for a, b in zip(factors(layer_a), factors(layer_b)):
        assert torch.equal(a, b)
    state_a, state_b = opt_a.state_dict(), opt_b.state_dict()
    for key in ("dlrt_cycle_position", "dlrt_truncations"):
        assert state_a[key] == state_b[key]
    assert state_a["state"].keys() == state_b["state"].keys()
    for key in state_a["state"]:
        entries_a, entries_b = state_a["state"][key], state_b["state"][key]
        assert entries_a.keys() == entries_b.keys()
        for name in entries_a:
            a, b = entries_a[name], entries_b[name]
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name


@pytest.mark.parametrize("integrator", ["kls", "single-pass"])
@pytest.mark.parametrize("rule", ["sgd", "sgd-momentum-decay", "adam"])
@pytest.mark.parametrize("new_coordinates", ["shared", "per-coordinate"])
def test_with_k_1_the_rank_tests_agree_bit_for_bit(integrator, rule, new_coordinates):
    """k = 1: augmentation, S-step and truncation in one step; the rank test of a cycle of one step is the plain
    tolerance, so both rules run the same steps."""
    x, y = problem(dtype=torch.float32)
    runs = []
    for rank_test in ("per-step", "accumulated"):
        layer = make_layer(rank=3, tau=0.05, dtype=torch.float32)
        opt = DLRT([layer], lr=0.05, integrator=integrator, rank_test=rank_test, new_coordinates=new_coordinates,
                   **RULES[rule][0])
        for _ in range(9):  # crosses two orthonormality checks
            opt.step(closure_for(layer, opt, x, y))
        runs.append((layer, opt))
    assert_same_run(*runs[0], *runs[1])


@pytest.mark.parametrize("integrator", ["kls", "single-pass"])
def test_a_cycle_augments_takes_k_s_steps_on_the_fixed_augmented_bases_and_truncates(integrator):
    """Plain SGD, k = 4, against the cycle written out: U_hat = [U, orth((I - U U^T) G V)], likewise V_hat,
    S_hat = [[S, 0], [0, 0]]; four steps S_hat <- S_hat - h U_hat^T G(U_hat S_hat V_hat^T) V_hat; truncation."""
    x, y = problem()
    layer = make_layer(rank=3, tau=0.1)
    h, k, tolerance = 0.1, 4, 1e-12
    u, s, v = factors(layer)
    g = loss_gradient(u @ s @ v.T, x, y)
    u_hat = torch.cat([u, augmented_basis(u, g @ v)], 1)
    v_hat = torch.cat([v, augmented_basis(v, g.T @ u)], 1)
    s_hat = padded(s, u_hat.shape[1], v_hat.shape[1])
    opt = DLRT([layer], lr=h, integrator=integrator, basis_interval=k, rank_test="accumulated")
    for step in range(k):
        s_hat = s_hat - h * u_hat.T @ loss_gradient(u_hat @ s_hat @ v_hat.T, x, y) @ v_hat
        opt.step(closure_for(layer, opt, x, y))
        if step < k - 1:  # the layer holds the augmented factors: the old bases first, unchanged
            assert layer.U.shape == u_hat.shape and layer.V.shape == v_hat.shape
            assert torch.equal(layer.U[:, :3], u) and torch.equal(layer.V[:, :3], v)
            torch.testing.assert_close(layer.U.data, u_hat, rtol=0, atol=tolerance)
            torch.testing.assert_close(layer.V.data, v_hat, rtol=0, atol=tolerance)
            torch.testing.assert_close(layer.S.data, s_hat, rtol=0, atol=tolerance)
    p, d, q = truncate(s_hat, layer.tau, layer.r_min, layer.r_max)
    assert layer.rank == len(d) < u_hat.shape[1]
    torch.testing.assert_close(effective_weight(layer), u_hat @ p @ torch.diag(d) @ q.T @ v_hat.T, rtol=0,
                               atol=tolerance)


def test_the_augmentation_leaves_w_unchanged():
    """kls evaluates the loss again on the installed (U_hat, S_hat, V_hat): the same loss, and the first step
    is the projected gradient step W - h P_U_hat G P_V_hat of W itself."""
    x, y = problem()
    layer = make_layer(rank=3, tau=0.1)
    w, h = effective_weight(layer), 0.1
    losses = []
    opt = DLRT([layer], lr=h, integrator="kls", basis_interval=3)
    opt.step(closure_for(layer, opt, x, y, losses))
    assert len(losses) == 2 and layer.rank > 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-14)
    project_u, project_v = layer.U @ layer.U.T, layer.V @ layer.V.T
    expected = w - h * project_u @ loss_gradient(w, x, y) @ project_v
    torch.testing.assert_close(effective_weight(layer), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("rule", list(RULES))
def test_the_cycle_s_steps_are_torch_optim_on_s_with_the_bases_fixed(rule):
    """After a first cycle (so that the state is not empty), the next cycle's k S-steps equal torch.optim's SGD /
    Adam on S_hat = [[S, 0], [0, 0]] with the state padded alike and U_hat, V_hat fixed; at tau = 0 the
    truncation keeps W, and maps the state by m <- P^T m Q, v <- (P^T)^2 v Q^2 (the K state by Q, the L state
    by P), with P = U_hat^T U_new, Q = V_hat^T V_new."""
    options, torch_optimizer = RULES[rule]
    x, y = problem()
    layer = make_layer(rank=3, tau=0.0)
    h, k, tolerance = 0.02, 4, 1e-12
    opt = DLRT([layer], lr=h, integrator="single-pass", basis_interval=k, **options)
    closure = closure_for(layer, opt, x, y)
    for _ in range(k):
        opt.step(closure)
    u, s, v = factors(layer)
    old_state = deepcopy(opt.state[layer.S])
    opt.step(closure)  # step 1 of the second cycle: augmentation and S-step
    u_hat, v_hat = layer.U.detach().clone(), layer.V.detach().clone()
    k_state, l_state = deepcopy(opt.state[layer.U]), deepcopy(opt.state[layer.V])
    r = u.shape[1]
    assert torch.equal(u_hat[:, :r], u) and torch.equal(v_hat[:, :r], v)
    rows, cols = u_hat.shape[1], v_hat.shape[1]
    reference = padded(s, rows, cols).requires_grad_()
    reference_opt = torch_optimizer([reference], h)
    reference_state = {key: padded(old_state[key], rows, cols)
                       for key in ("momentum_buffer", "exp_avg", "exp_avg_sq") if key in old_state}
    if "step" in old_state:
        reference_state["step"] = torch.tensor(float(old_state["step"]), dtype=torch.float64)
    reference_opt.state[reference] = reference_state

    def reference_step():
        reference_opt.zero_grad()
        F.mse_loss(x @ u_hat @ reference @ v_hat.T, y).backward()
        reference_opt.step()

    reference_step()
    torch.testing.assert_close(layer.S.data, reference.detach(), rtol=0, atol=tolerance)
    for _ in range(k - 2):
        opt.step(closure)
        reference_step()
        assert torch.equal(layer.U.data, u_hat) and torch.equal(layer.V.data, v_hat)
        torch.testing.assert_close(layer.S.data, reference.detach(), rtol=0, atol=tolerance)
    opt.step(closure)  # the k-th S-step, then the truncation
    reference_step()
    s_hat = reference.detach()
    torch.testing.assert_close(effective_weight(layer), u_hat @ s_hat @ v_hat.T, rtol=0, atol=tolerance)
    p, q = u_hat.T @ layer.U, v_hat.T @ layer.V
    expected = reference_opt.state[reference]
    for key, power in (("momentum_buffer", 1), ("exp_avg", 1), ("exp_avg_sq", 2)):
        if key in old_state:
            torch.testing.assert_close(opt.state[layer.S][key], p.T**power @ expected[key] @ q**power, rtol=0,
                                       atol=tolerance)
    for before, after, change in ((k_state, opt.state[layer.U], q), (l_state, opt.state[layer.V], p)):
        for key, power in (("momentum_buffer", 1), ("exp_avg", 1), ("exp_avg_sq", 2)):
            if key in before:
                torch.testing.assert_close(after[key], before[key] @ change**power, rtol=0, atol=tolerance)


def signed_permutation(n, seed):
    gen = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    return torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=gen)] * signs


def test_on_a_signed_permutation_the_mapped_state_is_the_permuted_state_and_adam_commutes():
    """m <- P^T m Q, v <- (P^T)^2 v Q^2, t <- (P^T)^2 t Q^2 for signed permutations P, Q is, bit for bit, the
    state of Adam run in the permuted coordinates, and its step is the permuted step to rounding (torch's
    vectorised pow and its scalar tail may round beta^t differently by an ulp, which 1 - beta2^t, as in
    torch.optim.Adam, turns into up to ~1e-13 relative at small t). The augmentation's padding is the same map
    with [I; 0], and gives new coordinates zero state."""
    gen = torch.Generator().manual_seed(0)
    m, g = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(5, 4, generator=gen, dtype=torch.float64)
    v = torch.rand(5, 4, generator=gen, dtype=torch.float64)
    t = torch.randint(1, 50, (5, 4), generator=gen).double()
    p, q = signed_permutation(5, 1), signed_permutation(4, 2)
    state = {"exp_avg": m.clone(), "exp_avg_sq": v.clone(), "coordinate_steps": t.clone()}
    _change_basis(state, p.T, q)
    rows, cols = p.abs().argmax(0), q.abs().argmax(0)  # new coordinate (i, j) is old (rows[i], cols[j]), with a sign
    sign = (p.sum(0)[:, None] * q.sum(0)[None, :])
    assert torch.equal(state["exp_avg"], sign * m[rows][:, cols])
    assert torch.equal(state["exp_avg_sq"], v[rows][:, cols])
    assert torch.equal(state["coordinate_steps"], t[rows][:, cols])
    step = adam_directions_per_coordinate([g], [m], [v], [t + 1], 0.9, 0.999, 1e-8)[0]
    mapped_step = adam_directions_per_coordinate([p.T @ g @ q], [state["exp_avg"]], [state["exp_avg_sq"]],
                                                 [state["coordinate_steps"] + 1], 0.9, 0.999, 1e-8)[0]
    torch.testing.assert_close(mapped_step, p.T @ step @ q, rtol=1e-13, atol=0)

    _pad_state(state, 7, 6)
    for key in ("exp_avg", "exp_avg_sq", "coordinate_steps"):
        assert state[key].shape == (7, 6) and not state[key][5:].any() and not state[key][:, 4:].any()


def test_the_truncation_maps_step_counts_to_weighted_means_of_the_old_ones():
    """Orthonormal columns of P and Q: each mapped count is a mean of the old counts with weights P_ki^2 Q_lj^2
    that sum to one; equal counts stay equal."""
    gen = torch.Generator().manual_seed(3)
    p = torch.linalg.qr(torch.randn(8, 5, generator=gen, dtype=torch.float64)).Q
    q = torch.linalg.qr(torch.randn(7, 4, generator=gen, dtype=torch.float64)).Q
    t = torch.randint(0, 100, (8, 7), generator=gen).double()
    state = {"coordinate_steps": t}
    _change_basis(state, p.T, q)
    weights = (p.T**2)[:, None, :, None] * (q**2).T[None, :, None, :]  # (5, 4, 8, 7)
    torch.testing.assert_close(weights.sum((2, 3)), torch.ones(5, 4, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(state["coordinate_steps"], (weights * t).sum((2, 3)), rtol=1e-14, atol=0)
    assert t.min() <= state["coordinate_steps"].min() and state["coordinate_steps"].max() <= t.max()
    uniform = {"coordinate_steps": torch.full((8, 7), 30.0, dtype=torch.float64)}
    _change_basis(uniform, p.T, q)
    torch.testing.assert_close(uniform["coordinate_steps"], torch.full((5, 4), 30.0, dtype=torch.float64),
                               rtol=1e-14, atol=0)


def resumable_runs():
    """(name, builder of (module, data), DLRT arguments) for the mid-cycle resumption test."""

    def linear(seed, rank):
        torch.manual_seed(seed)
        return DynamicalLowRank(30, 20, rank, bias=True, tau=0.05)

    def conv(seed, rank):
        torch.manual_seed(seed)
        return DynamicalLowRankConv2d(3, 8, 3, rank, padding=1, tau=0.05)

    gen = torch.Generator().manual_seed(7)
    linear_data = (torch.randn(64, 30, generator=gen), torch.randn(64, 20, generator=gen))
    conv_data = (torch.randn(4, 3, 6, 6, generator=gen), torch.randn(4, 8, 6, 6, generator=gen))
    return [
        ("linear-adam-per-coordinate", linear, linear_data,
         {"method": "adam", "integrator": "single-pass", "new_coordinates": "per-coordinate"}),
        ("linear-adam-kls", linear, linear_data, {"method": "adam", "integrator": "kls", "weight_decay": 0.01}),
        ("linear-momentum", linear, linear_data, {"method": "sgd", "momentum": 0.9, "integrator": "single-pass"}),
        ("conv-adam", conv, conv_data, {"method": "adam", "integrator": "single-pass"}),
        ("conv-adam-per-coordinate-kls", conv, conv_data,
         {"method": "adam", "integrator": "kls", "new_coordinates": "per-coordinate"}),
    ]


@pytest.mark.parametrize("name, build, data, options", resumable_runs(), ids=[run[0] for run in resumable_runs()])
def test_a_state_dict_saved_mid_cycle_continues_the_same_trajectory_bit_for_bit(name, build, data, options):
    """Saved at step 2 of the second cycle (the layer holds the augmented factors), through torch.save, into a
    layer of another rank and a new optimiser: the next 7 steps (a truncation, another cycle) are identical."""
    x, y = data
    k = 4
    layer = build(0, 4)
    opt = DLRT([layer], lr=0.02, basis_interval=k, **options)
    closure = closure_for(layer, opt, x, y)
    for _ in range(k):
        opt.step(closure)
    truncated_rank = layer.rank
    for _ in range(2):
        opt.step(closure)
    assert layer.rank > truncated_rank and layer.S.shape == (layer.U.shape[1], layer.V.shape[1])
    buffer = io.BytesIO()
    torch.save({"model": layer.state_dict(), "optimizer": opt.state_dict()}, buffer)
    for _ in range(7):
        opt.step(closure)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = build(1, 2)
    resumed.load_state_dict(saved["model"])
    resumed_opt = DLRT([resumed], lr=0.02, basis_interval=k, **options)
    resumed_opt.load_state_dict(saved["optimizer"])
    for _ in range(7):
        resumed_opt.step(closure_for(resumed, resumed_opt, x, y))
    assert_same_run(layer, opt, resumed, resumed_opt)


@pytest.mark.parametrize("new_coordinates", ["shared", "per-coordinate"])
def test_a_coordinate_added_by_the_augmentation_takes_an_adam_step_of_h_with_per_coordinate_counts(new_coordinates):
    """At the augmentation after 200 steps, every coordinate of S takes torch.optim.Adam's step for a parameter of
    its own: an old one with its moments and its count (per-coordinate) or the count of S (shared), a new one
    with zero moments and count 0 (a fresh parameter) or the count of S. So a new coordinate moves by
    h g / (|g| + eps) = h with per-coordinate counts, and by
    h (1 - beta1) / (1 - beta1^t) / sqrt((1 - beta2) / (1 - beta2^t)) = 1.35 h at t = 201 with the shared one."""
    x, y = problem()
    layer = make_layer(rank=3, tau=0.1)
    h, k = 0.01, 5
    opt = DLRT([layer], lr=h, method="adam", integrator="single-pass", basis_interval=k,
               new_coordinates=new_coordinates)
    closure = closure_for(layer, opt, x, y)
    for _ in range(40 * k):
        opt.step(closure)
    u, s, v = factors(layer)
    old = deepcopy(opt.state[layer.S])
    opt.step(closure)  # augmentation and the first S-step of the new coordinates
    u_hat, v_hat = layer.U.detach(), layer.V.detach()
    rows, cols, r = u_hat.shape[1], v_hat.shape[1], u.shape[1]
    new = torch.ones(rows, cols, dtype=torch.bool)
    new[:r, :r] = False
    assert new.any()
    g = u_hat.T @ loss_gradient(u @ s @ v.T, x, y) @ v_hat
    s_hat = padded(s, rows, cols)
    params = [s_hat[i, j].clone().requires_grad_() for i in range(rows) for j in range(cols)]
    reference = torch.optim.Adam(params, lr=h, foreach=False)
    for index, param in enumerate(params):
        i, j = divmod(index, cols)
        param.grad = g[i, j].clone()
        zero = torch.zeros((), dtype=torch.float64)
        if not new[i, j]:
            count = old["coordinate_steps"][i, j] if new_coordinates == "per-coordinate" else old["step"]
            reference.state[param] = {"step": torch.tensor(float(count), dtype=torch.float64),
                                      "exp_avg": old["exp_avg"][i, j].clone(),
                                      "exp_avg_sq": old["exp_avg_sq"][i, j].clone()}
        elif new_coordinates == "shared":
            reference.state[param] = {"step": torch.tensor(float(old["step"]), dtype=torch.float64), "exp_avg": zero,
                                      "exp_avg_sq": zero.clone()}
    reference.step()
    torch.testing.assert_close(layer.S.data, torch.stack(params).detach().reshape(rows, cols), rtol=0, atol=1e-12)
    # The first step of a new coordinate, in units of h: a |g| / (b |g| + eps) for a count t.
    t = 1 if new_coordinates == "per-coordinate" else old["step"] + 1
    a, b = (1 - 0.9) / (1 - 0.9**t), ((1 - 0.999) / (1 - 0.999**t)) ** 0.5
    gradient = g[new].abs()
    torch.testing.assert_close(((layer.S.data - s_hat) / h)[new].abs(), a * gradient / (b * gradient + 1e-8),
                               rtol=1e-9, atol=1e-12)
    if new_coordinates == "per-coordinate":
        assert a == b == 1  # a step of h (|g| >> eps)
    else:
        assert t == 201 and a / b == pytest.approx(1.35, abs=0.01)
    assert (gradient > 1e-4).any()


def network(tau, dtype=torch.float64):
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return NeuralNetwork([DynamicalLowRank(40, 32, 8, tau=tau), DynamicalLowRank(32, 16, 8, tau=tau), Dense(16, 5)],
                             ["relu", "relu", "identity"])
    finally:
        torch.set_default_dtype(default)


def rotated(model, seed):
    """The same network with each dynamical layer's factors rotated: ``U Q1, Q1^T S Q2, V Q2`` (the same W)."""
    copy = deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for layer in copy.dynamical_layers():
        q1, q2 = (torch.linalg.qr(torch.randn(layer.rank, layer.rank, generator=gen, dtype=torch.float64)).Q
                  .to(layer.S.dtype) for _ in range(2))
        layer.set_factors(layer.U.data @ q1, q1.T @ layer.S.data @ q2, layer.V.data @ q2)
    return copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("tau, batch", [(0.1, 64), (0.0, 64), (0.1, 12)], ids=["tau=0.1", "tau=0", "batch<2r"])
@pytest.mark.parametrize("rule", ["sgd", "sgd-momentum-decay"])
def test_a_cycle_depends_on_w_and_the_data_not_on_the_factorisation(dtype, tau, batch, rule):
    """Two factorisations of the same W (U Q1, Q1^T S Q2, V Q2) take the same steps over two whole cycles and the
    augmentation of a third (k = 3, 7 steps): the augmented spans, the S-steps on them and the truncation depend
    on W and the data only. SGD, with or without momentum and weight decay (linear in the gradients, so its
    state is the same tensor in rotated coordinates); Adam's element-wise normalisation is not rotation
    invariant. The runs differ by rounding, amplified at a truncation by at most 1 / CLUSTER_RTOL: the bound is
    conftest.rotation_tolerance of the dtype, as for the classic step in test_optim."""
    x = torch.rand(batch, 40, generator=torch.Generator().manual_seed(1), dtype=dtype)
    labels = torch.randint(0, 5, (batch,), generator=torch.Generator().manual_seed(2))
    model = network(tau, dtype)
    twin = rotated(model, seed=3)
    weights = []
    for net in (model, twin):
        opt = dlrt_optimizer(net, lr=0.1, integrator="single-pass", basis_interval=3, **RULES[rule][0])

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(net(x), labels)
            loss.backward()
            return loss

        ranks = []
        for _ in range(7):
            opt.step(closure)
            ranks.append(net.ranks())
        weights.append(([effective_weight(layer) for layer in net.layers], ranks))
    (expected, expected_ranks), (got, got_ranks) = weights
    assert got_ranks == expected_ranks
    for w_expected, w_got in zip(expected, got):
        error = torch.linalg.matrix_norm(w_got - w_expected) / torch.linalg.matrix_norm(w_expected)
        assert error <= rotation_tolerance(dtype), float(error)


def test_on_a_convolution_the_single_pass_cycle_is_the_kls_cycle():
    """The convolution's single-pass S-gradient on the augmented bases (from the unfolded patches) and its
    autograd S.grad between augmentation and truncation give kls's cycle (float64)."""
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64), torch.randn(4, 8, 6, 6, generator=gen,
                                                                                      dtype=torch.float64)
    layers = []
    for integrator in ("kls", "single-pass"):
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            conv = DynamicalLowRankConv2d(3, 8, 3, 3, padding=1, tau=0.05)
        finally:
            torch.set_default_dtype(default)
        opt = DLRT([conv], lr=0.02, method="adam", integrator=integrator, basis_interval=3)
        for _ in range(7):
            opt.step(closure_for(conv, opt, x, y))
        layers.append(conv)
    assert layers[0].rank == layers[1].rank > 3  # mid-cycle: the augmented factors
    torch.testing.assert_close(layers[1].weight_matrix(), layers[0].weight_matrix(), rtol=0, atol=1e-12)


def test_a_fixed_rank_layer_takes_new_bases_on_the_first_step_of_a_cycle_and_s_steps_on_them_after():
    """Fixed rank, k = 3: step 1 is the classic fixed-rank step (the same as with k = 1), steps 2 and 3 are
    S <- S - h dL/dS with U and V unchanged, step 4 starts a new cycle with new bases."""
    x, y = problem()
    layer, classic = make_layer(rank=4, adaptive=False), make_layer(rank=4, adaptive=False)
    h = 0.02
    opt = DLRT([layer], lr=h, integrator="single-pass", basis_interval=3)
    classic_opt = DLRT([classic], lr=h, integrator="single-pass")
    opt.step(closure_for(layer, opt, x, y))
    classic_opt.step(closure_for(classic, classic_opt, x, y))
    assert all(torch.equal(a, b) for a, b in zip(factors(layer), factors(classic)))
    for _ in range(2):
        u, s, v = factors(layer)
        expected = s - h * u.T @ loss_gradient(u @ s @ v.T, x, y) @ v
        opt.step(closure_for(layer, opt, x, y))
        assert torch.equal(layer.U.data, u) and torch.equal(layer.V.data, v)
        torch.testing.assert_close(layer.S.data, expected, rtol=0, atol=1e-13)
    u = layer.U.detach().clone()
    opt.step(closure_for(layer, opt, x, y))
    assert not torch.equal(layer.U.data, u)


def test_the_rank_test_counts_the_new_block_as_one_step_s_worth():
    """cycle_rank is the tolerance rank of S_hat with the new block divided by sqrt(j). An old block diag(4, 2)
    and a new block of j = 16 steps of independent signs (+-h each, about sqrt(j) h per entry after j steps):
    the plain tolerance keeps 4 of the noise directions, the per-step test none. A new direction whose singular
    value divided by sqrt(j) still passes the tolerance (6.4 / 4 = 1.6 against tau ||S_hat|| ~ 0.95) is kept by
    both; one of 1.6 (h on every step, coherently) only by the plain rule."""
    gen = torch.Generator().manual_seed(0)
    j, h, tau = 16, 0.1, 0.2
    s_hat = torch.zeros(10, 10, dtype=torch.float64)
    s_hat[0, 0], s_hat[1, 1] = 4.0, 2.0
    noise = (torch.randint(0, 2, (j, 10, 10), generator=gen).double() * 2 - 1).sum(0) * h
    noise[:2, :2] = 0
    assert tolerance_rank(torch.linalg.svdvals(s_hat + noise).tolist(), tau) == 6
    assert cycle_rank(s_hat + noise, (2, 2), j, tau) == 2
    assert cycle_rank(s_hat + noise, (2, 2), 1, tau) == 6  # one step: the plain rule
    for value, per_step in ((4 * j * h, 3), (j * h, 2)):
        coherent = s_hat + noise / 4
        coherent[2, 2] = value
        assert tolerance_rank(torch.linalg.svdvals(coherent).tolist(), tau) == 3
        assert cycle_rank(coherent, (2, 2), j, tau) == per_step
    scaled = (s_hat + noise) / j**0.5
    scaled[:2, :2] = s_hat[:2, :2]
    assert cycle_rank(s_hat + noise, (2, 2), j, tau) == tolerance_rank(torch.linalg.svdvals(scaled).tolist(), tau)


@pytest.mark.parametrize("rank_test", ["per-step", "accumulated"])
def test_the_end_of_a_cycle_keeps_s_hat_s_leading_triplets_at_the_tested_rank(rank_test, monkeypatch):
    """Adam, k = 5: the truncation at the end of the second cycle installs U_hat P_r1 diag(d[:r1]) Q_r1^T V_hat^T
    with (P, d, Q) the SVD of that cycle's S_hat itself, and r1 the rank test's count (per-step: cycle_rank of
    S_hat, its new block starting at the cycle's starting rank; accumulated: the plain tolerance), clamped and
    with clusters kept whole."""
    x, y = problem()
    layer = make_layer(rank=3, tau=0.1)
    k = 5
    opt = DLRT([layer], lr=0.01, method="adam", integrator="single-pass", basis_interval=k, rank_test=rank_test)
    closure = closure_for(layer, opt, x, y)
    for _ in range(k + 1):
        opt.step(closure)
    start = tuple(opt.state[layer.S]["cycle_start"])
    assert start == (3, 3) or layer.rank > 3
    calls = []
    original = optim.truncate

    def recording_truncate(s_hat, tau, r_min, r_max, rank=None):
        calls.append((s_hat.clone(), rank))
        return original(s_hat, tau, r_min, r_max, rank)

    monkeypatch.setattr(optim, "truncate", recording_truncate)
    for _ in range(k - 2):
        opt.step(closure)
    assert not calls
    u_hat, v_hat = layer.U.detach().clone(), layer.V.detach().clone()
    opt.step(closure)  # the k-th S-step of the cycle and the truncation
    (s_hat, rank), = calls
    assert "cycle_start" not in opt.state[layer.S]
    if rank_test == "per-step":
        assert rank == cycle_rank(s_hat, start, k, layer.tau)
    else:
        assert rank is None
    p, d, qt = torch.linalg.svd(s_hat)
    r1 = optim.truncated_rank(d, layer.tau, layer.r_min, layer.r_max, optim.CLUSTER_RTOL, rank)
    assert layer.rank == r1
    expected = u_hat @ p[:, :r1] @ torch.diag(d[:r1]) @ qt[:r1] @ v_hat.T
    torch.testing.assert_close(effective_weight(layer), expected, rtol=0, atol=1e-12)


def test_finish_cycle_ends_a_cycle_early_as_a_shorter_cycle_would():
    """finish_cycle after 2 of k = 5 steps truncates with the rank test of 2 steps: the same run as k = 2 for that
    cycle; the next step augments again. Between cycles it does nothing."""
    x, y = problem()
    runs = []
    for k in (5, 2):
        layer = make_layer(rank=3, tau=0.1)
        opt = DLRT([layer], lr=0.01, method="adam", integrator="single-pass", basis_interval=k)
        closure = closure_for(layer, opt, x, y)
        for _ in range(2):
            opt.step(closure)
        assert opt.mid_cycle == (k == 5)
        opt.finish_cycle()
        assert not opt.mid_cycle and "cycle_start" not in opt.state[layer.S]
        before = factors(layer)
        opt.finish_cycle()
        assert all(torch.equal(a, b) for a, b in zip(before, factors(layer)))
        runs.append((layer, opt, before))
    (layer_a, opt_a, before_a), (layer_b, opt_b, before_b) = runs
    assert all(torch.equal(a, b) for a, b in zip(before_a, before_b))
    for layer, opt in ((layer_a, opt_a), (layer_b, opt_b)):
        rank = layer.rank
        opt.step(closure_for(layer, opt, x, y))
        assert layer.rank > rank  # a new cycle: the augmented factors
    assert all(torch.equal(a, b) for a, b in zip(factors(layer_a), factors(layer_b)))


@pytest.mark.parametrize("kwargs, message", [({"rank_test": "every-step"}, "rank_test"),
                                             ({"new_coordinates": "fresh"}, "new_coordinates")])
def test_unknown_rank_tests_and_step_count_rules_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DLRT([make_layer()], **kwargs)


@pytest.mark.parametrize("k", [1, 3])
def test_without_growth_the_rank_never_rises_above_the_rank_a_step_or_cycle_started_from(k):
    """grow=False (the DLRT authors' LeNet5 rule): at tau = 0 a growing layer doubles its rank, one without growth
    keeps it; the rank falls when the tolerance allows and then stays at or below every earlier rank."""
    x, y = problem()
    ranks = {}
    for grow in (True, False):
        layer = make_layer(rank=3, tau=0.0, grow=grow)
        opt = DLRT([layer], lr=0.05, method="adam", integrator="single-pass", basis_interval=k)
        for _ in range(k):
            opt.step(closure_for(layer, opt, x, y))
        ranks[grow] = layer.rank
    assert ranks[True] > 3 and ranks[False] == 3
    layer = make_layer(rank=12, tau=0.3, grow=False)
    opt = DLRT([layer], lr=0.05, method="adam", integrator="single-pass", basis_interval=k)
    history = []
    for _ in range(8 * k):
        opt.step(closure_for(layer, opt, x, y))
        if not opt.mid_cycle:
            history.append(layer.rank)
    assert history[-1] < 12 and all(a >= b for a, b in zip(history, history[1:]))


def test_weight_decay_enters_the_k_and_l_steps_where_it_changes_them():
    """Weight decay lambda adds lambda K = lambda U S to G V (and lambda V S^T to G^T U). Fixed rank, plain SGD: the
    new basis spans U S - h (G V + lambda U S). Rank-adaptive, Adam (k = 3, so that the layer holds U_hat): the new
    directions are those of Adam's first direction (G V + lambda U S) / (|G V + lambda U S| + eps), element-wise.
    In both, lambda = 0 gives another basis. (Rank-adaptive plain SGD is the case where it cannot matter: U S lies
    in span(U), so span[U, G V + lambda U S] = span[U, G V].)"""
    x, y = problem()
    h, decay = 0.1, 0.5

    def projector(basis):
        return basis @ basis.T

    for adaptive, options in ((False, {"method": "sgd"}), (True, {"method": "adam", "basis_interval": 3})):
        spans = {}
        for weight_decay in (decay, 0.0):
            layer = make_layer(rank=3, tau=0.1, adaptive=adaptive)
            u, s, v = factors(layer)
            g = loss_gradient(u @ s @ v.T, x, y)
            opt = DLRT([layer], lr=h, integrator="kls", weight_decay=weight_decay, **options)
            opt.step(closure_for(layer, opt, x, y))
            direction = g @ v + weight_decay * u @ s
            if adaptive:
                expected = torch.cat([u, augmented_basis(u, direction / (direction.abs() + 1e-8))], 1)
            else:
                expected = torch.linalg.qr(u @ s - h * direction).Q
            torch.testing.assert_close(projector(layer.U.data), projector(expected), rtol=0, atol=1e-10)
            spans[weight_decay] = projector(layer.U.data)
        assert not torch.allclose(spans[decay], spans[0.0], atol=1e-3)
