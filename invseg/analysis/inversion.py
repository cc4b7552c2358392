"""Inversion error of invertible networks: reconstruction, per-block growth, condition, gradient error.

Memory-efficient training rebuilds every activation by inverting the blocks (see
:class:`invseg.blocks.InvertibleSequence`), so a network whose inverse is numerically unstable trains
on wrong activations and wrong gradients. Bounding each block's Lipschitz constant with spectral
normalization keeps the inverse stable (paper §1; Behrmann et al. 2020, "Understanding and mitigating
exploding inverses in invertible neural networks"). The checkers here measure it for a given network:

* :func:`reconstruction_error` -- ``||x - f^-1(f(x))|| / ||x||`` per sample (max and mean over the
  batch) for any module with ``forward`` / ``inverse`` (a block, an
  :class:`~invseg.blocks.InvertibleSequence`, an :class:`~invseg.nets.IUNet` core).
* :func:`block_error_growth` -- the same error for every prefix ``steps[:j]`` of a sequence
  (nested sequences flattened): how the error grows through the network.
* :func:`condition_estimate` -- local Lipschitz constants of ``f`` at ``x`` and of ``f^-1`` at
  ``y = f(x)`` (largest singular value of the Jacobian, power iteration on ``J^T J`` through
  autograd) and their product.
* :func:`gradient_error` -- parameter and input gradients of ``memory_efficient=True`` against
  plain backprop on identical weights.

**Precisions** (:data:`PRECISIONS`): ``"float64"`` (the reference) and ``"float32"`` run a deep copy
of the module cast with ``.to(dtype)`` on an input cast likewise. ``"bfloat16"`` and ``"float16"``
run a float32 copy under ``torch.autocast`` -- how mixed-precision training runs the network:
convolutions compute in the low precision, element-wise coupling arithmetic (``x1 + F(x2)``) stays
in float32 where the inputs are float32. ``"float16"`` needs a CUDA device (ValueError otherwise;
:func:`precision_available` tells). Errors are always computed in float64 against the (cast)
input, so they measure the inversion, not the rounding of the input. The caller's module is never
modified. Casting re-runs the spectral-normalization search of the copy (weights' ``_version``
moves); forward and inverse of one measurement always see the same normalized weights.

**The sweep** (:func:`run_inversion_sweep`, driven by ``scripts/inversion_error.py`` and
``configs/inversion_vs_K.yaml``): IUNets in 2D/3D with additive, affine and residual blocks, K over a
grid plus "no spectral normalization", at initialization, after a few Adam steps on a synthetic
segmentation task, under an adversarial weight scaling, and optionally from a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from invseg.blocks import (
    AdditiveCoupling,
    AffineCoupling,
    InvertibleModule,
    InvertibleResidual,
    InvertibleSequence,
    SNDSSubnet,
)
from invseg.utils import tensor_tuple
from invseg.layers import spectral_state_frozen, update_spectral_state

__all__ = [
    "PRECISIONS",
    "SETTINGS",
    "ReconstructionError",
    "StepError",
    "ConditionEstimate",
    "GradientError",
    "precision_available",
    "reconstruction_error",
    "block_error_growth",
    "condition_estimate",
    "gradient_error",
    "scale_subnet_weights",
    "synthetic_segmentation_batch",
    "SweepNetConfig",
    "InversionSweepConfig",
    "SweepResult",
    "run_inversion_sweep",
    "format_sweep_tables",
    "plot_sweep",
    "write_sweep",
]

#: Precisions the checkers run in (see the module docstring for how each is applied).
PRECISIONS = ("float64", "float32", "bfloat16", "float16")
#: Weight settings of the sweep: initial weights, after training steps, weights scaled up, a checkpoint.
SETTINGS = ("init", "trained", "adversarial", "checkpoint")

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconstructionError:
    """Relative reconstruction error ``||x_b - f^-1(f(x_b))|| / ||x_b||`` of each sample ``b``.

    Non-finite reconstructions (overflow, NaN) count as ``inf``.
    """

    max: float  # maximum over the batch
    mean: float  # mean over the batch
    per_sample: tuple[float, ...]  # one value per sample
    precision: str  # the precision measured in ("module" when run as given)


@dataclass(frozen=True)
class StepError:
    """Reconstruction error through the first ``depth`` steps of a sequence (see :func:`block_error_growth`)."""

    depth: int  # number of steps applied (1 .. len)
    step: str  # qualified name and type of the last step, e.g. "steps.0.steps.1 (InvertibleChannelMixing)"
    max: float  # maximum relative error over the batch
    mean: float  # mean relative error over the batch


@dataclass(frozen=True)
class ConditionEstimate:
    """Local Lipschitz constants (largest Jacobian singular values) of ``f`` at ``x`` and ``f^-1`` at ``f(x)``.

    Power iteration converges from below: each value is a lower bound of the local Jacobian norm,
    which is itself a lower bound of the global Lipschitz constant.
    """

    lip_forward: float  # ||J_f(x)||_2
    lip_inverse: float  # ||J_{f^-1}(f(x))||_2
    condition: float  # lip_forward * lip_inverse (>= 1 up to the estimate's accuracy)
    iterations: int  # power iterations run for each


@dataclass(frozen=True)
class GradientError:
    """Gradients of the memory-efficient backward against plain backprop on identical weights."""

    relative: float  # ||g_me - g_plain|| / ||g_plain|| over all parameters together
    max_tensor: float  # max over parameter tensors of the same ratio per tensor
    worst_tensor: str  # the parameter where max_tensor is reached
    input_relative: float | None  # same ratio for the input gradient (None for non-float inputs)
    num_tensors: int  # parameters compared


# --------------------------------------------------------------------------------------------
# Precision handling
# --------------------------------------------------------------------------------------------


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def precision_available(precision: str, device: torch.device | str = "cpu") -> bool:
    """Whether ``precision`` can be measured on ``device`` (float16 autocast needs CUDA)."""
    _check_precision(precision)
    device = torch.device(device)
    if precision == "float16":
        return device.type == "cuda"
    if precision == "bfloat16" and device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def _as_inputs(x: Tensor | Sequence[Tensor], name: str = "x") -> tuple[Tensor, ...]:
    xs = tensor_tuple(x)
    if not xs or not all(isinstance(t, Tensor) for t in xs):
        raise ValueError(f"{name} must be a tensor or a non-empty sequence of tensors, got {type(x).__name__}")
    return xs


def _device_of(xs: Sequence[Tensor]) -> torch.device:
    return xs[0].device


def _prepare(
    module: nn.Module, xs: tuple[Tensor, ...], precision: str | None
) -> tuple[nn.Module, tuple[Tensor, ...], Callable[[], contextlib.AbstractContextManager]]:
    """``(module_copy, inputs, autocast)`` for ``precision``: run forward passes under ``autocast()``.

    ``None`` runs the module as given (no copy, no cast, no autocast).
    """
    if precision is None:
        return module, xs, contextlib.nullcontext
    _check_precision(precision)
    device = _device_of(xs)
    if not precision_available(precision, device):
        raise ValueError(
            f"precision {precision!r} is not available on device {device.type!r} "
            f"(float16 autocast needs CUDA; bfloat16 needs a GPU that supports it)"
        )
    low = precision in ("bfloat16", "float16")
    dtype = torch.float32 if low else _DTYPES[precision]
    work = copy.deepcopy(module).to(dtype)
    cast = tuple(t.to(dtype) if t.is_floating_point() else t for t in xs)
    if low:
        return work, cast, lambda: torch.autocast(device.type, dtype=_DTYPES[precision])
    return work, cast, contextlib.nullcontext


def _relative_errors(ref: Sequence[Tensor], rec: Sequence[Tensor]) -> Tensor:
    """Per-sample ``||rec - ref|| / ||ref||`` over all tensors (dim 0 = batch), in float64; inf if non-finite."""
    if len(ref) != len(rec):
        raise ValueError(f"the inverse returned {len(rec)} tensors for {len(ref)} inputs")
    num = torch.zeros(ref[0].shape[0], dtype=torch.float64, device=ref[0].device)
    den = torch.zeros_like(num)
    for a, b in zip(ref, rec):
        a64, b64 = a.detach().double().flatten(1), b.detach().double().flatten(1)
        num += (b64 - a64).square().sum(1)
        den += a64.square().sum(1)
    err = num.sqrt() / den.sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))


def _summary(err: Tensor) -> tuple[float, float, tuple[float, ...]]:
    values = tuple(float(v) for v in err.cpu())
    return max(values), float(sum(values) / len(values)), values


def _check_invertible(module: nn.Module) -> None:
    if not isinstance(module, nn.Module) or not callable(getattr(module, "inverse", None)):
        raise ValueError(
            f"module must be an nn.Module with forward and inverse (an invertible block, an InvertibleSequence "
            f"or an IUNet's .core), got {type(module).__name__}"
        )


# --------------------------------------------------------------------------------------------
# Reconstruction error and its growth through the network
# --------------------------------------------------------------------------------------------


def reconstruction_error(
    module: nn.Module, x: Tensor | Sequence[Tensor], precision: str | None = "float32"
) -> ReconstructionError:
    """Relative reconstruction error ``||x - f^-1(f(x))|| / ||x||`` per sample, max and mean over the batch.

    Args:
        module: any module with ``forward`` and ``inverse`` (an :class:`~invseg.blocks.InvertibleModule`,
            an :class:`~invseg.blocks.InvertibleSequence`, ``IUNet(...).core``). Not modified.
        x: the input, a tensor ``(B, ...)`` or a tuple of tensors for multi-input modules (the error of
            sample ``b`` pools all tensors).
        precision: one of :data:`PRECISIONS` (a cast deep copy / autocast, see the module docstring), or
            ``None`` to run ``module`` exactly as given. Default ``"float32"``.

    Returns:
        :class:`ReconstructionError`; non-finite reconstructions count as ``inf``.

    Raises:
        ValueError: for a module without ``inverse``, a bad ``x`` or an unknown / unavailable precision.
        RuntimeError: from the module (e.g. an :class:`~invseg.blocks.InvertibleResidual` whose
            fixed-point inverse does not converge).
    """
    _check_invertible(module)
    xs = _as_inputs(x)
    work, inputs, autocast = _prepare(module, xs, precision)
    with torch.no_grad(), autocast():
        ys = tensor_tuple(work(*inputs))
        rec = tensor_tuple(work.inverse(*ys))
        err = _relative_errors(inputs, rec)
    mx, mean, per = _summary(err)
    return ReconstructionError(mx, mean, per, precision or "module")


def _flatten_steps(module: nn.Module) -> list[InvertibleModule]:
    if isinstance(module, InvertibleSequence):
        return [leaf for step in module.steps for leaf in _flatten_steps(step)]
    return [module]


def _run_stack(steps: Sequence[InvertibleModule], stack: list[Tensor], inverse: bool) -> list[Tensor]:
    """Apply steps to a stack of tensors (each consumes its inputs from the top), as InvertibleSequence does."""
    stack = list(stack)
    for step in steps:
        n = step.num_outputs if inverse else step.num_inputs
        args = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        stack.extend(tensor_tuple(step.inverse(*args) if inverse else step(*args)))
    return stack


def block_error_growth(
    module: nn.Module, x: Tensor | Sequence[Tensor], precision: str | None = "float32"
) -> list[StepError]:
    """Reconstruction error of every prefix of a sequence: how the inversion error grows with depth.

    Nested :class:`~invseg.blocks.InvertibleSequence` s are flattened into their leaf blocks (for an
    IUNet core: couplings, channel mixings, splits, resamplings, merges). For each depth ``j`` the
    input is pushed through ``steps[:j]`` and pulled back through their inverses; the error is
    measured against the input as in :func:`reconstruction_error`. Costs ``O(len**2)`` block
    evaluations (fine for analysis-sized networks). A single block gives one entry.

    Args:
        module: an invertible module (a sequence, or a single block).
        x: its input (tensor or tuple of tensors).
        precision: as in :func:`reconstruction_error`.

    Returns:
        One :class:`StepError` per depth ``1 .. len(steps)``.
    """
    _check_invertible(module)
    xs = _as_inputs(x)
    work, inputs, autocast = _prepare(module, xs, precision)
    with torch.no_grad(), autocast():
        steps = _flatten_steps(work)
        names = {id(m): name for name, m in work.named_modules()}
        states = [list(inputs)]  # stack after 0, 1, ..., n steps
        for step in steps:
            states.append(_run_stack([step], states[-1], inverse=False))
        out = []
        for j in range(1, len(steps) + 1):
            rec = _run_stack(list(reversed(steps[:j])), states[j], inverse=True)
            mx, mean, _ = _summary(_relative_errors(inputs, rec))
            last = steps[j - 1]
            out.append(StepError(j, f"{names.get(id(last)) or '<root>'} ({type(last).__name__})", mx, mean))
    return out


# --------------------------------------------------------------------------------------------
# Condition estimate (power iteration through autograd)
# --------------------------------------------------------------------------------------------


def _unroll_steps(q: float, tol: float) -> int:
    """Terms of the Neumann series of ``(I + J_g)^-1`` so that the rest is within ``tol`` (``||J_g|| <= q < 1``)."""
    q = min(max(q, 1e-3), 0.999)
    return max(1, math.ceil(math.log(tol * (1.0 - q)) / math.log(q)))


def _inverse_with_grad(module: nn.Module, ys: tuple[Tensor, ...], unroll_tol: float) -> tuple[Tensor, ...]:
    """``module.inverse`` with a graph to its inputs, also for blocks whose inverse runs without grad.

    :class:`~invseg.blocks.InvertibleResidual` inverts by a no-grad fixed-point iteration; here its
    converged result ``x*`` is refined by ``n`` differentiable steps ``x <- y - g(x)``. All of them
    evaluate ``g`` at ``x*``, so the derivative is the Neumann series of ``(I + J_g(x*))^-1``
    truncated after ``n`` terms, with relative error ``<= q**n / (1 - q)`` for ``q = ||J_g(x*)||``.
    ``q`` is estimated by a few power iterations (times 1.1 for safety, capped by the block's ``K``),
    and ``n`` chosen for ``unroll_tol``: the local contraction is usually far below ``K``.
    """
    if isinstance(module, InvertibleSequence):
        return tuple(_inverse_with_grad_stack(list(module.steps), list(ys), unroll_tol))
    if isinstance(module, InvertibleResidual):
        (y,) = ys
        with torch.no_grad():
            x_star = module.inverse(y)
        q = _jacobian_norm(lambda t: (module.g(t[0]),), (x_star,), 8, torch.Generator().manual_seed(0))
        x = x_star
        for _ in range(_unroll_steps(min(1.1 * q, module.K), unroll_tol)):
            x = y - module.g(x)
        return (x,)
    return tensor_tuple(module.inverse(*ys))


def _inverse_with_grad_stack(steps: list[nn.Module], stack: list[Tensor], unroll_tol: float) -> list[Tensor]:
    for step in reversed(steps):
        n = step.num_outputs
        args = tuple(stack[len(stack) - n :])
        del stack[len(stack) - n :]
        stack.extend(_inverse_with_grad(step, args, unroll_tol))
    return stack


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((u * v).sum() for u, v in zip(a, b))


def _jacobian_norm(
    fn: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]],
    xs: tuple[Tensor, ...],
    iterations: int,
    generator: torch.Generator,
) -> float:
    """Largest singular value of the Jacobian of ``fn`` at ``xs`` by power iteration on ``J^T J``.

    ``J^T u`` is one backward pass; ``J v`` is the derivative of ``J^T u`` with respect to ``u``
    (double-backward trick), so one graph built once serves all iterations.
    """
    leaves = tuple(t.detach().clone().requires_grad_() for t in xs)
    with torch.enable_grad():
        ys = fn(leaves)
        us = tuple(torch.zeros_like(y, requires_grad=True) for y in ys)
        jt_u = torch.autograd.grad(ys, leaves, us, create_graph=True, allow_unused=True)
        jt_u = tuple(torch.zeros_like(l) if g is None else g for g, l in zip(jt_u, leaves))
        v = tuple(torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t) for t in leaves)
        sigma2 = torch.zeros((), dtype=torch.float64)
        for _ in range(iterations):
            nrm = _dot(v, v).sqrt()
            if not (torch.isfinite(nrm) and nrm > 0):
                return math.inf if not torch.isfinite(nrm) else 0.0
            v = tuple(t / nrm for t in v)
            jv = torch.autograd.grad(jt_u, us, v, retain_graph=True, allow_unused=True)
            jv = tuple(torch.zeros_like(u) if g is None else g for g, u in zip(jv, us))
            jtjv = torch.autograd.grad(ys, leaves, jv, retain_graph=True, allow_unused=True)
            jtjv = tuple(torch.zeros_like(l) if g is None else g for g, l in zip(jtjv, leaves))
            sigma2 = _dot(v, jtjv).double()  # Rayleigh quotient ||J v||^2 of the unit vector v
            v = tuple(t.detach() for t in jtjv)
    value = float(sigma2.clamp_min(0).sqrt())
    return value if math.isfinite(value) else math.inf


def _plain_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    work = copy.deepcopy(module).to(dtype)
    for m in work.modules():  # double backward needs plain autograd (the memory-efficient one is once-differentiable)
        if isinstance(m, InvertibleSequence):
            m.memory_efficient = False
    work.requires_grad_(False)
    return work


def condition_estimate(
    module: nn.Module,
    x: Tensor | Sequence[Tensor],
    iterations: int = 20,
    precision: str = "float64",
    seed: int = 0,
    unroll_tol: float = 1e-3,
) -> ConditionEstimate:
    """Local Lipschitz constants of ``f`` at ``x`` and of ``f^-1`` at ``y = f(x)``, and their product.

    Power iteration on ``J^T J`` through autograd (``J v`` by double backward) from a seeded random
    start, ``iterations`` times for each; the values converge from below (lower bounds of the local
    Jacobian norms). Runs on a copy cast to ``precision`` (float64 or float32) with plain autograd and
    frozen spectral state. For :class:`~invseg.blocks.InvertibleResidual` blocks, whose inverse is a
    no-grad fixed-point iteration, the inverse's Jacobian is the Neumann series of ``(I + J_g)^-1``
    truncated at relative accuracy ``unroll_tol``.

    Cost: one forward + inverse graph per estimate and ``2 * iterations`` backward passes (three
    times that for double backward) -- meant for analysis-sized inputs.

    Args:
        module: an invertible module (as for :func:`reconstruction_error`). Not modified.
        x: its input (a tensor or a tuple of tensors).
        iterations: power iterations (>= 1). Default 20.
        precision: ``"float64"`` (default) or ``"float32"``.
        seed: seed of the random start vector.
        unroll_tol: accuracy of the residual blocks' inverse Jacobian (in (0, 1)). Default 1e-3.

    Raises:
        ValueError: for bad arguments (naming them).
    """
    _check_invertible(module)
    xs = _as_inputs(x)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if precision not in ("float64", "float32"):
        raise ValueError(f"precision must be 'float64' or 'float32' for the condition estimate, got {precision!r}")
    if not 0 < unroll_tol < 1:
        raise ValueError(f"unroll_tol must be in (0, 1), got {unroll_tol}")
    dtype = _DTYPES[precision]
    work = _plain_copy(module, dtype)
    inputs = tuple(t.detach().to(dtype) for t in xs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the copy's spectral state follows its weights (as in every forward), then freezes
        ys = tensor_tuple(work(*inputs))
    with spectral_state_frozen(work):
        lip_f = _jacobian_norm(lambda t: tensor_tuple(work(*t)), inputs, iterations, gen)
        lip_inv = _jacobian_norm(lambda t: _inverse_with_grad(work, t, unroll_tol), ys, iterations, gen)
    cond = lip_f * lip_inv if math.isfinite(lip_f) and math.isfinite(lip_inv) else math.inf
    return ConditionEstimate(lip_f, lip_inv, cond, iterations)


# --------------------------------------------------------------------------------------------
# Gradient error of the memory-efficient backward
# --------------------------------------------------------------------------------------------


def _default_loss(out: Tensor | tuple[Tensor, ...]) -> Tensor:
    """A fixed random projection of the output (seeded by shape): every output entry matters."""
    outs = tensor_tuple(out)
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for o in outs:
        w = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, torch.float32)
        total = total + (o.float() * w).sum() / o.numel()
    return total


def _gradients(model: nn.Module, xs: tuple[Tensor, ...], loss_fn, autocast) -> tuple[dict[str, Tensor], Tensor | None]:
    model.zero_grad(set_to_none=True)
    leaves = tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in xs)
    with autocast():  # forward and loss under autocast, backward outside (as torch.amp recommends)
        loss = loss_fn(model(*leaves))
    loss.backward()
    grads = {
        n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    gx = leaves[0].grad if leaves[0].is_floating_point() else None
    return grads, None if gx is None else gx.detach().clone()


def _ratio(diff2: float, ref2: float) -> float:
    if ref2 == 0.0:
        return 0.0 if diff2 == 0.0 else math.inf
    return math.sqrt(diff2 / ref2)


def gradient_error(
    model_or_factory: nn.Module | Callable[[], nn.Module],
    x: Tensor | Sequence[Tensor],
    loss_fn: Callable[[Any], Tensor] | None = None,
    precision: str = "float32",
) -> GradientError:
    """Relative error of the memory-efficient gradients against plain backprop on identical weights.

    Two deep copies of the model (the same weights and spectral state) are cast to ``precision``; one
    runs with ``memory_efficient=True`` (activations rebuilt by inversion in backward), the other with
    ``memory_efficient=False``; both compute ``loss_fn(model(*x)).backward()``. Reported:
    ``||g_me - g_plain|| / ||g_plain||`` over all trainable parameters together, the maximum of the same
    ratio per parameter tensor (and which tensor), and the ratio for the gradient of the first input.

    Args:
        model_or_factory: a model with a settable ``memory_efficient`` attribute (``IUNet``,
            :class:`~invseg.blocks.InvertibleSequence`), or a zero-argument callable building one
            (called once; the two runs use copies of that one model). Not modified.
        x: the input (tensor or tuple of tensors).
        loss_fn: ``output -> scalar``; default a fixed random projection of the output.
        precision: one of :data:`PRECISIONS`. Default ``"float32"``.

    Raises:
        ValueError: when the model has no ``memory_efficient`` attribute, or for a bad precision / input.
    """
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else None
    if model is None:
        if not callable(model_or_factory):
            raise ValueError(
                f"model_or_factory must be an nn.Module or a callable, got {type(model_or_factory).__name__}"
            )
        model = model_or_factory()
    if not isinstance(model, nn.Module) or not hasattr(model, "memory_efficient"):
        raise ValueError(
            f"the model must be an nn.Module with a settable memory_efficient attribute (IUNet, InvertibleSequence), "
            f"got {type(model).__name__}"
        )
    xs = _as_inputs(x)
    loss_fn = _default_loss if loss_fn is None else loss_fn
    _check_precision(precision)
    results = []
    for me in (True, False):
        work, inputs, autocast = _prepare(model, xs, precision)
        work.memory_efficient = me
        with torch.enable_grad():
            results.append(_gradients(work, inputs, loss_fn, autocast))
    (g_me, x_me), (g_pl, x_pl) = results
    d2_total = r2_total = 0.0
    worst, worst_name = 0.0, ""
    for name, gp in g_pl.items():
        gm = g_me[name]
        d2 = float((gm.double() - gp.double()).square().sum())
        r2 = float(gp.double().square().sum())
        d2_total += d2
        r2_total += r2
        rel = _ratio(d2, r2)
        if rel > worst or not worst_name:
            worst, worst_name = rel, name
    inp = None
    if x_me is not None and x_pl is not None:
        inp = _ratio(float((x_me.double() - x_pl.double()).square().sum()), float(x_pl.double().square().sum()))
    return GradientError(_ratio(d2_total, r2_total), worst, worst_name, inp, len(g_pl))


# --------------------------------------------------------------------------------------------
# Weight settings
# --------------------------------------------------------------------------------------------


def _subnets(module: nn.Module) -> list[nn.Module]:
    out = []
    for m in module.modules():
        if isinstance(m, (AdditiveCoupling, AffineCoupling)):
            out.append(m.subnet)
        elif isinstance(m, InvertibleResidual):
            out.append(m.g)
    return out


@torch.no_grad()
def scale_subnet_weights(module: nn.Module, factor: float) -> int:
    """Multiply every conv / linear weight of the blocks' sub-networks by ``factor``, in place.

    The sub-networks are the couplings' ``subnet`` and the residual blocks' ``g``; biases, soft-scaling
    parameters and the orthogonal mixing / resampling are left alone. The spectral state is then updated
    (:func:`~invseg.layers.update_spectral_state`, as after an optimizer step), so with spectral normalization
    the network is unchanged up to rounding; without it every sub-network's Lipschitz constant grows by
    ``factor ** (number of weight layers in the chain)``: the adversarial setting of the sweep.

    Returns:
        The number of weight tensors scaled.

    Raises:
        ValueError: for a non-finite or non-positive ``factor``, or a module without coupling /
            residual blocks.
    """
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a positive finite number, got {factor!r}")
    subnets = _subnets(module)
    if not subnets:
        raise ValueError(
            f"{type(module).__name__} has no coupling or residual blocks whose sub-networks could be scaled"
        )
    count = 0
    for sub in subnets:
        for name, p in sub.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight" or (leaf == "original" and ".weight." in f".{name}"):
                p.mul_(factor)
                count += 1
    update_spectral_state(module)
    return count


def synthetic_segmentation_batch(
    spatial_dims: int,
    size: int,
    batch_size: int = 2,
    in_channels: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """A small in-memory segmentation batch: one ball per sample in noise.

    Returns:
        ``(image, label)``: ``(B, in_channels, *[size]*d)`` float32 (ball intensity ``1 + 0.5 c`` in
        channel ``c`` plus unit Gaussian noise) and ``(B, 1, *[size]*d)`` int64 labels in {0, 1}.
    """
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    for name, value in (("size", size), ("batch_size", batch_size), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    grid = torch.stack(torch.meshgrid(*([axis] * spatial_dims), indexing="ij"))  # (d, *N)
    centers = (torch.rand(batch_size, spatial_dims, generator=gen) - 0.5) * 0.8
    radii = 0.25 + 0.25 * torch.rand(batch_size, generator=gen)
    shape = (batch_size, spatial_dims) + (1,) * spatial_dims
    dist = (grid.unsqueeze(0) - centers.reshape(shape)).square().sum(1).sqrt()  # (B, *N)
    label = (dist < radii.reshape((batch_size,) + (1,) * spatial_dims)).unsqueeze(1)  # (B, 1, *N)
    gains = 1.0 + 0.5 * torch.arange(in_channels, dtype=torch.float32).reshape((1, in_channels) + (1,) * spatial_dims)
    noise = torch.randn((batch_size, in_channels) + (size,) * spatial_dims, generator=gen)
    image = label.float() * gains + noise
    return image.to(device), label.long().to(device)


# --------------------------------------------------------------------------------------------
# The inversion-error-vs-K sweep
# --------------------------------------------------------------------------------------------


@dataclass
class SweepNetConfig:
    """The IUNet of one dimensionality in the sweep."""

    channels: list[int] = field(default_factory=lambda: [8, 16])  # channels per level (see IUNet)
    num_blocks: int = 2  # blocks per level and path
    size: int = 32  # spatial size per axis of the input (a multiple of 2**(levels - 1))


@dataclass
class InversionSweepConfig:
    """Grid and settings of the inversion-error-vs-K sweep (``configs/inversion_vs_K.yaml``)."""

    Ks: list[float] = field(default_factory=lambda: [0.5, 0.9, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0])  # Lipschitz bounds
    no_sn: bool = True  # also measure the network without spectral normalization (sn_method "none")
    couplings: list[str] = field(default_factory=lambda: ["additive", "affine", "residual"])  # residual: K < 1 only
    spatial_dims: list[int] = field(default_factory=lambda: [2, 3])  # dimensionalities
    net2d: SweepNetConfig = field(default_factory=SweepNetConfig)  # the 2D IUNet
    net3d: SweepNetConfig = field(default_factory=lambda: SweepNetConfig([4, 16], 1, 16))  # the 3D IUNet
    settings: list[str] = field(default_factory=lambda: ["init", "trained", "adversarial"])  # weight settings
    precisions: list[str] = field(default_factory=lambda: ["float64", "float32", "bfloat16", "float16"])  # fp16: CUDA
    batch_size: int = 2  # samples of the synthetic batch
    in_channels: int = 1  # image channels of the synthetic task
    num_classes: int = 2  # classes (logits) of the synthetic task
    seed: int = 0  # seed of the weights and of the synthetic batch (same weights for every K)
    train_steps: int = 20  # "trained": Adam steps on the synthetic batch (DiceCE loss)
    train_lr: float = 0.01  # "trained": Adam learning rate (high, so that the weights grow)
    adversarial_factor: float = 4.0  # "adversarial": factor on every sub-network conv weight
    power_iterations: int = 6  # condition estimate: power iterations (float64; a lower bound, ~10 % below 30 its)
    growth_precisions: list[str] = field(default_factory=lambda: ["float32"])  # per-block error growth in these
    gradient_check: bool = True  # measure the memory-efficient gradient error (float32)
    residual_tol: float = 1.0e-6  # fixed-point tolerance of residual blocks (their error floor)
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    threads: int = 1  # torch CPU threads set by the script (1 is fastest on a shared small machine)
    output_dir: str = "outputs/inversion_error"  # where JSON / CSV / PNG / tables go


@dataclass
class SweepResult:
    """Rows of the sweep (one per network x setting x precision) and what was skipped."""

    rows: list[dict[str, Any]]  # see run_inversion_sweep for the keys
    skipped: list[str]  # e.g. "float16: needs CUDA"
    meta: dict[str, Any]  # machine, versions, config, duration


def _check_sweep_config(cfg: InversionSweepConfig) -> None:
    from invseg.nets.iunet import COUPLINGS

    if not cfg.Ks or any(not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0) for k in cfg.Ks):
        raise ValueError(f"Ks must be a non-empty list of positive numbers, got {cfg.Ks}")
    for c in cfg.couplings:
        if c not in COUPLINGS:
            raise ValueError(f"couplings entries must be in {COUPLINGS}, got {c!r}")
    for d in cfg.spatial_dims:
        if d not in (2, 3):
            raise ValueError(f"spatial_dims entries must be 2 or 3, got {d!r}")
    for s in cfg.settings:
        if s not in ("init", "trained", "adversarial"):
            raise ValueError(f"settings entries must be 'init', 'trained' or 'adversarial', got {s!r}")
    for p in list(cfg.precisions) + list(cfg.growth_precisions):
        _check_precision(p)
    for key in ("batch_size", "in_channels", "num_classes", "power_iterations", "threads"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.train_steps < 0:
        raise ValueError(f"train_steps must be >= 0, got {cfg.train_steps}")
    if not cfg.train_lr > 0 or not cfg.adversarial_factor > 0:
        raise ValueError(f"train_lr and adversarial_factor must be > 0, got {cfg.train_lr}, {cfg.adversarial_factor}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {cfg.device!r}")


def _sweep_cases(cfg: InversionSweepConfig) -> list[tuple[str, float | None]]:
    """``(coupling, K)`` pairs; ``K=None`` means no spectral normalization (not for residual blocks)."""
    cases = []
    for c in cfg.couplings:
        for k in cfg.Ks:
            if c == "residual" and not k < 1:
                continue
            cases.append((c, float(k)))
        if cfg.no_sn and c != "residual":
            cases.append((c, None))
    return cases


def _seg_loss():
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


def _train_steps(model: nn.Module, image: Tensor, label: Tensor, steps: int, lr: float) -> str:
    """Adam steps with plain backprop on one batch; spectral state updated after each step. Returns a note."""
    from invseg.layers import SpectralUpdater
    from invseg.train.runner import NonFiniteLossError, check_finite
    from invseg.train.step import train_step

    loss_fn = _seg_loss()  # DiceCE on softmax logits vs integer labels (B, 1, *N)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    updater = SpectralUpdater(model)
    memory_efficient = model.memory_efficient
    model.memory_efficient = False  # train on exact activations: the measurement comes afterwards
    model.train()
    note = ""
    try:
        for step in range(steps):
            try:
                train_step(model, image, label, loss_fn, opt, updater=updater,
                           check=lambda v, step=step: check_finite(v, step))
            except NonFiniteLossError:
                note = f"training loss non-finite at step {step}; stopped there"
                break
    finally:
        model.memory_efficient = memory_efficient
    return note


def _max_weight_norm(module: nn.Module) -> float:
    norms = [float(p.detach().double().norm()) for sub in _subnets(module) for n, p in sub.named_parameters()
             if n.endswith("weight") or n.endswith("original")]
    return max(norms) if norms else 0.0


def _measure(
    model: nn.Module,
    image: Tensor,
    label: Tensor,
    cfg: InversionSweepConfig,
    precisions: list[str],
    base: dict[str, Any],
) -> list[dict[str, Any]]:
    """All rows of one network in one setting."""
    with torch.no_grad():
        h = model.input_layer(image)  # (B, channels[0], *N): the core's input
    rows = []
    common: dict[str, Any] = dict(base)
    common["subnet_weight_norm_max"] = _max_weight_norm(model.core)
    try:
        c = condition_estimate(model.core, h, iterations=cfg.power_iterations)
        common.update(lip_forward=c.lip_forward, lip_inverse=c.lip_inverse, condition=c.condition)
    except RuntimeError as e:  # residual inverse not converging
        common.update(lip_forward=math.nan, lip_inverse=math.nan, condition=math.nan)
        common["note"] = (common.get("note", "") + f" condition: {e}").strip()
    if cfg.gradient_check:
        loss_fn = _seg_loss()
        try:
            g = gradient_error(model, image, lambda out: loss_fn(out, label), "float32")
            common.update(grad_rel_err=g.relative, grad_max_tensor_rel_err=g.max_tensor)
        except RuntimeError as e:
            common.update(grad_rel_err=math.nan, grad_max_tensor_rel_err=math.nan)
            common["note"] = (common.get("note", "") + f" gradient: {e}").strip()
    for p in precisions:
        row = dict(common, precision=p)
        try:
            r = reconstruction_error(model.core, h, p)
            row.update(max_rel_err=r.max, mean_rel_err=r.mean)
            if p in cfg.growth_precisions:
                row["per_block"] = [e.max for e in block_error_growth(model.core, h, p)]
        except RuntimeError as e:
            row.update(max_rel_err=math.inf, mean_rel_err=math.inf)
            row["note"] = (row.get("note", "") + f" {p}: {e}").strip()
        rows.append(row)
    return rows


def run_inversion_sweep(
    cfg: InversionSweepConfig,
    checkpoint_model: nn.Module | None = None,
    checkpoint_name: str = "checkpoint",
    progress: bool = True,
) -> SweepResult:
    """Measure inversion error vs K for the grid of ``cfg`` (and optionally a trained checkpoint).

    For each dimensionality, coupling and K (plus "no SN", ``K=None``, for couplings), an IUNet is built
    with the same seed (hence the same raw weights for every K) and measured in each setting:

    * ``"init"``: the initial weights;
    * ``"trained"``: after ``train_steps`` Adam steps (lr ``train_lr``, plain backprop, DiceCE loss,
      spectral state updated after each step) on a synthetic segmentation batch;
    * ``"adversarial"``: the initial weights with every sub-network conv weight multiplied by
      ``adversarial_factor`` (:func:`scale_subnet_weights`): spectral normalization undoes it,
      without it the blocks' Lipschitz constants explode;
    * ``"checkpoint"``: ``checkpoint_model`` (an IUNet, e.g. from ``invseg.train.seg.load_seg_checkpoint``)
      as loaded.

    Each (network, setting) gives one row per precision with keys ``dims, coupling, K`` (None: no SN),
    ``sn, setting, precision, max_rel_err, mean_rel_err``, ``per_block`` (max error of each prefix of
    the core, see :func:`block_error_growth`; for the precisions in ``growth_precisions``),
    ``lip_forward, lip_inverse, condition`` (float64, of the core at its input),
    ``grad_rel_err, grad_max_tensor_rel_err`` (float32, memory-efficient vs plain, whole network with
    the DiceCE loss), ``subnet_weight_norm_max`` and ``note``. The core's input is
    ``model.input_layer(image)`` of the synthetic batch.

    The global RNG is left as it was (the sweep seeds inside ``torch.random.fork_rng``).
    """
    from invseg.nets import IUNet

    _check_sweep_config(cfg)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA device is available")
    precisions = [p for p in cfg.precisions if precision_available(p, device)]
    skipped = [f"{p}: not available on {device.type} (float16 autocast needs CUDA)"
               for p in cfg.precisions if p not in precisions]
    cases = _sweep_cases(cfg)
    jobs = [(d, c, k, s) for d in cfg.spatial_dims for c, k in cases for s in cfg.settings]
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=len(jobs) + (checkpoint_model is not None), desc="inversion sweep", disable=not progress)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for d in cfg.spatial_dims:
            net = cfg.net2d if d == 2 else cfg.net3d
            image, label = synthetic_segmentation_batch(d, net.size, cfg.batch_size, cfg.in_channels, cfg.seed, device)
            for coupling, K in cases:
                torch.manual_seed(cfg.seed)
                model = IUNet(
                    d, cfg.in_channels, cfg.num_classes, channels=list(net.channels), num_blocks=net.num_blocks,
                    coupling=coupling, K=1.0 if K is None else K, sn_method="none" if K is None else "fft",
                    memory_efficient=True, residual_tol=cfg.residual_tol,
                ).to(device)
                for setting in cfg.settings:
                    work = copy.deepcopy(model)
                    note = ""
                    if setting == "trained":
                        note = _train_steps(work, image, label, cfg.train_steps, cfg.train_lr)
                    elif setting == "adversarial":
                        scale_subnet_weights(work, cfg.adversarial_factor)
                    base = dict(dims=d, coupling=coupling, K=K, sn="none" if K is None else "fft",
                                setting=setting, note=note)
                    rows += _measure(work, image, label, cfg, precisions, base)
                    bar.set_postfix_str(f"{d}D {coupling} K={'none' if K is None else K} {setting}")
                    bar.update()
        if checkpoint_model is not None:
            model = checkpoint_model.to(device)
            d = int(model.spatial_dims)
            net = cfg.net2d if d == 2 else cfg.net3d
            image, label = synthetic_segmentation_batch(d, net.size, cfg.batch_size, int(model.in_channels),
                                                        cfg.seed, device)
            label = label.clamp_max(int(model.out_channels) - 1)
            sn_method = _sn_method_of(model)
            base = dict(dims=d, coupling=model.coupling, K=None if sn_method == "none" else _K_of(model),
                        sn=sn_method, setting=checkpoint_name, note="")
            rows += _measure(model, image, label, cfg, precisions, base)
            bar.update()
    bar.close()
    meta = {
        "machine": _machine(device),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 1),
        "precisions": precisions,
        "config": asdict(cfg),
    }
    return SweepResult(rows, skipped, meta)


def _sn_method_of(model: nn.Module) -> str:
    from invseg.layers import spectral_layers

    layers = spectral_layers(model.core)
    return layers[0].method if layers else "none"


def _K_of(model: nn.Module) -> float | None:
    """The sub-networks' Lipschitz bound K of an IUNet (None when it has no sub-networks)."""
    for m in model.core.modules():
        if isinstance(m, (SNDSSubnet, InvertibleResidual)):
            return float(m.K)
    return None


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    cpus = os.cpu_count()
    return f"{platform.processor() or platform.machine()} CPU, {cpus} cores ({platform.system()})"


# --------------------------------------------------------------------------------------------
# Tables, files and the plot
# --------------------------------------------------------------------------------------------


def _k_label(k: float | None) -> str:
    return "none" if k is None else f"{k:g}"


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf"
    return f"{v:.1e}"


def _pivot(rows, key_fn, value_key, columns) -> list[tuple[tuple, dict[str, float]]]:
    table: dict[tuple, dict[str, float]] = {}
    for r in rows:
        table.setdefault(key_fn(r), {})[_k_label(r["K"])] = r.get(value_key)
    return list(table.items())


def format_sweep_tables(result: SweepResult) -> str:
    """Markdown tables: max relative reconstruction error per precision, condition and gradient error vs K."""
    rows = result.rows
    ks = []
    for r in rows:
        label = _k_label(r["K"])
        if label not in ks:
            ks.append(label)
    ks.sort(key=lambda s: math.inf if s == "none" else float(s))
    head = "| " + " | ".join(ks) + " |"
    sep = "|" + "---|" * len(ks)
    out = [f"Machine: {result.meta['machine']}, device {result.meta['device']}, torch {result.meta['torch']}, "
           f"{result.meta['threads']} thread(s); {result.meta['seconds']} s."]
    if result.skipped:
        out.append("Skipped: " + "; ".join(result.skipped) + ".")
    out += ["", "**Max relative reconstruction error ||x - f^-1(f(x))|| / ||x|| of the core** (K = none: no SN)", "",
            "| dims | setting | coupling | precision " + head, "|---|---|---|---" + sep]
    for key, vals in _pivot(rows, lambda r: (r["dims"], r["setting"], r["coupling"], r["precision"]),
                            "max_rel_err", ks):
        cells = " | ".join(_fmt(vals.get(k)) for k in ks)
        out.append(f"| {key[0]}D | {key[1]} | {key[2]} | {key[3]} | {cells} |")
    once = [r for r in rows if r["precision"] == rows[0]["precision"]]
    out += ["", "**Condition estimate Lip(f) * Lip(f^-1) of the core at the input** (float64, power iteration)", "",
            "| dims | setting | coupling " + head, "|---|---|---" + sep]
    for key, vals in _pivot(once, lambda r: (r["dims"], r["setting"], r["coupling"]), "condition", ks):
        out.append(f"| {key[0]}D | {key[1]} | {key[2]} | " + " | ".join(_fmt(vals.get(k)) for k in ks) + " |")
    if any("grad_rel_err" in r for r in once):
        out += ["", "**Relative gradient error, memory-efficient vs plain backprop** (float32, all parameters)", "",
                "| dims | setting | coupling " + head, "|---|---|---" + sep]
        for key, vals in _pivot(once, lambda r: (r["dims"], r["setting"], r["coupling"]), "grad_rel_err", ks):
            out.append(f"| {key[0]}D | {key[1]} | {key[2]} | " + " | ".join(_fmt(vals.get(k)) for k in ks) + " |")
    notes = sorted({f"{r['dims']}D {r['setting']} {r['coupling']} K={_k_label(r['K'])}: {r['note']}"
                    for r in rows if r.get("note")})
    if notes:
        out += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(out)


_CSV_KEYS = ("dims", "setting", "coupling", "K", "sn", "precision", "max_rel_err", "mean_rel_err", "lip_forward",
             "lip_inverse", "condition", "grad_rel_err", "grad_max_tensor_rel_err", "subnet_weight_norm_max", "note")


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """Log max relative error vs K (log2 axis; "no SN" as a separate marker at the right).

    One panel per (dims, setting), one line per coupling x precision (colour: coupling, line style:
    precision). Non-finite errors are drawn at the top edge with an "x"; exact zeros at 1e-17.
    Drawn with ``Figure`` + ``FigureCanvasAgg`` (no global backend switch).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result.rows
    panels = sorted({(r["dims"], r["setting"]) for r in rows}, key=lambda p: (p[0], _setting_order(p[1])))
    dims = sorted({p[0] for p in panels})
    settings = sorted({p[1] for p in panels}, key=_setting_order)
    ks = sorted({r["K"] for r in rows if r["K"] is not None})
    k_none = (max(ks) * 4) if ks else 1.0  # x position of "no SN"
    fig = Figure(figsize=(4.2 * len(settings), 3.4 * len(dims)), constrained_layout=True)
    FigureCanvasAgg(fig)
    colors = {"additive": "tab:blue", "affine": "tab:orange", "residual": "tab:green"}
    styles = {"float64": "-", "float32": "--", "bfloat16": ":", "float16": "-."}
    top, floor = 1e2, 1e-17
    for i, d in enumerate(dims):
        for j, s in enumerate(settings):
            ax = fig.add_subplot(len(dims), len(settings), i * len(settings) + j + 1)
            sel = [r for r in rows if r["dims"] == d and r["setting"] == s]
            for coupling in sorted({r["coupling"] for r in sel}):
                for prec in [p for p in styles if any(r["precision"] == p for r in sel)]:
                    pts = sorted(((r["K"], r["max_rel_err"]) for r in sel if r["coupling"] == coupling
                                  and r["precision"] == prec and r["K"] is not None), key=lambda t: t[0])
                    color, ls = colors.get(coupling, "k"), styles[prec]
                    if pts:
                        xs = [p[0] for p in pts]
                        ys = [min(max(p[1], floor), top) for p in pts]
                        ax.plot(xs, ys, ls, color=color, marker="o", ms=3, label=f"{coupling} {prec}")
                        for x, y0 in pts:
                            if not math.isfinite(y0):
                                ax.plot([x], [top], "x", color=color, ms=7)
                    for r in sel:
                        if r["coupling"] == coupling and r["precision"] == prec and r["K"] is None:
                            y0 = r["max_rel_err"]
                            ax.plot([k_none], [min(max(y0, floor), top)], "s" if math.isfinite(y0) else "x",
                                    color=color, ms=6, mfc="none")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ticks = ks + ([k_none] if any(r["K"] is None for r in sel) else [])
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{k:g}" for k in ks] + (["no SN"] if len(ticks) > len(ks) else []), fontsize=7,
                               rotation=45)
            ax.set_xlabel("K (Lipschitz bound per sub-network)")
            ax.set_ylabel("max relative error")
            ax.set_title(f"{d}D, {s}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
    handles, labels = {}, []
    for ax in fig.axes:  # one legend for all panels (coupling: colour, precision: line style)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="outside right upper", fontsize=7,
                   title="coupling, precision\n(square: no SN,\nx: non-finite)", title_fontsize=7)
    fig.suptitle(f"Inversion error of the IUNet core vs K ({result.meta['machine']}, {result.meta['device']})",
                 fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _setting_order(s: str) -> int:
    return SETTINGS.index(s) if s in SETTINGS else len(SETTINGS)


def write_sweep(result: SweepResult, output_dir: str | Path) -> dict[str, Path]:
    """Write ``inversion_error.json`` (rows incl. per-block growth, meta), ``.csv``, ``.md`` (tables) and ``.png``.

    Returns:
        ``{"json", "csv", "md", "png"}`` -> paths.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "inversion_error.json", "csv": out / "inversion_error.csv",
             "md": out / "inversion_error.md", "png": out / "inversion_error.png"}
    payload = {"meta": result.meta, "skipped": result.skipped, "rows": result.rows}
    paths["json"].write_text(json.dumps(_json_safe(payload), indent=1))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(_CSV_KEYS), extrasaction="ignore")
    writer.writeheader()
    for r in result.rows:
        writer.writerow({k: ("none" if k == "K" and r.get(k) is None else r.get(k, "")) for k in _CSV_KEYS})
    paths["csv"].write_text(buf.getvalue())
    paths["md"].write_text(format_sweep_tables(result) + "\n")
    plot_sweep(result, paths["png"])
    return paths
