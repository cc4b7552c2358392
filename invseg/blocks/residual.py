"""Invertible residual block (i-ResNet, Behrmann et al. 2019) with a fixed-point inverse."""

from __future__ import annotations

import torch
from torch import Tensor

from invseg.blocks.base import InvertibleModule
from invseg.blocks.subnet import SubnetConstructor

__all__ = ["InvertibleResidual"]


class InvertibleResidual(InvertibleModule):
    """``y = x + g(x)`` with ``Lip(g) <= K < 1``; inverse by fixed-point iteration.

    ``g = subnet(C, C)``; with the default sub-network (:class:`~invseg.blocks.SNDSSubnet`, two SN
    DS convs with bound ``sqrt(K)`` each and a 1-Lipschitz nonlinearity between them) the
    spectral normalization enforces ``Lip(g) <= K``. Then ``x -> y - g(x)`` is a contraction and
    the inverse is its fixed point (Banach): ``x_0 = y``, ``x_{n+1} = y - g(x_n)``, which stops
    when ``||x_{n+1} - x_n|| <= tol * ||y||``. Since ``x_n - x_{n+1} = x_n + g(x_n) - y`` this
    step is also the residual of ``x_n``, and the error of the result is at most
    ``K / (1 - K) * tol * ||y||``; iterations needed grow like ``log(tol) / log(K)``. Under
    autocast (or for half-precision inputs) the iteration cannot get below the rounding of the
    compute dtype, so ``tol`` is raised to that dtype's machine epsilon (bf16: 7.8e-3, fp16:
    9.8e-4; fp32 and fp64 keep ``tol``).

    The inverse is computed without gradient tracking (it is used to rebuild activations; the
    gradient of the block comes from re-running :meth:`forward`).

    Args:
        channels: ``C`` (>= 1).
        subnet: constructor ``(in_channels, out_channels) -> nn.Module`` whose output has Lipschitz
            constant at most ``K`` (e.g. ``sn_ds_subnet(spatial_dims, K=K, ...)``).
        K: the Lipschitz bound of ``g`` that ``subnet`` enforces; must satisfy ``0 < K < 1``.
        tol: relative stopping tolerance of the fixed-point iteration. Default 1e-6.
        max_iter: maximum number of iterations. Default 200.

    Raises:
        ValueError: at construction when ``K`` is not in ``(0, 1)``.
        RuntimeError: from :meth:`inverse` when the iteration has not converged after
            ``max_iter`` iterations (e.g. ``g`` is not a contraction); the message names ``K``, the
            iterations and the final relative residual.
    """

    def __init__(
        self,
        channels: int,
        subnet: SubnetConstructor,
        K: float,
        tol: float = 1e-6,
        max_iter: int = 200,
    ) -> None:
        super().__init__()
        if not 0 < K < 1:
            raise ValueError(f"K must satisfy 0 < K < 1 for an invertible residual block (Lip(g) < 1), got {K}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        self.channels = channels
        self.K = float(K)
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.g = subnet(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, *spatial) -> (B, C, *spatial)``."""
        return x + self.g(x)

    @torch.no_grad()
    def inverse(self, y: Tensor) -> Tensor:
        """Fixed-point inverse (see class docstring); raises RuntimeError if not converged."""
        scale = torch.linalg.vector_norm(y.float()).clamp_min(torch.finfo(torch.float32).tiny)
        tol = max(self.tol, _precision_floor(y))
        x = y
        rel = float("inf")
        for n in range(1, self.max_iter + 1):
            x_next = y - self.g(x)
            rel = float(torch.linalg.vector_norm((x_next - x).float()) / scale)
            x = x_next
            if rel <= tol:
                return x
            if not rel < float("inf"):  # NaN or inf: diverged, stop early
                break
        raise RuntimeError(
            f"InvertibleResidual.inverse did not converge: K={self.K}, {n} iterations "
            f"(max_iter={self.max_iter}), relative residual ||x + g(x) - y|| / ||y|| = {rel:.3e} "
            f"> tol={tol:.1e}; g must be a contraction (Lip(g) <= K < 1)"
        )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, K={self.K}, tol={self.tol}, max_iter={self.max_iter}"


def _precision_floor(y: Tensor) -> float:
    """Machine epsilon of the lowest precision the fixed-point iteration computes in."""
    eps = torch.finfo(y.dtype).eps if y.dtype.is_floating_point else 0.0
    if torch.is_autocast_enabled(y.device.type):
        eps = max(eps, torch.finfo(torch.get_autocast_dtype(y.device.type)).eps)
    return eps if eps > torch.finfo(torch.float32).eps else 0.0
