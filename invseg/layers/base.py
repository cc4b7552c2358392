"""Shared machinery of the spectrally normalized layers: scaling, state updates, method dispatch.

**When spectral state changes** (DESIGN §1f). Invertible training recomputes forwards during backward;
if the normalization state moved there, forward and recompute would see different weights and the
gradients would be wrong. invseg therefore updates all spectral state **once per optimization step** and
never inside a recomputed forward. Between updates each layer's σ is a deterministic, differentiable
function of the current weights and its frozen state (arg-max frequencies, power vectors).

The update API:

* :func:`update_spectral_state` ``(model)`` — explicit: call it after ``optimizer.step()``.
* :func:`attach_spectral_update` ``(optimizer, model)`` — registers an optimizer step post-hook that
  does the same automatically (works with every optimizer, fused ones included).
* Layers of equal geometry are updated together (one batched search / power iteration per group), and
  :class:`SpectralUpdater` can skip the power method's stopping test (the only host synchronisation)
  on all but every n-th step.
* Automatic safety net: an SN layer also updates itself in ``forward`` when its state was never
  initialised, when the input spatial size changed, or when its weight's ``_version`` counter moved
  (in-place optimizer steps and ``load_state_dict`` bump it; fused optimizers do not, hence the hook).
  None of these happens inside a recomputation; :func:`spectral_state_frozen` disables even that.

The ``"torch"`` method (``torch.nn.utils.parametrizations.spectral_norm``) is a baseline with torch's own
semantics: it updates in every training forward and is therefore wrong inside recomputed blocks.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
from torch import nn

from invseg.spectral import conv_apply, naive_power_method

__all__ = [
    "METHODS",
    "SCALINGS",
    "LipschitzScale",
    "SpectralNormLayer",
    "update_spectral_state",
    "attach_spectral_update",
    "SpectralUpdater",
    "batched_power_update",
    "spectral_state_frozen",
    "spectral_layers",
]

#: Spectral-normalization methods accepted by every SN layer.
METHODS = ("fft", "naive", "torch", "none")
#: Scaling modes: ``"hard"`` multiplies by K, ``"soft"`` by ``K·tanh(s)`` with learnable ``s``.
SCALINGS = ("hard", "soft")

_local = threading.local()


def _frozen() -> bool:
    return getattr(_local, "frozen", 0) > 0


@contextlib.contextmanager
def spectral_state_frozen(module: nn.Module | None = None) -> Iterator[None]:
    """Inside this context no SN layer changes its spectral state (process-wide for the current thread;
    ``module`` is accepted for readability only). Layers whose state was never initialised still
    initialise it, since they could not run otherwise."""
    _local.frozen = getattr(_local, "frozen", 0) + 1
    try:
        yield
    finally:
        _local.frozen -= 1


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


class LipschitzScale(nn.Module):
    """The scale applied after normalization: ``K`` ("hard") or ``K·tanh(s)`` ("soft", paper §2.3).

    Args:
        K: scaling constant, > 0.
        scaling: ``"hard"`` or ``"soft"``.
        s_init: initial ``s`` for soft scaling (paper: 3, and 0.5 for large K).
    """

    def __init__(self, K: float = 1.0, scaling: str = "hard", s_init: float = 3.0):
        super().__init__()
        if isinstance(K, bool) or not isinstance(K, (int, float)) or not math.isfinite(K) or K <= 0:
            raise ValueError(f"K must be a positive finite number, got {K!r}")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        self.K = float(K)
        self.scaling = scaling
        if scaling == "soft":
            self.s = nn.Parameter(torch.tensor(float(s_init)))
        else:
            self.register_parameter("s", None)

    def forward(self) -> torch.Tensor | float:
        if self.s is None:
            return self.K
        return self.K * torch.tanh(self.s)

    def extra_repr(self) -> str:
        return f"K={self.K}, scaling={self.scaling!r}"


class SpectralNormLayer(nn.Module):
    """Base class of invseg's SN layers: holds ``weight``, the method, the scale, and the update logic.

    Subclasses implement ``_update_state(spatial_size)`` (no grad) and ``_sigma()`` (differentiable),
    and keep their persistent state in buffers named ``sn_*`` (what ``spectral_state_tensors()`` returns).
    """

    def __init__(self, method: str, K: float, scaling: str, s_init: float):
        super().__init__()
        self.method = check_method(method)
        self.scale = LipschitzScale(K, scaling, s_init) if method != "none" else None
        self._seen_version: int | None = None
        self._seen_size: tuple[int, ...] | None = None
        self._written_size: tuple[int, ...] | None = None  # last value written to an sn_input_size buffer
        self.num_updates = 0  # number of state updates performed (diagnostics and tests)
        self._fused_weight = None  # (weight, grad mode, weight version) set by fused_spectral_scales
        # between DFT searches (depthwise, full conv): the certified bound and the last search's weights
        self._sn_cert: torch.Tensor | None = None
        self._sn_ref = None

    # -- to be provided by subclasses -------------------------------------------------------------
    def _update_state(self, spatial_size: tuple[int, ...] | None) -> None:  # pragma: no cover
        raise NotImplementedError

    def _sigma(self) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def spectral_state_tensors(self) -> list[torch.Tensor]:
        """The persistent spectral state: every buffer named ``sn_*`` (derived caches start with ``_``)."""
        return [b for name, b in self._buffers.items() if name.startswith("sn_") and b is not None]

    def _needs_input_size(self) -> bool:
        return False

    def _group_key(self):
        """Hashable key of layers whose updates can be batched together (None: update alone)."""
        return None

    @staticmethod
    def _group_update(layers: list[SpectralNormLayer], check: bool, iters: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def _mark_updated(self, size: tuple[int, ...] | None) -> None:
        self._seen_size = size
        self._seen_version = self._weight_version()
        self.num_updates += 1

    # -- update logic ------------------------------------------------------------------------------
    def _weight_version(self) -> int:
        return self.weight._version

    def update_spectral_state(self, spatial_size: tuple[int, ...] | None = None) -> None:
        """Update the spectral state for the current weights (no grad). ``spatial_size`` defaults to
        the last input size seen; layers whose norm depends on it skip the update until a first
        forward has told them."""
        if self.method in ("none", "torch"):
            return
        size = self._seen_size if spatial_size is None else tuple(spatial_size)
        if self._needs_input_size() and size is None:
            return
        with torch.no_grad():
            previous, self._seen_size = self._seen_size, size
            try:
                key = self._group_key()  # validates the geometry for this size
            except ValueError:
                self._seen_size = previous
                raise
            if key is not None:  # the batched path, as a group of one (marks the layer)
                type(self)._group_update([self], True, 1)
            else:
                self._update_state(size)
                self._mark_updated(size)

    def _update_or_certify(self, search: bool) -> None:
        """The ungrouped update (layers without a batched path): full-conv stems may certify instead of
        searching (see :func:`update_spectral_state`); the rest always update."""
        self.update_spectral_state()

    def _maybe_update(self, spatial_size: tuple[int, ...]) -> None:
        if self.method in ("none", "torch"):
            return
        stale_size = self._needs_input_size() and spatial_size != self._seen_size
        never = self._seen_version is None
        if never or ((stale_size or self._weight_version() != self._seen_version) and not _frozen()):
            self.update_spectral_state(spatial_size)

    def normalized_scale(self, spatial_size: tuple[int, ...]) -> torch.Tensor | float:
        """The factor ``K_eff / σ`` that multiplies ``weight`` in forward (1.0 for method "none")."""
        if self.method == "none":
            return 1.0
        self._maybe_update(spatial_size)
        scale = self.scale()
        if self.method == "torch":  # the parametrization already divided the weight
            return scale
        return scale / self._sigma()

    def _fused_kind(self) -> str | None:
        """The group kind of :func:`~invseg.layers.fused_spectral_scales` (None: no fused form)."""
        return None

    def normalized_weight(self, spatial_size: tuple[int, ...]) -> torch.Tensor:
        """``weight · K_eff / σ`` for an input of ``spatial_size`` (``weight`` itself for method "none").

        Inside :func:`~invseg.layers.fused_spectral_scales` this is the weight computed with the layer's
        group, when it still fits (same grad mode, weights and input size); otherwise the per-layer path.
        """
        if self.method == "none":
            return self.weight
        fused = self._fused_weight
        if fused is not None:
            weight, grad, version = fused
            if (grad == torch.is_grad_enabled() and version == self._weight_version()
                    and (not self._needs_input_size() or spatial_size == self._seen_size)):
                return weight
        return self.weight * self.normalized_scale(spatial_size)

    def _state_sigma(self) -> torch.Tensor:  # pragma: no cover - layers with certificates override
        """σ at the remembered state (differentiable), before any certificate (DFT-searched layers)."""
        raise NotImplementedError

    def _certified(self, sigma: torch.Tensor) -> torch.Tensor:
        """``sigma`` lifted to the certificate between searches (a detached slack: the value is the certified
        bound, the gradient that of the remembered state)."""
        if self._sn_cert is None:
            return sigma
        return sigma + (self._sn_cert.to(sigma.dtype) - sigma.detach()).clamp_min(0)

    def _raw_sigma(self) -> torch.Tensor:
        """σ at the remembered state without the certificate's slack (no grad; certified layers only)."""
        with torch.no_grad():
            return self._state_sigma()

    def sigma(self) -> torch.Tensor:
        """Current σ (differentiable) from the frozen state; for inspection and tests."""
        return self._sigma()

    # -- the naive full-operator method, shared by the conv layers (they provide _conv_spec(size)) ------
    def _conv_spec(self, size):  # pragma: no cover - conv layers override
        raise NotImplementedError

    def _naive_update(self, size: tuple[int, ...]) -> None:
        """Warm-start full-operator power iteration on the ``(1, Cin, *N)`` state ``sn_u``."""
        u = self.sn_u if self.sn_u is not None and tuple(self.sn_u.shape[2:]) == tuple(size) else None
        self.sn_u, _ = naive_power_method(self.weight, u, self._conv_spec(size), eps=self.eps,
                                          max_iter=self.max_iter)
        if self._written_size != size:
            self.sn_input_size.copy_(torch.tensor(size))
            self._written_size = size

    def _naive_sigma(self) -> torch.Tensor:
        """σ = ||A u|| with the frozen unit ``u`` (one extra conv per forward: the naive method's cost)."""
        return torch.linalg.vector_norm(
            conv_apply(self.sn_u.to(self.weight.dtype), self.weight, self._conv_spec(self._seen_size)))

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._sn_cert is not None:  # saved between searches: the certified bound of the saved weights
            destination[prefix + "sn_cert"] = self._sn_cert if keep_vars else self._sn_cert.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        cert = state_dict.pop(prefix + "sn_cert", None)  # only present when saved between searches
        key = prefix + "sn_u"
        if key in state_dict and "sn_u" in self._buffers:  # the naive state is shaped by the input size
            if self.sn_u is None or self.sn_u.shape != state_dict[key].shape:
                self.sn_u = torch.empty_like(state_dict[key], device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Loaded state belongs to the loaded weights: no re-search on the next forward (exact resume; a
        # checkpoint saved between searches brings its certificate along).
        if any(prefix + name in state_dict for name in ("sn_input_size", "sn_v", "sn_u")):
            self._after_load()
            if cert is not None and self._seen_version is not None:
                self._sn_cert = cert.detach().to(self.weight.device)

    def _after_load(self) -> None:
        if "sn_input_size" in self._buffers:
            size = tuple(int(v) for v in self.sn_input_size.tolist())
            if not all(v > 0 for v in size):
                return  # never computed: update on the next forward
            self._seen_size = self._written_size = size
        if "sn_v" in self._buffers and not bool(self.sn_v.any()):
            return  # the loaded state was never computed: update on the next forward
        self._on_load()
        self._seen_version = self._weight_version()

    def _on_load(self) -> None:
        """Drop derived caches after a state was loaded (subclasses)."""


def spectral_layers(module: nn.Module) -> list[SpectralNormLayer]:
    """All invseg SN layers inside ``module`` (including itself)."""
    return [m for m in module.modules() if isinstance(m, SpectralNormLayer)]


def update_spectral_state(module: nn.Module, *, check: bool = True, iters: int = 1, search: bool = True,
                          slack_tol: float | None = None) -> None:
    """Update every SN layer of ``module`` for its current weights, batched.

    Call once per optimization step, after ``optimizer.step()`` (or use :func:`attach_spectral_update`);
    never inside a recomputed forward. Layers of equal geometry are updated together: one chunked
    search per group of depthwise layers with the same kernel/stride/padding/input size, one power
    iteration over all pointwise (and one over all linear) layers with a single stopping test per
    iteration — and no host synchronisation except that test.

    Args:
        module: a model (DDP-wrapped models are accepted).
        check: apply the paper's stopping rule ``||ΘᵀΘv − σ²v|| <= eps σ²`` (iterate until every layer
            meets it; one host sync per iteration for all the matrices). With ``check=False``
            exactly ``iters`` warm-start iterations run and nothing synchronises.
        iters: iterations per update when ``check=False`` (minimum iterations otherwise).
        search: run the DFT searches of the depthwise and full-conv layers (default). ``False`` keeps
            their arg-max frequencies and certifies the bound for the current weights from the last
            search instead (``bound(θ) <= bound(θ₀) + ||θ − θ₀||₁`` per channel, a few device ops per
            group; σ in forward is lifted to that certificate by a detached slack, so every layer stays
            within K). The certificate loosens as the weights move away from the last search: search
            every few steps (:class:`SpectralUpdater` ``search_every``). Layers never searched at their
            current input size search regardless.
        slack_tol: with ``search=False``: search a layer again anyway (batched with the other loose layers of
            its group) when its certificate exceeds its σ at the remembered frequency and grid by more than
            this fraction. That σ is at most the bound on the remembered grid, so the over-normalization
            against a fresh search stays near the tolerance (a fresh search may pick a tighter grid for the
            moved weights: at most 1.6 % at 0.01 in ResNet-34-DS's first 40 steps, see ``certificate_slack``). One host synchronisation per update for all
            layers together. None: no such test.

    Layers that have not yet seen an input (unknown input size) are skipped; they initialise on their
    first forward.
    """
    groups: dict = {}
    loose = []  # certified layers or groups whose slack is tested below: (group update or None, layers)
    for m in spectral_layers(module):
        if m.method in ("none", "torch") or (m._needs_input_size() and m._seen_size is None):
            continue
        key = m._group_key()
        if key is None:
            m._update_or_certify(search)
            if not search and slack_tol is not None and m._sn_cert is not None:
                loose.append((None, [m]))
        else:
            groups.setdefault((type(m)._group_update, key), []).append(m)
    for (fn, _), layers in groups.items():
        with torch.no_grad():
            fn(layers, check, iters, search)
        if not search and slack_tol is not None and layers[0]._sn_cert is not None:
            loose.append((fn, layers))
    if loose:  # one host sync for every certified layer: search those whose certificate became too loose
        with torch.no_grad():
            flags = torch.cat([_too_loose(layers, slack_tol) for _, layers in loose]).tolist()
            offset = 0
            for fn, layers in loose:
                redo = [layer for layer, flag in zip(layers, flags[offset:offset + len(layers)]) if flag]
                offset += len(layers)
                if not redo:
                    continue
                if fn is None:
                    redo[0].update_spectral_state()
                else:  # only the loose layers of the group (same geometry: still one batched search)
                    fn(redo, check, iters, True)


def _too_loose(layers: list[SpectralNormLayer], tol: float) -> torch.Tensor:
    """Per layer: whether its certificate exceeds its σ at the remembered frequency by more than ``tol``
    (bool tensor, no sync)."""
    certs = torch.stack([layer._sn_cert for layer in layers])
    raws = torch.stack([layer._raw_sigma() for layer in layers]).to(certs.dtype)
    return certs > (1.0 + tol) * raws


class SpectralUpdater:
    """Calls :func:`update_spectral_state` after optimizer steps.

    Args:
        module: the model.
        check_every: test the power method's stopping rule every n updates (1 = every step, the paper's
            protocol; larger values avoid host synchronisation on GPUs, running ``iters`` fixed warm-start
            iterations in between).
        iters: iterations per update between checks.
        search_every: run the depthwise/full-conv DFT searches every n updates (1 = every step, default);
            in between the bounds are certified from the last search (``search=False`` of
            :func:`update_spectral_state`): still upper bounds, looser as the weights move.
        slack_tol: between searches, search a layer anyway when its certificate exceeds the σ at its
            remembered frequency and grid by more than this fraction (default 0.01; see
            :func:`update_spectral_state`; one host synchronisation per update). None: searches every n
            steps only.
    """

    def __init__(self, module: nn.Module, check_every: int = 1, iters: int = 1, search_every: int = 1,
                 slack_tol: float | None = 0.01):
        for name, value in (("check_every", check_every), ("iters", iters), ("search_every", search_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if slack_tol is not None and not (isinstance(slack_tol, (int, float)) and slack_tol >= 0):
            raise ValueError(f"slack_tol must be a number >= 0 or None, got {slack_tol!r}")
        self.module, self.check_every, self.iters, self.search_every = module, check_every, iters, search_every
        self.slack_tol = slack_tol
        self.count = 0

    def __call__(self, *_) -> None:
        check = self.count % self.check_every == 0
        search = self.count % self.search_every == 0
        self.count += 1
        update_spectral_state(self.module, check=check, iters=self.iters, search=search, slack_tol=self.slack_tol)


def attach_spectral_update(optimizer: torch.optim.Optimizer, module: nn.Module, check_every: int = 1,
                           iters: int = 1, search_every: int = 1, slack_tol: float | None = 0.01):
    """Call :func:`update_spectral_state` ``(module)`` after every ``optimizer.step()`` (a step
    post-hook; works with every optimizer, fused ones included). See :class:`SpectralUpdater`.

    Returns:
        the hook handle (``handle.remove()`` detaches it).
    """
    return optimizer.register_step_post_hook(SpectralUpdater(module, check_every, iters, search_every, slack_tol))


#: devices on which the power method stacks equal-shape matrices into one batched product
_STACKED_POWER_DEVICES = ("cuda",)


@torch.no_grad()
def batched_power_update(layers: list[SpectralNormLayer], matrices: list[torch.Tensor], check: bool,
                         iters: int) -> None:
    """Warm-start power iteration on a group of matrices at once (state ``layer.sn_v``).

    With ``check`` the iteration runs until every matrix meets ``||AᵀAv − σ²v|| <= eps σ²`` (one host
    sync per iteration for the whole group) or ``max_iter``; without, exactly ``iters`` iterations and no sync.

    On CUDA, matrices of equal shape are stacked into one batched product (few kernel launches). On CPU each
    matrix is iterated on its own weight: stacking copies every weight once per update, which measured
    3.5× slower there (MobileNetV2's pointwise layers, one-off timing: 6.9 ms vs 2.0 ms per update).
    """
    mats = [m.detach() for m in matrices]
    tiny = torch.finfo(mats[0].dtype).tiny
    if mats[0].device.type in _STACKED_POWER_DEVICES:
        by_shape: dict = {}
        for i, a in enumerate(mats):
            by_shape.setdefault(tuple(a.shape), []).append(i)
        blocks = [(idx, torch.stack([mats[i] for i in idx])) for idx in by_shape.values()]
    else:
        blocks = [([i], a.unsqueeze(0)) for i, a in enumerate(mats)]  # views: no copy
    vs, eps = [], []
    for idx, a in blocks:
        v = torch.stack([layers[i].sn_v for i in idx]).to(a.dtype) if len(idx) > 1 else layers[idx[0]].sn_v.to(
            a.dtype)[None]
        if any(layers[i]._seen_version is None for i in idx):  # never updated (or a zero state loaded): v0
            v0 = torch.stack([layers[i]._sn_v0 for i in idx]).to(a.dtype)
            v = torch.where((v == 0).all(dim=1, keepdim=True), v0, v)
        vs.append(v)
        eps.append(torch.tensor([layers[i].eps for i in idx], dtype=a.dtype, device=a.device) if check else None)
    max_iter = max(layer.max_iter for layer in layers)
    for it in range(1, max_iter + 1):
        test = check and it >= iters
        flags = []
        for b, (idx, a) in enumerate(blocks):
            v = vs[b]
            w = torch.bmm(a.transpose(1, 2), torch.bmm(a, v.unsqueeze(2))).squeeze(2)  # AᵀA v
            if test:
                sigma2 = (v * w).sum(1)
                resid = torch.linalg.vector_norm(w - sigma2[:, None] * v, dim=1)
                flags.append((resid <= eps[b] * sigma2.abs().clamp_min(tiny)).all())
            nrm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
            vs[b] = torch.where(nrm > 0, w / nrm.clamp_min(tiny), v)
        done = bool(torch.stack(flags).all()) if test else (not check and it >= iters)
        if done:
            break
    for (idx, _), v in zip(blocks, vs):
        for i, vi in zip(idx, v):
            layers[i].sn_v.copy_(vi)
            layers[i]._mark_updated(layers[i]._seen_size)
