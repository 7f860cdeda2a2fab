"""lowrank.analysis: NC1 on hand-made features, truncation to the epsilon-rank."""

import math

import pytest
import torch

from lowrank import analysis, metrics
from lowrank.layers import Dense, LowRank
from lowrank.network import NeuralNetwork, effective_weight

torch.set_num_threads(1)


def two_clusters(a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 at (-1, 0) and class 1 at (1, 0), each sample displaced by (+-a, +-b) (all four signs)."""
    shifts = torch.tensor([[a, b], [a, -b], [-a, b], [-a, -b]], dtype=torch.float64)
    h = torch.cat([torch.tensor([-1.0, 0.0]) + shifts, torch.tensor([1.0, 0.0]) + shifts])
    return h, torch.tensor([0] * 4 + [1] * 4)


def test_nc1_of_two_clusters_by_hand():
    # Sigma_B = e1 e1^T (means +-e1), Sigma_W = diag(a^2, b^2): NC1 = tr(Sigma_W Sigma_B^+) / 2 = a^2 / 2;
    # the spread b along the null space of Sigma_B does not count.
    h, y = two_clusters(0.5, 3.0)
    assert analysis.nc1(h, y) == pytest.approx(0.125, rel=1e-12)


def test_nc1_is_zero_for_collapsed_features_and_ignores_empty_classes():
    h, y = two_clusters(0.0, 0.0)
    assert analysis.nc1(h, y) == pytest.approx(0.0, abs=1e-20)
    h, y = two_clusters(0.5, 0.0)
    assert analysis.nc1(h, y + 3) == pytest.approx(0.125, rel=1e-12)  # classes 0..2 have no sample
    with pytest.raises(ValueError, match="two classes"):
        analysis.nc1(h[:4], y[:4])


def test_nc1_equals_the_definition_with_a_full_pseudo_inverse():
    torch.manual_seed(0)
    classes, d = 4, 6
    y = torch.arange(200) % classes
    h = torch.randn(classes, d)[y] * 3 + torch.randn(200, d) * torch.linspace(0.1, 2, d)
    h, y = h.double(), y
    means = torch.stack([h[y == c].mean(0) for c in range(classes)])
    sigma_w = sum((h[i] - means[y[i]])[:, None] * (h[i] - means[y[i]])[None, :] for i in range(200)) / 200
    centred = means - means.mean(0)
    sigma_b = centred.T @ centred / classes
    expected = torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, rtol=1e-10)).item() / classes
    assert analysis.nc1(h, y) == pytest.approx(expected, rel=1e-8)


def test_nc1_does_not_depend_on_a_rotation_or_a_shift_of_the_features():
    torch.manual_seed(1)
    y = torch.arange(300) % 3
    h = torch.randn(3, 5)[y] + 0.5 * torch.randn(300, 5)
    rotation = torch.linalg.qr(torch.randn(5, 5)).Q
    assert analysis.nc1(h @ rotation + 7.0, y) == pytest.approx(analysis.nc1(h, y), rel=1e-6)


def test_layer_inputs_are_the_activations_entering_each_layer():
    torch.manual_seed(0)
    model = NeuralNetwork([Dense(6, 5), LowRank(5, 4, rank=2), Dense(4, 3)], ["relu", "tanh", "identity"])
    x = torch.randn(7, 6)
    a0, a1, a2 = analysis.layer_inputs(model, x)
    assert torch.equal(a0, x)
    assert torch.allclose(a1, torch.relu(model.layers[0](x)))
    assert torch.allclose(a2, torch.tanh(model.layers[1](a1)))
    assert model.training  # restored


def test_truncated_svd_is_the_best_approximation_with_the_tail_as_error():
    torch.manual_seed(0)
    w = torch.randn(20, 12, dtype=torch.float64)
    sigma = torch.linalg.svdvals(w)
    p, s, q = analysis.truncated_svd(w, 5)
    assert p.shape == (20, 5) and s.shape == (5,) and q.shape == (12, 5)
    error = torch.linalg.matrix_norm(w - (p * s) @ q.T)
    assert error.item() == pytest.approx(sigma[5:].norm().item(), rel=1e-10)
    with pytest.raises(ValueError, match="rank = 13"):
        analysis.truncated_svd(w, 13)


def test_truncated_network_at_full_rank_computes_the_same_function():
    torch.manual_seed(0)
    model = NeuralNetwork([Dense(6, 5), LowRank(5, 4, rank=2), Dense(4, 3)], ["relu", "relu", "identity"]).eval()
    copy = analysis.truncated_network(model, [5, 2, 3])
    x = torch.randn(9, 6)
    assert torch.allclose(copy(x), model(x), atol=1e-5)
    assert all(isinstance(layer, Dense) for layer in copy.layers)
    low = analysis.truncated_network(model, [1, 1, 1])
    assert [metrics.epsilon_rank(metrics.layer_singular_values(l), 1e-6) for l in low.layers] == [1, 1, 1]
    assert torch.equal(effective_weight(model.layers[0]), model.layers[0].weight.detach())  # model unchanged


def test_truncation_table_loses_nothing_at_a_tiny_tolerance():
    torch.manual_seed(0)
    model = NeuralNetwork([Dense(6, 5), Dense(5, 3)], ["relu", "identity"])
    x, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    table = analysis.truncation_table(model, x, y, [1e-9, 0.99])
    assert list(table.columns) == ["eps", "rank_0", "rank_1", "factor_fraction", "accuracy", "accuracy_lost"]
    assert table.loc[0, ["rank_0", "rank_1"]].tolist() == [5, 3]
    assert table.loc[0, "accuracy_lost"] == 0.0
    assert table.loc[0, "accuracy"] == metrics.model_accuracy(model, x, y)
    assert table.loc[1, ["rank_0", "rank_1"]].tolist() == [0, 0]  # no sigma_i / ||W||_F above 0.99
    assert table.loc[0, "factor_fraction"] == pytest.approx((5 * 11 + 3 * 8) / (30 + 15))
    assert math.isclose(table.loc[1, "factor_fraction"], 0.0)
