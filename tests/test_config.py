"""lowrank.engine.config: both TOML shapes, resolved defaults, aliases, the cache key, and one test per error,
each checking that the message names the file, the key path and what is allowed."""

import dataclasses
import re
import textwrap

import pytest

from lowrank import choices, optim
from lowrank.engine import config
from lowrank.network import ACTIVATION_MODULES
from lowrank.engine.config import ConfigError, LayerConfig, ModelConfig, Settings, Study

FILE = "notebooks/configs/fig_a.toml"

SEED = """
[settings]
learningRate = 0.001
batchSize = 232
numEpochs = 10

[[layer]]
type = "dynamical"
dims = [784, 512]
tau = 0.1

[[layer]]
type = "dynamical"
dims = [512, 512]
tau = 0.1

[[layer]]
type = "dense"
dims = [512, 10]
activation = "identity"
"""

FIGURE = """
[figure]
title = "DLRT against dense"
taus = [0.05, 0.1]

[settings]
num_epochs = 3
optimizer = "sgd"
learning_rate = 0.01

[[model]]
name = "dense"
[[model.layer]]
type = "dense"
dims = [784, 256]
[[model.layer]]
type = "dense"
dims = [256, 10]
activation = "identity"

[[model]]
name = "lowrank"
[model.settings]
learning_rate = 0.05
momentum = 0.9
[[model.layer]]
type = "lowrank"
dims = [784, 256]
rank = 20
factorization = "uv"
init = "spectral"
[[model.layer]]
type = "dense"
dims = [256, 10]
activation = "identity"
"""


def load_text(text):
    return config.loads(textwrap.dedent(text), FILE)


def error_of(text) -> str:
    with pytest.raises(ConfigError) as info:
        config.loads(textwrap.dedent(text), FILE)
    return str(info.value)


def single(layers: str, settings: str = "") -> str:
    """A one-model file: [settings] lines + [[layer]] tables given as TOML text."""
    return f"[settings]\n{settings}\n{layers}"


DENSE_FIRST = '[[layer]]\ntype = "dense"\ndims = [784, 512]\n'
DENSE_OUT = '[[layer]]\ntype = "dense"\ndims = [512, 10]\nactivation = "identity"\n'


def assert_names(message, *parts):
    assert message.startswith(FILE + ": "), message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------
# The two shapes

def test_seed_template_gives_one_model_named_after_the_file():
    study = load_text(SEED)
    assert isinstance(study, Study) and len(study.models) == 1
    model = study.models[0]
    assert model.name == "fig_a"
    assert model.settings == Settings(learning_rate=0.001, batch_size=232, num_epochs=10)
    assert [layer.type for layer in model.layers] == ["dynamical", "dynamical", "dense"]
    assert model.layers[0].dims == (784, 512)
    assert model.layers[2].activation == "identity"
    assert study.figure == {}


def test_load_reads_a_file(tmp_path):
    path = tmp_path / "seed_study.toml"
    path.write_text(SEED)
    study = config.load(path)
    assert study.path == path
    assert study.models[0].name == "seed_study"


def test_figure_file_gives_several_models_with_overridden_settings():
    study = load_text(FIGURE)
    assert study.figure == {"title": "DLRT against dense", "taus": [0.05, 0.1]}
    assert study.settings.num_epochs == 3 and study.settings.learning_rate == 0.01
    dense, lowrank = study.models
    assert dense.name == "dense" and dense.settings == study.settings
    assert lowrank.settings == dataclasses.replace(study.settings, learning_rate=0.05, momentum=0.9)
    layer = lowrank.layers[0]
    assert (layer.type, layer.rank, layer.factorization, layer.init) == ("lowrank", 20, "uv", "spectral")


def test_defaults_are_resolved():
    model = load_text(SEED).models[0]
    s = model.settings
    assert (s.optimizer, s.momentum, s.weight_decay, s.seed, s.dataset, s.subset, s.device, s.integrator) == (
        "adam", 0.0, 0.0, 0, "mnist", None, "cpu", "kls")
    first = model.layers[0]
    assert (first.activation, first.bias, first.init, first.r_min, first.adaptive) == ("relu", True, "kaiming", 1, True)
    assert first.init_scale == 0.2 and model.layers[-1].init_scale == 1.0  # dynamical and dense defaults
    normal = load_text(SEED.replace('type = "dynamical"', 'type = "dynamical"\ninit = "normal"', 1)).models[0]
    assert normal.layers[0].init_scale == 1.0  # an explicit init other than kaiming keeps its own scale
    assert first.r_max == 512  # min(dims)
    assert first.rank == 256  # max(r_min, r_max // 2)


def test_dynamical_rank_default_follows_r_max_and_r_min():
    layers = ('[[layer]]\ntype = "dynamical"\ndims = [784, 512]\nr_max = 100\n'
              '[[layer]]\ntype = "dynamical"\ndims = [512, 10]\nr_min = 8\nactivation = "identity"\n')
    first, second = load_text(single(layers)).models[0].layers
    assert (first.rank, first.r_max) == (50, 100)
    assert (second.rank, second.r_max, second.r_min) == (8, 10, 8)


def test_ints_are_accepted_where_floats_are_expected():
    settings = load_text(single(DENSE_FIRST + DENSE_OUT, "learning_rate = 1")).settings
    assert settings.learning_rate == 1.0 and isinstance(settings.learning_rate, float)


def test_to_dict_is_json_able_and_lists_only_the_keys_a_layer_type_uses():
    import json
    d = load_text(FIGURE).models[1].to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["layers"][1] == {"type": "dense", "dims": [256, 10], "activation": "identity", "bias": True, "init": "kaiming",
                             "init_scale": 1.0}
    assert "tau" not in d["layers"][0] and d["layers"][0]["factorization"] == "uv"
    assert d["settings"]["momentum"] == 0.9


# ---------------------------------------------------------------------------------------------
# cache_key and with_settings

def test_cache_key_is_stable_across_calls_and_key_order():
    a = load_text(SEED).models[0]
    reordered = SEED.replace('type = "dense"\ndims = [512, 10]', 'dims = [512, 10]\ntype = "dense"')
    reordered = reordered.replace("learningRate = 0.001\nbatchSize = 232", "batchSize = 232\nlearningRate = 0.001")
    assert reordered != SEED
    b = load_text(reordered).models[0]
    assert a.cache_key() == a.cache_key() == b.cache_key()
    assert len(a.cache_key()) == 16 and int(a.cache_key(), 16) >= 0


def test_cache_key_does_not_change_when_a_default_is_written_out():
    a = load_text(SEED).models[0]
    b = load_text(SEED.replace("numEpochs = 10", 'numEpochs = 10\nseed = 0\noptimizer = "adam"')).models[0]
    assert a.cache_key() == b.cache_key()


@pytest.mark.parametrize("overrides", [
    {"learning_rate": 0.002}, {"batch_size": 100}, {"num_epochs": 2}, {"optimizer": "sgd"},
    {"weight_decay": 1e-4}, {"seed": 1}, {"dataset": "fashion-mnist"}, {"subset": 1000},
    {"device": "auto"}, {"integrator": "single-pass"},
])
def test_cache_key_changes_when_a_setting_changes(overrides):
    model = load_text(SEED).models[0]
    assert model.with_settings(**overrides).cache_key() != model.cache_key()


@pytest.mark.parametrize("field, value", [
    ("type", "lowrank"), ("activation", "tanh"), ("bias", False), ("init", "normal"), ("rank", 100),
    ("tau", 0.2), ("r_max", 400), ("r_min", 2), ("adaptive", False),
])
def test_cache_key_changes_when_a_layer_value_changes(field, value):
    model = load_text(SEED).models[0]
    layer = dataclasses.replace(model.layers[0], **{field: value})
    changed = dataclasses.replace(model, layers=(layer,) + model.layers[1:])
    assert changed.cache_key() != model.cache_key()


def test_cache_key_changes_with_the_name_and_the_version(monkeypatch):
    model = load_text(SEED).models[0]
    assert dataclasses.replace(model, name="other").cache_key() != model.cache_key()
    key = model.cache_key()
    monkeypatch.setattr(config, "__version__", "999")
    assert model.cache_key() != key


def test_with_settings_replaces_and_revalidates():
    model = load_text(SEED).models[0]
    quick = model.with_settings(num_epochs=1, subset=500)
    assert (quick.settings.num_epochs, quick.settings.subset) == (1, 500)
    assert quick.layers == model.layers and quick.name == model.name
    assert model.settings.num_epochs == 10  # frozen: the original is unchanged
    with pytest.raises(ConfigError, match=r'model "fig_a": settings.num_epochs = 0 is too small; allowed: an integer >= 1'):
        model.with_settings(num_epochs=0)
    with pytest.raises(ConfigError, match=r"settings.num_epoch is not a key .*did you mean \"num_epochs\"\?"):
        model.with_settings(num_epoch=1)
    with pytest.raises(ConfigError, match=r"settings.momentum = 0.5 is used by optimizer = \"sgd\" only"):
        model.with_settings(momentum=0.5)
    assert model.with_settings(optimizer="sgd", momentum=0.5).settings.momentum == 0.5


# ---------------------------------------------------------------------------------------------
# Errors: each names the file, the key path and what is allowed

def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml: no such file"):
        config.load(path)


def test_invalid_toml_gives_the_line():
    message = error_of('[settings]\nlearning_rate = = 1\n')
    assert_names(message, "invalid TOML", "line 2")


def test_unknown_setting_lists_allowed_keys_and_suggests_the_closest():
    message = error_of(single(DENSE_FIRST + DENSE_OUT, "learning_rat = 0.1"))
    assert_names(message, "settings.learning_rat", 'did you mean "learning_rate"', "allowed keys:", "batch_size", "integrator")


def test_unknown_layer_key_suggests_the_closest():
    message = error_of(single('[[layer]]\ntype = "lowrank"\ndims = [784, 512]\nrnak = 3\n' + DENSE_OUT))
    assert_names(message, "layer[0].rnak", 'did you mean "rank"', "allowed keys:", "factorization", "r_max")


def test_unknown_top_level_key():
    message = error_of("[setting]\nseed = 1\n" + DENSE_FIRST + DENSE_OUT)
    assert_names(message, "setting is not a key", 'did you mean "settings"', "allowed keys: settings, figure, layer, model")


def test_unknown_model_key():
    message = error_of('[[model]]\nname = "a"\nlayers = []\n')
    assert_names(message, "model[0].layers", 'did you mean "layer"', "allowed keys: name, settings, layer")


@pytest.mark.parametrize("key, value, allowed", [
    ("type", '"conv"', '"dense" | "lowrank" | "dynamical"'),
    ("activation", '"relu6"', '"relu" | "identity" | "tanh" | "sigmoid"'),
    ("init", '"xavier"', '"kaiming" | "kaiming-flat" | "normal" | "spectral" | "spectral-ones"'),
])
def test_unknown_layer_choice_lists_the_choices(key, value, allowed):
    layer = {"type": '"dense"', "dims": "[784, 512]", key: value}
    text = "[[layer]]\n" + "".join(f"{k} = {v}\n" for k, v in layer.items()) + DENSE_OUT
    message = error_of(text)
    assert_names(message, f"layer[0].{key} = {value} is unknown", f"allowed: {allowed}")


@pytest.mark.parametrize("key, value, allowed", [
    ("optimizer", '"adamw"', '"sgd" | "adam"'),
    ("dataset", '"cifar10"', '"mnist" | "fashion-mnist"'),
    ("device", '"gpu"', '"cpu" | "cuda" | "auto"'),
    ("integrator", '"bug"', '"kls" | "single-pass"'),
])
def test_unknown_setting_choice_lists_the_choices(key, value, allowed):
    message = error_of(single(DENSE_FIRST + DENSE_OUT, f"{key} = {value}"))
    assert_names(message, f"settings.{key} = {value} is unknown", f"allowed: {allowed}")


def test_close_choice_is_suggested():
    message = error_of(single(DENSE_FIRST + DENSE_OUT, 'optimizer = "Adam"'))
    assert_names(message, 'did you mean "adam"')


@pytest.mark.parametrize("line, key, allowed", [
    ("batch_size = 1.5", "settings.batch_size = 1.5", "an integer >= 1"),
    ("num_epochs = true", "settings.num_epochs = true", "an integer >= 1"),
    ('learning_rate = "fast"', 'settings.learning_rate = "fast"', "a number > 0"),
    ("learning_rate = true", "settings.learning_rate = true", "a number > 0"),
    ("subset = 10.0", "settings.subset = 10.0", "an integer >= 1"),
    ("optimizer = 3", "settings.optimizer = 3", '"sgd" | "adam"'),
])
def test_wrong_type_in_settings(line, key, allowed):
    message = error_of(single(DENSE_FIRST + DENSE_OUT, line))
    assert_names(message, key, "wrong type", f"allowed: {allowed}")


def test_wrong_type_in_layer():
    message = error_of('[[layer]]\ntype = "dense"\ndims = [784, 512]\nbias = 1\n' + DENSE_OUT)
    assert_names(message, "layer[0].bias = 1", "wrong type", "allowed: true or false")


@pytest.mark.parametrize("line, value", [
    ("learning_rate = 0", "learning_rate = 0.0"), ("learning_rate = -1e-3", "learning_rate = -0.001"),
    ("batch_size = 0", "batch_size = 0"), ("num_epochs = 0", "num_epochs = 0"), ("subset = 0", "subset = 0"),
    ("weight_decay = -1", "weight_decay = -1.0"), ("seed = -1", "seed = -1"),
    ("basis_interval = 0", "basis_interval = 0"),
])
def test_settings_out_of_range(line, value):
    message = error_of(single(DENSE_FIRST + DENSE_OUT, line))
    assert_names(message, f"settings.{value} is too small", "allowed:")


def test_momentum_must_be_below_one_and_needs_sgd():
    message = error_of(single(DENSE_FIRST + DENSE_OUT, 'optimizer = "sgd"\nmomentum = 1'))
    assert_names(message, "settings.momentum = 1.0 is too large", "allowed: a number >= 0 and < 1")
    message = error_of(single(DENSE_FIRST + DENSE_OUT, "momentum = 0.9"))
    assert_names(message, "settings.momentum = 0.9", 'optimizer = "sgd" only', 'allowed: 0, or set optimizer = "sgd"')


def test_alias_and_canonical_name_together():
    message = error_of(single(DENSE_FIRST + DENSE_OUT, "learningRate = 0.1\nlearning_rate = 0.1"))
    assert_names(message, "settings.learningRate and settings.learning_rate are the same setting", "allowed: one of them")


@pytest.mark.parametrize("dims, key", [
    ("[784]", "layer[0].dims = [784]"), ("[784, 512, 3]", "layer[0].dims = [784, 512, 3]"),
    ("[784.0, 512]", "layer[0].dims = [784.0, 512]"), ('"784x512"', 'layer[0].dims = "784x512"'),
    ("[784, true]", "layer[0].dims = [784, true]"),
])
def test_dims_must_be_a_pair_of_ints(dims, key):
    message = error_of(f'[[layer]]\ntype = "dense"\ndims = {dims}\n' + DENSE_OUT)
    assert_names(message, key, "allowed: a pair of positive integers [in_features, out_features]")


def test_dims_must_be_positive():
    message = error_of('[[layer]]\ntype = "dense"\ndims = [784, 0]\n')
    assert_names(message, "layer[0].dims[1] = 0 is too small", "allowed: a pair of positive integers")


def test_missing_dims_and_type():
    assert_names(error_of('[[layer]]\ntype = "dense"\n'), "layer[0].dims is missing", "allowed: a pair of positive")
    assert_names(error_of("[[layer]]\ndims = [784, 10]\n"), "layer[0].type is missing",
                 'allowed: "dense" | "lowrank" | "dynamical"')


def test_dims_must_chain():
    message = error_of(DENSE_FIRST + '[[layer]]\ntype = "dense"\ndims = [256, 10]\n')
    assert_names(message, "layer[1].dims[0] = 256 but layer[0].dims[1] = 512", "allowed: 512")


def test_dims_must_fit_the_dataset():
    message = error_of(single('[[layer]]\ntype = "dense"\ndims = [100, 10]\n', 'dataset = "fashion-mnist"'))
    assert_names(message, 'layer[0].dims[0] = 100 but dataset = "fashion-mnist" has 784 inputs', "allowed: 784")
    message = error_of('[[layer]]\ntype = "dense"\ndims = [784, 12]\n')
    assert_names(message, 'layer[0].dims[1] = 12 but dataset = "mnist" has 10 classes', "allowed: 10")


def test_rank_larger_than_min_dims_in_a_figure_file():
    text = FIGURE.replace("rank = 20", "rank = 600")
    message = error_of(text)
    assert message == f"{FILE}: model[1].layer[0].rank = 600 is larger than min(dims) = 256; allowed: 1..256"


def test_rank_missing_for_lowrank():
    message = error_of('[[layer]]\ntype = "lowrank"\ndims = [784, 512]\n' + DENSE_OUT)
    assert_names(message, "layer[0].rank is missing", "allowed: 1..512")


def test_rank_zero():
    message = error_of('[[layer]]\ntype = "lowrank"\ndims = [784, 512]\nrank = 0\n' + DENSE_OUT)
    assert_names(message, "layer[0].rank = 0 is too small", "allowed: an integer >= 1")


def test_negative_tau():
    message = error_of('[[layer]]\ntype = "dynamical"\ndims = [784, 512]\ntau = -0.1\n' + DENSE_OUT)
    assert_names(message, "layer[0].tau = -0.1 is too small", "allowed: a number >= 0 and < 1")


def test_tau_of_one_or_more():
    message = error_of('[[layer]]\ntype = "dynamical"\ndims = [784, 512]\ntau = 1\n' + DENSE_OUT)
    assert_names(message, "layer[0].tau = 1.0 is too large", "allowed: a number >= 0 and < 1")


def test_r_min_larger_than_r_max():
    message = error_of('[[layer]]\ntype = "dynamical"\ndims = [784, 512]\nr_max = 4\nr_min = 5\n' + DENSE_OUT)
    assert_names(message, "layer[0].r_min = 5 is larger than r_max = 4", "allowed: 1..4")


def test_r_max_larger_than_min_dims():
    message = error_of('[[layer]]\ntype = "dynamical"\ndims = [784, 512]\nr_max = 600\n' + DENSE_OUT)
    assert_names(message, "layer[0].r_max = 600 is larger than min(dims) = 512", "allowed: 1..512")


def test_dynamical_rank_outside_r_min_r_max():
    message = error_of('[[layer]]\ntype = "dynamical"\ndims = [784, 512]\nr_max = 64\nrank = 100\n' + DENSE_OUT)
    assert_names(message, "layer[0].rank = 100 is outside r_min..r_max", "allowed: 1..64")


@pytest.mark.parametrize("kind, line, users", [
    ("dense", "tau = 0.1", "dynamical"),
    ("dense", "rank = 10", "lowrank and dynamical"),
    ("lowrank", "adaptive = false", "dynamical"),
    ("dynamical", 'factorization = "uv"', "lowrank"),
])
def test_key_not_used_by_the_layer_type(kind, line, users):
    rank = "rank = 10\n" if kind == "lowrank" else ""
    message = error_of(f'[[layer]]\ntype = "{kind}"\ndims = [784, 512]\n{rank}{line}\n' + DENSE_OUT)
    key = line.split(" ")[0]
    assert_names(message, f"layer[0].{key} is not used by a {kind} layer (only by {users})",
                 f"allowed keys of a {kind} layer: type, dims")


def test_spectral_init_needs_a_factorised_layer():
    message = error_of('[[layer]]\ntype = "dense"\ndims = [784, 512]\ninit = "spectral-ones"\n' + DENSE_OUT)
    assert_names(message, 'layer[0].init = "spectral-ones" needs a lowrank or dynamical layer',
                 'allowed for a dense layer: "kaiming" | "normal"')


def test_zero_layers():
    assert_names(error_of("[settings]\nseed = 1\n"), "layer: the model has no layers", "allowed: one or more [[layer]]")
    message = error_of('[[model]]\nname = "a"\n')
    assert_names(message, "model[0].layer: the model has no layers", "allowed: one or more [[model.layer]]")


def test_layer_written_as_a_single_table():
    message = error_of('[layer]\ntype = "dense"\ndims = [784, 10]\n')
    assert_names(message, "layer is a single table", "allowed: an array of tables, written [[layer]]")


def test_duplicate_model_names():
    text = FIGURE.replace('name = "lowrank"', 'name = "dense"')
    message = error_of(text)
    assert_names(message, 'model[1].name = "dense" is already the name of model[0]', "allowed: a name not used yet")


def test_model_name_missing():
    message = error_of('[[model]]\n[[model.layer]]\ntype = "dense"\ndims = [784, 10]\n')
    assert_names(message, "model[0].name is missing", "allowed: a non-empty string")


def test_model_settings_errors_name_the_model():
    text = FIGURE.replace("learning_rate = 0.05", "learning_rate = -0.05")
    message = error_of(text)
    assert_names(message, "model[1].settings.learning_rate = -0.05 is too small", "allowed: a number > 0")
    text = FIGURE.replace("momentum = 0.9", 'momentum = 0.9\noptimizer = "adam"')
    assert_names(error_of(text), "model[1].settings.momentum = 0.9", 'optimizer = "sgd" only')


def test_layers_and_models_together():
    message = error_of(DENSE_FIRST + FIGURE)
    assert_names(message, "[[layer]]", "[[model]]", "not both")


def test_errors_without_a_path_name_the_string():
    with pytest.raises(ConfigError, match=r"^<config>: layer\[0\].type is missing"):
        config.loads("[[layer]]\ndims = [784, 10]\n")
    assert config.loads(SEED).models[0].name == "model"
    assert config.parse({"layer": [{"type": "dense", "dims": [784, 10]}]}).models[0].layers[0].dims == (784, 10)


def test_config_imports_only_the_standard_library():
    """So that `python -m lowrank --help` and the report's checks of every TOML run without torch."""
    import subprocess
    import sys
    code = ("import sys; import lowrank.engine.config; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('lowrank') or m in ('torch', 'numpy', 'pandas'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == ["lowrank", "lowrank.choices", "lowrank.engine", "lowrank.engine.config"]


def test_dataclasses_are_frozen():
    model = load_text(SEED).models[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.settings.num_epochs = 1
    assert isinstance(model, ModelConfig) and isinstance(model.layers[0], LayerConfig)


# ---------------------------------------------------------------------------------------------
# Regularisers, warm start and layer tracking (issue 7)

LOWRANK_FIRST = '[[layer]]\ntype = "lowrank"\ndims = [784, 512]\nrank = 16\n'


def test_new_settings_default_to_off():
    settings = load_text(SEED).settings
    assert (settings.factor_decay, settings.frobenius_decay, settings.warm_start_epochs, settings.track_layers) == (
        0.0, 0.0, 0, False)


def test_regularisers_and_warm_start_are_read():
    text = single(LOWRANK_FIRST + DENSE_OUT,
                  "num_epochs = 3\nfactor_decay = 1e-3\nfrobenius_decay = 2\nwarm_start_epochs = 2\ntrack_layers = true")
    settings = load_text(text).settings
    assert (settings.factor_decay, settings.frobenius_decay, settings.warm_start_epochs, settings.track_layers) == (
        1e-3, 2.0, 2, True)


@pytest.mark.parametrize("line, value", [
    ("factor_decay = -1", "factor_decay = -1.0"), ("frobenius_decay = -0.1", "frobenius_decay = -0.1"),
    ("warm_start_epochs = -1", "warm_start_epochs = -1"),
])
def test_new_settings_out_of_range(line, value):
    message = error_of(single(LOWRANK_FIRST + DENSE_OUT, line))
    assert_names(message, f"settings.{value} is too small", "allowed:")


def test_warm_start_must_leave_a_low_rank_epoch():
    message = error_of(single(LOWRANK_FIRST + DENSE_OUT, "num_epochs = 2\nwarm_start_epochs = 2"))
    assert_names(message, "settings.warm_start_epochs = 2 leaves no low-rank epoch of num_epochs = 2", "allowed: 0..1")


@pytest.mark.parametrize("key", ["factor_decay", "frobenius_decay"])
def test_factor_regularisers_need_a_lowrank_layer(key):
    message = error_of(single(DENSE_FIRST + DENSE_OUT, f"{key} = 0.01"))
    assert_names(message, f"settings.{key} = 0.01 regularises lowrank layers and the model has none", "allowed: 0")
    dynamical = '[[layer]]\ntype = "dynamical"\ndims = [784, 512]\n'
    assert_names(error_of(single(dynamical + DENSE_OUT, f"{key} = 0.01")), "weight_decay")


def test_warm_start_needs_a_factorised_layer_and_names_the_model():
    message = error_of(single(DENSE_FIRST + DENSE_OUT, "num_epochs = 3\nwarm_start_epochs = 1"))
    assert_names(message, "settings.warm_start_epochs = 1 needs a lowrank or dynamical layer", "allowed: 0")
    text = FIGURE.replace("momentum = 0.9", "momentum = 0.9\nwarm_start_epochs = 1")
    assert load_text(text).models[1].settings.warm_start_epochs == 1  # the lowrank model may warm-start
    text = FIGURE.replace("num_epochs = 3", "num_epochs = 3\nwarm_start_epochs = 1")  # the dense model may not
    assert_names(error_of(text), "model[0].settings.warm_start_epochs = 1 needs a lowrank or dynamical layer")


def test_dense_twin_keeps_dims_activations_and_biases():
    model = load_text(FIGURE.replace("momentum = 0.9", "momentum = 0.9\nwarm_start_epochs = 2")).models[1]
    twin = model.dense_twin()
    assert [layer.type for layer in twin.layers] == ["dense", "dense"]
    assert [layer.dims for layer in twin.layers] == [layer.dims for layer in model.layers]
    assert [layer.activation for layer in twin.layers] == ["relu", "identity"]
    assert [layer.init for layer in twin.layers] == ["kaiming", "kaiming"]
    assert twin.settings.warm_start_epochs == 0
    assert twin.settings.learning_rate == model.settings.learning_rate


def test_figure_seeds_train_every_model_once_per_seed():
    text = """
[figure]
seeds = [0, 3]
[settings]
seed = 7
[[model]]
name = "a"
[[model.layer]]
type = "dense"
dims = [784, 10]
activation = "identity"
[[model]]
name = "b"
[[model.layer]]
type = "lowrank"
dims = [784, 10]
rank = 4
activation = "identity"
"""
    study = config.loads(text, "seeds.toml")
    assert [m.name for m in study.models] == ["a seed=0", "a seed=3", "b seed=0", "b seed=3"]
    assert [m.settings.seed for m in study.models] == [0, 3, 0, 3]
    assert len({m.cache_key() for m in study.models}) == 4
    for bad, message in (("[0, 0]", "repeats a seed"), ("[-1]", "integers >= 0"), ('"0"', "not a list")):
        with pytest.raises(config.ConfigError, match=f"seeds.toml: figure.seeds = .*{message}"):
            config.loads(text.replace("seeds = [0, 3]", f"seeds = {bad}"), "seeds.toml")


def test_every_activation_name_has_its_module():
    assert tuple(ACTIVATION_MODULES) == choices.ACTIVATIONS


def test_basis_interval_reaches_the_dlrt_optimiser():
    from lowrank.network import NeuralNetwork

    model = config.loads("""
[settings]
basis_interval = 5
[[layer]]
type = "dynamical"
dims = [784, 32]
rank = 8
[[layer]]
type = "dense"
dims = [32, 10]
activation = "identity"
""").models[0]
    network = NeuralNetwork.from_config(model.layers)
    assert optim.build_optimizer(network, model.settings).dlrt.basis_interval == 5


@dataclasses.dataclass(frozen=True)
class Probe:
    """An experiment's options as the figure kinds declare theirs (lowrank.engine.experiments)."""

    sizes: tuple[int, ...] = config.option((4,), "sizes", min=1, multiple_of=2, table="grid")
    names: tuple[str, ...] = config.option(("a",), "names", choices=("a", "b"), table="grid")
    empty_ok: tuple[float, ...] = config.option((), "may be []", above=0, empty=True, table="grid")
    code: str = config.option("x1", "a code", pattern=(r"x\d", "x and a digit"), table="run")
    steps: int = config.option(3, "steps", min=1, table="run")
    untabled: int = 0


PROBE = {"figure": {"kind": "probe"}, "grid": {"sizes": [2, 8]}, "run": {"steps": 5}, "quick": {"steps": 1}}


def test_experiment_tables_read_each_key_from_its_table_and_quick_from_quick():
    assert config.experiment_tables(PROBE, "probe", "p.toml", Probe) == {"kind": "probe"}
    assert config.table_values(Probe, PROBE, "p.toml") == {"sizes": (2, 8), "steps": 5}
    assert config.table_values(Probe, PROBE, "p.toml", quick=True) == {"sizes": (2, 8), "steps": 1}
    assert Probe(**config.table_values(Probe, {"grid": {"empty_ok": []}}, "p.toml")).empty_ok == ()


@pytest.mark.parametrize("data, message", [
    ({"grid": {"sizes": [2, 3]}}, r'p\.toml: grid\.sizes\[1\] = 3 is not a multiple of 2; allowed: a non-empty list of '
                                  r"integers >= 1 and multiples of 2"),
    ({"grid": {"sizes": []}}, r"grid\.sizes = \[\] has the wrong type; allowed: a non-empty list of integers"),
    ({"grid": {"sizes": [2, 2.5]}}, r"grid\.sizes = \[2, 2\.5\] has the wrong type"),
    ({"grid": {"names": ["a", "c"]}}, r'grid\.names\[1\] = "c" is unknown; allowed: a non-empty list of "a" \| "b"'),
    ({"grid": {"empty_ok": [0]}}, r"grid\.empty_ok\[0\] = 0\.0 is too small; allowed: a list of numbers > 0"),
    ({"run": {"code": "y"}}, r'run\.code = "y" is unknown; allowed: x and a digit'),
    ({"run": {"sizes": [2]}}, r"run\.sizes is not a key of \[run\].*; allowed keys: code, steps"),
    ({"quick": {"untabled": 1}}, r"quick\.untabled is not a key of \[quick\]; allowed keys: sizes, names, empty_ok, code"),
    ({"grids": {}}, r"unknown top-level key 'grids'; allowed: \[figure\], \[grid\], \[run\], \[quick\]"),
    ({"figure": {"kind": "other"}}, r'figure\.kind = "other" is not allowed; allowed: "probe"'),
])
def test_experiment_errors_name_the_file_the_key_and_the_allowed_values(data, message):
    data = {"figure": {"kind": "probe"}, **data}
    with pytest.raises(ConfigError, match=message):
        config.experiment_tables(data, "probe", "p.toml", Probe)
        config.table_values(Probe, data, "p.toml", quick=True)


LENET = """
[[layer]]
type = "dynamical"
dims = [1, 20]
kernel_size = 5
pool = 2
r_max = 10
[[layer]]
type = "dynamical"
dims = [20, 50]
kernel_size = 5
pool = 2
[[layer]]
type = "dynamical"
dims = [800, 500]
[[layer]]
type = "dense"
dims = [500, 10]
activation = "identity"
"""


def test_a_convolutional_network_chains_its_image_shapes():
    """LeNet5 of the DLRT paper: 28 -> conv 5 -> 24 -> pool 2 -> 12 -> conv 5 -> 8 -> pool 2 -> 4: 50 x 4 x 4 = 800."""
    (model,) = load_text(LENET).models
    first, second, linear, _ = model.layers
    assert first.matrix_dims == (25, 20) and second.matrix_dims == (500, 50) and linear.matrix_dims == (800, 500)
    assert (first.rank, first.r_max, second.rank, second.r_max) == (5, 10, 25, 50)  # default rank: r_max // 2
    assert first.output_shape((1, 28, 28)) == (20, 12, 12)
    assert "kernel_size" in first.to_dict() and "kernel_size" not in linear.to_dict()  # MLP cache keys unchanged


@pytest.mark.parametrize("change, message", [
    (("dims = [20, 50]", "dims = [16, 50]"), r"layer\[1\]\.dims\[0\] = 16 but its input has 20 channels \(20 x 12 x 12\); allowed: 20"),
    (("dims = [800, 500]", "dims = [784, 500]"), r"layer\[2\]\.dims\[0\] = 784 but its input has 800 values \(50 x 4 x 4\); allowed: 800"),
    (("pool = 2\n[[layer]]\ntype = \"dynamical\"\ndims = [800", "pool = 16\n[[layer]]\ntype = \"dynamical\"\ndims = [800"),
     r"layer\[1\]: kernel_size = 5, stride = 1, padding = 0 and pool = 16 leave no pixel of its 12 x 12 input"),
    (("r_max = 10", "r_max = 30"), r"layer\[0\]\.r_max = 30 is larger than min\(in_channels \* kernel_size², out_channels\) = 20"),
    (("activation = \"identity\"", "activation = \"identity\"\npadding = 1"),
     r"layer\[3\]\.padding is used by convolutions only; allowed: set kernel_size, or leave out padding"),
])
def test_convolution_errors_name_the_layer_and_the_shapes(change, message):
    with pytest.raises(ConfigError, match=message):
        load_text(LENET.replace(*change, 1))


def test_a_convolution_cannot_follow_a_linear_layer():
    text = LENET.replace('dims = [1, 20]\nkernel_size = 5\npool = 2\nr_max = 10', 'dims = [784, 20]\nr_max = 10', 1)
    with pytest.raises(ConfigError, match=r"layer\[1\] is a convolution after a linear layer"):
        load_text(text)


# ---------------------------------------------------------------------------------------------
# Issue 26: the parser's errors and the subset, named with the file, the line or key, and what to do

@pytest.mark.parametrize("text, line, what", [
    ("[settings]\nnum_epochs = 1\nnum_epochs = 2\n", "line 3 (num_epochs = 2)", "a key is set twice in one table"),
    (DENSE_FIRST + 'dims = [784, 256]\n' + DENSE_OUT, "line 4 (dims = [784, 256])", "a key is set twice"),
    ("[settings]\nseed = 1\n[settings]\nseed = 2\n", "line 3 ([settings])", "a table is declared twice"),
    ('[[layer]]\ntype = "dense"\n[layer]\ndims = [784, 10]\n', "line 3 ([layer])", "[[layer]] or [[model]] tables"),
])
def test_a_duplicated_key_or_table_names_the_file_the_line_and_what_to_do(text, line, what):
    message = error_of(text)
    assert_names(message, f"{FILE}: {line}: invalid TOML", what, "allowed:", "two brackets")


def test_a_toml_syntax_error_names_the_line_and_the_syntax():
    message = error_of("[settings]\nlearning_rate = = 1\n")
    assert_names(message, "line 2 (learning_rate = = 1): invalid TOML: Invalid value", "allowed: TOML")


def test_read_toml_names_the_file_and_line_of_an_experiment_file(tmp_path):
    path = tmp_path / "fig.toml"
    path.write_text("[grid]\nwidths = [1]\nwidths = [2]\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: line 3 \(widths = \[2\]\): invalid TOML"):
        config.read_toml(path)


def test_a_subset_larger_than_the_training_split_is_refused_when_the_config_is_validated():
    message = error_of(single(DENSE_FIRST + DENSE_OUT, "subset = 60000"))
    assert_names(message, 'settings.subset = 60000 is larger than the training split of dataset = "mnist" (50000 '
                          "images", "allowed: 1..50000")
    assert config.loads(single(DENSE_FIRST + DENSE_OUT, "subset = 50000"), FILE).models[0].settings.subset == 50000
    model = config.loads(single(DENSE_FIRST + DENSE_OUT), FILE).models[0]
    with pytest.raises(ConfigError, match=r"settings.subset = 50000000 is larger .* allowed: 1..50000"):
        model.with_settings(subset=50_000_000)


def test_the_validated_subset_bound_is_the_loaded_training_split():
    from lowrank.engine import data

    assert data.SPLIT_SIZES is config.SPLIT_SIZES and config.SPLIT_SIZES["train"] == 50_000

