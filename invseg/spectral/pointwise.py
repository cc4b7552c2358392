"""Spectral norm of pointwise convolutions and dense layers (paper, Thm 3; DESIGN §1c).

A pointwise conv (any number of spatial dims, any stride) has the operator norm of its ``Cout × Cin``
connectivity matrix Θ, so a warm-start power method on Θ needs one vector of ``Cin`` floats as state,
independent of the input size. The same holds for ``nn.Linear``.
"""

from __future__ import annotations

import torch

__all__ = ["connectivity_matrix", "power_iteration", "pointwise_norm", "pointwise_norm_exact"]


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
