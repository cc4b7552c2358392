"""Spectrally normalized fully connected layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from invseg.utils import check_int

from .matrix import MatrixSpectralNorm

__all__ = ["SNLinear"]


class SNLinear(MatrixSpectralNorm):
    """``nn.Linear`` with its weight divided by a certified bound of its spectral norm and scaled by K
    (or ``K·tanh(s)``).

    The bound is the certified warm-start power method of :mod:`invseg.layers.matrix` (state: the power
    vector, ``in_features`` floats, and two scalars), stopping rule ``||WᵀWv − σ²v|| <= eps σ²``;
    ``exact=True`` uses the exact SVD norm at every update. For a dense layer the matrix is the full
    operator, so ``method="naive"`` is the same method (kept for uniform comparisons).

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        K, scaling, s_init: Lipschitz scale. method: ``"fft"``/``"naive"``/``"torch"``/``"none"``.
        eps: power-method tolerance (paper: 0.01). max_iter: cap per update. exact: SVD norm every update.
        sn_mode: ``"reparam"`` (default) or ``"project"``.
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
        sn_mode: str = "reparam",
    ):
        super().__init__(method, K, scaling, s_init, sn_mode)
        check_int(in_features, "in_features")
        check_int(out_features, "out_features")
        self.in_features, self.out_features = in_features, out_features
        ref = nn.Linear(in_features, out_features, bias=bias)  # torch's default initialisation
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone()) if bias else None
        # the full operator of a dense layer is its matrix: "naive" is the same certified method
        self._init_matrix_state(in_features, eps, max_iter, exact, stateful=method in ("fft", "naive"))
        if method == "torch":
            nn.utils.parametrizations.spectral_norm(self, "weight")

    def _group_key(self):
        if self.method not in ("fft", "naive"):
            return None
        w = self.weight
        return ("matrix", w.dtype, w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SNLinear expects input (..., {self.in_features}), got {tuple(x.shape)}")
        w = self.normalized_weight(())
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.method!r}, "
                f"sn_mode={self.sn_mode!r}")
