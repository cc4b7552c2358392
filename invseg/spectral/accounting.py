"""Accounting of persistent spectral-normalization state."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["state_tensors", "state_bytes"]


def state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every persistent tensor of spectral-normalization state in ``module`` (each storage once).

    Counts what invseg's SN layers declare through ``spectral_state_tensors()`` (arg-max indices, power
    vectors, remembered input sizes, naive feature-map vectors) and the ``_u``/``_v`` buffers of
    ``torch.nn.utils.parametrizations.spectral_norm``. Weights and learnable scales are parameters, not
    state, and are not counted.
    """
    out: dict[int, torch.Tensor] = {}
    for m in module.modules():
        tensors: list[torch.Tensor] = []
        if hasattr(m, "spectral_state_tensors"):
            tensors = list(m.spectral_state_tensors())
        elif type(m).__name__ == "_SpectralNorm":  # torch's parametrization keeps u and v as buffers
            tensors = [b for b in m.buffers(recurse=False)]
        for t in tensors:
            if t is not None and t.numel() > 0:
                out.setdefault(t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t), t)
    return list(out.values())


def state_bytes(module: nn.Module) -> int:
    """Bytes of persistent spectral-normalization state in ``module`` (see :func:`state_tensors`)."""
    return sum(t.numel() * t.element_size() for t in state_tensors(module))
