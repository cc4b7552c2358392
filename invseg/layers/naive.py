"""The literature's baseline for convolutions: the warm-start full-operator power method ("naive").

Its state is one input feature map per layer, ``(1, Cin, *N)`` — the memory invseg removes — and σ is
``||A u||`` with the frozen unit ``u``: one extra convolution per forward, converging from *below*, so
it is not certified. Kept for the comparisons of ``scripts/memory_compare.py`` and
``scripts/bench_overhead.py``.
"""

from __future__ import annotations

import torch

from invseg.spectral import conv_apply, naive_power_method

from .base import write_snapshots
from .matrix import BOUND_FLOOR

__all__ = ["naive_group_update", "naive_sigma"]


@torch.no_grad()
def naive_group_update(layers, *, search=True, check=True, iters=1, slack_tol=None, rescale=False) -> None:
    """One warm-start update of each layer's full-operator power method (``check``: until
    ``||AᵀAu − σ²u|| <= eps σ²``; otherwise ``iters`` iterations); ``rescale`` divides the weight by σ."""
    for layer in layers:
        size = layer._size
        spec = layer._conv_spec(size)
        u = layer.sn_u if layer.sn_u is not None and tuple(layer.sn_u.shape[2:]) == tuple(size) else None
        u, _ = naive_power_method(layer.weight, u, spec, eps=layer.eps,
                                  max_iter=layer.max_iter if check else iters)
        layer.sn_u = u.contiguous()
        sigma = torch.linalg.vector_norm(conv_apply(u, layer.weight.detach(), spec)).clamp_min(BOUND_FLOOR)
        if rescale:
            layer.weight.data.div_(sigma)
            sigma = torch.ones_like(sigma)
        layer.sn_bound.copy_(sigma)
        layer.sn_input_size.copy_(torch.tensor(size))
        write_snapshots([layer])
        layer._since_search = 0


def naive_sigma(layer) -> torch.Tensor:
    """σ = ``||A u||`` with the frozen unit ``u`` (differentiable in the weight)."""
    return torch.linalg.vector_norm(conv_apply(layer.sn_u.to(layer.weight.dtype), layer.weight,
                                               layer._conv_spec(layer._size)))
