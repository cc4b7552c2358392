"""Fused normalization: the normalized weights of all SN layers of a model, computed together per forward.

Per layer, ``weight · K_eff / σ`` is a handful of tiny ops in forward and as many autograd nodes in
backward; with 50–70 SN layers that bookkeeping, not arithmetic, is what spectral normalization costs
in a training step (measured: ~28 ms of a 2-core CPU step of MobileNetV2). Inside
:func:`fused_spectral_scales` the layers of equal kind and shape are normalized as one group instead:
one stacked σ, one scale, one multiply per group, so a layer's own forward is its conv alone.

The values are those of the per-layer path (the same formulas on stacked operands) and so are the
gradients; a layer falls back to the per-layer path by itself whenever the fused weight might not fit:
a state that is stale (changed weights, a new input size: the layer then updates as usual), grad mode
other than the one the fused weights were built in (e.g. inside a memory-efficient block's
recomputation), or a layer/method without a fused form (full-conv stems, ``exact=True``, ``"naive"``,
``"torch"``).

Used by :class:`~invseg.nets.MobileNetV2`, :class:`~invseg.nets.ResNet34DS` and
:class:`~invseg.nets.DSStack` in their ``forward``; wrap any other model's forward the same way::

    with fused_spectral_scales(model):
        loss = criterion(model(x), y)
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .base import SpectralNormLayer, spectral_layers

__all__ = ["fused_spectral_scales"]

_local = threading.local()
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Group:
    """Layers normalized together, with the constant tensors of the group (built once per plan)."""

    def __init__(self, kind: str, layers: list[SpectralNormLayer]):
        self.kind, self.layers = kind, layers
        ref = layers[0].weight
        self.soft = layers[0].scale.s is not None
        self.k = torch.tensor([layer.scale.K for layer in layers], dtype=ref.dtype, device=ref.device)
        if kind == "dw":
            self.counts = [layer.channels for layer in layers]
            offsets = [sum(self.counts[:i]) for i in range(len(layers))]
            self.offsets = torch.tensor(offsets, dtype=torch.int64, device=ref.device)
            owner = [i for i, c in enumerate(self.counts) for _ in range(c)]  # layer index of each row
            self.owner = torch.tensor(owner, dtype=torch.int64, device=ref.device)
            self.inv_fold = torch.tensor([1.0 / math.sqrt(layer._fold) for layer in layers], dtype=ref.dtype,
                                         device=ref.device)

    def numerators(self) -> torch.Tensor:
        if not self.soft:
            return self.k
        return self.k * torch.tanh(torch.stack([layer.scale.s for layer in self.layers]))

    def effective_weights(self) -> list[torch.Tensor]:
        layers = self.layers
        if self.kind == "matrix":  # pointwise convs and linear layers: σ = ||A v|| per layer
            a = torch.stack([layer.weight for layer in layers])  # (L, Cout, Cin[, 1...])
            mat = a.reshape(a.shape[0], a.shape[1], a.shape[2])
            v = torch.stack([layer.sn_v for layer in layers]).to(a.dtype)
            sigma = torch.linalg.vector_norm((mat * v[:, None, :]).sum(dim=2), dim=1)  # (L,)
            factor = self.numerators() / sigma
            eff = a * factor.reshape(-1, *([1] * (a.dim() - 1)))
            return list(eff.unbind(0))
        # depthwise: σ = |phase · θ_c*| / sqrt(fold) at each layer's remembered channel c*
        w = torch.cat([layer.weight.reshape(layer.channels, -1) for layer in layers])  # (ΣC, Πk)
        rows = torch.cat([layer.sn_state[:1] for layer in layers]) + self.offsets
        theta = w.index_select(0, rows)  # (L, Πk)
        phase = torch.stack([layer._sn_phase for layer in layers]).to(theta.dtype)  # (L, 2S, Πk)
        sigma = torch.linalg.vector_norm((phase * theta[:, None, :]).sum(dim=2), dim=1) * self.inv_fold
        certs = [getattr(layer, "_sn_cert", None) for layer in layers]
        if any(c is not None for c in certs):  # between searches: up to each certified bound (detached)
            zero = sigma.new_zeros(())
            cert = torch.stack([zero if c is None else c.to(sigma.dtype) for c in certs])
            sigma = sigma + (cert - sigma.detach()).clamp_min(0)
        factor = (self.numerators() / sigma).index_select(0, self.owner)  # no host sync
        eff = (w * factor[:, None]).split(self.counts)
        return [e.view(layer.weight.shape) for e, layer in zip(eff, layers)]


def _fused_kind(layer: SpectralNormLayer) -> str | None:
    """``"matrix"``, ``"dw"`` or None (no fused form) — decided by the layer's own ``_fused_kind``."""
    fn = getattr(layer, "_fused_kind", None)
    return fn() if fn is not None else None


def _ready(layer: SpectralNormLayer) -> bool:
    """The layer's state belongs to its current weights (otherwise it must update in its own forward)."""
    return layer._seen_version is not None and layer._seen_version == layer._weight_version()


class _Plan:
    def __init__(self, signature, groups: list[_Group]):
        self.signature, self.groups = signature, groups


def _build(module: nn.Module) -> list[tuple[SpectralNormLayer, tuple]]:
    entries = []
    for layer in spectral_layers(module):
        kind = _fused_kind(layer)
        if kind is None or not _ready(layer):
            continue
        if kind == "dw":
            if getattr(layer, "_sn_phase", None) is None or layer._sn_phase.device != layer.weight.device:
                layer._refresh_phase(layer._seen_size)
            key = (kind, tuple(layer._sn_phase.shape), layer._fold)
        else:
            key = (kind, tuple(layer.weight.shape))
        w = layer.weight
        entries.append((layer, key + (layer.scale.s is not None, w.dtype, w.device)))
    return entries


def _plan_for(module: nn.Module) -> _Plan:
    entries = _build(module)
    signature = tuple((id(layer), key) for layer, key in entries)
    plan = _PLANS.get(module)
    if plan is None or plan.signature != signature:
        grouped: dict = {}
        for layer, key in entries:
            grouped.setdefault(key, []).append(layer)
        plan = _Plan(signature, [_Group(key[0], layers) for key, layers in grouped.items()])
        _PLANS[module] = plan
    return plan


@contextlib.contextmanager
def fused_spectral_scales(module: nn.Module) -> Iterator[None]:
    """Within this context the SN layers of ``module`` use normalized weights computed group by group.

    Nested uses are no-ops (the outermost context computes them). Layers whose state is stale when the
    context opens (or which have no fused form) take their per-layer path as usual; the values and
    gradients are the same either way.
    """
    if getattr(_local, "active", False):
        yield
        return
    plan = _plan_for(module)
    grad = torch.is_grad_enabled()
    assigned = []
    _local.active = True
    try:
        for group in plan.groups:
            for layer, weight in zip(group.layers, group.effective_weights()):
                layer._fused_weight = (weight, grad, layer._weight_version())
                assigned.append(layer)
        yield
    finally:
        _local.active = False
        for layer in assigned:
            layer._fused_weight = None
