"""The private PyTorch API behind one module: the fused kernel, the _foreach_ ops and the public fallback agree."""

import pytest
import torch

from lowrank import torch_compat

PATHS = {"fused": (), "foreach": ("_fused_adam_",), "public": ("_fused_adam_", "_foreach_addcmul_", "_foreach_add_")}


def inputs():
    gen = torch.Generator().manual_seed(0)
    shapes, steps = [(30, 4), (4, 4), (20, 6)], [1, 3, 7]
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]
    moments = [(torch.randn(shape, generator=gen, dtype=torch.float64), torch.rand(shape, generator=gen, dtype=torch.float64))
               for shape in shapes]
    return grads, moments, steps


def run(monkeypatch, missing):
    with monkeypatch.context() as patch:
        for name in missing:
            patch.delattr(torch, name)
        grads, moments, steps = inputs()
        exp_avgs, exp_avg_sqs = [m.clone() for m, _ in moments], [v.clone() for _, v in moments]
        directions = torch_compat.adam_directions(grads, exp_avgs, exp_avg_sqs, steps, 0.9, 0.999, 1e-8)
        buffers = [m.clone() for m, _ in moments]
        torch_compat.momentum_update_(buffers, grads, 0.9)
    return directions, exp_avgs, exp_avg_sqs, buffers


@pytest.mark.parametrize("path", ["foreach", "public"])
def test_every_path_gives_the_fused_kernel_s_directions_moments_and_momentum(monkeypatch, path):
    reference, other = run(monkeypatch, PATHS["fused"]), run(monkeypatch, PATHS[path])
    for expected, got in zip(reference, other):
        for a, b in zip(expected, got):
            torch.testing.assert_close(b, a, rtol=1e-13, atol=0)


def test_the_directions_are_adam_s_bias_corrected_ratio():
    grads, moments, steps = inputs()
    m, v = moments[0][0].clone(), moments[0][1].clone()
    direction = torch_compat.adam_directions(grads[:1], [m], [v], steps[:1], 0.9, 0.999, 1e-8)[0]
    m_expected = 0.9 * moments[0][0] + 0.1 * grads[0]
    v_expected = 0.999 * moments[0][1] + 0.001 * grads[0] ** 2
    torch.testing.assert_close(m, m_expected)
    torch.testing.assert_close(direction, (m_expected / 0.1) / ((v_expected / 0.001).sqrt() + 1e-8))


def test_per_coordinate_counts_that_agree_give_the_fused_kernel_s_directions_and_moments():
    """adam_directions_per_coordinate with every coordinate's count equal to the tensor's count is Adam; the fused
    kernel takes one scalar count per tensor, so it cannot do unequal counts."""
    grads, moments, steps = inputs()
    fused_m, fused_v = [m.clone() for m, _ in moments], [v.clone() for _, v in moments]
    expected = torch_compat.adam_directions(grads, fused_m, fused_v, steps, 0.9, 0.999, 1e-8)
    exp_avgs, exp_avg_sqs = [m.clone() for m, _ in moments], [v.clone() for _, v in moments]
    counts = [torch.full(g.shape, float(t), dtype=torch.float64) for g, t in zip(grads, steps)]
    got = torch_compat.adam_directions_per_coordinate(grads, exp_avgs, exp_avg_sqs, counts, 0.9, 0.999, 1e-8)
    for a, b in zip(expected + fused_m + fused_v, got + exp_avgs + exp_avg_sqs):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=0)
    if hasattr(torch, "_fused_adam_"):
        with pytest.raises(RuntimeError, match="cannot be converted to Scalar"):
            torch._fused_adam_([torch.zeros_like(grads[1])], [grads[1]], [moments[1][0].clone()],
                               [moments[1][1].clone()], [], [counts[1]], lr=-1.0, beta1=0.9, beta2=0.999,
                               weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
