"""lowrank.network: the forward pass, from any layer on, and the inputs of each layer."""

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
