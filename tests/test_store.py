"""The results store: one atomic write for every file, run folders keyed by the config, the checkpoint."""

import pytest

from lowrank.engine import config, store


def test_atomic_write_leaves_no_partial_file_when_writing_fails(tmp_path):
    target = tmp_path / "history.csv"
    with pytest.raises(RuntimeError, match="interrupted"):
        with store.atomic_write(target) as file:
            file.write(b"half of it")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []

    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with store.atomic_write(target) as file:
            file.write(b"new but incomplete")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"old"

    with store.atomic_write(target) as file:
        file.write(b"new")
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o644


def test_run_folders_are_named_after_the_model_and_keyed_by_its_config(tmp_path):
    model = config.loads("""
[[layer]]
type = "dense"
dims = [784, 10]
activation = "identity"
""", path="my model.toml").models[0]
    folder = store.run_dir(model, tmp_path)
    assert folder == tmp_path / f"my_model-{model.cache_key()}"
    assert store.run_dir(model, tmp_path, processes=2) == tmp_path / f"my_model-{model.cache_key()}-2proc"
    assert store.run_dir(model.with_settings(seed=1), tmp_path) != folder


def test_a_checkpoint_of_another_config_or_a_broken_one_is_ignored_with_a_warning(tmp_path):
    first, second = (config.loads(f"""
[settings]
seed = {seed}
[[layer]]
type = "dense"
dims = [784, 10]
activation = "identity"
""").models[0] for seed in (0, 1))
    assert store.load_checkpoint(tmp_path, first) is None  # none written yet
    store.save_checkpoint(tmp_path, {"config": first.to_dict(), "epoch": 3})
    assert store.load_checkpoint(tmp_path, first) == {"config": first.to_dict(), "epoch": 3}
    with pytest.warns(UserWarning, match="of a different config"):
        assert store.load_checkpoint(tmp_path, second) is None
    (tmp_path / store.CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        assert store.load_checkpoint(tmp_path, first) is None
    store.remove_checkpoint(tmp_path)
    assert not (tmp_path / store.CHECKPOINT_FILE).exists()


def test_notebooks_are_written_atomically_and_as_nbformat_writes_them(tmp_path, monkeypatch):
    import nbformat

    from lowrank.engine import report

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# é")])
    report.write_notebook(notebook, tmp_path / "a.ipynb")
    nbformat.write(notebook, tmp_path / "b.ipynb")
    assert (tmp_path / "a.ipynb").read_bytes() == (tmp_path / "b.ipynb").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nbformat, "writes", lambda nb: fail())
    with pytest.raises(OSError):
        report.write_notebook(notebook, tmp_path / "a.ipynb")
    assert (tmp_path / "a.ipynb").read_bytes() == (tmp_path / "b.ipynb").read_bytes()  # the old file stays
