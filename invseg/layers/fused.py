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
recomputation), or a layer/method without a fused form (full-conv stems, ``exact=True``, ``"torch"``, and
the convolutions' ``"naive"``; ``SNLinear``'s ``"naive"`` is the same power method and is fused).

The backward is written by hand (one pass over each weight for its gradient); with ``create_graph=True``
(double backward, gradient penalties) it differentiates the plain formula instead, so higher derivatives work.

Used by :class:`~invseg.nets.MobileNetV2` and :class:`~invseg.nets.ResNet34DS` in their ``forward``;
wrap any other model's forward the same way::

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


class _GroupNormalize(torch.autograd.Function):
    """``eff_i = w_i · num_i / σ_i(w_i)`` for a group of layers, with a hand-written backward.

    One autograd node per group instead of a handful per layer, and no stacked copies of the weights:
    forward reads each weight twice (σ and the scaled copy), backward three times. ``σ_i`` is the
    layer's own formula — ``||A v||`` (power method) or ``||P θ_c||/sqrt(fold)`` (depthwise, remembered
    channel and frequency) — lifted to the layer's certificate between searches (a detached slack). Its
    gradient: ``∂L/∂w = f G + (−num c/σ²) ∇σ_raw`` with ``c = <G, w>``, ``f = num/σ``, and
    ``∂L/∂num = c/σ``; ``∇σ_raw`` is ``u vᵀ`` (``u = A v/||A v||``) or ``Pᵀ y/(||y|| sqrt(fold))`` on row ``c``.
    """

    @staticmethod
    def forward(ctx, group: "_Group", num: torch.Tensor, *weights: torch.Tensor):
        with torch.autocast(weights[0].device.type, enabled=False):  # the weights' own precision
            dirs, raws, specs = [], [], []
            for layer, w in zip(group.layers, weights):
                if group.kind == "matrix":
                    v = layer.sn_v.to(w.dtype, copy=True)  # kept for backward: the state may change before
                    y = w.reshape(w.shape[0], -1).mv(v)
                    raw = torch.linalg.vector_norm(y)
                    dirs.append((y / raw, v))
                    specs.append((v,))
                else:
                    row = layer.sn_state[:1].clone()
                    phase = layer._sn_phase.to(w.dtype)
                    scale = 1.0 / math.sqrt(layer._fold)
                    y = phase.mv(w.reshape(layer.channels, -1).index_select(0, row)[0])
                    norm = torch.linalg.vector_norm(y)
                    raw = norm * scale
                    dirs.append((phase.t().mv(y) * (scale / norm), row))
                    specs.append((phase, row, scale))
                raws.append(raw)
            sigma = torch.stack(raws)
            certs = [layer._sn_cert for layer in group.layers]
            if any(c is not None for c in certs):  # between searches: up to each certified bound
                cert = torch.stack([sigma.new_zeros(()) if c is None else c.to(sigma.dtype) for c in certs])
                sigma = torch.maximum(sigma, cert)
            factor = num.to(sigma.dtype) / sigma
            outs = tuple(w * f for w, f in zip(weights, factor.unbind(0)))
        ctx.group, ctx.dirs, ctx.specs, ctx.certs = group, dirs, specs, certs
        ctx.save_for_backward(num, sigma, factor, *weights)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        num, sigma, factor, *weights = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True (double backward): differentiate the plain formula
            return _GroupNormalize._differentiable_backward(ctx, num, weights, grads)
        group = ctx.group
        with torch.autocast(weights[0].device.type, enabled=False):
            c = torch.stack([torch.dot(g.reshape(-1).to(w.dtype), w.reshape(-1)) if g is not None else w.new_zeros(())
                             for g, w in zip(grads, weights)])
            coef = -(num.to(sigma.dtype) * c) / sigma.square()
            grad_w = []
            for i, (g, w, (a, b)) in enumerate(zip(grads, weights, ctx.dirs)):
                if not ctx.needs_input_grad[2 + i] or g is None:
                    grad_w.append(None)
                    continue
                gw = g.to(w.dtype) * factor[i]
                if group.kind == "matrix":  # + coef · u vᵀ
                    gw.reshape(w.shape[0], -1).addr_(a * coef[i], b)
                else:  # + coef · ∇σ on the remembered channel's row
                    gw.reshape(w.shape[0], -1).index_add_(0, b, (a * coef[i])[None])
                grad_w.append(gw)
            grad_num = (c / sigma).to(num.dtype) if ctx.needs_input_grad[1] else None
        return (None, grad_num, *grad_w)

    @staticmethod
    def _differentiable_backward(ctx, num, weights, grads):
        """The same gradients through autograd ops on the saved inputs, so that they can be differentiated
        again (gradient penalties)."""
        with torch.autocast(weights[0].device.type, enabled=False):
            effs = []
            for i, (w, spec, cert) in enumerate(zip(weights, ctx.specs, ctx.certs)):
                if ctx.group.kind == "matrix":
                    raw = torch.linalg.vector_norm((w.reshape(w.shape[0], -1) * spec[0]).sum(dim=1))
                else:
                    phase, row, scale = spec
                    theta = w.reshape(w.shape[0], -1).index_select(0, row)
                    raw = torch.linalg.vector_norm((phase * theta).sum(dim=1)) * scale
                if cert is not None:
                    raw = raw + (cert.to(raw.dtype) - raw.detach()).clamp_min(0)
                effs.append(w * (num[i].to(raw.dtype) / raw))
            pairs = [(e, g) for e, g in zip(effs, grads) if g is not None]
            wanted = [(k, t) for k, t in enumerate([num, *weights]) if ctx.needs_input_grad[1 + k]]
            got = torch.autograd.grad([e for e, _ in pairs], [t for _, t in wanted], [g for _, g in pairs],
                                      create_graph=True, allow_unused=True)
        out = [None] * (1 + len(weights))
        for (k, _), g in zip(wanted, got):
            out[k] = g
        return (None, *out)


class _Group:
    """Layers normalized together, with the constant tensors of the group (built once per plan)."""

    def __init__(self, kind: str, layers: list[SpectralNormLayer]):
        self.kind, self.layers = kind, layers
        ref = layers[0].weight
        self.soft = layers[0].scale.s is not None
        self.k = torch.tensor([layer.scale.K for layer in layers], dtype=ref.dtype, device=ref.device)

    def numerators(self) -> torch.Tensor:
        if not self.soft:
            return self.k
        return self.k * torch.tanh(torch.stack([layer.scale.s for layer in self.layers]))

    def effective_weights(self) -> list[torch.Tensor]:
        return list(_GroupNormalize.apply(self, self.numerators(), *[layer.weight for layer in self.layers]))


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
            layer._ensure_phase()
        w = layer.weight
        entries.append((layer, (kind, layer.scale.s is not None, w.dtype, w.device)))
    return entries


def _plan_for(module: nn.Module) -> _Plan:
    entries = _build(module)
    signature = tuple((id(layer), key, layer.scale.K) for layer, key in entries)  # K is a plan constant
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
