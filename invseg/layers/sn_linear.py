"""Spectrally normalized fully connected layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from invseg.spectral import pointwise_norm_exact

from .base import SpectralNormLayer, batched_power_update

__all__ = ["SNLinear"]


class SNLinear(SpectralNormLayer):
    """``nn.Linear`` with its weight divided by its spectral norm and scaled by K (or ``K·tanh(s)``).

    σ = ``||W v||`` with the warm-start power vector ``v`` (``in_features`` floats), stopping rule
    ``||WᵀWv − σ²v|| <= eps σ²``; ``exact=True`` uses the SVD norm. For a dense layer the matrix is the
    full operator, so ``method="naive"`` is the same power method (kept for uniform comparisons).

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        K, scaling, s_init: Lipschitz scale. method: ``"fft"``/``"naive"``/``"torch"``/``"none"``.
        eps: power-method tolerance (paper: 0.01). max_iter: cap per update. exact: SVD norm.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        K: float = 1.0,
        scaling: str = "hard",
        s_init: float = 3.0,
        method: str = "fft",
        eps: float = 1e-2,
        max_iter: int = 100,
        exact: bool = False,
    ):
        super().__init__(method, K, scaling, s_init)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.in_features, self.out_features = in_features, out_features
        self.eps, self.max_iter, self.exact = float(eps), int(max_iter), bool(exact)
        ref = nn.Linear(in_features, out_features, bias=bias)  # torch's default initialisation
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        if method in ("fft", "naive") and not exact:
            gen = torch.Generator().manual_seed(0)
            v0 = torch.randn(in_features, generator=gen)
            self.register_buffer("sn_v", torch.zeros(in_features))  # 0 = never updated
            self.register_buffer("_sn_v0", v0 / v0.norm(), persistent=False)
        elif method == "torch":
            nn.utils.parametrizations.spectral_norm(self, "weight")

    def _group_key(self):
        if self.method in ("none", "torch") or self.exact:
            return None
        w = self.weight
        return ("matrix", w.dtype, w.device)  # any shapes: one stopping test (host sync) per iteration

    def _fused_kind(self):
        return "matrix" if self.method in ("fft", "naive") and not self.exact else None

    @staticmethod
    def _group_update(layers, check, iters, search=True):
        batched_power_update(layers, [layer.weight.reshape(layer.weight.shape[0], -1) for layer in layers],
                             check, iters)

    def _update_state(self, size):
        pass  # the power method runs on the batched path; exact=True keeps no state

    def _sigma(self) -> torch.Tensor:
        if self.exact:
            return pointwise_norm_exact(self.weight)[0]
        # elementwise product + sum rather than matmul: autocast keeps it in the weight's precision
        return torch.linalg.vector_norm((self.weight * self.sn_v.to(self.weight.dtype)).sum(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SNLinear expects input (..., {self.in_features}), got {tuple(x.shape)}")
        w = self.normalized_weight(())
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method!r}"
