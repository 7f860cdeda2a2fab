"""Data-parallel training on 2 CPU processes (gloo): both hold the same network, equal to 1 process at batch 2B."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from lowrank.engine import config, data, distributed, store, training

torch.set_num_threads(1)

B = 50  # images per process and step
# init = "spectral": distinct singular values with large gaps, so the rounding of sums taken in another order
# (two shards vs one batch) cannot move the kept subspace beyond ~1e-6.
SETTINGS = f"""
[settings]
num_epochs = 2
batch_size = {B}
subset = 1000
learning_rate = 0.1
optimizer = "sgd"
momentum = 0.9
"""
# One small dynamical model per DLRT integrator.
MODEL = """
[[model]]
name = "{integrator}"
[model.settings]
integrator = "{integrator}"
[[model.layer]]
type = "dynamical"
dims = [784, 32]
rank = 8
tau = 0.4
init = "spectral"
[[model.layer]]
type = "dense"
dims = [32, 10]
activation = "identity"
"""
CONFIG = SETTINGS + "".join(MODEL.format(integrator=name) for name in ("kls", "single-pass"))

# Run by each process: train every model of the config and save what this rank ends with.
WORKER = """
import sys, torch
from lowrank.engine import config, distributed, training
with distributed.launch() as world:
    for model in config.load(sys.argv[1]).models:
        result = training.train(model, sys.argv[2])
        torch.save({"model": result.model.state_dict(), "history": result.history.to_dict("list"),
                    "test": (result.test_loss, result.test_accuracy), "path": str(result.path)},
                   f"{sys.argv[2]}/{model.name}-rank{world.rank}.pt")
"""


def torchrun(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOWRANK_RESULTS", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    try:
        data.prepare("mnist")
    except data.DataUnavailableError as error:
        pytest.skip(f"MNIST is not available here: {error}")
    folder = tmp_path_factory.mktemp("distributed")
    (folder / "study.toml").write_text(CONFIG)
    return folder, config.load(folder / "study.toml")


@pytest.fixture(scope="module")
def two_processes(study):
    """Each model's saved state on rank 0 and rank 1 of one 2-process run."""
    folder, models = study
    (folder / "worker.py").write_text(WORKER)
    torchrun("worker.py", "study.toml", "out", cwd=folder)
    return {m.name: [torch.load(folder / "out" / f"{m.name}-rank{r}.pt", weights_only=True) for r in (0, 1)]
            for m in models.models}


def weight(state: dict, layer: int) -> torch.Tensor:
    """The matrix W of layer ``layer``: ``U S V^T`` of a dynamical layer, else its dense weight."""
    prefix = f"layers.{layer}."
    if prefix + "U" in state:
        return state[prefix + "U"] @ state[prefix + "S"] @ state[prefix + "V"].T
    return state[prefix + "weight"]


@pytest.mark.parametrize("name", ["kls", "single-pass"])
def test_both_processes_hold_bitwise_identical_networks(two_processes, name):
    rank0, rank1 = two_processes[name]
    assert rank0["model"].keys() == rank1["model"].keys()
    for key, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][key]), key
    assert rank0["history"] == rank1["history"]  # ranks, losses and (max-reduced) timings
    assert rank0["test"] == rank1["test"]
    assert rank0["path"] == rank1["path"]


@pytest.mark.parametrize("name", ["kls", "single-pass"])
def test_two_processes_match_one_process_with_the_doubled_batch(two_processes, study, tmp_path, name):
    model = next(m for m in study[1].models if m.name == name)
    single = training.train(model.with_settings(batch_size=2 * B), tmp_path)
    distributed_run = two_processes[name][0]
    history = pd.DataFrame(distributed_run["history"])
    ranks = [c for c in history.columns if c.startswith("rank_")]
    assert history[ranks].equals(single.history[ranks])
    assert history.rank_0.iloc[-1] < 8  # the ranks did change: truncation decided the same on both sides
    columns = ["train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    assert history[columns].to_numpy() == pytest.approx(single.history[columns].to_numpy(), abs=1e-5)
    assert distributed_run["test"] == pytest.approx((single.test_loss, single.test_accuracy), abs=1e-5)
    state = single.model.state_dict()
    for layer in (0, 1):
        torch.testing.assert_close(weight(distributed_run["model"], layer), weight(state, layer), rtol=0, atol=1e-5)
        key = f"layers.{layer}.bias"
        torch.testing.assert_close(distributed_run["model"][key], state[key], rtol=0, atol=1e-5)


def test_torchrun_cli_trains_once_and_caches_under_its_own_name(two_processes, study):
    folder, models = study
    done = torchrun("-m", "lowrank", "train", "study.toml", "--model", "kls", "--out", "cli", cwd=folder)
    assert done.stdout.count("test_accuracy") == 1  # only rank 0 prints
    model = next(m for m in models.models if m.name == "kls")
    path = store.run_dir(model, folder / "cli", processes=2)
    assert path.name == f"kls-{model.cache_key()}-2proc"  # not the 1-process run of this config
    assert store.run_dir(model, folder / "cli") != path
    assert {p.name for p in path.iterdir()} == {"history.csv", "model.pt", "result.json"}
    assert json.loads((path / "result.json").read_text())["processes"] == 2
    saved = torch.load(path / "model.pt", weights_only=True)
    for key, value in two_processes["kls"][0]["model"].items():  # the CLI ran the same training
        assert torch.equal(saved[key], value), key


def test_shards_split_each_batch_evenly_and_drop_the_remainder():
    batches = [(torch.arange(10), torch.arange(10)), (torch.arange(10, 15), torch.arange(10, 15)),
               (torch.tensor([15]), torch.tensor([15]))]
    shards = [list(distributed.World(rank, 2).shard(batches)) for rank in (0, 1)]
    assert [y.tolist() for _, y in shards[0]] == [[0, 1, 2, 3, 4], [10, 11]]
    assert [y.tolist() for _, y in shards[1]] == [[5, 6, 7, 8, 9], [12, 13]]  # 14 and the batch [15] dropped
    assert [len(list(distributed.World(rank, 2).strided(batches))) for rank in (0, 1)] == [2, 1]
    loader = data._loader(np.zeros((21, 1), np.float32), np.arange(21), 10, "cpu", torch.float32, shuffle_seed=0)  # 10, 10, 1
    shards = distributed.World(1, 2).shard(loader)
    assert len(shards) == len(list(shards)) == 2


def test_one_process_is_left_alone():
    world = distributed.World.current()
    assert world is distributed.SINGLE and world.main
    batches = [(torch.zeros(3), torch.zeros(3))]
    assert world.shard(batches) is batches
    assert world.all_sum(1.5, 2) == (1.5, 2)
    loss = torch.tensor(0.5)
    assert world.average_gradients(torch.nn.Linear(2, 2), loss) is loss
