"""Orthogonal matrices via ``torch.nn.utils.parametrizations.orthogonal`` and the Haar initialisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

__all__ = ["OrthogonalMatrix", "haar_matrix"]


def haar_matrix(spatial_dims: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal d-D Haar transform of a ``2**d`` patch: the d-fold Kronecker power of
    ``[[1, 1], [1, -1]] / sqrt(2)``; row 0 is the average (low-pass) filter."""
    h1 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(spatial_dims):
        h = torch.kron(h, h1)
    return h.to(dtype)


class OrthogonalMatrix(nn.Module):
    """An ``n x n`` orthogonal matrix, learnable or fixed.

    Learnable: ``torch.nn.utils.parametrizations.orthogonal`` (matrix exponential with dynamic
    trivialization) on a square parameter; the initial matrix ``init`` is reproduced exactly (it
    becomes the trivialization base, with the parameter at zero skew part). Fixed: a buffer.

    Args:
        init: the initial orthogonal matrix ``(n, n)``.
        learnable: register it as a parametrized parameter (True) or a buffer (False).
    """

    def __init__(self, init: Tensor, learnable: bool = True) -> None:
        super().__init__()
        if init.ndim != 2 or init.shape[0] != init.shape[1]:
            raise ValueError(f"init must be a square matrix, got shape {tuple(init.shape)}")
        self.learnable = bool(learnable)
        if self.learnable:
            self.weight = nn.Parameter(init.clone())
            orthogonal(self, "weight")
        else:
            self.register_buffer("weight", init.clone())

    def forward(self) -> Tensor:
        """The current orthogonal matrix ``(n, n)``."""
        return self.weight

    def _apply(self, fn, *args, **kwargs):
        # A float32 orthogonal matrix cast to float64 is orthogonal only to ~1e-7 (e.g. 1/sqrt(8) of the 3-D
        # Haar basis is not exact in float32), which would put a float32-sized floor under every float64
        # inversion. After a cast to float64 the stored matrix is re-projected onto the orthogonal group (its
        # polar factor), so float64 copies are orthogonal to float64 rounding.
        out = super()._apply(fn, *args, **kwargs)
        if self.learnable:
            target = getattr(self.parametrizations.weight[0], "base", None)
            if target is None:
                target = self.parametrizations.weight.original
        else:
            target = self.weight
        if target is not None and target.dtype == torch.float64:
            with torch.no_grad():
                u, _, vh = torch.linalg.svd(target)
                target.copy_(u @ vh)
        return out
