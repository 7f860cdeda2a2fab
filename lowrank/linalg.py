"""Linear-algebra helpers of the library.

The truncated SVD: the best rank-``k`` approximation of ``W = P Sigma Q^T`` in every unitarily invariant norm
is ``W_k = P_k Sigma_k Q_k^T`` (Eckart-Young), with ``||W - W_k||_F^2 = sum_{i > k} sigma_i^2``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def truncated_svd(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(P_k, sigma_k, Q_k)`` of ``W = P diag(sigma) Q^T``, keeping the ``k = rank`` largest singular values.

    Shapes ``(n_in, k)``, ``(k,)``, ``(n_out, k)``; ``P_k diag(sigma_k) Q_k^T`` is the best rank-``k``
    approximation of ``W`` (Eckart-Young). Computed in float64, returned in ``weight``'s dtype.
    """
    if not 0 <= rank <= min(weight.shape):
        raise ValueError(f"rank = {rank} must be in 0..min{tuple(weight.shape)} = {min(weight.shape)}")
    p, sigma, qt = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    dtype = weight.dtype
    return p[:, :rank].to(dtype), sigma[:rank].to(dtype), qt[:rank].T.to(dtype)
