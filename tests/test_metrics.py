"""Exact small examples for lowrank.metrics."""

import math

import pytest
import torch

from lowrank import metrics
from lowrank.layers import Dense, DynamicalLowRank, LowRank
from lowrank.network import NeuralNetwork

torch.set_num_threads(1)


def small_model() -> NeuralNetwork:
    """784 -dense-> 20 -lowrank r=3-> 10 -dynamical r=4-> 10, all with biases."""
    torch.manual_seed(0)
    layers = [Dense(784, 20), LowRank(20, 10, rank=3), DynamicalLowRank(10, 10, rank=4)]
    return NeuralNetwork(layers, ["relu", "relu", "identity"])


def test_accuracy_counts_argmax_hits():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.1, 0.2]])
    labels = torch.tensor([0, 1, 1, 1])
    assert metrics.accuracy(logits, labels) == pytest.approx(0.75)
    assert metrics.accuracy(torch.empty(0, 2), torch.empty(0, dtype=torch.long)) == 0.0


def test_model_accuracy_is_the_accuracy_of_the_logits_in_any_batch_size_and_dtype():
    model = small_model()
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(50, 784, generator=generator), torch.randint(0, 10, (50,), generator=generator)
    model.train()
    expected = metrics.accuracy(model.eval()(x), y)
    model.train()
    assert metrics.model_accuracy(model, x, y) == pytest.approx(expected, abs=1e-12)
    assert not model.training  # measured in eval mode
    assert metrics.model_accuracy(model, x, y, batch_size=7) == pytest.approx(expected, abs=1e-12)
    assert metrics.model_accuracy(model, x.double(), y) == pytest.approx(expected, abs=1e-12)  # cast to float32


def test_parameter_counts_match_hand_formulas():
    model = small_model()
    dense = 784 * 20 + 20
    lowrank = 3 * (20 + 10 + 3) + 10
    dynamical = 4 * (10 + 10 + 4) + 10
    assert metrics.parameter_count(model) == dense + lowrank + dynamical
    twin = dense + (20 * 10 + 10) + (10 * 10 + 10)
    assert metrics.dense_parameter_count(model) == twin
    assert metrics.compression(model) == pytest.approx(1 - (dense + lowrank + dynamical) / twin)


def test_parameter_count_follows_the_rank_of_a_dynamical_layer():
    layer = DynamicalLowRank(30, 20, rank=5)
    layer.set_factors(torch.zeros(30, 2), torch.zeros(2, 2), torch.zeros(20, 2))
    assert metrics.parameter_count(layer) == 2 * (30 + 20 + 2) + 20


def test_uv_factorization_and_no_bias():
    layer = LowRank(50, 40, rank=6, factorization="uv", bias=False)
    assert metrics.parameter_count(layer) == 6 * (50 + 40)
    assert metrics.layer_flops(layer) == 2 * 6 * (50 + 40)
    assert metrics.dense_parameter_count(layer) == 50 * 40


def test_dense_net_has_zero_compression():
    model = NeuralNetwork([Dense(784, 32), Dense(32, 10)], ["relu", "identity"])
    assert metrics.compression(model) == 0.0


def test_flops_per_sample_match_hand_formulas():
    model = small_model()
    expected = (2 * 784 * 20 + 20) + (2 * 3 * (20 + 10 + 3) + 10) + (2 * 4 * (10 + 10 + 4) + 10)
    assert metrics.flops_per_sample(model) == expected


def test_singular_values_of_a_diagonal_matrix():
    w = torch.diag(torch.tensor([1.0, 3.0, 2.0]))
    assert torch.allclose(metrics.singular_values(w), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 2, 7])
def test_effective_rank_of_k_equal_singular_values_is_k(k):
    sigma = torch.cat([torch.full((k,), 2.5), torch.zeros(3)])
    assert metrics.effective_rank(sigma) == pytest.approx(k, rel=1e-12)


def test_effective_rank_of_identity_is_its_size():
    assert metrics.effective_rank(metrics.singular_values(torch.eye(5))) == pytest.approx(5.0)


def test_effective_rank_of_two_unequal_values():
    p = torch.tensor([0.75, 0.25])
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert metrics.effective_rank(3 * p) == pytest.approx(math.exp(entropy))
    assert 1 < metrics.effective_rank(p) < 2


def test_effective_rank_of_zero_matrix_is_zero():
    assert metrics.effective_rank(torch.zeros(4)) == 0.0


def test_epsilon_rank_counts_values_above_relative_threshold():
    sigma = torch.tensor([10.0, 5.0, 0.11, 0.1, 0.0])
    assert metrics.epsilon_rank(sigma, 0.01) == 3  # 0.1 / 10 = 0.01 is not > 0.01
    assert metrics.epsilon_rank(sigma, 0.5) == 1
    assert metrics.epsilon_rank(torch.zeros(3), 0.1) == 0


def test_layer_spectra_is_tidy_and_matches_ranks():
    model = small_model()
    spectra = metrics.layer_spectra(model)
    assert list(spectra.columns) == ["layer", "index", "singular_value"]
    assert spectra.groupby("layer").size().tolist() == [20, 10, 10]
    low_rank = spectra[spectra.layer == 1].singular_value.to_numpy()
    assert (low_rank[3:] < 1e-5 * low_rank[0]).all()  # a rank-3 W has 3 non-zero singular values
    assert (low_rank[:3] > 1e-3).all()


def test_epsilon_rank_relative_to_the_frobenius_norm():
    sigma = torch.tensor([3.0, 4.0, 0.0045, 0.0001])  # sigma_1 = 4, ||sigma||_2 = 5.000002
    assert metrics.epsilon_rank(sigma, 1e-3, relative_to="frobenius") == 2  # 0.0045 / 5 = 9e-4 < 1e-3
    assert metrics.epsilon_rank(sigma, 1e-3, relative_to="max") == 3  # 0.0045 / 4 = 1.1e-3 > 1e-3
    assert metrics.epsilon_rank(sigma, 0.7, relative_to="frobenius") == 1  # 4 / 5 = 0.8
    assert metrics.epsilon_rank(torch.zeros(3), 1e-3, relative_to="frobenius") == 0
    with pytest.raises(ValueError, match="relative_to"):
        metrics.epsilon_rank(sigma, relative_to="nuclear")


@pytest.mark.parametrize("layer", [
    LowRank(30, 20, rank=5), LowRank(30, 20, rank=5, factorization="uv", init="spectral"),
    DynamicalLowRank(30, 20, rank=6), LowRank(20, 30, rank=4, init="normal"),
], ids=["usv", "uv", "dynamical", "normal"])
def test_layer_singular_values_of_factors_equal_those_of_the_formed_matrix(layer):
    from lowrank.network import effective_weight

    expected = metrics.singular_values(effective_weight(layer))[:layer.rank]
    assert torch.allclose(metrics.layer_singular_values(layer), expected, rtol=1e-5, atol=1e-6)


def test_layer_singular_values_of_a_dense_layer():
    layer = Dense(30, 20)
    assert torch.equal(metrics.layer_singular_values(layer), metrics.singular_values(layer.weight))


def two_clusters(a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 at (-1, 0) and class 1 at (1, 0), each sample displaced by (+-a, +-b) (all four signs)."""
    shifts = torch.tensor([[a, b], [a, -b], [-a, b], [-a, -b]], dtype=torch.float64)
    h = torch.cat([torch.tensor([-1.0, 0.0]) + shifts, torch.tensor([1.0, 0.0]) + shifts])
    return h, torch.tensor([0] * 4 + [1] * 4)


def test_nc1_of_two_clusters_by_hand():
    # Sigma_B = e1 e1^T (means +-e1), Sigma_W = diag(a^2, b^2): NC1 = tr(Sigma_W Sigma_B^+) / 2 = a^2 / 2;
    # the spread b along the null space of Sigma_B does not count.
    h, y = two_clusters(0.5, 3.0)
    assert metrics.nc1(h, y) == pytest.approx(0.125, rel=1e-12)


def test_nc1_is_zero_for_collapsed_features_and_ignores_empty_classes():
    h, y = two_clusters(0.0, 0.0)
    assert metrics.nc1(h, y) == pytest.approx(0.0, abs=1e-20)
    h, y = two_clusters(0.5, 0.0)
    assert metrics.nc1(h, y + 3) == pytest.approx(0.125, rel=1e-12)  # classes 0..2 have no sample
    with pytest.raises(ValueError, match="two classes"):
        metrics.nc1(h[:4], y[:4])


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
    assert metrics.nc1(h, y) == pytest.approx(expected, rel=1e-8)


def test_nc1_does_not_depend_on_a_rotation_or_a_shift_of_the_features():
    torch.manual_seed(1)
    y = torch.arange(300) % 3
    h = torch.randn(3, 5)[y] + 0.5 * torch.randn(300, 5)
    rotation = torch.linalg.qr(torch.randn(5, 5)).Q
    assert metrics.nc1(h @ rotation + 7.0, y) == pytest.approx(metrics.nc1(h, y), rel=1e-6)
