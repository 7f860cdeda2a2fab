"""The private PyTorch API that the DLRT optimiser uses, in one place, each with a public fallback.

``torch._fused_adam_`` (the kernel behind ``torch.optim.Adam(fused=True)``) and the ``torch._foreach_*``
operations are not part of PyTorch's documented API and may change or vanish between releases. Each function
below uses them when they exist and otherwise computes the same values with public per-tensor operations.

Adam, for a gradient ``g``, moments ``m``, ``v`` and the step count ``t`` (``DLRT._directions``)::

    m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2
    direction = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

With a step count per coordinate (``t`` a tensor of the parameter's shape, :func:`adam_directions_per_coordinate`)
the bias corrections are taken element-wise. The fused kernel cannot do that: it reads one scalar count per
tensor (given a ``(3, 3)`` count, torch 2.14 raises "a Tensor with 9 elements cannot be converted to Scalar"),
and so does ``torch.optim.Adam``; that function uses public operations only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _fused_applies(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor]) -> bool:
    return (hasattr(torch, "_fused_adam_") and len({(g.device, g.dtype) for g in grads}) == 1
            and grads[0].device.type in ("cpu", "cuda") and grads[0].is_floating_point()
            and all(m.is_contiguous() and v.is_contiguous() for m, v in zip(exp_avgs, exp_avg_sqs)))


def adam_directions(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], steps: list[int],
                    beta1: float, beta2: float, eps: float) -> list[Tensor]:
    """Adam's moments updated in place, and its directions (module docstring), for tensors of any shapes.

    One call of the fused Adam kernel on zero "parameters" with learning rate ``-1`` leaves exactly the
    directions in them (about 4x faster on small factors than ``torch._foreach_*``); then the ``_foreach_``
    operations; then a loop of public operations.
    """
    grads = [g.contiguous() for g in grads]  # G V is a column-major view; the kernel needs one layout for all
    if grads and _fused_applies(grads, exp_avgs, exp_avg_sqs):
        directions = [torch.zeros_like(g) for g in grads]
        counters = {t: torch.tensor(float(t), device=grads[0].device) for t in set(steps)}  # read, not advanced
        torch._fused_adam_(directions, grads, exp_avgs, exp_avg_sqs, [], [counters[t] for t in steps], lr=-1.0,
                           beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
        return directions
    if hasattr(torch, "_foreach_addcmul_"):
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [math.sqrt(1 - beta2**t) for t in steps])
        torch._foreach_add_(denominators, eps)
        directions = torch._foreach_div(exp_avgs, [1 - beta1**t for t in steps])
        torch._foreach_div_(directions, denominators)
        return directions
    directions = []
    for g, m, v, t in zip(grads, exp_avgs, exp_avg_sqs, steps):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        directions.append((m / (1 - beta1**t)) / (v.sqrt() / math.sqrt(1 - beta2**t) + eps))
    return directions


def adam_directions_per_coordinate(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                                   steps: list[Tensor], beta1: float, beta2: float, eps: float) -> list[Tensor]:
    """:func:`adam_directions` with a step count per coordinate: ``steps[i]`` has the shape of ``grads[i]`` (already
    advanced for this step), and ``1 - beta^t`` is taken element-wise, computed in float64 as the fused kernel
    does for its scalar count."""
    directions = []
    for g, m, v, t in zip(grads, exp_avgs, exp_avg_sqs, steps):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        exponent = t.double()
        first = (1 - torch.pow(beta1, exponent)).to(g.dtype)
        second_sqrt = (1 - torch.pow(beta2, exponent)).sqrt().to(g.dtype)
        directions.append((m / first) / (v.sqrt() / second_sqrt + eps))
    return directions


def momentum_update_(buffers: list[Tensor], grads: list[Tensor], momentum: float) -> None:
    """``buffer <- momentum buffer + g`` in place for each pair (SGD with momentum)."""
    if not buffers:
        return
    if hasattr(torch, "_foreach_add_"):
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        return
    for buffer, g in zip(buffers, grads):
        buffer.mul_(momentum).add_(g)
