"""The README's examples work, and CI runs the README's test command."""

import re
import warnings
from pathlib import Path

import torch

from lowrank.engine import config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_python_example_trains_a_dynamical_network():
    example, _ = fenced("python")
    torch.manual_seed(0)
    namespace = {"x": torch.rand(232, 784), "y": torch.randint(0, 10, (232,))}
    exec(example, namespace)
    model, loss = namespace["model"], namespace["loss"]
    assert torch.isfinite(loss)
    assert model.ranks()[:2] != [256, 256] and all(1 <= r <= 256 for r in model.ranks()[:2])


def test_convert_example_makes_a_resnet_dynamical_but_its_classifier_and_compresses_it(capsys):
    import lowrank
    from lowrank import DynamicalLowRankConv2d

    _, example = fenced("python")
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "more parameters than the model given"
        exec(example, namespace)
    model, optimizer = namespace["model"], namespace["optimizer"]
    assert sum(isinstance(m, DynamicalLowRankConv2d) for m in model.modules()) == 20
    assert isinstance(model.fc, torch.nn.Linear) and optimizer.dlrt is not None
    summary = lowrank.summary(model)
    assert capsys.readouterr().out.strip() == str(summary)
    share = f"{summary.parameters / summary.dense_parameters:.1%}"
    assert f"{share} of dense in all" in example and share == "29.2%"


def test_toml_example_is_a_valid_config():
    (example,) = fenced("toml")
    (model,) = config.loads(example, "README.md").models
    assert [layer.type for layer in model.layers] == ["dynamical", "dynamical", "dense"]
    assert model.layers[0].tau == 0.1 and model.layers[1].dims == (512, 512)


def test_ci_runs_the_readme_test_command():
    (commands,) = [block for block in fenced("bash") if "make test" in block]
    test_command = next(line.split("#")[0].strip() for line in commands.splitlines() if "make test" in line)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in [line.strip() for line in ci.splitlines()]
