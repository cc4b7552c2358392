"""The spectrally normalized layer: what it holds and what its forward computes (DESIGN §1d, §1f–§1h).

A reader needs five concepts to hold an SN layer in mind:

1. **Weight, scale and mode.** ``weight`` is the parameter; the layer is ``K_eff``-Lipschitz with
   ``K_eff = K`` (hard) or ``K·tanh(s)`` (soft). ``sn_mode`` says how the norm enters: ``"reparam"``
   divides by a σ that is differentiable in the weights (torch's ``spectral_norm`` style);
   ``"project"`` is the paper's protocol — the updater rescales the weight in place after every
   optimizer step so that its certified bound is 1, and forward is the plain conv times ``K_eff``.
2. **The certificate.** The updater leaves a snapshot of the weights it certified (``_sn_ref``) and
   their certified bound (``sn_bound``, per channel for depthwise convs). Every forward divides by
   ``bound + ||weight − snapshot||₁``: each bound invseg uses moves by at most the ℓ1 norm of the
   weights' change (DESIGN §1g), so what forward divides by bounds the operator it applies **whatever
   happened to the weights** since the update — a fused optimizer, a ``.data`` edit, a stale
   checkpoint. In normal training the weights equal the snapshot and this is ``bound`` exactly.
3. **The state** that makes the bound cheap and differentiable: the DFT arg-max (channel, grid,
   frequency) of depthwise convs and stems, the power vector and its deflated bound for matrices. In
   ``"reparam"`` mode the value of σ is the certificate and its gradient that of σ at the state.
4. **The input size.** Convolution bounds depend on it. The state is for one size; a forward at
   another size initialises the layer there (a certified search), except inside
   :func:`spectral_state_frozen`, where a size the state does not cover raises (with zero padding a
   state also covers every smaller input: the operator on it is a submatrix).
5. **One updater** (:mod:`invseg.layers.update`) owns all state: :func:`update_spectral_state` after
   each ``optimizer.step()`` (or :func:`attach_spectral_update`) searches, certifies and — in
   ``"project"`` mode — rescales, batched over layers of equal geometry. Forward never changes state
   except to initialise a layer at an input size it has no state for.

``layer.spectral_info()`` tells what a layer uses (:class:`SpectralInfo`).

The ``"torch"`` method (``torch.nn.utils.parametrizations.spectral_norm``) is a baseline with torch's own
semantics (updated in every training forward, wrong inside recomputed blocks, not a bound of a
convolution's norm); ``"naive"`` is the literature's full-operator warm-start power method (state of the
size of an input feature map, converges from below: not certified). Only ``"fft"`` is certified.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from invseg.utils import check_positive

__all__ = [
    "METHODS",
    "SCALINGS",
    "SN_MODES",
    "CERTIFIED_PATHS",
    "LipschitzScale",
    "SpectralInfo",
    "SpectralNormLayer",
    "spectral_state_frozen",
    "spectral_layers",
    "check_method",
    "check_mode",
    "write_snapshots",
]

#: Spectral-normalization methods accepted by every SN layer.
METHODS = ("fft", "naive", "torch", "none")
#: Scaling modes: ``"hard"`` multiplies by K, ``"soft"`` by ``K·tanh(s)`` with learnable ``s``.
SCALINGS = ("hard", "soft")
#: How σ enters the layer (DESIGN §1h): differentiable division, or the paper's in-place projection.
SN_MODES = ("reparam", "project")

#: The paths of :class:`SpectralInfo` whose bound is certified (DESIGN §1g).
CERTIFIED_PATHS = ("dft", "exact-small", "full-dft", "power", "exact")

_local = threading.local()


def _globally_frozen() -> bool:
    return getattr(_local, "frozen", 0) > 0


@contextlib.contextmanager
def spectral_state_frozen(module: nn.Module | None = None) -> Iterator[None]:
    """Inside this context the SN layers of ``module`` (all layers of this thread when None) keep their
    spectral state: a forward at an input size their state does not cover raises instead of initialising
    them there (a layer without any state still initialises), and :func:`~invseg.layers.update_spectral_state`
    refuses to update them. Memory-efficient blocks recompute their forward inside it."""
    layers = None if module is None else spectral_layers(module)
    if layers is None:
        _local.frozen = getattr(_local, "frozen", 0) + 1
    else:
        for layer in layers:
            layer._sn_frozen += 1
    try:
        yield
    finally:
        if layers is None:
            _local.frozen -= 1
        else:
            for layer in layers:
                layer._sn_frozen -= 1


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def check_mode(sn_mode: str, method: str = "fft") -> str:
    if sn_mode not in SN_MODES:
        raise ValueError(f"sn_mode must be one of {SN_MODES}, got {sn_mode!r}")
    if sn_mode == "project" and method == "torch":
        raise ValueError("sn_mode='project' needs an invseg method ('fft', 'naive' or 'none'); the 'torch' "
                         "baseline is torch's reparametrization (use sn_mode='reparam')")
    return sn_mode


class LipschitzScale(nn.Module):
    """The scale applied after normalization: ``K`` ("hard") or ``K·tanh(s)`` ("soft", paper §2.3).

    Args:
        K: scaling constant, > 0.
        scaling: ``"hard"`` or ``"soft"``.
        s_init: initial ``s`` for soft scaling (paper: 3, and 0.5 for large K).
    """

    def __init__(self, K: float = 1.0, scaling: str = "hard", s_init: float = 3.0):
        super().__init__()
        check_positive(K, "K")
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


@dataclass(frozen=True)
class SpectralInfo:
    """What an SN layer uses, for users and tests (:meth:`SpectralNormLayer.spectral_info`).

    Attributes:
        method: ``"fft"``, ``"naive"``, ``"torch"`` or ``"none"``.
        mode: ``"reparam"`` or ``"project"``.
        path: how the bound is computed: ``"dft"`` (depthwise DFT bound), ``"exact-small"`` (dense SVD of a
            tiny input's operator), ``"full-dft"`` (multi-channel DFT bound of a stem), ``"power"``
            (certified power method), ``"exact"`` (exact SVD every update), ``"naive"``, ``"torch"``,
            ``"none"``; ``"uninitialised"`` before the first forward or update.
        input_size: the input size the state is for (None for matrices, and before initialisation).
        sigma: σ at the state for the current weights (the differentiable part in reparam mode).
        bound: the certified bound of the snapshot weights (maximum over channels).
        certificate: what forward divides the weights by: ``bound + ||weight − snapshot||₁``, an upper
            bound of the current weights' operator norm when ``certified``.
        scale: ``K_eff`` (K, or ``K·tanh(s)``).
        certified: whether ``certificate`` is a certified upper bound (the paths of :data:`CERTIFIED_PATHS`;
            then the layer's linear part as forward applies it is at most ``scale``-Lipschitz).
        updates: number of state updates so far (diagnostics).
        since_search: updates since the last search (DFT layers) or exact eigendecomposition (matrices);
            0 right after one.
    """

    method: str
    mode: str
    path: str
    input_size: tuple[int, ...] | None
    sigma: float
    bound: float
    certificate: float
    scale: float
    certified: bool
    updates: int
    since_search: int


class SpectralNormLayer(nn.Module):
    """Base class of invseg's SN layers (the five concepts of the module docstring).

    Subclasses hold ``weight``, register their persistent state as buffers named ``sn_*`` (fixed keys and
    shapes: ``state_dict`` is the same at every step) and implement:

    * ``_group_key()`` — hashable key of layers updated together (None: not updated by the updater);
    * ``_group_update(layers, *, search, check, iters, slack_tol, rescale)`` (static) — search/certify the
      group for its current weights, write ``sn_bound``, the state and the snapshot, and in
      ``"project"`` mode (``rescale``) divide the weights by their certified bound;
    * ``_state_sigma()`` — σ at the state, differentiable (reparam mode only);
    * ``_path()`` — the :class:`SpectralInfo` path; ``_size_dependent`` — whether the bound depends on the
      input size; ``_covers(size)`` — whether the state's bound also bounds inputs of ``size``.
    """

    _size_dependent = True

    def __init__(self, method: str, K: float, scaling: str, s_init: float, sn_mode: str = "reparam"):
        super().__init__()
        self.method = check_method(method)
        self.sn_mode = check_mode(sn_mode, method)
        self.scale = LipschitzScale(K, scaling, s_init) if method != "none" else None
        self._size: tuple[int, ...] | None = None  # the input size the state is for; None: uninitialised
        self._sn_frozen = 0  # > 0 inside spectral_state_frozen(module)
        self.num_updates = 0
        self._since_search = 0  # updates since the last search / exact step (diagnostics)
        # the weights at the last update (derived, not persistent: rebuilt and re-certified on load)
        self.register_buffer("_sn_ref", None, persistent=False)

    # -- subclass interface ------------------------------------------------------------------------------
    def _group_key(self):  # pragma: no cover - subclasses override
        return None

    @staticmethod
    def _group_update(layers, *, search, check, iters, slack_tol, rescale):  # pragma: no cover
        raise NotImplementedError

    def _state_sigma(self) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _path(self) -> str:  # pragma: no cover
        raise NotImplementedError

    def _covers(self, size: tuple[int, ...]) -> bool:
        return size == self._size

    def spectral_state_tensors(self) -> list[torch.Tensor]:
        """The persistent spectral state: every buffer named ``sn_*`` (what ``state_bytes`` counts)."""
        return [b for name, b in self._buffers.items() if name.startswith("sn_") and b is not None]

    # -- forward -----------------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        """Whether a :func:`spectral_state_frozen` context covers this layer."""
        return self._sn_frozen > 0 or _globally_frozen()

    def _ensure_size(self, size: tuple[int, ...]) -> None:
        """Initialise the layer for an input of ``size`` if its state is for another size (certified)."""
        if size == self._size:
            return
        if self.frozen and self._size is not None:  # a layer without any state yet may still initialise
            if self._covers(size):
                return
            raise RuntimeError(
                f"{type(self).__name__} has spectral state for inputs of size {self._size}, got {size} inside "
                "spectral_state_frozen(): its bound would not cover this input. Run one forward at this size "
                "outside the frozen context (it initialises the layer there), then freeze."
            )
        self._initialise(size)

    def _initialise(self, size: tuple[int, ...]) -> None:
        """A certified search for the current weights at ``size`` (the updater's own code, group of one,
        without rescaling: forward never rescales weights)."""
        previous = self._size
        self._size = size if self._size_dependent else ()
        try:
            key = self._group_key()  # validates the geometry at this size
        except ValueError:
            self._size = previous
            raise
        if key is None:
            return
        # fresh tensors: a graph built by an earlier call at another size keeps the ones it saved
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.clone()
        if "sn_input_size" in self._buffers and self._size_dependent:
            self.sn_input_size.copy_(torch.tensor(self._size))
        type(self)._group_update([self], search=True, check=True, iters=1, slack_tol=None, rescale=False)

    def _certificate(self) -> torch.Tensor:
        """``bound + ||weight − snapshot||₁``: an upper bound of the current weights' operator norm (detached)."""
        return self.sn_bound.amax() + torch.dist(self.weight.detach(), self._sn_ref, 1)

    def normalized_weight(self, size: tuple[int, ...]) -> torch.Tensor:
        """``weight · K_eff / σ`` for an input of spatial ``size`` (``weight`` itself for method "none").

        σ is the certificate (value); in reparam mode its gradient is that of σ at the state.
        """
        if self.method == "none":
            return self.weight
        if self.method == "torch":  # the parametrization already divided the weight
            return self.weight * self.scale()
        self._ensure_size(size if self._size_dependent else ())
        return self.weight * (self.scale() / self._sigma_value())

    def _sigma_value(self) -> torch.Tensor:
        cert = self._certificate()
        if self.sn_mode == "reparam":  # the value is exactly the certificate, the gradient that of σ at the state
            at_state = self._state_sigma()
            return cert + (at_state - at_state.detach())
        return cert

    # -- inspection --------------------------------------------------------------------------------------
    @torch.no_grad()
    def spectral_info(self) -> SpectralInfo:
        """What the layer uses now (see :class:`SpectralInfo`); reads state, changes nothing."""
        scale = self.scale() if self.scale is not None else 1.0
        scale = float(scale)
        initialised = self._size is not None and self.method in ("fft", "naive")
        if initialised:
            sigma = float(self._state_sigma())
            bound = float(self.sn_bound.amax())
            cert = float(self._certificate())
        else:
            sigma = bound = cert = float("nan")
        if self.method in ("none", "torch"):
            path = self.method
        else:
            path = self._path() if initialised else "uninitialised"
        size = self._size if (self._size_dependent and self._size is not None) else None
        return SpectralInfo(self.method, self.sn_mode, path, size, sigma, bound, cert, scale,
                            path in CERTIFIED_PATHS, self.num_updates, self._since_search)

    def sigma(self) -> torch.Tensor:
        """What forward divides the weights by, at the state's input size (differentiable in reparam mode)."""
        if self.method in ("none", "torch"):
            raise RuntimeError(f"method {self.method!r} has no invseg sigma")
        size = self._size if self._size_dependent else ()
        if size is None:
            raise RuntimeError(f"{type(self).__name__} has no spectral state yet: run a forward first")
        self._ensure_size(size)
        return self._sigma_value()

    # -- the snapshot and checkpoints ------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "sn_cert", None)  # written by invseg < 0.2 between searches; re-derived below
        for name in self._legacy_defaults():  # checkpoints of invseg < 0.2 lack these: certified below anyway
            if prefix + name not in state_dict and name in self._buffers and self._buffers[name] is not None:
                state_dict[prefix + name] = torch.zeros_like(self._buffers[name])
        key = prefix + "sn_u"
        if key in state_dict and "sn_u" in self._buffers:  # the naive state is shaped by the input size
            if self.sn_u is None or self.sn_u.shape != state_dict[key].shape:
                self.sn_u = torch.empty_like(state_dict[key], device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.method in ("fft", "naive") and not error_msgs:
            self._after_load()

    def _legacy_defaults(self) -> tuple[str, ...]:
        return ("sn_bound",)

    def _after_load(self) -> None:
        """A loaded state is a warm start, not a certificate (DESIGN §1g): the loaded weights are searched
        again at the loaded input size and the bound becomes the larger of the loaded and the fresh one —
        exact resume for checkpoints invseg wrote, certified for any other."""
        size = self._loaded_size()
        if size is None:  # saved before any forward: initialise on the first one
            self._size = None
            return
        self._size = size
        self._recertify_loaded()
        write_snapshots([self], count=False)

    def _loaded_size(self) -> tuple[int, ...] | None:  # pragma: no cover - subclasses override
        raise NotImplementedError

    def _recertify_loaded(self) -> None:  # pragma: no cover - subclasses override
        raise NotImplementedError


def write_snapshots(layers: list[SpectralNormLayer], count: bool = True) -> None:
    """Remember each layer's current weights as its certified snapshot (one batched copy); ``count``: this
    ends an update (``num_updates``)."""
    copy_to, copy_from = [], []
    for layer in layers:
        w = layer.weight.detach()
        ref = layer._sn_ref
        if ref is None or ref.shape != w.shape or ref.dtype != w.dtype or ref.device != w.device:
            layer._sn_ref = w.clone()
        else:
            copy_to.append(ref)
            copy_from.append(w)
        layer.num_updates += count
    if copy_to:
        torch._foreach_copy_(copy_to, copy_from)


def spectral_layers(module: nn.Module) -> list[SpectralNormLayer]:
    """All invseg SN layers inside ``module`` (including itself)."""
    return [m for m in module.modules() if isinstance(m, SpectralNormLayer)]
