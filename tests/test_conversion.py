"""lowrank.convert on models built from torch.nn: a torchvision ResNet-18, a transformer encoder block, an MLP and
a layer by itself; lowrank.summary, ranks and compression of any model."""

import io
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

import lowrank
from lowrank import DynamicalLowRank, DynamicalLowRankConv2d, LowRank, LowRankConv2d
from lowrank.optim import dynamical_layers

torch.set_num_threads(1)
# Full-rank conversions are larger than the model by design; test_a_conversion_that_grows_the_model_warns checks
# the warning.
pytestmark = pytest.mark.filterwarnings("ignore:the converted model has:UserWarning")


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return resnet18(weights=None, num_classes=10).eval()


class Block(nn.Module):
    """A pre-norm transformer encoder block from torch.nn parts: attention, then a feed-forward network."""

    def __init__(self, width: int = 32, heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.feed_forward = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.feed_forward(self.norm2(x))


def block() -> nn.Module:
    torch.manual_seed(0)
    return Block().eval()


def count(model: nn.Module, *types) -> int:
    return sum(isinstance(m, types) for m in model.modules())


@pytest.mark.parametrize("how", [dict(tau=0.0), dict(rank=10_000), dict(rank=1.0)], ids=["tau=0", "rank=max", "rank=1.0"])
def test_a_resnet_converted_at_full_rank_computes_what_it_did(how):
    model = resnet()
    x = torch.randn(2, 3, 32, 32)
    converted = lowrank.convert(model, **how)
    conv, linear = (DynamicalLowRankConv2d, DynamicalLowRank) if "tau" in how else (LowRankConv2d, LowRank)
    assert count(converted, conv) == count(model, nn.Conv2d) == 20 and count(converted, nn.Conv2d) == 0
    assert count(converted, linear) - count(converted, conv) == 1  # the classifier
    assert not converted.training
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lowrank.to_dense(converted)(x), model(x), rtol=1e-5, atol=1e-5)
    assert count(lowrank.to_dense(converted), nn.Conv2d) == 20


def test_convert_starts_each_dynamical_layer_at_the_rank_its_spectrum_gives():
    model = resnet()
    converted = lowrank.convert(model, tau=0.3, include=["layer4.*"], exclude=["*.downsample.*"])
    converted_names = [name for name, m in converted.named_modules() if isinstance(m, DynamicalLowRankConv2d)]
    assert converted_names == ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    layer = converted.get_submodule("layer4.0.conv1")
    original = model.get_submodule("layer4.0.conv1").weight.detach().reshape(512, -1).T
    sigma = torch.linalg.svdvals(original.double())
    r = layer.rank
    assert sigma[r:].norm() <= 0.3 * sigma.norm() < sigma[r - 1:].norm()  # the smallest rank within tau
    assert layer.tau == 0.3 and layer.r_max == 512
    assert lowrank.convert(model, rank=0.5, include=["fc"]).fc.rank == 5  # half of min(512, 10)
    assert model.get_submodule("layer4.0.conv1").__class__ is nn.Conv2d  # the original is untouched


def test_a_transformer_block_converts_its_feed_forward_and_keeps_attention():
    model = block()
    x = torch.randn(3, 7, 32)
    converted = lowrank.convert(model, tau=0.0)
    assert all(isinstance(converted.feed_forward[i], DynamicalLowRank) for i in (0, 2))
    assert type(converted.attention.out_proj) is type(model.attention.out_proj)  # attention reads it as a weight
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True).eval()
    with pytest.raises(ValueError, match="no torch.nn.Linear"):  # its fast path reads linear1.weight: left alone
        lowrank.convert(layer, tau=0.0)


@pytest.mark.parametrize("make", [resnet, block], ids=["resnet18", "transformer"])
def test_a_dlrt_step_on_a_converted_model_lowers_the_loss(make):
    model = make().train()
    torch.manual_seed(1)
    if make is resnet:
        x, target = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

        def loss_of(m):
            return F.cross_entropy(m(x), target)
    else:
        x, target = torch.randn(4, 5, 32), torch.randn(4, 5, 32)

        def loss_of(m):
            return F.mse_loss(m(x), target)

    converted = lowrank.convert(model, tau=0.05)
    optimizer = lowrank.dlrt_optimizer(converted, lr=1e-3, method="adam")
    assert optimizer.dlrt is not None and optimizer.ordinary is not None  # factors, and biases / norms / attention

    def closure():
        optimizer.zero_grad()
        loss = loss_of(converted)
        loss.backward()
        return loss

    first = optimizer.step(closure).item()
    for _ in range(4):
        last = optimizer.step(closure).item()
    assert last < first


def test_a_converted_model_resumes_bit_identically_from_a_checkpoint():
    """Saved after two steps at their adapted ranks, loaded into a freshly converted model with
    ``weights_only=True``, the next steps are those of the run that was never interrupted."""
    def converted() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 10))
        return lowrank.convert(model, tau=0.1, init_scale=1.0)

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)

    def steps(model, optimizer, n):
        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return [optimizer.step(closure).item() for _ in range(n)]

    model = converted()
    optimizer = lowrank.dlrt_optimizer(model, lr=0.05, method="adam")
    steps(model, optimizer, 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    expected = steps(model, optimizer, 3)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh = converted()
    fresh.load_state_dict(checkpoint["model"])  # the dynamical layers take the checkpoint's ranks
    resumed = lowrank.dlrt_optimizer(fresh, lr=0.05, method="adam")
    resumed.load_state_dict(checkpoint["optimizer"])
    assert steps(fresh, resumed, 3) == expected
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_convert_says_what_it_needs():
    model = resnet()
    with pytest.raises(ValueError, match="give rank= .* or tau="):
        lowrank.convert(model)
    with pytest.raises(ValueError, match=r"tau = 1.5 must be in \[0, 1\)"):
        lowrank.convert(model, tau=1.5)
    with pytest.raises(ValueError, match=r"no torch.nn.Linear or torch.nn.Conv2d module matches include=\['head'\]"):
        lowrank.convert(model, rank=4, include=["head"])
    with pytest.raises(ValueError, match=r"rank = 1.5 as a fraction"):
        lowrank.convert(model, rank=1.5)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 8, 1))
    assert [type(m) for m in lowrank.convert(grouped, rank=2)] == [nn.Conv2d, LowRankConv2d]  # groups != 1 stays


def test_dlrt_optimizer_takes_any_optimiser_for_the_other_parameters():
    model = lowrank.convert(resnet(), tau=0.1)
    optimizer = lowrank.dlrt_optimizer(model, lr=0.01, method="sgd",
                                       ordinary=lambda params: torch.optim.AdamW(params, lr=1e-3))
    assert isinstance(optimizer.ordinary, torch.optim.AdamW)
    factors = {id(p) for layer in dynamical_layers(model) for p in (layer.U, layer.S, layer.V)}
    others = [p for group in optimizer.ordinary.param_groups for p in group["params"]]
    assert not factors & {id(p) for p in others}
    assert len(others) + len(factors) == len(list(model.parameters()))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


@pytest.mark.parametrize("make", [lambda: nn.Linear(8, 6), lambda: nn.Conv2d(3, 8, 3, padding=1)],
                         ids=["linear", "conv"])
def test_a_layer_converted_by_itself_is_returned_as_the_low_rank_layer(make):
    torch.manual_seed(0)
    layer = make().eval()
    x = torch.randn(4, 8) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 5, 5)
    vanilla, dynamical = lowrank.convert(layer, rank=2), lowrank.convert(layer, tau=0.0)
    assert isinstance(vanilla, (LowRank, LowRankConv2d)) and vanilla.rank == 2
    assert isinstance(dynamical, (DynamicalLowRank, DynamicalLowRankConv2d))
    assert set(vanilla.state_dict()) == {"U", "S", "V", "bias"}  # no dense weight, no child named ""
    with torch.no_grad():
        torch.testing.assert_close(dynamical(x), layer(x), rtol=1e-5, atol=1e-5)  # full rank: the same map
        back = lowrank.to_dense(vanilla)
        assert type(back) is type(layer)
        torch.testing.assert_close(back(x), vanilla(x), rtol=1e-5, atol=1e-5)


def test_every_error_of_a_layer_names_the_module_and_its_shape():
    with pytest.raises(ValueError, match=r"^1 \(Linear, W 784 x 256\): init_scale"):
        lowrank.convert(mlp(), rank=4, init_scale=-1.0)
    with pytest.raises(TypeError, match=r"^1 \(Linear, W 784 x 256\): .*'factorization'"):
        lowrank.convert(mlp(), tau=0.1, factorization="uv")
    with pytest.raises(ValueError, match=r"^the model itself \(Linear, W 8 x 8\): init_scale"):
        lowrank.convert(nn.Linear(8, 8), rank=2, init_scale=0.0)


def test_rank_limits_are_capped_at_each_layers_full_rank_and_fractions_resolved_per_layer():
    converted = lowrank.convert(mlp(), tau=0.1, r_max=32)  # the case: full rank 10 < 32 in the last layer
    first, last = converted[1], converted[3]
    assert (first.r_max, last.r_max) == (32, 10) and first.rank <= 32 and last.rank <= 10
    converted = lowrank.convert(mlp(), tau=0.1, r_max=0.25, r_min=0.1)
    assert [(m.r_min, m.r_max) for m in (converted[1], converted[3])] == [(25, 64), (1, 2)]
    converted = lowrank.convert(mlp(), tau=0.1, rank=1000, r_max=48)  # the start rank within [r_min, r_max]
    assert [m.rank for m in (converted[1], converted[3])] == [48, 10]
    assert lowrank.ranks(lowrank.convert(mlp(), rank=100)) == {"1": 100, "3": 10}


def test_an_int_is_a_rank_and_a_float_a_fraction_of_full_rank():
    assert lowrank.ranks(lowrank.convert(mlp(), rank=1)) == {"1": 1, "3": 1}
    assert lowrank.ranks(lowrank.convert(mlp(), rank=1.0)) == {"1": 256, "3": 10}
    assert lowrank.ranks(lowrank.convert(mlp(), rank=0.5)) == {"1": 128, "3": 5}
    for bad, message in [(2.0, r"rank = 2.0 as a fraction .* must be in \(0, 1\]; a rank is an int \(rank=2\)"),
                         (0.0, r"rank = 0.0 as a fraction"), (0, r"rank = 0 must be an int >= 1"),
                         (True, r"rank = True must be an int >= 1 \(a rank\) or a float in \(0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            lowrank.convert(mlp(), rank=bad)
    with pytest.raises(ValueError, match=r"r_max = 1.5 as a fraction"):
        lowrank.convert(mlp(), tau=0.1, r_max=1.5)
    with pytest.raises(ValueError, match=r"r_max: r_max and r_min limit the ranks of dynamical layers; give tau="):
        lowrank.convert(mlp(), rank=4, r_max=8)


def test_an_exclude_pattern_that_leaves_nothing_out_raises_like_include():
    with pytest.raises(ValueError, match=r"exclude pattern 'head' leaves out none of .* \('conv1', "):
        lowrank.convert(resnet(), rank=4, exclude=["head"])
    with pytest.raises(ValueError, match=r"exclude pattern 'layer4' leaves out none .* 'layer4\.\*'"):
        lowrank.convert(resnet(), rank=4, exclude=["layer4"])  # a container: its children are 'layer4.*'
    converted = lowrank.convert(resnet(), rank=4, exclude=["layer4.*", "fc"])
    assert type(converted.fc) is nn.Linear and type(converted.layer4[0].conv1) is nn.Conv2d


def test_a_conversion_that_grows_the_model_warns_and_one_that_compresses_does_not():
    """tau on an untrained model keeps nearly full rank (a random weight's singular values are all of one size),
    which is more parameters than dense: the measurement the conversion docstring and the README give."""
    model = resnet()
    with pytest.warns(UserWarning, match=r"13,793,435 parameters, 23% more than the 11,181,642"):
        converted = lowrank.convert(model, tau=0.1)
    full = {name: min(m.in_features, m.out_features) for name, m in converted.named_modules()
            if isinstance(m, DynamicalLowRank)}
    assert all(rank >= 0.9 * full[name] for name, rank in lowrank.ranks(converted).items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compressed = lowrank.convert(model, rank=0.25, tau=0.1)
    assert lowrank.compression(compressed) > 0.7


def test_summary_lists_every_layer_and_its_totals_are_the_model_and_its_dense_twin():
    model = resnet()
    converted = lowrank.convert(model, rank=0.25, exclude=["fc"])
    report = lowrank.summary(converted)
    assert [row.name for row in report.layers] == [name for name, m in model.named_modules()
                                                    if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert report.parameters == sum(p.numel() for p in converted.parameters())
    assert report.dense_parameters == sum(p.numel() for p in model.parameters())  # the dense twin is the original
    assert report.compression == pytest.approx(lowrank.compression(converted)) and report.compression > 0.7
    row = next(row for row in report.layers if row.name == "layer4.1.conv2")
    assert (row.kind, row.shape, row.rank) == ("LowRankConv2d", (4608, 512), 128)
    assert row.parameters == 128 * (4608 + 512 + 128) and row.share == pytest.approx(row.parameters / (4608 * 512))
    fc = report.layers[-1]
    assert (fc.name, fc.kind, fc.rank, fc.share) == ("fc", "Linear", 10, 1.0)
    assert report.other_parameters == sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
                                          for p in m.parameters())
    text = str(report)
    assert re.search(r"^layer4\.1\.conv2 +LowRankConv2d +4608 x 512 +128 +671,744 +28\.5%$", text, flags=re.M)
    assert text.splitlines()[-1] == f"dense twin: {report.dense_parameters:,} parameters; compression 70.8%"
    assert repr(report) == text


def test_ranks_and_dynamical_layers_of_any_model():
    converted = lowrank.convert(block(), tau=0.1, include=["feed_forward.*"])
    layers = lowrank.dynamical_layers(converted)
    assert lowrank.ranks(converted) == {"feed_forward.0": layers[0].rank, "feed_forward.2": layers[1].rank}
    assert lowrank.ranks(block()) == {} and lowrank.compression(block()) == 0.0
