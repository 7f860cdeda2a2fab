"""The training manager: learning, history, resume, results cache, divergence (small nets, MNIST subsets)."""

import json
import multiprocessing
from pathlib import Path

import pandas as pd
import pytest
import torch

from lowrank import metrics
from lowrank.engine import config, data, store, training
from lowrank.network import effective_weight

torch.set_num_threads(1)

LAYERS = {
    "dense": """
        [[layer]]
        type = "dense"
        dims = [784, 32]
    """,
    "lowrank": """
        [[layer]]
        type = "lowrank"
        dims = [784, 32]
        rank = 8
    """,
    "dynamical": """
        [[layer]]
        type = "dynamical"
        dims = [784, 32]
        rank = 8
        tau = 0.1
    """,
    "shrinking": """
        [[layer]]
        type = "dynamical"
        dims = [784, 32]
        rank = 8
        tau = 0.5
    """,
}
OUTPUT_LAYER = """
    [[layer]]
    type = "dense"
    dims = [32, 10]
    activation = "identity"
"""


def model_config(kind: str = "dense", name: str | None = None, **settings) -> config.ModelConfig:
    """A 784-32-10 net whose hidden layer is of ``kind``, on an MNIST subset, with ``settings`` overrides."""
    settings = {"subset": 2000, "batch_size": 50, "num_epochs": 1, "learning_rate": 0.01, **settings}
    table = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    text = f"[settings]\n{table}\n{LAYERS[kind]}\n{OUTPUT_LAYER}"
    return config.loads(text, f"{name or kind}.toml").models[0]


@pytest.fixture(scope="module", autouse=True)
def mnist_available():
    try:
        data.prepare("mnist")
    except data.DataUnavailableError as error:
        pytest.skip(f"MNIST is not available here: {error}")


@pytest.mark.parametrize(
    "kind, integrator",
    [("dense", "kls"), ("lowrank", "kls"), ("dynamical", "kls"), ("dynamical", "single-pass")],
)
def test_one_epoch_reduces_the_loss(tmp_path, kind, integrator):
    result = training.train(model_config(kind, integrator=integrator), tmp_path)
    before, after = result.history.iloc[0], result.history.iloc[1]
    assert after.val_loss < 0.8 * before.val_loss
    assert after.train_loss < before.train_loss
    assert after.val_accuracy > before.val_accuracy + 0.3
    assert result.test_accuracy > 0.4


def test_history_columns_and_result_files(tmp_path):
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    result = training.train(model_config("dynamical", num_epochs=2), tmp_path)
    assert torch.equal(torch.get_rng_state(), rng_before)  # train() leaves the caller's RNG alone
    assert torch.get_num_threads() == 1

    history = result.history
    assert history.epoch.tolist() == [0, 1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "train_seconds", "epoch_seconds",
            "train_seconds_cum", "epoch_seconds_cum", "parameters", "compression", "flops_per_sample",
            "rank_0", "rank_1"} <= set(history.columns)
    assert history.loc[0, ["train_seconds", "epoch_seconds"]].tolist() == [0.0, 0.0]
    assert (history.train_seconds[1:] > 0).all()
    assert (history.train_seconds <= history.epoch_seconds).all()
    assert history.epoch_seconds_cum.tolist() == pytest.approx(history.epoch_seconds.cumsum().tolist())
    assert history.rank_1.tolist() == [10, 10, 10]  # the dense output layer reports min(dims)
    assert history.rank_0.iloc[-1] == result.model.ranks()[0]
    assert history.parameters.iloc[-1] == metrics.parameter_count(result.model)
    assert history.attrs["test_accuracy"] == result.test_accuracy

    assert result.path == store.run_dir(result.config, tmp_path)
    assert result.path.name == f"dynamical-{result.config.cache_key()}"
    assert {p.name for p in result.path.iterdir()} == {"history.csv", "model.pt", "result.json"}
    info = json.loads((result.path / "result.json").read_text())
    assert info["test_accuracy"] == result.test_accuracy
    assert info["config"] == result.config.to_dict()


def test_resumed_run_has_the_history_of_an_uninterrupted_run(tmp_path):
    cfg = model_config("shrinking", num_epochs=3, subset=1000)
    uninterrupted = training.train(cfg, tmp_path / "a")
    assert uninterrupted.history.rank_0[1] < 8  # the checkpoint of epoch 1 has another rank than a new model

    def interrupt(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, tmp_path / "b", on_epoch=interrupt)
    assert (store.run_dir(cfg, tmp_path / "b") / "checkpoint.pt").is_file()

    epochs_seen = []
    resumed = training.train(cfg, tmp_path / "b", on_epoch=lambda row: epochs_seen.append(row["epoch"]))
    assert epochs_seen == [2, 3]
    assert not resumed.cached
    timing = list(training.TIMING_COLUMNS)
    pd.testing.assert_frame_equal(resumed.history.drop(columns=timing), uninterrupted.history.drop(columns=timing),
                                  check_exact=True)
    assert resumed.test_loss == uninterrupted.test_loss
    assert resumed.model.ranks() == uninterrupted.model.ranks()
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_cached_result_is_returned_without_training(tmp_path, monkeypatch):
    cfg = model_config("lowrank", subset=500)
    trained = training.train(cfg, tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("trained although a cached result exists")

    monkeypatch.setattr(training, "_train_epoch", no_training)
    monkeypatch.setattr(data, "loaders", no_training)
    cached = training.train(cfg, tmp_path)
    assert cached.cached
    pd.testing.assert_frame_equal(cached.history, trained.history, check_exact=True)
    assert (cached.test_loss, cached.test_accuracy) == (trained.test_loss, trained.test_accuracy)
    for key, value in trained.model.state_dict().items():
        assert torch.equal(cached.model.state_dict()[key], value), key

    with pytest.raises(AssertionError, match="trained although"):
        training.train(cfg, tmp_path, force=True)


def _train_after_barrier(cfg, results_dir, barrier, answers) -> None:
    """One of two processes asked for the same run at the same moment (run in a spawned process)."""
    torch.set_num_threads(1)
    barrier.wait()
    result = training.train(cfg, results_dir)
    answers.put((result.cached, result.test_accuracy))


def test_two_processes_asked_for_the_same_run_train_it_once(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, answers = context.Barrier(2), context.Queue()
    cfg = model_config("dynamical", subset=500)
    workers = [context.Process(target=_train_after_barrier, args=(cfg, tmp_path, barrier, answers)) for _ in range(2)]
    for worker in workers:
        worker.start()
    results = sorted(answers.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    (first_cached, first_accuracy), (second_cached, second_accuracy) = results
    assert (first_cached, second_cached) == (False, True)  # one trained, the other waited and read its result
    assert first_accuracy == second_accuracy
    assert not (store.run_dir(cfg, tmp_path) / store.CHECKPOINT_FILE).exists()


def test_poisoned_batch_raises_a_clear_divergence_error(tmp_path, monkeypatch):
    loaders = data.loaders

    def poisoned(*args, **kwargs):
        splits = loaders(*args, **kwargs)
        splits.train.dataset.tensors[0][:] = float("nan")  # every training image: batch 0 fails
        return splits

    monkeypatch.setattr(data, "loaders", poisoned)
    cfg = model_config("dense", name="poisoned", subset=300)
    with pytest.raises(training.TrainingDivergedError) as error:
        training.train(cfg, tmp_path)
    assert (error.value.model, error.value.epoch, error.value.batch) == ("poisoned", 1, 0)
    assert 'model "poisoned" diverged in epoch 1, batch 0' in str(error.value)
    assert "learning_rate = 0.01" in str(error.value)


def test_huge_learning_rate_raises_a_divergence_error(tmp_path):
    cfg = model_config("dynamical", name="huge-lr", optimizer="sgd", learning_rate=1e12, subset=1000)
    message = r'model "huge-lr" diverged in epoch 1, .*learning_rate = 1e\+12; try a smaller learning_rate'
    with pytest.raises(training.TrainingDivergedError, match=message):
        training.train(cfg, tmp_path)
    assert not (store.run_dir(cfg, tmp_path) / "result.json").exists()


# ---------------------------------------------------------------------------------------------
# Issue 7: effective ranks, regularisers, warm start, layer tracking

def test_history_has_effective_and_epsilon_ranks_of_every_layer(tmp_path):
    result = training.train(model_config("lowrank", subset=500), tmp_path)
    history, last = result.history, result.history.iloc[-1]
    assert {"erank_0", "erank_1", "epsrank_0", "epsrank_1", "phase"} <= set(history.columns)
    assert not any(c.startswith("nc1_") for c in history.columns)
    assert history.phase.tolist() == ["train", "train"]
    for i, layer in enumerate(result.model.layers):
        sigma = metrics.layer_singular_values(layer)
        assert last[f"erank_{i}"] == pytest.approx(metrics.effective_rank(sigma), rel=1e-12)
        assert last[f"epsrank_{i}"] == metrics.epsilon_rank(sigma, 1e-3, relative_to="frobenius")
    assert 1 < history.erank_0[0] < history.rank_0[0]  # kaiming factors: a spread (Gaussian S) spectrum
    assert (history.erank_0 <= history.rank_0).all()


def test_frobenius_decay_shrinks_the_weights_and_leaves_the_loss_column_the_cross_entropy(tmp_path):
    plain = training.train(model_config("lowrank", subset=500, optimizer="sgd"), tmp_path)
    decayed = training.train(model_config("lowrank", subset=500, optimizer="sgd", frobenius_decay=5.0), tmp_path)
    norm = lambda result: effective_weight(result.model.layers[0]).norm().item()  # noqa: E731
    assert norm(decayed) < 0.8 * norm(plain)
    # The row-0 losses are the same untrained network's cross-entropy, without the penalty.
    assert decayed.history.train_loss[0] == plain.history.train_loss[0]
    assert decayed.history.train_loss[1] < 2.5


def test_factor_decay_shrinks_the_factors(tmp_path):
    plain = training.train(model_config("lowrank", subset=500, optimizer="sgd"), tmp_path)
    decayed = training.train(model_config("lowrank", subset=500, optimizer="sgd", factor_decay=5.0), tmp_path)
    size = lambda result: sum(p.square().sum().item() for p in (result.model.layers[0].U, result.model.layers[0].V))  # noqa: E731
    assert size(decayed) < 0.8 * size(plain)


def test_warm_start_factorises_the_trained_dense_twin(tmp_path):
    cfg = model_config("lowrank", subset=500, num_epochs=3, warm_start_epochs=1)
    result = training.train(cfg, tmp_path)
    history = result.history
    assert history.phase.tolist() == ["warm-up", "warm-up", "train", "train"]
    assert history.rank_0.tolist() == [32, 8, 8, 8]  # dense twin, then factorised at the end of epoch 1
    dense_params, lowrank_params = 784 * 32 + 32 + 32 * 10 + 10, 8 * (784 + 32 + 8) + 32 + 32 * 10 + 10
    assert history.parameters.tolist() == [dense_params] + [lowrank_params] * 3
    assert (history.train_seconds[1:] > 0).all()
    assert history.train_seconds_cum.iloc[-1] == pytest.approx(history.train_seconds.sum())
    assert history.val_accuracy[1] > 0.5  # the factorised network right after the warm-up already works
    assert result.model.ranks() == [8, 10]


def test_warm_start_sets_the_best_rank_r_approximation_and_copies_the_rest():
    from lowrank.linalg import truncated_svd
    from lowrank.network import NeuralNetwork

    for factorization in ("usv", "uv"):
        text = LAYERS["lowrank"] + f'factorization = "{factorization}"\n'
        cfg = config.loads(f"[settings]\n{text}\n{OUTPUT_LAYER}", "w.toml").models[0]
        torch.manual_seed(3)
        dense = NeuralNetwork.from_config(cfg.dense_twin().layers)
        with torch.no_grad():
            for layer in dense.layers:
                layer.bias.normal_()
        rng = torch.get_rng_state()
        model = training.warm_start(cfg, dense)
        assert torch.equal(torch.get_rng_state(), rng)
        w = dense.layers[0].weight.detach()
        p, sigma, q = truncated_svd(w, 8)
        assert torch.allclose(effective_weight(model.layers[0]), (p * sigma) @ q.T, atol=1e-5)
        if factorization == "uv":  # balanced: U^T U = V^T V = Sigma_r
            u, v = model.layers[0].U.detach(), model.layers[0].V.detach()
            assert torch.allclose(u.T @ u, torch.diag(sigma), atol=1e-4)
            assert torch.allclose(v.T @ v, torch.diag(sigma), atol=1e-4)
        else:
            assert torch.allclose(model.layers[0].S.detach(), torch.diag(sigma))
        assert torch.equal(model.layers[0].bias, dense.layers[0].bias)
        assert torch.equal(model.layers[1].weight, dense.layers[1].weight)
        assert torch.equal(model.layers[1].bias, dense.layers[1].bias)


def test_run_resumed_during_and_after_a_warm_start_has_the_history_of_an_uninterrupted_run(tmp_path):
    cfg = model_config("lowrank", num_epochs=3, subset=500, warm_start_epochs=2, track_layers=True)
    uninterrupted = training.train(cfg, tmp_path / "a")
    timing = list(training.TIMING_COLUMNS)
    for stop in (1, 2):  # in the dense warm-up, and just after the switch to the factorised network

        def interrupt(row, stop=stop):
            if row["epoch"] == stop:
                raise KeyboardInterrupt

        folder = tmp_path / f"stop{stop}"
        with pytest.raises(KeyboardInterrupt):
            training.train(cfg, folder, on_epoch=interrupt)
        resumed = training.train(cfg, folder)
        pd.testing.assert_frame_equal(resumed.history.drop(columns=timing),
                                      uninterrupted.history.drop(columns=timing), check_exact=True)
        pd.testing.assert_frame_equal(resumed.spectra, uninterrupted.spectra, check_exact=True)
        assert resumed.test_loss == uninterrupted.test_loss


def test_track_layers_stores_spectra_and_nc1(tmp_path):
    cfg = model_config("dense", subset=500, num_epochs=2, track_layers=True)
    result = training.train(cfg, tmp_path)
    assert {"nc1_0", "nc1_1"} <= set(result.history.columns)
    assert (result.path / "spectra.csv").is_file()
    spectra = result.spectra
    assert list(spectra.columns) == ["epoch", "layer", "index", "value"]
    assert len(spectra) == 3 * (32 + 10)  # epochs 0..2, min(dims) values per layer
    final = spectra[spectra.epoch == 2]
    for i, layer in enumerate(result.model.layers):
        values = torch.tensor(final[final.layer == i].sort_values("index").value.tolist(), dtype=torch.float64)
        assert torch.allclose(values, metrics.layer_singular_values(layer))
    assert result.history.nc1_0.nunique() == 1  # the pixels do not change with training
    x, y = data.loaders("mnist", subset=500, seed=0).train.dataset.tensors
    hidden = result.model.layer_inputs(x[:training.FEATURE_SAMPLE])[1]
    assert result.history.nc1_1.iloc[-1] == pytest.approx(metrics.nc1(hidden, y[:training.FEATURE_SAMPLE]), rel=1e-6)
    cached = training.load_result(cfg, tmp_path)
    pd.testing.assert_frame_equal(cached.spectra, spectra, check_exact=True)


# ---------------------------------------------------------------------------------------------
# Issue 12: the two-phase protocol (rank-adaptive, then fixed-rank fine-tuning)

def test_fine_tuning_keeps_the_ranks_reached_and_is_one_history(tmp_path):
    cfg = model_config("shrinking", num_epochs=2, fine_tune_epochs=2, subset=1000)
    result = training.train(cfg, tmp_path)
    history = result.history
    assert history.epoch.tolist() == [0, 1, 2, 3, 4]
    assert history.phase.tolist() == ["train", "train", "train", "fine-tune", "fine-tune"]
    assert history.rank_0[1] < 8  # the adaptive phase changed the rank ...
    assert history.rank_0[2] == history.rank_0[3] == history.rank_0[4]  # ... the fine-tuning keeps it
    assert history.train_loss[4] < history.train_loss[2]  # and still trains
    assert not any(layer.adaptive for layer in result.model.dynamical_layers())
    assert cfg.cache_key() != model_config("shrinking", num_epochs=2, subset=1000).cache_key()


def test_run_resumed_in_the_fine_tuning_phase_has_the_history_of_an_uninterrupted_run(tmp_path):
    cfg = model_config("shrinking", num_epochs=2, fine_tune_epochs=2, subset=500)
    uninterrupted = training.train(cfg, tmp_path / "a")

    def interrupt(row):
        if row["epoch"] == 3:  # the first fine-tuning epoch is checkpointed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, tmp_path / "b", on_epoch=interrupt)
    resumed = training.train(cfg, tmp_path / "b")
    timing = list(training.TIMING_COLUMNS)
    pd.testing.assert_frame_equal(resumed.history.drop(columns=timing), uninterrupted.history.drop(columns=timing),
                                  check_exact=True)
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_the_full_length_protocol_of_figure_f_runs_at_tiny_size(tmp_path):
    """notebooks/configs/fig_f_full.toml (250 + 100 epochs from rank 300, device auto), shrunk to 2 + 1 epochs."""
    study = config.load(Path(__file__).resolve().parents[1] / "notebooks" / "configs" / "fig_f_full.toml")
    full = next(m for m in study.models if m.name.startswith("dynamical tau=0.17"))
    assert (full.settings.num_epochs, full.settings.fine_tune_epochs, full.settings.device) == (250, 100, "auto")
    assert [layer.rank for layer in full.layers[:-1]] == [300] * 4
    tiny = full.with_settings(subset=300, num_epochs=2, fine_tune_epochs=1, batch_size=100)
    result = training.train(tiny, tmp_path)
    assert result.history.phase.tolist() == ["train", "train", "train", "fine-tune"]
    assert result.history.rank_0[3] == result.history.rank_0[2] < 300


CONV_NET = """
[settings]
subset = 600
batch_size = 50
num_epochs = 2
learning_rate = 0.01
[[layer]]
type = "dynamical"
dims = [1, 6]
kernel_size = 5
pool = 2
rank = 3
tau = 0.2
[[layer]]
type = "dense"
dims = [6, 8]
kernel_size = 3
stride = 2
[[layer]]
type = "lowrank"
dims = [200, 10]
rank = 4
activation = "identity"
"""


def test_a_convolutional_network_trains_and_resumes_like_a_perceptron(tmp_path):
    from lowrank.conv import DenseConv2d, DynamicalLowRankConv2d

    cfg = config.loads(CONV_NET, "conv.toml").models[0]
    uninterrupted = training.train(cfg, tmp_path / "a")
    model = uninterrupted.model
    assert [type(layer) for layer in model.layers[:2]] == [DynamicalLowRankConv2d, DenseConv2d]
    assert model.positions() == [24 * 24, 5 * 5, 1]  # 28 -> 24, pooled to 12 -> stride 2: 5
    history = uninterrupted.history
    assert history.val_loss.iloc[-1] < history.val_loss.iloc[0]
    assert history.rank_1.tolist() == [min(6 * 9, 8)] * 3 and history.rank_0.iloc[0] == 3
    # per output position: 2 r (n_in + n_out + r) + n_out (rank 3), 2 n_in n_out + n_out (dense), then the linear layer
    positions_flops = (2 * 3 * (25 + 6 + 3) + 6) * 576 + (2 * 54 * 8 + 8) * 25 + 2 * 4 * (200 + 10 + 4) + 10
    assert history.flops_per_sample.iloc[0] == positions_flops

    def interrupt(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, tmp_path / "b", on_epoch=interrupt)
    resumed = training.train(cfg, tmp_path / "b")
    timing = list(training.TIMING_COLUMNS)
    pd.testing.assert_frame_equal(resumed.history.drop(columns=timing), history.drop(columns=timing), check_exact=True)
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
