"""Layers: shapes, the factorised product, its gradients, initialisations and checkpoints of any rank."""

import math

import pytest
import torch
from torch import nn

from lowrank.layers import (
    DYNAMICAL_INIT_SCALE,
    Dense,
    DynamicalLowRank,
    GradientSink,
    LowRank,
    dense_product,
    initial_factors,
    low_rank_product,
    skinny_mm,
    weight_gradient,
)
from lowrank.network import effective_weight

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(
    "layer",
    [Dense(12, 7), LowRank(12, 7, 3), LowRank(12, 7, 3, factorization="uv"), DynamicalLowRank(12, 7, 3)],
    ids=["dense", "lowrank", "lowrank-uv", "dynamical"],
)
def test_shapes_for_any_leading_dimensions(layer):
    assert layer(torch.randn(5, 12)).shape == (5, 7)
    assert layer(torch.randn(2, 4, 12)).shape == (2, 4, 7)


@pytest.mark.parametrize("factorization", ["usv", "uv"])
def test_lowrank_equals_dense_layer_with_product_weight(factorization):
    layer = LowRank(20, 9, 4, factorization=factorization)
    with torch.no_grad():
        layer.bias.normal_()
    dense = Dense(20, 9)
    with torch.no_grad():
        dense.weight.copy_(effective_weight(layer))
        dense.bias.copy_(layer.bias)
    x = torch.randn(16, 20)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    assert torch.linalg.matrix_rank(effective_weight(layer)) == 4


def test_low_rank_product_gradients_match_finite_differences():
    inputs = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in [(5, 6), (6, 3), (3, 3), (4, 3)]]
    assert torch.autograd.gradcheck(low_rank_product, inputs)


def test_sink_holds_exact_k_and_l_gradients():
    """G V and G^T U left by the backward pass equal autograd's dL/dW times V and U."""
    layer = DynamicalLowRank(15, 8, 4)
    x, target = torch.randn(32, 15), torch.randn(32, 8)
    ((layer(x) - target) ** 2).sum().backward()

    w = effective_weight(layer).requires_grad_()
    ((x @ w + layer.bias.detach() - target) ** 2).sum().backward()
    g = w.grad
    torch.testing.assert_close(layer.sink.k_grad, g @ layer.V.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.sink.l_grad, g.T @ layer.U.detach(), rtol=1e-5, atol=1e-4)
    # The factor gradient dL/dU = G V S^T is a different vector unless S^T S = I.
    torch.testing.assert_close(layer.U.grad, g @ layer.V.detach() @ layer.S.detach().T, rtol=1e-5, atol=1e-4)


def test_sink_accumulates_and_projects_recorded_passes():
    layer = DynamicalLowRank(10, 6, 3)
    layer.sink.record_activations = True
    batches = [torch.randn(8, 10) for _ in range(2)]
    for x in batches:
        layer(x).sum().backward()
    g = sum(x.T @ torch.ones(8, 6) for x in batches)
    u, v = torch.linalg.qr(torch.randn(10, 5)).Q, torch.linalg.qr(torch.randn(6, 4)).Q
    torch.testing.assert_close(layer.sink.projected_gradient(u, v), u.T @ g @ v, rtol=1e-5, atol=1e-5)
    layer.sink.clear()
    assert layer.sink.k_grad is None and not layer.sink.inputs
    with pytest.raises(RuntimeError, match="no recorded backward pass"):
        GradientSink().projected_gradient(u, v)


def test_no_gradient_is_recorded_without_grad_mode():
    layer = DynamicalLowRank(10, 6, 3)
    with torch.no_grad():
        layer(torch.randn(4, 10))
    assert layer.sink.k_grad is None


@pytest.mark.parametrize("init", ["kaiming", "spectral", "spectral-ones", "sorted-normal"])
def test_factor_bases_are_orthonormal(init):
    u, s, v = initial_factors(50, 30, 8, init)
    torch.testing.assert_close(u.T @ u, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(8), atol=1e-5, rtol=0)


def test_the_sorted_normal_start_is_a_decreasing_diagonal_of_absolute_gaussians():
    """The DLRT authors' LeNet5 start: S = diag(|z|) for z ~ N(0, I_r), sorted in decreasing order."""
    torch.manual_seed(3)
    _, s, _ = initial_factors(50, 30, 8, "sorted-normal")
    d = torch.diagonal(s)
    assert torch.equal(s, torch.diag(d)) and (d >= 0).all() and torch.equal(d, d.sort(descending=True).values)
    torch.manual_seed(0)
    samples = torch.cat([torch.diagonal(initial_factors(20, 20, 20, "sorted-normal")[1]) for _ in range(200)])
    assert float(samples.mean()) == pytest.approx((2 / torch.pi) ** 0.5, rel=0.05)  # E|z| for z ~ N(0, 1)


def test_kaiming_factors_have_distinct_singular_values_and_the_dense_frobenius_norm():
    """S has i.i.d. Gaussian entries (not c I): no ties for the truncation, and E||W||_F^2 = 2 n_out as Kaiming's."""
    torch.manual_seed(0)
    norms, gaps = [], []
    for _ in range(20):
        u, s, v = initial_factors(784, 512, 128, "kaiming")
        torch.testing.assert_close(u.T @ u, torch.eye(128), atol=1e-5, rtol=0)
        d = torch.linalg.svdvals(s.double())
        gaps.append(float((d[:-1] - d[1:]).min() / d[0]))
        norms.append(float(torch.linalg.matrix_norm((u @ s @ v.T).double()) ** 2))
    assert sum(norms) / len(norms) == pytest.approx(2 * 512, rel=0.02)
    assert min(gaps) > 1e-6


def test_spectral_init_is_the_best_rank_r_approximation_of_a_dense_init():
    torch.manual_seed(3)
    u, s, v = initial_factors(40, 30, 6, "spectral")
    torch.manual_seed(3)
    w0 = torch.randn(40, 30) * math.sqrt(2 / 40)
    sigma = torch.linalg.svdvals(w0)
    torch.testing.assert_close(torch.diagonal(s), sigma[:6])
    # Eckart-Young: the error is the norm of the discarded singular values.
    assert torch.linalg.matrix_norm(w0 - u @ s @ v.T) == pytest.approx(sigma[6:].norm().item(), rel=1e-4)


def test_spectral_ones_sets_every_singular_value_to_one():
    _, s, _ = initial_factors(40, 30, 6, "spectral-ones")
    torch.testing.assert_close(s, torch.eye(6))


def test_uv_spectral_factors_split_singular_values_evenly():
    layer = LowRank(40, 30, 5, factorization="uv", init="spectral")
    torch.testing.assert_close(layer.U.T @ layer.U, layer.V.T @ layer.V, rtol=1e-4, atol=1e-5)


def test_normal_init_reproduces_plain_gaussian_factors():
    layer = LowRank(300, 200, 50, init="normal")
    for factor in (layer.U, layer.S, layer.V, layer.bias):
        assert factor.mean().item() == pytest.approx(0, abs=0.1)
        assert factor.std().item() == pytest.approx(1, abs=0.1)


def test_dynamical_layer_loads_a_checkpoint_of_another_rank():
    source = DynamicalLowRank(12, 9, 2)
    source.set_factors(*initial_factors(12, 9, 5, "kaiming"))
    target = DynamicalLowRank(12, 9, 2)
    target.load_state_dict(source.state_dict())
    assert target.rank == 5
    x = torch.randn(3, 12)
    torch.testing.assert_close(target(x), source(x))


def test_parameter_counts_follow_the_formulas():
    n_in, n_out, r = 784, 512, 20
    count = lambda layer: sum(p.numel() for p in layer.parameters())  # noqa: E731
    assert count(Dense(n_in, n_out)) == n_in * n_out + n_out
    assert count(LowRank(n_in, n_out, r)) == r * (n_in + n_out + r) + n_out
    assert count(LowRank(n_in, n_out, r, factorization="uv")) == r * (n_in + n_out) + n_out
    assert count(DynamicalLowRank(n_in, n_out, r)) == r * (n_in + n_out + r) + n_out


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LowRank(10, 5, 6), "rank = 6"),
        (lambda: LowRank(10, 5, 2, factorization="svd"), "factorization"),
        (lambda: Dense(10, 5, init="spectral"), "init"),
        (lambda: DynamicalLowRank(10, 5, 4, r_max=3), "r_max"),
        (lambda: DynamicalLowRank(10, 5, 2, tau=-0.1), "tau"),
        (lambda: Dense(0, 5), "in_features"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_extra_repr_names_the_sizes():
    assert "in_features=12, out_features=7, rank=3" in repr(LowRank(12, 7, 3))
    assert "tau=0.2" in repr(DynamicalLowRank(12, 7, 3, tau=0.2))


@pytest.mark.parametrize("columns", [3, 10, 15, 16, 40])
def test_reordered_products_equal_plain_matmul(columns):
    """skinny_mm and weight_gradient pick faster layouts; the matrices are those of a @ b and x^T dy."""
    a, b = torch.randn(64, 300, dtype=torch.float64), torch.randn(300, columns, dtype=torch.float64)
    torch.testing.assert_close(skinny_mm(a, b), a @ b)
    x, dy = torch.randn(64, 300, dtype=torch.float64), torch.randn(64, columns * 5, dtype=torch.float64)
    torch.testing.assert_close(weight_gradient(x, dy), x.T @ dy)


def test_dense_product_gradients_match_finite_differences():
    inputs = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in [(5, 6), (6, 3), (3,)]]
    assert torch.autograd.gradcheck(dense_product, inputs)
    assert torch.autograd.gradcheck(lambda x, w: dense_product(x, w), inputs[:2])


def test_low_rank_product_with_bias_gradients_match_finite_differences():
    shapes = [(5, 6), (6, 3), (3, 3), (4, 3), (4,)]
    x, u, s, v, b = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in shapes]
    assert torch.autograd.gradcheck(lambda x, u, s, v, b: low_rank_product(x, u, s, v, bias=b), (x, u, s, v, b))


def test_dense_layer_equals_the_plain_affine_map():
    layer = Dense(20, 9)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 8, 20)
    torch.testing.assert_close(layer(x), x @ layer.weight + layer.bias)


def test_augmented_gradient_reuses_recorded_coordinates():
    """[U, U_e]^T G [V, V_e] from the recorded X U and Delta V equals projected_gradient of the joined bases."""
    layer = DynamicalLowRank(10, 6, 2)
    layer.sink.record_activations = True
    for _ in range(2):
        layer(torch.randn(8, 10)).square().sum().backward()
    u_extra, v_extra = torch.randn(10, 3), torch.randn(6, 2)
    expected = layer.sink.projected_gradient(torch.cat([layer.U, u_extra], 1), torch.cat([layer.V, v_extra], 1))
    torch.testing.assert_close(layer.sink.augmented_gradient(u_extra, v_extra), expected, rtol=1e-5, atol=1e-5)


def test_sink_switches_skip_basis_gradients_but_keep_the_s_gradient():
    x = torch.randn(16, 15)
    reference = DynamicalLowRank(15, 8, 4)
    reference(x).square().sum().backward()
    for basis_grads, active in ((False, True), (False, False)):
        layer = DynamicalLowRank(15, 8, 4)
        layer.load_state_dict(reference.state_dict())
        layer.sink.basis_grads, layer.sink.active = basis_grads, active
        layer(x).square().sum().backward()
        assert layer.U.grad is None and layer.V.grad is None
        torch.testing.assert_close(layer.S.grad, reference.S.grad)
        torch.testing.assert_close(layer.bias.grad, reference.bias.grad)
        if active:
            torch.testing.assert_close(layer.sink.k_grad, reference.sink.k_grad)
        else:
            assert layer.sink.k_grad is None and layer.sink.l_grad is None


@pytest.mark.parametrize("init", ["kaiming", "normal", "spectral"])
def test_init_scale_multiplies_the_initial_weight(init):
    for make in (lambda c: DynamicalLowRank(40, 30, 6, init=init, init_scale=c),
                 lambda c: LowRank(40, 30, 6, init=init, init_scale=c),
                 lambda c: LowRank(40, 30, 6, factorization="uv", init=init, init_scale=c)):
        torch.manual_seed(5)
        reference = effective_weight(make(1.0))
        torch.manual_seed(5)
        torch.testing.assert_close(effective_weight(make(0.3)), 0.3 * reference)
    torch.manual_seed(5)
    reference = Dense(40, 30, init="normal" if init == "normal" else "kaiming").weight
    torch.manual_seed(5)
    torch.testing.assert_close(Dense(40, 30, init="normal" if init == "normal" else "kaiming", init_scale=0.3).weight,
                               0.3 * reference)


def test_dynamical_layers_start_small_and_the_others_at_the_kaiming_scale():
    assert DynamicalLowRank(30, 20, 4).init_scale == DYNAMICAL_INIT_SCALE == 0.2
    assert DynamicalLowRank(30, 20, 4, init="normal").init_scale == 1.0  # the student study's N(0, 1) as it was
    assert LowRank(30, 20, 4).init_scale == Dense(30, 20).init_scale == 1.0
    with pytest.raises(ValueError, match="init_scale = 0 must be positive"):
        DynamicalLowRank(30, 20, 4, init_scale=0)


def test_kaiming_flat_factors_have_equal_singular_values_and_the_dense_frobenius_norm():
    u, s, v = initial_factors(784, 512, 64, "kaiming-flat")
    torch.testing.assert_close(s, torch.eye(64) * math.sqrt(2 * 512 / 64))
    assert torch.linalg.matrix_norm(u @ s @ v.T) ** 2 == pytest.approx(2 * 512, rel=1e-4)


def test_dense_converts_to_and_from_torch_linear_with_the_same_map():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    x = torch.randn(5, 12)
    rng = torch.get_rng_state()
    dense = Dense.from_linear(linear)
    back = dense.to_linear()
    assert torch.equal(torch.get_rng_state(), rng)
    assert dense.weight.shape == (12, 7) and torch.equal(dense.weight, linear.weight.T)
    torch.testing.assert_close(dense(x), linear(x))
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)
    assert Dense.from_linear(nn.Linear(12, 7, bias=False)).bias is None


@pytest.mark.parametrize("make", [
    lambda dense: LowRank.from_dense(dense, 4),
    lambda dense: LowRank.from_dense(dense, 4, factorization="uv"),
    lambda dense: DynamicalLowRank.from_dense(dense, 4, tau=0.05),
], ids=["lowrank usv", "lowrank uv", "dynamical"])
def test_from_dense_is_the_best_rank_r_approximation_and_to_dense_its_weight(make):
    torch.manual_seed(1)
    dense = Dense(20, 16)
    with torch.no_grad():
        dense.bias.normal_()
    rng = torch.get_rng_state()
    layer = make(dense)
    assert torch.equal(torch.get_rng_state(), rng)
    sigma = torch.linalg.svdvals(dense.weight.detach())
    error = torch.linalg.matrix_norm(layer.weight_matrix() - dense.weight.detach())
    torch.testing.assert_close(error, sigma[4:].norm())  # Eckart-Young: the tail of the spectrum
    assert torch.equal(layer.bias, dense.bias)
    back = layer.to_dense()
    torch.testing.assert_close(back.weight, layer.weight_matrix())
    x = torch.randn(3, 20)
    torch.testing.assert_close(back(x), layer(x))
    if isinstance(layer, DynamicalLowRank):
        torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(4), atol=1e-5, rtol=0)
        assert layer.tau == 0.05


def test_a_full_rank_copy_of_a_dense_layer_computes_the_same_map():
    torch.manual_seed(2)
    dense = Dense(10, 6)
    x = torch.randn(4, 10)
    torch.testing.assert_close(LowRank.from_dense(dense, 6)(x), dense(x), atol=1e-5, rtol=1e-5)
