"""Low-rank adapters, the Frank-Wolfe steps on {s >= 0, sum s <= tau}, bilevel rank selection, the config file."""

from pathlib import Path

import pytest
import torch

from lowrank.engine.experiments import adapters as ad
from lowrank.engine import report
from lowrank.engine.config import ConfigError
from lowrank.layers import Dense
from lowrank.network import NeuralNetwork

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "notebooks" / "configs" / "fig_k.toml"


def feasible(s, tau):
    return bool((s >= 0).all()) and float(s.sum()) <= tau * (1 + 1e-12)


# ---------------------------------------------------------------------------------------------
# Frank-Wolfe

def test_lmo_returns_the_vertex_that_minimises_the_linear_function():
    generator = torch.Generator().manual_seed(0)
    tau = 3.0
    for _ in range(50):
        g = torch.randn(7, generator=generator, dtype=torch.float64)
        eye = torch.eye(7, dtype=torch.float64)
        vertices = [torch.zeros(7, dtype=torch.float64)] + [tau * eye[i] for i in range(7)]
        best = min(float(g @ v) for v in vertices)
        v = ad.lmo(g, tau)
        assert float(g @ v) == pytest.approx(best)
        assert feasible(v, tau) and (v == 0).sum() >= 6  # a vertex
    assert torch.equal(ad.lmo(torch.tensor([0.5, 2.0]), tau), torch.zeros(2))  # no negative entry: the vertex 0


def test_frank_wolfe_steps_keep_s_feasible():
    generator = torch.Generator().manual_seed(1)
    tau = 2.0
    s = torch.full((10,), tau / 20, dtype=torch.float64)
    kinds = set()
    for _ in range(500):
        g = torch.randn(10, generator=generator, dtype=torch.float64)
        s, kind = ad.frank_wolfe_step(s, g, tau, step=0.3)
        kinds.add(kind)
        assert feasible(s, tau), s
    assert {"fw", "away", "drop"} <= kinds


def test_an_away_step_at_its_largest_length_drops_the_coordinate_exactly():
    tau = 1.0
    s = torch.tensor([0.01, 0.49, 0.5], dtype=torch.float64)  # on the face sum s = tau
    g = torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64)  # coordinate 0 hurts: move away from tau e_0
    new, kind = ad.frank_wolfe_step(s, g, tau, step=0.5)
    assert kind == "drop" and new[0] == 0.0
    assert float(new.sum()) == pytest.approx(tau) and feasible(new, tau)


def test_frank_wolfe_finds_the_sparse_minimiser_of_a_convex_quadratic():
    """min ||s - c||^2 over C_tau with c outside: the minimiser is the projection, with exact zeros."""
    tau = 1.0
    c = torch.tensor([0.9, 0.6, -0.2, 0.05, -1.0], dtype=torch.float64)
    expected = torch.tensor([0.65, 0.35, 0.0, 0.0, 0.0], dtype=torch.float64)  # projection onto the simplex face
    s = torch.full((5,), tau / 5, dtype=torch.float64)
    for k in range(300):
        s, _ = ad.frank_wolfe_step(s, 2 * (s - c), tau, step=2 / (k + 3))  # the classical diminishing step
    assert torch.allclose(s, expected, atol=1e-3)
    assert torch.equal(s[2:], torch.zeros(3, dtype=torch.float64))  # identified exactly by drop steps


# ---------------------------------------------------------------------------------------------
# The adapter layer

def test_adapter_at_s_zero_is_the_pretrained_layer():
    torch.manual_seed(0)
    base = Dense(6, 4)
    with torch.no_grad():
        base.bias.normal_()
    adapter = ad.Adapter(base, rank=3)
    x = torch.randn(5, 6)
    assert torch.equal(adapter(x), base(x))
    assert adapter.rank == 0


def test_adapter_adds_u_diag_s_v_transposed_with_unit_columns():
    torch.manual_seed(0)
    base = Dense(6, 4)
    adapter = ad.Adapter(base, rank=3, s=0.7)
    with torch.no_grad():
        adapter.U.mul_(5.0)  # the scale of the stored columns does not matter
    u, v = adapter.factors()
    assert torch.allclose(u.norm(dim=0), torch.ones(3)) and torch.allclose(v.norm(dim=0), torch.ones(3))
    x = torch.randn(5, 6)
    expected = x @ (base.weight + 0.7 * u @ v.T) + base.bias
    assert torch.allclose(adapter(x), expected, atol=1e-6)
    assert torch.allclose(adapter.delta(), 0.7 * u @ v.T)
    assert adapter.rank == 3 and not adapter.weight0.requires_grad


def test_adapt_copies_the_network_and_counts_ranks_and_parameters():
    torch.manual_seed(0)
    net = NeuralNetwork([Dense(8, 6), Dense(6, 3)], ["relu", "identity"])
    adapted = ad.adapt(net, [2, 0], s=0.1)
    x = torch.randn(4, 8)
    assert ad.ranks(adapted) == [2, 0]
    assert ad.adapter_parameters(adapted) == 2 * (8 + 6 + 1)
    with torch.no_grad():
        for a in ad.adapters(adapted):
            a.s.zero_()
    assert torch.allclose(adapted(x), net(x))


def test_prune_and_selected_ranks_count_the_weights_above_the_threshold():
    torch.manual_seed(0)
    net = ad.adapt(NeuralNetwork([Dense(8, 6), Dense(6, 3)], ["relu", "identity"]), [3, 2])
    with torch.no_grad():
        net.layers[0].s.copy_(torch.tensor([0.5, 1e-4, 0.2]))
        net.layers[1].s.copy_(torch.tensor([1e-3, 0.0]))
    assert ad.ranks(net) == [3, 1]
    assert ad.selected_ranks(net, 0.01) == [2, 0]
    assert ad.prune(net, 0.01) == [2, 0] and net.layers[0].s[1] == 0


def test_uniform_ranks_spread_the_total_evenly_under_the_caps():
    assert ad.uniform_ranks(20, [32, 32, 10]) == [7, 7, 6]
    assert ad.uniform_ranks(40, [32, 32, 10]) == [15, 15, 10]
    assert ad.uniform_ranks(15, [32, 32, 10]) == [5, 5, 5]
    assert ad.uniform_ranks(2, [32, 32, 10]) == [1, 1, 0]
    with pytest.raises(ValueError):
        ad.uniform_ranks(80, [32, 32, 10])


# ---------------------------------------------------------------------------------------------
# Training on a toy problem

def toy_problem():
    """A random 6-12-3 network and data labelled by a different random network."""
    torch.manual_seed(0)
    net = NeuralNetwork([Dense(6, 12), Dense(12, 3)], ["relu", "identity"])
    teacher = NeuralNetwork([Dense(6, 12), Dense(12, 3)], ["relu", "identity"])
    x = torch.randn(512, 6)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    return net, x, y


def test_bilevel_training_decreases_the_loss_and_keeps_s_feasible():
    net, x, y = toy_problem()
    model = ad.adapt(net, [4, 3])
    settings = ad.Bilevel(tau=4.0, outer_steps=60, inner_steps=3, batch_size=64, learning_rate=1e-2, fw_step=0.1)
    history = ad.train_bilevel(model, x, y, settings)
    assert history.upper_loss.iloc[-10:].mean() < 0.8 * history.upper_loss.iloc[:10].mean()
    assert history.lower_loss.iloc[-10:].mean() < 0.8 * history.lower_loss.iloc[:10].mean()
    s = torch.cat([a.s.detach() for a in ad.adapters(model)])
    assert feasible(s, settings.tau)
    assert list(history.columns[-4:]) == ["mass_0", "mass_1", "rank_0", "rank_1"]
    assert history.budget.iloc[-1] == pytest.approx(history.mass_0.iloc[-1] + history.mass_1.iloc[-1])


def test_bilevel_training_is_reproducible():
    runs = []
    for _ in range(2):
        net, x, y = toy_problem()
        torch.manual_seed(1)
        model = ad.adapt(net, [4, 3])
        runs.append(ad.train_bilevel(model, x, y, ad.Bilevel(tau=4.0, outer_steps=10, inner_steps=2, batch_size=64)))
    assert runs[0].equals(runs[1])


def test_fixed_rank_training_decreases_the_loss():
    net, x, y = toy_problem()
    model = ad.adapt(net, [3, 3])
    losses = ad.train_fixed(model, x, y, steps=150, batch_size=64, learning_rate=1e-2)
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])


def test_label_shift_correction_permutes_the_logits_and_has_rank_c_minus_1():
    torch.manual_seed(0)
    w = torch.randn(20, 10, dtype=torch.float64)
    h = torch.randn(5, 20, dtype=torch.float64)
    z, z_new = h @ w, h @ (w + ad.label_shift_correction(w))
    assert torch.allclose(z_new, torch.roll(z, 1, dims=1))  # new class (k + 1) mod 10 gets old logit k
    assert torch.linalg.matrix_rank(ad.label_shift_correction(w)) == 9


def test_permuted_labels_shift_every_label_by_one(mnist_arrays):
    task = ad.shifted_task("permuted-labels", 100, seed=0)
    assert task.train_x.shape == (100, 784) and task.test_x.shape == (10_000, 784)
    assert torch.equal(task.test_y, torch.from_numpy((mnist_arrays["test_y"] + 1) % 10))


# ---------------------------------------------------------------------------------------------
# The config file

def test_the_figure_config_loads_and_its_quick_run_is_smaller():
    full, quick = ad.load_experiment(CONFIG), ad.load_experiment(CONFIG, quick=True)
    assert full.caps == [32, 32, 10]
    assert quick.train_images < full.train_images and quick.bilevel.outer_steps < full.bilevel.outer_steps
    assert quick.pretrain.settings.subset == 1000 and quick.pretrain.name == "pretrained"
    assert isinstance(report.validate(CONFIG), ad.AdapterExperiment)


PRETRAIN = """
[figure]
kind = "adapters"
[pretrain.settings]
num_epochs = 1
[[pretrain.layer]]
type = "dense"
dims = [784, 10]
activation = "identity"
"""


@pytest.mark.parametrize("extra, message", [
    ('[adaptation]\nshift = "rotated"', r'adaptation\.shift = .* allowed: "permuted-labels" \| "fashion-mnist"'),
    ("[bilevel]\nfw_step = 1.5", r"bilevel\.fw_step = 1\.5 is too large; allowed: a number > 0 and <= 1"),
    ("[bilevel]\nsteps = 3", r"bilevel\.steps is not a key of \[bilevel\].*; allowed keys: tau, outer_steps"),
    ("[adaptation]\noracle_ranks = [0, 11]", r"adaptation\.oracle_ranks = \[0, 11\] needs one rank per layer"),
])
def test_config_errors_name_the_file_the_key_and_the_allowed_values(tmp_path, extra, message):
    path = tmp_path / "bad.toml"
    path.write_text(PRETRAIN + extra)
    with pytest.raises(ConfigError, match=message) as error:
        ad.load_experiment(path)
    assert str(error.value).startswith(str(path))


def test_a_pretrain_error_names_its_key_path_from_the_top_of_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(PRETRAIN.replace("num_epochs = 1", "num_epochs = 0"))
    with pytest.raises(ConfigError, match=r"bad\.toml: pretrain\.settings\.num_epochs = 0 is too small"):
        ad.load_experiment(path)


def adapter_results(selected: tuple[float, float], uniform: tuple[float, float], output_mass: float
                    ) -> "ad.AdapterResults":
    """What run_experiment returns, made by hand: accuracies as (min, max) over the seeds, in %."""
    import pandas as pd

    experiment = ad.load_experiment(CONFIG, quick=True)
    names = ("bilevel", "bilevel, pruned", "selected ranks", "uniform ranks", "oracle ranks")
    ranges = {"bilevel": (80.0, 80.0), "bilevel, pruned": (80.5, 80.5), "selected ranks": selected,
              "uniform ranks": uniform, "oracle ranks": (81.0, 81.0)}
    models = pd.DataFrame([dict(model=n, ranks=[4, 2, 9], total_rank=15, parameters=100, runs=3,
                                test_accuracy=sum(ranges[n]) / 200, accuracy_min=ranges[n][0] / 100,
                                accuracy_max=ranges[n][1] / 100) for n in names])
    history = pd.DataFrame({"step": [0, 1, 2], "kind": ["fw", "drop", "fw"], "mass_0": [1.0, 1.0, 1.0],
                            "mass_1": [1.0, 1.0, 1.0], "mass_2": [1.0, 1.0, output_mass]})
    weights = pd.DataFrame({"layer": [0, 1, 2], "index": [0, 0, 0], "s": [1.0, 1.0, output_mass]})
    return ad.AdapterResults(models, history, weights, {"pretraining task": 0.98, "shifted task": 0.1},
                             {"pretraining": 1.0}, experiment, exact_fix=torch.tensor([1.0] * 9 + [1e-9]))


@pytest.mark.parametrize("selected, uniform, gap_verdict, closing", [
    ((79.0, 79.5), (78.0, 78.9), "the selected ranks are ahead with every seed", "beat uniform ranks"),
    ((78.0, 78.9), (79.0, 79.5), "the uniform ranks are ahead with every seed", "fall behind uniform ranks"),
    ((78.0, 79.5), (79.0, 80.0), "the accuracies of the two overlap across the seeds", "within each other's spread"),
])
def test_figure_k_compares_the_selected_and_uniform_ranks_seed_by_seed(selected, uniform, gap_verdict, closing):
    values = ad.findings(adapter_results(selected, uniform, output_mass=8.0), "fig_z")
    assert values["fig_z_gap_verdict"].text == gap_verdict and closing in values["fig_z_closing"].text
    assert values["fig_z_share_2"] == 80.0 and values["fig_z_allocation_verdict"].text.startswith("most of the budget")
    assert values["fig_z_output_rank"] == 9 and values["fig_z_output_rank_verdict"].text == "equal to"  # rank of the fix
    assert (values["fig_z_drops"], values["fig_z_fw_steps"]) == (1, 2)
    assert values["fig_z_bilevel_vs_fixed"].text == "not ahead of the best training at fixed ranks"  # oracle: 81


def test_figure_k_says_when_the_budget_did_not_go_to_the_output_layer():
    values = ad.findings(adapter_results((79.0, 79.5), (78.0, 78.9), output_mass=1.0), "fig_z")
    assert values["fig_z_allocation_verdict"].text == "the budget did not go mainly where the exact correction lives"
    assert "did not move" in values["fig_z_opening"].text
    results = adapter_results((79.0, 79.5), (78.0, 78.9), output_mass=1.0)
    assert ad.setting_values(results, "fig_z")["fig_z_fix_rank"] == 9
    assert ad.layer_names(results.experiment) == ["layer 1 (784 x 256)", "layer 2 (256 x 256)", "layer 3 (256 x 10)"]
    assert list(ad.model_table(results).columns)[-2:] == ["test accuracy % (mean)", "min - max %"]
