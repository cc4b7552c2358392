"""One-sided additive and affine coupling blocks (NICE / RealNVP / iUNet style)."""

from __future__ import annotations

import torch
from torch import Tensor

from invseg.blocks.base import InvertibleModule
from invseg.blocks.subnet import SubnetConstructor

__all__ = ["AdditiveCoupling", "AffineCoupling"]


class _Coupling(InvertibleModule):
    """Shared split/merge logic of one-sided couplings.

    The input ``(B, C, *spatial)`` is split along channels into ``x1`` (transformed) and ``x2``
    (conditioner, passed through): ``y1 = couple(x1, h)``, ``y2 = x2`` with ``h = subnet(x2)``.
    With ``reverse=True`` the roles of the two halves are swapped, so alternating ``reverse``
    between consecutive blocks transforms both halves.

    Inverting computes ``h = subnet(y2) = subnet(x2)``: exactly what the backward needs, so
    :meth:`backward_step` computes the sub-network once, with grad, and reuses it both to rebuild
    ``x1`` and to back-propagate (one sub-network forward per block in backward instead of two).
    """

    def __init__(self, channels: int, subnet_out_channels: int, subnet: SubnetConstructor, reverse: bool) -> None:
        super().__init__()
        if channels < 2 or channels % 2 != 0:
            raise ValueError(f"channels must be even and >= 2 for a coupling split, got {channels}")
        self.channels = channels
        self.half = channels // 2
        self.reverse = bool(reverse)
        self.subnet = subnet(self.half, subnet_out_channels)

    # --- split / merge (the transformed half first) --------------------------------------------
    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels in dim 1, got shape {tuple(x.shape)}")
        a, b = x[:, : self.half], x[:, self.half :]
        return (b, a) if self.reverse else (a, b)

    def _merge(self, x1: Tensor, x2: Tensor) -> Tensor:
        return torch.cat((x2, x1) if self.reverse else (x1, x2), dim=1)

    # --- the coupling law, implemented by subclasses -------------------------------------------
    def _couple(self, x1: Tensor, h: Tensor) -> Tensor:
        raise NotImplementedError

    def _uncouple(self, y1: Tensor, h: Tensor) -> Tensor:
        raise NotImplementedError

    # --- contract ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, *spatial) -> (B, C, *spatial)``."""
        x1, x2 = self._split(x)
        return self._merge(self._couple(x1, self.subnet(x2)), x2)

    def inverse(self, y: Tensor) -> Tensor:
        """Exact inverse of :meth:`forward` (up to rounding)."""
        y1, y2 = self._split(y)
        return self._merge(self._uncouple(y1, self.subnet(y2)), y2)

    def backward_step(self, y, grad_y, params):
        """Invert and back-propagate with a single sub-network evaluation (see class docstring)."""
        (y,), (grad_y,) = y, grad_y
        y1, y2 = self._split(y)
        dy1, dy2 = self._split(grad_y)
        x2 = y2.detach().requires_grad_()
        h = self.subnet(x2)  # with grad: the only sub-network evaluation of the backward
        with torch.no_grad():
            x1 = self._uncouple(y1, h)
        x1_leaf = x1.detach().requires_grad_()
        y1_re = self._couple(x1_leaf, h)
        grads = torch.autograd.grad(y1_re, (x1_leaf, x2, *params), dy1, allow_unused=True)
        dx1 = grads[0] if grads[0] is not None else torch.zeros_like(dy1)
        dx2 = dy2 if grads[1] is None else dy2 + grads[1]
        return (self._merge(x1, x2.detach()),), (self._merge(dx1, dx2),), grads[2:]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reverse={self.reverse}"


class AdditiveCoupling(_Coupling):
    """Additive coupling ``y1 = x1 + F(x2)``, ``y2 = x2``; inverse ``x1 = y1 - F(y2)``.

    Volume preserving; exact inverse for any ``F``. ``F = subnet(C/2, C/2)``.

    Args:
        channels: ``C``, even and >= 2.
        subnet: constructor ``(in_channels, out_channels) -> nn.Module``, e.g.
            :func:`invseg.blocks.sn_ds_subnet` (the default sub-network of the nets).
        reverse: transform the second half instead of the first. Default False.
    """

    def __init__(self, channels: int, subnet: SubnetConstructor, reverse: bool = False) -> None:
        super().__init__(channels, channels // 2, subnet, reverse)

    def _couple(self, x1: Tensor, h: Tensor) -> Tensor:
        return x1 + h

    def _uncouple(self, y1: Tensor, h: Tensor) -> Tensor:
        return y1 - h


class AffineCoupling(_Coupling):
    """Affine coupling ``y1 = x1 * exp(s) + t``, ``y2 = x2`` with a bounded log-scale.

    ``(s_raw, t) = subnet(x2)`` (the sub-network outputs ``C`` channels: ``C/2`` each) and
    ``s = clamp * tanh(s_raw / clamp)``, so the scale ``exp(s)`` lies in the open interval
    ``(exp(-clamp), exp(clamp))``, equals 1 for ``s_raw = 0`` and has slope 1 there. The bound
    keeps the inverse ``x1 = (y1 - t) * exp(-s)`` from amplifying errors by more than
    ``exp(clamp)`` per block.

    Args:
        channels: ``C``, even and >= 2.
        subnet: constructor ``(in_channels, out_channels) -> nn.Module`` (called as
            ``subnet(C/2, C)``).
        reverse: transform the second half instead of the first. Default False.
        clamp: bound of ``|s|`` (> 0). Default 2.0 (scale in ``(0.135, 7.39)``).
    """

    def __init__(self, channels: int, subnet: SubnetConstructor, reverse: bool = False, clamp: float = 2.0) -> None:
        if not clamp > 0:
            raise ValueError(f"clamp must be > 0, got {clamp}")
        super().__init__(channels, channels, subnet, reverse)
        self.clamp = float(clamp)

    def _log_scale_shift(self, h: Tensor) -> tuple[Tensor, Tensor]:
        s_raw, t = h[:, : self.half], h[:, self.half :]
        return self.clamp * torch.tanh(s_raw / self.clamp), t

    def _couple(self, x1: Tensor, h: Tensor) -> Tensor:
        s, t = self._log_scale_shift(h)
        return x1 * torch.exp(s) + t

    def _uncouple(self, y1: Tensor, h: Tensor) -> Tensor:
        s, t = self._log_scale_shift(h)
        return (y1 - t) * torch.exp(-s)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, clamp={self.clamp}"
