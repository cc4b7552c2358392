"""The one owner of spectral state: the once-per-step update of every SN layer (DESIGN §1f, §1g, §1h).

Call :func:`update_spectral_state` ``(model)`` after each ``optimizer.step()`` — or let
:func:`attach_spectral_update` / :class:`SpectralUpdater` do it — and never inside a recomputed forward.
Layers of equal geometry are updated together: one chunked DFT search per group of depthwise layers with
the same kernel/stride/padding/input size, one certified power iteration over all matrix layers with a
single stopping test per iteration. The groups are built once per model and rebuilt only when a layer's
geometry, dtype or device changes.

What an update does to each layer: search (or certify between searches) its bound for the current
weights, write the state and the snapshot, and in ``sn_mode="project"`` divide the weight in place by its
certified bound (the paper's "normalization step after each step of SGD"; momentum and weight decay then
act on the direction only, the scale is reset every step).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from invseg.utils import check_int

from .base import SpectralNormLayer, spectral_layers

__all__ = ["update_spectral_state", "SpectralUpdater", "attach_spectral_update"]


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _groups(module: nn.Module) -> list[list[SpectralNormLayer]]:
    """The groups of ``module``'s SN layers that are updated together, built once per model and rebuilt
    only when the layers or their keys (geometry, input size, dtype, device) change."""
    layers = spectral_layers(module)
    signature = tuple((id(layer), layer._group_key()) for layer in layers)
    cached = _PLANS.get(module)
    if cached is not None and cached[0] == signature:
        return cached[1]
    groups: dict = {}
    for layer, (_, key) in zip(layers, signature):
        if key is not None:
            groups.setdefault(key, []).append(layer)
    _PLANS[module] = (signature, list(groups.values()))
    return _PLANS[module][1]


def update_spectral_state(module: nn.Module, *, check: bool = True, iters: int = 1, search: bool = True,
                          slack_tol: float | None = None) -> None:
    """Update every SN layer of ``module`` for its current weights, batched (no grad).

    Args:
        module: a model (DDP-wrapped models are accepted).
        check: apply the stopping rules — the paper's ``||ΘᵀΘv − σ²v|| <= eps σ²`` for the power method,
            iterated until every matrix meets it (one host sync per iteration for all of them), plus an exact
            certification of a matrix whose certificate is still more than ``eps`` above its estimate, and the
            ``slack_tol`` test below. With ``check=False`` exactly ``iters`` power iterations run and nothing
            synchronises (every bound stays certified, possibly looser).
        iters: power iterations per update when ``check=False`` (minimum iterations otherwise).
        search: run the DFT searches of the depthwise and full-conv layers (default). ``False`` keeps their
            arg-max frequencies and certifies the bound for the current weights from the last update's
            (``bound_c(θ) <= bound_c(θ₀) + ||θ_c − θ₀_c||₁`` per channel): still an upper bound, looser as the
            weights move until the next search (:class:`SpectralUpdater` ``search_every``).
        slack_tol: with ``check`` and ``search=False``: search a layer again anyway (batched with the other
            loose layers of its group) when its certificate exceeds its σ at the remembered frequency and grid
            by more than this fraction (one host synchronisation per group). None: no such test.

    Layers whose bound depends on the input size and that have not seen an input yet are skipped; they
    initialise on their first forward.

    Raises:
        RuntimeError: inside :func:`~invseg.layers.spectral_state_frozen` for a layer of ``module``.
    """
    for layers in _groups(module):
        frozen = [layer for layer in layers if layer.frozen]
        if frozen:
            raise RuntimeError(
                f"update_spectral_state inside spectral_state_frozen(): {type(frozen[0]).__name__} is frozen "
                "(update after the frozen context, e.g. after backward and optimizer.step())"
            )
        type(layers[0])._group_update(layers, search=search, check=check, iters=iters, slack_tol=slack_tol,
                                      rescale=layers[0].sn_mode == "project")


class SpectralUpdater:
    """Calls :func:`update_spectral_state` after optimizer steps (or when called).

    Args:
        module: the model.
        check_every: apply the stopping rules (the only host synchronisations) every n updates (1 = every
            step, the paper's protocol); in between, ``iters`` fixed warm-start iterations.
        iters: iterations per update between checks.
        search_every: run the depthwise/full-conv DFT searches every n updates (1 = every step, default); in
            between the bounds are certified from the last update (``search=False`` of
            :func:`update_spectral_state`): still upper bounds, looser as the weights move.
        slack_tol: between searches, search a layer anyway when its certificate exceeds the σ at its
            remembered frequency and grid by more than this fraction (default 0.01; tested at check steps).
            None: searches every n steps only.
    """

    def __init__(self, module: nn.Module, check_every: int = 1, iters: int = 1, search_every: int = 1,
                 slack_tol: float | None = 0.01):
        for name, value in (("check_every", check_every), ("iters", iters), ("search_every", search_every)):
            check_int(value, name)
        if slack_tol is not None and (isinstance(slack_tol, bool) or not isinstance(slack_tol, (int, float))
                                      or not slack_tol >= 0):
            raise ValueError(f"slack_tol must be a number >= 0 or None, got {slack_tol!r}")
        self.module, self.check_every, self.iters, self.search_every = module, check_every, iters, search_every
        self.slack_tol = slack_tol
        self.count = 0

    def __call__(self, *_) -> None:
        check = self.count % self.check_every == 0
        search = self.count % self.search_every == 0
        self.count += 1
        update_spectral_state(self.module, check=check, iters=self.iters, search=search, slack_tol=self.slack_tol)

    def state_dict(self) -> dict:
        """The step counter (for exact resume of the check/search schedule)."""
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])


def attach_spectral_update(optimizer: torch.optim.Optimizer, module: nn.Module, check_every: int = 1,
                           iters: int = 1, search_every: int = 1, slack_tol: float | None = 0.01):
    """Call :func:`update_spectral_state` ``(module)`` after every ``optimizer.step()`` (a step post-hook;
    works with every optimizer, fused ones included). See :class:`SpectralUpdater`.

    Returns:
        the hook handle (``handle.remove()`` detaches it).
    """
    return optimizer.register_step_post_hook(SpectralUpdater(module, check_every, iters, search_every, slack_tol))
