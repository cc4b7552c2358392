"""Spectral norm of pointwise convolutions and dense layers (paper, Thm 3; DESIGN §1c).

A pointwise conv (any number of spatial dims, any stride) has the operator norm of its ``Cout × Cin``
connectivity matrix Θ, so a warm-start power method on Θ needs one vector of ``Cin`` floats as state,
independent of the input size. The same holds for ``nn.Linear``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "connectivity_matrix",
    "power_iteration",
    "pointwise_norm",
    "pointwise_norm_exact",
    "rayleigh_bound",
    "rotate_deflated",
    "grow_deflated",
    "exact_top_pair",
    "exact_deflated",
    "rounding_margin",
    "certified_pointwise_norm",
]


def connectivity_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The ``(Cout, Cin)`` matrix of a pointwise weight ``(Cout, Cin)`` or ``(Cout, Cin, 1, ..., 1)``.

    Raises:
        ValueError: if the weight is not a matrix or has a spatial extent other than 1.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError(
            f"a pointwise weight must have shape (Cout, Cin) or (Cout, Cin, 1, ..., 1), got "
            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}"
        )
    if any(k != 1 for k in weight.shape[2:]):
        raise ValueError(
            f"a pointwise weight must have kernel size 1 on every spatial axis, got shape {tuple(weight.shape)}"
        )
    return weight.reshape(weight.shape[0], weight.shape[1])


@torch.no_grad()
def power_iteration(
    matrix: torch.Tensor,
    v: torch.Tensor | None = None,
    eps: float = 1e-2,
    max_iter: int = 100,
    check_every: int = 1,
) -> tuple[torch.Tensor, int]:
    """Warm-start power method on ``AᵀA`` with the paper's stopping rule.

    Iterates ``v <- AᵀA v / ||AᵀA v||`` until ``||AᵀA v - σ² v|| <= eps · σ²`` (the paper's rule
    ``||AᵀAv - σ²v|| < ε``, made scale-invariant so that ε means the same for any weight scale) or
    ``max_iter`` iterations. ``check_every > 1`` tests the rule only every few iterations (each test is a
    host synchronisation).

    Returns:
        ``(v, iterations)`` with ``v`` a unit vector of length ``Cin`` (detached).
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    a = matrix.detach()
    if v is None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(a.shape[1], generator=gen, dtype=a.dtype).to(a.device)
    v = v.to(a.dtype)
    v = v / v.norm().clamp_min(torch.finfo(a.dtype).tiny)
    it = 0
    for it in range(1, max_iter + 1):
        w = a.t() @ (a @ v)  # AᵀA v
        sigma2 = torch.dot(v, w)  # Rayleigh quotient of the unit v
        if it % check_every == 0 or it == max_iter:
            resid = (w - sigma2 * v).norm()
            done = bool(resid <= eps * sigma2.abs().clamp_min(torch.finfo(a.dtype).tiny))
        else:
            done = False
        nrm = w.norm()
        if nrm == 0:  # zero matrix: any unit vector is a singular vector
            break
        v = w / nrm
        if done:
            break
    return v, it


def pointwise_norm(
    weight: torch.Tensor,
    v: torch.Tensor | None = None,
    eps: float = 1e-2,
    max_iter: int = 100,
    exact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral norm of a pointwise/dense weight by the efficient warm-start power method.

    Args:
        weight: ``(Cout, Cin)`` or ``(Cout, Cin, 1, ..., 1)``.
        v: warm start (unit vector of length ``Cin``), or None for a fixed random start.
        eps: relative tolerance of the stopping rule (paper: 0.01).
        max_iter: iteration cap.
        exact: return the exact norm (SVD) instead; ``v`` is then the top right singular vector.

    Returns:
        ``(sigma, v)``: ``sigma = ||Θ v||`` (differentiable w.r.t. ``weight``, ``v`` frozen) — a value
        ``<= ||Θ||`` that converges from below — and the updated unit ``v`` (detached).
    """
    a = connectivity_matrix(weight)
    if exact:
        return pointwise_norm_exact(weight)
    v, _ = power_iteration(a, v, eps=eps, max_iter=max_iter)
    return torch.linalg.vector_norm(a @ v), v


def pointwise_norm_exact(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact spectral norm of a pointwise/dense weight by SVD (differentiable), and its top right
    singular vector. Cheap for the small ``Cout × Cin`` matrices of pointwise layers."""
    a = connectivity_matrix(weight)
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    return s[0], vh[0].detach()


# -- certified bounds (DESIGN §1g) ------------------------------------------------------------------------
#
# The power method converges from below and its residual rule places *an* eigenvalue near σ², not
# necessarily the top one. The functions below turn what the power method computes — ρ = ‖W v‖², the
# residual r = ‖WᵀW v − ρ v‖ — into a certified *upper* bound, given one more number: a bound c on the
# largest Rayleigh quotient of WᵀW orthogonal to v ("the deflated bound"). c is known exactly after an
# exact eigendecomposition and is carried from update to update (it grows by the weights' change and by
# the rotation of v), so the certificate costs the power method's own matrix-vector products.


def rayleigh_bound(rho: torch.Tensor, resid: torch.Tensor, deflated2: torch.Tensor) -> torch.Tensor:
    """Certified upper bound of ``λ_max(B)`` of a symmetric PSD ``B`` from one unit vector ``v``.

    With ``ρ = vᵀBv``, ``r = ||Bv − ρv||`` and any ``c >= max_{x ⊥ v, ||x|| = 1} xᵀBx``, every unit
    ``x = αv + βy`` (``y ⊥ v``) has ``xᵀBx = α²ρ + 2αβ yᵀ(Bv − ρv) + β² yᵀBy <= [|α|, |β|] M [|α|, |β|]ᵀ``
    with ``M = [[ρ, r], [r, c]]``, hence

        ``λ_max(B) <= μ = (ρ + c)/2 + sqrt(((ρ − c)/2)² + r²)``.

    It is ``ρ + r²/(ρ − c) + O(r⁴)`` when ``c < ρ`` (second order in the residual) and at most
    ``max(ρ, c) + r``. Elementwise over tensors of equal shape.
    """
    half = (rho - deflated2) * 0.5
    return (rho + deflated2) * 0.5 + torch.sqrt(half * half + resid * resid)


def rotate_deflated(rho: torch.Tensor, resid: torch.Tensor, deflated2: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
    """The deflated bound after moving the unit vector from ``v`` to ``v'`` (``sin = sin∠(v, v')``).

    Given the majorant ``M = [[ρ, r], [r, c]]`` of :func:`rayleigh_bound` at ``v``, a unit ``x ⊥ v'`` has
    ``|⟨x, v⟩| <= sin φ``, so ``xᵀBx <= max_{0 <= ψ <= φ} q(ψ)`` with
    ``q(ψ) = ρ sin²ψ + 2r sinψ cosψ + c cos²ψ = (ρ + c)/2 + R cos(2ψ − γ)`` (``R``, ``γ`` the modulus and
    angle of ``((c − ρ)/2, r)``). The maximum is ``μ`` when the arc reaches ``2ψ = γ``, otherwise
    ``q(φ) = c + sin²φ (ρ − c) + 2 sinφ cosφ r`` — an increase of second order in the residual when
    ``v'`` is a power step from ``v``.
    """
    s2 = sin * sin
    cos = torch.sqrt((1.0 - s2).clamp_min(0))
    half = (deflated2 - rho) * 0.5
    radius = torch.sqrt(half * half + resid * resid)
    mu = (rho + deflated2) * 0.5 + radius
    partial = deflated2 + s2 * (rho - deflated2) + 2.0 * sin * cos * resid
    reached = (1.0 - 2.0 * s2) * radius <= half
    return torch.where(reached, mu, torch.minimum(partial, mu))


def grow_deflated(deflated: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """``sqrt(c)`` after the matrix moved by ``change >= ||ΔW||₂`` (e.g. its Frobenius norm): for
    ``x ⊥ v``, ``||(W + ΔW)x|| <= ||Wx|| + ||ΔW||₂`` (triangle inequality)."""
    return deflated + change


@torch.no_grad()
def exact_top_pair(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(λ₁, λ₂, v₁)`` of ``AᵀA`` for a ``(Cout, Cin)`` matrix, in float64: the two largest squared singular
    values and the top right singular vector, from an eigendecomposition of the smaller Gram matrix
    (``AᵀA`` or ``AAᵀ``). ``λ₂ = 0`` for a single column or row."""
    a = matrix.detach().to(torch.float64)
    cout, cin = a.shape
    gram = a.t() @ a if cin <= cout else a @ a.t()
    lam, vec = torch.linalg.eigh(gram)
    lam = lam.clamp_min(0)
    lam1 = lam[-1]
    lam2 = lam[-2] if lam.shape[0] > 1 else lam.new_zeros(())
    top = vec[:, -1]
    if cin > cout:  # top left singular vector u: v = Aᵀu / ||Aᵀu||
        top = a.t() @ top
        n = torch.linalg.vector_norm(top)
        top = torch.where(n > 0, top / n.clamp_min(torch.finfo(top.dtype).tiny), torch.zeros_like(top))
        if not bool(n > 0):
            top[0] = 1.0
    return lam1, lam2, top


def exact_deflated(lam1: torch.Tensor, lam2: torch.Tensor, v1: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``c >= max_{x ⊥ v} xᵀ AᵀA x`` for any unit ``v`` from the exact ``λ₁ >= λ₂`` and top vector ``v₁``:
    ``xᵀBx <= λ₂ + (λ₁ − λ₂)⟨x, v₁⟩²`` and ``max_{x ⊥ v} ⟨x, v₁⟩² = 1 − ⟨v, v₁⟩²`` (float64)."""
    v = v.to(torch.float64)
    v = v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(torch.float64).tiny)
    sin2 = (1.0 - torch.dot(v, v1.to(torch.float64)) ** 2).clamp_min(0)
    return lam2 + (lam1 - lam2) * sin2


def rounding_margin(dtype: torch.dtype, n: int) -> float:
    """Relative margin added to a bound computed in ``dtype`` from sums of ``n`` terms: ``1 + 8 sqrt(n) ε``
    (float32: 1e-6 at n = 1, 3.4e-5 at n = 1280), so that rounding can never put a certified bound below
    the exact norm of the weights forward uses."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return 1.0 + 8.0 * math.sqrt(max(int(n), 1)) * eps


@torch.no_grad()
def certified_pointwise_norm(
    weight: torch.Tensor,
    v: torch.Tensor | None = None,
    eps: float = 1e-2,
    max_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A certified upper bound of ``||Θ||₂`` for a pointwise/dense weight, and the power vector.

    Runs the warm-start power method (paper, Thm 3) until ``||ΘᵀΘv − ρv|| <= eps·ρ`` and certifies its last
    iterate with :func:`rayleigh_bound`, the deflated bound coming from one exact eigendecomposition
    (:func:`exact_top_pair`) — the one-shot form of what the SN layers do incrementally. Returns
    ``(bound, v)``; ``bound >= ||Θ||₂`` always (float64 arithmetic, plus :func:`rounding_margin`).
    """
    a = connectivity_matrix(weight).detach().to(torch.float64)
    v, _ = power_iteration(a, v, eps=eps, max_iter=max_iter)
    lam1, lam2, v1 = exact_top_pair(a)
    c = exact_deflated(lam1, lam2, v1, v)
    w = a.t() @ (a @ v)
    rho = torch.dot(v, w)
    resid = torch.linalg.vector_norm(w - rho * v)
    mu = rayleigh_bound(rho, resid, c)
    return mu.clamp_min(0).sqrt() * rounding_margin(torch.float64, max(a.shape)), v
