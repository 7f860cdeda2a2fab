"""lowrank.engine.experiments.analysis: truncation to the epsilon-rank."""

import math

import pytest
import torch

from lowrank import metrics
from lowrank.engine.experiments import analysis
from lowrank.layers import Dense, LowRank
from lowrank.network import NeuralNetwork, effective_weight

torch.set_num_threads(1)


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
