"""SN layers whose operator norm is that of a matrix: pointwise convs and ``Linear`` (paper, Thm 3).

The paper's warm-start power method on the ``Cout × Cin`` connectivity matrix, **certified**
(DESIGN §1g): each update evaluates the power method's iterate ``v`` — ``ρ = ||W v||²`` and the residual
``r = ||WᵀW v − ρ v||``, two matrix-vector products — and bounds the norm from above by
:func:`~invseg.spectral.rayleigh_bound` ``(ρ, r, c)``, where the *deflated bound* ``c`` bounds ``WᵀW``
orthogonally to ``v``. ``c`` comes from an exact eigendecomposition when a layer starts (or its
certificate got loose) and is carried from update to update: it grows by the weights' change
(Frobenius norm) and by the rotation of ``v`` (:func:`~invseg.spectral.rotate_deflated`). So the usual
update costs the power method's own products plus one pass over the weight for its change; the exact
step (``O(n³)``) runs only when the certificate is more than ``eps`` above the power estimate.

State (persistent, fixed shapes): ``sn_v`` (``Cin`` floats, the power vector), ``sn_bound`` (the
certified bound of the snapshot weights), ``sn_deflated`` (``sqrt(c)`` for ``sn_v``).
"""

from __future__ import annotations

import torch

from invseg.spectral import exact_deflated, exact_top_pair, rayleigh_bound, rotate_deflated, rounding_margin
from invseg.utils import check_int

from .base import SpectralNormLayer, write_snapshots

__all__ = ["MatrixSpectralNorm", "matrix_group_update", "BOUND_FLOOR"]

#: The smallest bound stored: a zero weight is the zero map, and forward never divides by zero.
BOUND_FLOOR = 1e-19


class MatrixSpectralNorm(SpectralNormLayer):
    """Shared state and update of the matrix-shaped SN layers (``SNPointwiseConv``, ``SNLinear``).

    Subclasses set ``weight`` and call :meth:`_init_matrix_state` (``eps``, ``max_iter``, ``exact``; the state
    buffers are registered for ``method="fft"`` unless ``stateful`` says otherwise).
    """

    _size_dependent = False

    def _init_matrix_state(self, n_in: int, eps: float, max_iter: int, exact: bool, stateful: bool | None = None) -> None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        check_int(max_iter, "max_iter")
        self.eps, self.max_iter, self.exact = float(eps), int(max_iter), bool(exact)
        if self.method == "fft" if stateful is None else stateful:
            gen = torch.Generator().manual_seed(0)
            v0 = torch.randn(n_in, generator=gen)
            self.register_buffer("sn_v", v0 / v0.norm())
            self.register_buffer("sn_bound", torch.zeros(()))
            self.register_buffer("sn_deflated", torch.zeros(()))

    def _matrix(self) -> torch.Tensor:
        return self.weight.reshape(self.weight.shape[0], -1)

    def _group_key(self):
        if self.method != "fft":
            return None
        w = self.weight
        return ("matrix", w.dtype, w.device)  # any shapes together: one stopping test per iteration

    def _path(self) -> str:
        return "exact" if self.exact else "power"

    def _state_sigma(self) -> torch.Tensor:
        # elementwise product + sum rather than matmul: autocast keeps it in the weight's precision
        a = self._matrix()
        return torch.linalg.vector_norm((a * self.sn_v.to(a.dtype)).sum(dim=1))

    @staticmethod
    def _group_update(layers, *, search=True, check=True, iters=1, slack_tol=None, rescale=False):
        matrix_group_update(layers, check=check, iters=iters, rescale=rescale, search=search, slack_tol=slack_tol)

    # -- checkpoints ------------------------------------------------------------------------------------
    def _legacy_defaults(self) -> tuple[str, ...]:
        return ("sn_bound", "sn_deflated")

    def _loaded_size(self):
        return ()  # a matrix's bound does not depend on the input

    def _recertify_loaded(self) -> None:
        """The loaded bound and deflated bound are kept only where an exact eigendecomposition of the
        loaded weights confirms them (exact resume); otherwise the exact values replace them."""
        with torch.no_grad():
            a = self._matrix()
            lam1, lam2, v1 = exact_top_pair(a)
            v = self.sn_v.to(torch.float64)
            if not bool(torch.linalg.vector_norm(v) > 0):  # a zero vector loaded: start from the exact one
                self.sn_v.copy_(v1.to(self.sn_v.dtype))
                v = v1
            margin = rounding_margin(torch.float64, max(a.shape))
            bound = lam1.sqrt() * margin
            deflated = exact_deflated(lam1, lam2, v1, v).clamp_min(0).sqrt() * margin
            self.sn_bound.copy_(torch.maximum(self.sn_bound.to(torch.float64), bound).clamp_min(BOUND_FLOOR))
            self.sn_deflated.copy_(torch.maximum(self.sn_deflated.to(torch.float64), deflated))


_CONSTANTS: dict = {}


def _group_constants(mats: list[torch.Tensor], eps: list[float]) -> tuple[torch.Tensor, ...]:
    """Per-layer constants of a group as device tensors, built once per group shape (no host-to-device
    copy per update): power-method tolerance, rounding margin of the certificate and of a rescale, and the
    most that entries lost to underflow could add to a Frobenius norm."""
    key = (tuple(tuple(m.shape) for m in mats), tuple(eps), mats[0].dtype, mats[0].device)
    out = _CONSTANTS.get(key)
    if out is None:
        if len(_CONSTANTS) > 256:
            _CONSTANTS.clear()
        dev, f64 = mats[0].device, torch.float64
        out = _CONSTANTS[key] = (
            torch.tensor(eps, dtype=f64, device=dev),
            torch.tensor([rounding_margin(m.dtype, max(m.shape)) for m in mats], dtype=f64, device=dev),
            torch.tensor([rounding_margin(m.dtype, min(m.shape)) for m in mats], dtype=f64, device=dev),
            torch.tensor([m.numel() ** 0.5 * 1e-19 for m in mats], dtype=f64, device=dev),
        )
    return out


def _certified_power(a: list[torch.Tensor], xs: list[torch.Tensor], c: torch.Tensor, eps: torch.Tensor,
                     iters: int, check: bool, max_iter: int):
    """Warm-start power iterations on each ``a[j]ᵀa[j]``, certifying every evaluated iterate.

    Returns ``(mu, rho, c, xs)``: per matrix the certified bound ``μ >= ||a||²`` at the last evaluated
    iterate, its Rayleigh quotient ``ρ``, and the next warm start ``x`` with its deflated bound ``c``.
    ``check``: from iteration ``iters`` on, a matrix stops when ``||aᵀa x − ρ x|| <= eps ρ`` (one host sync
    per iteration; the others keep iterating, up to ``max_iter``); otherwise exactly ``iters`` iterations.
    """
    f64, tiny = torch.float64, torch.finfo(torch.float64).tiny
    n = len(a)
    mu, rho = torch.zeros_like(c), torch.zeros_like(c)
    active = list(range(n))
    idx = None  # device index of `active` (None: all)
    for it in range(1, max_iter + 1):
        am, ax = [a[j] for j in active], [xs[j] for j in active]
        ys = [m.mv(x) for m, x in zip(am, ax)]
        zs = [m.t().mv(y) for m, y in zip(am, ys)]  # aᵀa x
        r_ = torch.stack(torch._foreach_norm(ys, 2, dtype=f64)).square()
        znorm = torch.stack(torch._foreach_norm(zs, 2, dtype=f64))
        scaled = torch._foreach_mul(ax, r_.to(am[0].dtype).unbind(0))
        resid = torch.stack(torch._foreach_norm(torch._foreach_sub(zs, scaled), 2, dtype=f64))
        c_ = c if idx is None else c.index_select(0, idx)
        m_ = rayleigh_bound(r_, resid, c_)  # certified for the iterate just evaluated
        # advance to x' = z / ||z|| (a zero matrix keeps x); cos∠(x, x') = xᵀz / ||z|| = ρ / ||z||
        alive = znorm > 0
        inv = torch.where(alive, 1.0 / znorm.clamp_min(tiny), torch.zeros_like(znorm))
        cos = torch.where(alive, r_ * inv, torch.ones_like(r_))
        c_ = rotate_deflated(r_, resid, c_, torch.sqrt((1.0 - cos * cos).clamp_min(0)))
        keep = (~alive).to(am[0].dtype).unbind(0)
        stepped = torch._foreach_add(torch._foreach_mul(zs, inv.to(am[0].dtype).unbind(0)), torch._foreach_mul(ax, keep))
        for j, x in zip(active, stepped):
            xs[j] = x
        if idx is None:
            mu, rho, c = m_, r_, c_
        else:
            mu, rho, c = mu.index_copy(0, idx, m_), rho.index_copy(0, idx, r_), c.index_copy(0, idx, c_)
        if it < iters:
            continue
        if not check:
            break
        done = (resid <= eps.index_select(0, idx) * r_ if idx is not None else resid <= eps * r_).tolist()
        active = [j for j, ok in zip(active, done) if not ok]
        if not active:
            break
        idx = torch.tensor(active, device=c.device)
    return mu, rho, c, xs


@torch.no_grad()
def matrix_group_update(layers: list[MatrixSpectralNorm], *, check: bool, iters: int, rescale: bool,
                        search: bool = True, slack_tol: float | None = None) -> None:
    try:
        _matrix_group_update(layers, check=check, iters=iters, rescale=rescale, search=search, slack_tol=slack_tol)
    except BaseException:
        for layer in layers:  # the snapshots may hold a difference: these layers start over, certified
            layer._sn_ref, layer._size = None, None
        raise


def _matrix_group_update(layers: list[MatrixSpectralNorm], *, check: bool, iters: int, rescale: bool,
                         search: bool = True, slack_tol: float | None = None) -> None:
    """One certified update of a group of matrix layers (any shapes; module docstring).

    ``search`` (the default, every step in the paper's protocol): the certified power method. With ``check``
    the iteration runs until each matrix meets the paper's rule ``||WᵀWv − ρv|| <= eps ρ`` (one host
    synchronisation per iteration for the whole group) or ``max_iter``, and a layer whose certified bound is
    then more than ``max(eps / 2, slack_tol)`` above the power estimate ``sqrt(ρ)`` (its deflated bound grew too
    close to ``ρ``) is certified exactly;
    without ``check``, exactly ``iters`` iterations and no synchronisation. ``search=False`` (between the
    searches of ``SpectralUpdater(search_every=n)``): Weyl's inequality only, ``||W|| <= ||W₀|| + ||W − W₀||_F``
    — one pass over each weight, no power iteration. Layers without a snapshot (never certified) and
    ``exact=True`` layers are certified exactly. ``rescale`` (project mode) divides each weight in place by
    its certified bound.
    """
    f64 = torch.float64
    mats = [layer._matrix().detach() for layer in layers]
    exact = [(layer.exact and search) or layer._sn_ref is None for layer in layers]
    bounds: list[torch.Tensor | None] = [None] * len(layers)
    power = [i for i, e in enumerate(exact) if not e]
    if power:
        a = [mats[i] for i in power]
        lay = [layers[i] for i in power]
        eps, margin, _, underflow = _group_constants(a, [layer.eps for layer in lay])
        # ||W − W_ref||_F in the weights' precision, computed in the snapshot's own storage (no weight-sized
        # temporary; write_snapshots below stores the new weights there); entries below ~1e-19 may underflow when
        # squared, so ||·||_F is lifted by what they could add: sqrt(numel) · 1e-19
        refs = [layer._sn_ref.view(m.shape) for layer, m in zip(lay, a)]
        torch._foreach_sub_(refs, a)
        change = torch.stack(torch._foreach_norm(refs))
        d = torch.stack([layer.sn_deflated for layer in lay]).to(f64) + change.to(f64) + underflow
        if not search:  # Weyl: the bound and the deflated bound both move by at most ||ΔW||_F
            bound = torch.stack([layer.sn_bound for layer in lay]).to(f64) + change.to(f64) + underflow
            torch._foreach_copy_([layer.sn_deflated for layer in lay], list(d.unbind(0)))
            for j, i in enumerate(power):
                bounds[i] = bound[j]
            power = []
    if power:
        xs = [layer.sn_v.to(m.dtype) for layer, m in zip(lay, a)]
        xs = list(torch._foreach_div(xs, torch._foreach_norm(xs)))
        mu, rho, c, xs = _certified_power(a, xs, d * d, eps, iters, check, max(layer.max_iter for layer in lay))
        bound = mu.clamp_min(0).sqrt() * margin
        deflated = c.clamp_min(0).sqrt() * margin
        tol = eps * 0.5 if slack_tol is None else torch.clamp(eps * 0.5, min=float(slack_tol))
        loose = (mu > (1.0 + tol).square() * rho).tolist() if check else [False] * len(power)
        keep_v = [j for j in range(len(power)) if not loose[j]]
        if keep_v:
            torch._foreach_copy_([lay[j].sn_v for j in keep_v], [xs[j] for j in keep_v])
            torch._foreach_copy_([lay[j].sn_deflated for j in keep_v], [deflated[j] for j in keep_v])
        for j, i in enumerate(power):
            if loose[j]:
                exact[i] = True
            else:
                bounds[i] = bound[j]
    for i, layer in enumerate(layers):  # exact certification (start, loose certificates, exact=True)
        if exact[i]:
            lam1, lam2, v1 = exact_top_pair(mats[i])
            margin = rounding_margin(f64, max(mats[i].shape))
            layer.sn_v.copy_(v1.to(layer.sn_v.dtype))
            layer.sn_deflated.copy_(exact_deflated(lam1, lam2, v1, layer.sn_v).clamp_min(0).sqrt() * margin)
            bounds[i] = (lam1.sqrt() * margin).to(layer.sn_bound.device)
    bound = torch.stack(bounds).clamp_min(BOUND_FLOOR)
    if rescale:
        # project mode: W <- W / bound in place, so that the snapshot's certified bound is 1 (the rounding of
        # the division is in the margin); the deflated bound scales with it
        _, _, margin, _ = _group_constants(mats, [layer.eps for layer in layers])
        torch._foreach_mul_([layer.weight.data for layer in layers], (1.0 / bound).to(mats[0].dtype).unbind(0))
        deflated = torch.stack([layer.sn_deflated for layer in layers]).to(f64) / bound * margin
        torch._foreach_copy_([layer.sn_deflated for layer in layers], list(deflated.unbind(0)))
        bound = margin
    torch._foreach_copy_([layer.sn_bound for layer in layers], list(bound.unbind(0)))
    write_snapshots(layers)
    for layer, e in zip(layers, exact):
        layer._size = ()  # initialised (a matrix's bound does not depend on the input size)
        layer._since_search = 0 if e else layer._since_search + 1
