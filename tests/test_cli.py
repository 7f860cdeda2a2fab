"""``python -m lowrank``: help, train on a tiny config, config errors."""

import json
import os
import subprocess
import sys

import pytest

from lowrank.engine import data


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()

TINY = """
[settings]
num_epochs = 3
batch_size = 100

[[model]]
name = "tiny"
[[model.layer]]
type = "lowrank"
dims = [784, 16]
rank = 4
[[model.layer]]
type = "dense"
dims = [16, 10]
activation = "identity"
"""


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOWRANK_RESULTS", None)
    return subprocess.run([sys.executable, "-m", "lowrank", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def test_help_lists_the_commands():
    done = run_cli("--help")
    assert done.returncode == 0
    assert "train" in done.stdout and "data" in done.stdout
    done = run_cli("train", "--help")
    assert done.returncode == 0
    for option in ("--epochs", "--subset", "--out", "--force", "--model", "--progress"):
        assert option in done.stdout


def test_train_prints_the_history_and_saves_the_result(tmp_path):
    try:
        data.prepare("mnist")
    except data.DataUnavailableError as error:
        pytest.skip(f"MNIST is not available here: {error}")
    (tmp_path / "tiny.toml").write_text(TINY)
    out = tmp_path / "results"
    done = run_cli("train", "tiny.toml", "--subset", "500", "--epochs", "1", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["epoch", "train_loss"])
    assert "val_accuracy" in header and "train_seconds" in header and "rank_0" in header
    assert any(line.split()[:1] == ["1"] for line in lines)  # the row of epoch 1
    assert "test_accuracy" in done.stdout
    (folder,) = out.iterdir()
    assert folder.name.startswith("tiny-") and str(folder) in done.stdout
    info = json.loads((folder / "result.json").read_text())
    assert info["config"]["settings"]["num_epochs"] == 1 and info["config"]["settings"]["subset"] == 500

    again = run_cli("train", "tiny.toml", "--subset", "500", "--epochs", "1", "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0 and "cached result" in again.stdout


def test_data_prints_the_cached_file_and_rejects_unknown_datasets():
    try:
        path = data.prepare("mnist")
    except data.DataUnavailableError as error:
        pytest.skip(f"MNIST is not available here: {error}")
    done = run_cli("data")
    assert done.returncode == 0 and f"mnist: {path}" in done.stdout
    done = run_cli("data", "cifar")
    assert done.returncode == 2 and "unknown dataset 'cifar'" in done.stderr


def test_bad_config_exits_2_with_the_message(tmp_path):
    (tmp_path / "bad.toml").write_text(TINY.replace("rank = 4", "rank = 40"))
    done = run_cli("train", str(tmp_path / "bad.toml"), "--out", str(tmp_path))
    assert done.returncode == 2
    assert "rank = 40 is larger than min(dims) = 16" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_model_name_exits_2(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    done = run_cli("train", str(tmp_path / "tiny.toml"), "--model", "nope", "--out", str(tmp_path))
    assert done.returncode == 2
    assert 'no model named "nope"' in done.stderr and '"tiny"' in done.stderr


def test_benchmark_passes_every_option_to_the_benchmark_and_the_parser_needs_no_torch():
    done = run_cli("benchmark", "--help")
    assert done.returncode == 0 and "python -m lowrank benchmark" in done.stdout and "--device {cpu,cuda}" in done.stdout
    done = run_cli("benchmark", "--widths", "0")
    assert done.returncode == 2 and "argument --widths: 0 is not an integer >= 1" in done.stderr
    check = "import sys; from lowrank.engine.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def _refused(done: subprocess.CompletedProcess, *parts: str) -> None:
    """Bad input: exit status 2, one error line with ``parts``, no traceback."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    for part in parts:
        assert part in done.stderr, done.stderr


@pytest.mark.skipif(torch_cuda_available(), reason="this machine has a CUDA device")
def test_device_cuda_without_a_gpu_says_what_to_use(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    done = run_cli("train", str(tmp_path / "tiny.toml"), "--device", "cuda", "--out", str(tmp_path))
    _refused(done, 'tiny.toml: model "tiny": settings.device = "cuda" (or --device)',
             "finds no CUDA device here", "use device cpu, or \"auto\"")


def test_a_subset_larger_than_the_training_split_names_the_option(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    done = run_cli("train", str(tmp_path / "tiny.toml"), "--subset", "50000000", "--out", str(tmp_path))
    _refused(done, "tiny.toml with --subset 50000000:", "settings.subset = 50000000 is larger than the training split",
             "allowed: 1..50000")
    (tmp_path / "big.toml").write_text(TINY.replace("batch_size = 100", "batch_size = 100\nsubset = 60000"))
    _refused(run_cli("train", str(tmp_path / "big.toml"), "--out", str(tmp_path)),
             "big.toml: settings.subset = 60000 is larger", "allowed: 1..50000")


def test_a_duplicated_toml_key_names_the_file_and_the_line(tmp_path):
    (tmp_path / "twice.toml").write_text(TINY.replace("rank = 4", "rank = 4\nrank = 8"))
    done = run_cli("train", str(tmp_path / "twice.toml"), "--out", str(tmp_path))
    _refused(done, "twice.toml: line 12 (rank = 8): invalid TOML", "a key is set twice in one table",
             "[[layer]] or [[model]] table")


def test_a_thread_count_below_one_is_an_argument_error(tmp_path):
    done = run_cli("train", "any.toml", "--threads", "0")
    _refused(done, "argument --threads: 0 is not an integer >= 1")


def test_cuda_is_refused_where_torch_finds_none_and_auto_falls_back_to_the_cpu(monkeypatch):
    import torch

    from lowrank.engine import determinism

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert determinism.resolve_device("auto") == torch.device("cpu")
    assert determinism.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(determinism.DeviceUnavailableError, match=r"is_available\(\) is False\); use device cpu"):
        determinism.resolve_device("cuda")
