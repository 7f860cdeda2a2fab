"""lowrank.network: the forward pass, from any layer on, and the inputs of each layer."""

import pytest
import torch

from lowrank.layers import Dense, LowRank
from lowrank.network import NeuralNetwork

torch.set_num_threads(1)


def test_layer_inputs_are_the_activations_entering_each_layer():
    torch.manual_seed(0)
    model = NeuralNetwork([Dense(6, 5), LowRank(5, 4, rank=2), Dense(4, 3)], ["relu", "tanh", "identity"])
    x = torch.randn(7, 6)
    a0, a1, a2 = model.layer_inputs(x)
    assert torch.equal(a0, x)
    assert torch.allclose(a1, torch.relu(model.layers[0](x)))
    assert torch.allclose(a2, torch.tanh(model.layers[1](a1)))
    assert model.training  # restored


def test_the_forward_from_a_layer_on_takes_that_layer_s_input():
    torch.manual_seed(0)
    model = NeuralNetwork([Dense(6, 5), LowRank(5, 4, rank=2), Dense(4, 3)], ["relu", "tanh", "identity"])
    x = torch.randn(7, 2, 3)  # images are flattened
    inputs = model.layer_inputs(x)
    assert torch.equal(model(x), model(inputs[0], start=0))
    assert torch.equal(model(x), model(inputs[2], start=2))
    assert torch.equal(model(inputs[1], start=1), model.layers[2](torch.tanh(model.layers[1](inputs[1]))))


def test_a_convolutional_network_pools_and_flattens_before_its_linear_layers():
    import torch.nn.functional as F

    from lowrank.conv import DenseConv2d, DynamicalLowRankConv2d

    torch.manual_seed(1)
    layers = [DynamicalLowRankConv2d(1, 4, 3, 2, padding=1), DenseConv2d(4, 6, 3, stride=2), Dense(6 * 2 * 2, 5)]
    model = NeuralNetwork(layers, ["relu", "tanh", "identity"], pools=[2, 1, 1], image_shape=(1, 12, 12))
    x = torch.randn(3, 144)  # flattened images, as the loaders give them
    a1 = F.max_pool2d(torch.relu(layers[0](x.reshape(3, 1, 12, 12))), 2)
    a2 = torch.tanh(layers[1](a1))
    torch.testing.assert_close(model(x), layers[2](a2.flatten(1)))
    inputs = model.layer_inputs(x)
    assert [tuple(a.shape) for a in inputs] == [(3, 1, 12, 12), (3, 4, 6, 6), (3, 24)]
    assert model.positions() == [144, 4, 1]
    assert model.ranks() == [2, 6, 5]
    with pytest.raises(ValueError, match="image_shape"):
        NeuralNetwork(layers, ["relu", "tanh", "identity"])
