"""lowrank.conv: low-rank convolutions against torch's convolution of the formed kernel, and DLRT on them."""

import io
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank import dlrt_optimizer
from lowrank.conv import DynamicalLowRankConv2d, LowRankConv2d
from lowrank.linalg import truncated_svd

torch.set_num_threads(1)

GEOMETRIES = [dict(), dict(stride=2, padding=1), dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1))]
CLASSES = [LowRankConv2d, DynamicalLowRankConv2d]


def formed_kernel(layer, u, s, v):
    """``reshape((U S V^T)^T, (c_out, c_in, k_h, k_w))`` from factors that autograd can differentiate."""
    w = u @ (s if s is not None else torch.eye(u.shape[1], dtype=u.dtype)) @ v.T
    return w.T.reshape(layer.out_channels, layer.in_channels, *layer.kernel_size)


def reference(layer, x):
    """torch's convolution with the kernel formed from detached copies of the factors."""
    factors = [p.detach().clone().requires_grad_() if p is not None else None for p in (layer.U, layer.S, layer.V)]
    y = F.conv2d(x, formed_kernel(layer, *factors), layer.bias, layer.stride, layer.padding, layer.dilation)
    return y, factors


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["plain", "stride-padding", "mixed"])
@pytest.mark.parametrize("bias", [True, False])
def test_the_factored_convolution_is_torch_s_convolution_of_the_formed_kernel(cls, geometry, bias):
    torch.manual_seed(0)
    layer = cls(3, 8, (3, 2), 4, bias=bias, **geometry).double()
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    y_ref, factors = reference(layer, x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.kernel(), formed_kernel(layer, *(f.detach() for f in factors)))

    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    for param, expected in zip((layer.U, layer.S, layer.V), factors):
        torch.testing.assert_close(param.grad, expected.grad, rtol=1e-12, atol=1e-12)


def test_the_sink_holds_the_exact_k_and_l_gradients():
    """``G V`` and ``G^T U`` for ``G = dL/dW`` of the kernel matrix, accumulated over backward passes."""
    torch.manual_seed(1)
    layer = DynamicalLowRankConv2d(4, 6, 3, 3, stride=2, padding=1).double()
    w = layer.weight_matrix().requires_grad_()
    x = torch.randn(3, 4, 11, 7, dtype=torch.float64)
    for passes in (1, 2):
        kernel = w.T.reshape(6, 4, 3, 3)
        loss = F.conv2d(x, kernel, layer.bias.detach(), stride=2, padding=1).square().sum()
        (g,) = torch.autograd.grad(loss, w)
        layer(x).square().sum().backward()
        torch.testing.assert_close(layer.sink.k_grad, passes * g @ layer.V.detach(), rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(layer.sink.l_grad, passes * g.T @ layer.U.detach(), rtol=1e-11, atol=1e-11)


def test_from_dense_is_the_best_approximation_and_to_dense_gives_a_torch_conv_back():
    torch.manual_seed(2)
    conv = nn.Conv2d(5, 12, 3, padding=1, stride=2).double()
    matrix = conv.weight.detach().reshape(12, -1).T  # (45, 12)
    sigma = torch.linalg.svdvals(matrix)
    for cls in CLASSES:
        layer = cls.from_dense(conv, 4)
        error = torch.linalg.matrix_norm(layer.weight_matrix() - matrix)
        assert error == pytest.approx(sigma[4:].square().sum().sqrt().item(), rel=1e-10)  # Eckart-Young
        back = layer.to_dense()
        assert isinstance(back, nn.Conv2d) and (back.stride, back.padding) == ((2, 2), (1, 1))
        x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(back(x), layer(x), rtol=1e-12, atol=1e-12)
    full = DynamicalLowRankConv2d.from_dense(conv, 12)
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(full(x), conv(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="groups=1"):
        LowRankConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 2)


def small_net(tau: float = 0.1) -> nn.Sequential:
    return nn.Sequential(DynamicalLowRankConv2d(1, 8, 3, 4, padding=1, tau=tau), nn.ReLU(), nn.MaxPool2d(2),
                         DynamicalLowRankConv2d(8, 12, 3, 6, tau=tau), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 16, 10))


def train(model: nn.Module, x, y, steps: int, integrator: str, lr: float = 0.05) -> list[float]:
    optimizer = dlrt_optimizer(model, lr=lr, method="sgd", integrator=integrator)
    losses = []

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        losses.append(optimizer.step(closure).item())
    return losses


def data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 1, 12, 12, generator=gen, dtype=torch.float64), torch.randint(0, 10, (32,), generator=gen)


@pytest.mark.parametrize("integrator", ["kls", "single-pass"])
def test_dlrt_trains_convolutions_and_adapts_their_ranks(integrator):
    torch.manual_seed(3)
    model = small_net().double()
    x, y = data()
    losses = train(model, x, y, steps=30, integrator=integrator, lr=0.3)
    assert losses[-1] < 0.6 * losses[0]
    ranks = [m.rank for m in model if isinstance(m, DynamicalLowRankConv2d)]
    assert ranks != [4, 6]
    for layer in (m for m in model if isinstance(m, DynamicalLowRankConv2d)):
        eye = torch.eye(layer.rank, dtype=torch.float64)
        torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-10, rtol=0)
        torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-10, rtol=0)


def test_single_pass_takes_the_kls_step_from_the_unfolded_patches():
    """Rank-adaptive, both integrators take the same step (lowrank.optim): the single pass forms U_hat^T G V_hat
    from the patches the layer unfolded, the classic one from a second pass."""
    torch.manual_seed(4)
    first = small_net(tau=0.05).double()
    second = deepcopy(first)
    x, y = data(1)
    train(first, x, y, steps=3, integrator="kls")
    train(second, x, y, steps=3, integrator="single-pass")
    for a, b in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def rotated(model: nn.Module, seed: int) -> nn.Module:
    """The same W with factors ``U Q1, Q1^T S Q2, V Q2`` (random orthogonal Q1, Q2)."""
    copy = deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for layer in (m for m in copy.modules() if isinstance(m, DynamicalLowRankConv2d)):
        q1, q2 = (torch.linalg.qr(torch.randn(layer.rank, layer.rank, generator=gen, dtype=torch.float64)).Q
                  for _ in range(2))
        layer.set_factors(layer.U.data @ q1, q1.T @ layer.S.data @ q2, layer.V.data @ q2)
    return copy


@pytest.mark.parametrize("tau", [0.0, 0.1])
def test_a_dlrt_step_on_a_convolution_depends_on_w_not_on_its_factorisation(tau):
    torch.manual_seed(5)
    model = small_net(tau).double()
    other = rotated(model, seed=6)
    x, y = data(2)
    train(model, x, y, steps=3, integrator="kls")
    train(other, x, y, steps=3, integrator="kls")
    for a, b in zip((m for m in model if isinstance(m, DynamicalLowRankConv2d)),
                    (m for m in other if isinstance(m, DynamicalLowRankConv2d))):
        assert a.rank == b.rank
        error = torch.linalg.matrix_norm(a.weight_matrix() - b.weight_matrix()) / torch.linalg.matrix_norm(a.weight_matrix())
        assert error < 1e-10


def test_the_truncation_drops_at_most_tau_of_the_augmented_coefficients():
    """After a rank-adaptive step, ``W`` is within ``tau ||S_hat||_F`` of the untruncated step: the dropped singular
    values have norm at most tau times the norm of all of them."""
    torch.manual_seed(7)
    tau = 0.2
    layer = DynamicalLowRankConv2d(2, 6, 3, 3, tau=tau, init_scale=1.0).double()
    untruncated = deepcopy(layer)
    untruncated.tau = 0.0
    x = torch.randn(8, 2, 7, 7, dtype=torch.float64)
    for net in (layer, untruncated):
        optimizer = dlrt_optimizer(net, lr=0.1, method="sgd")

        def closure(net=net, optimizer=optimizer):
            optimizer.zero_grad()
            loss = net(x).sin().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    full = untruncated.weight_matrix()
    dropped = torch.linalg.matrix_norm(layer.weight_matrix() - full)
    assert dropped <= tau * torch.linalg.matrix_norm(full) + 1e-12
    _, sigma, _ = truncated_svd(full, untruncated.rank)
    assert layer.rank < untruncated.rank and dropped == pytest.approx(sigma[layer.rank:].square().sum().sqrt().item())


def test_a_checkpoint_of_another_rank_loads_with_weights_only():
    torch.manual_seed(8)
    trained = small_net().double()
    train(trained, *data(), steps=10, integrator="kls")
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh = small_net().double()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x, _ = data(3)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)
    assert [m.rank for m in fresh if hasattr(m, "rank")] == [m.rank for m in trained if hasattr(m, "rank")]


def test_repr_and_shape_errors_follow_torch_conv2d():
    layer = LowRankConv2d(3, 16, 5, 4, stride=2)
    assert repr(layer) == ("LowRankConv2d(3, 16, kernel_size=(5, 5), stride=(2, 2), padding=(0, 0), dilation=(1, 1), "
                           "rank=4, factorization='usv', bias=True)")
    assert (layer.in_features, layer.out_features) == (75, 16) and layer.U.shape == (75, 4)
    assert layer(torch.randn(1, 3, 13, 13)).shape == nn.Conv2d(3, 16, 5, stride=2)(torch.randn(1, 3, 13, 13)).shape
    with pytest.raises(ValueError, match="rank = 20"):
        LowRankConv2d(3, 16, 1, 20)  # min(3 * 1 * 1, 16) = 3
    with pytest.raises(ValueError, match="stride and dilation must be >= 1"):
        DynamicalLowRankConv2d(3, 16, 3, 2, stride=0)
