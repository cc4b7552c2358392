"""Checkers of invertible networks: reconstruction error, its growth per block, condition, gradient error.

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
* :func:`scale_subnet_weights` -- the adversarial weight setting (sub-network weights scaled up, then the
  spectral update), under which spectral normalization must keep the inverse stable.

The segmentation trainer's invertibility guard calls :func:`reconstruction_error`; the inversion-error
sweep (:mod:`invseg.experiments.inversion`) calls all of them.

**Precisions** (:data:`invseg.utils.CHECK_PRECISIONS`, the trainers' names plus ``"fp64"``): ``"fp64"``
(the reference) and ``"fp32"`` run a deep copy of the module cast to float64 / float32 on an input cast
likewise. ``"bf16"`` and ``"fp16"`` run a float32 copy under ``torch.autocast`` -- how mixed-precision
training (``train.precision``) runs the network: convolutions compute in the low precision, element-wise
coupling arithmetic (``x1 + F(x2)``) stays in float32 where the inputs are float32. ``"fp16"`` needs a
CUDA device (ValueError otherwise;
:func:`precision_available` tells). Errors are always computed in float64 against the (cast)
input, so they measure the inversion, not the rounding of the input. The caller's module is never
modified. Casting re-runs the spectral-normalization search of the copy (weights' ``_version``
moves); forward and inverse of one measurement always see the same normalized weights.

"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from invseg.blocks.base import InvertibleModule
from invseg.blocks.coupling import AdditiveCoupling, AffineCoupling
from invseg.blocks.memory import InvertibleSequence, run_steps
from invseg.blocks.residual import InvertibleResidual
from invseg.layers import spectral_state_frozen, update_spectral_state
from invseg.utils import CHECK_PRECISIONS, check_int, tensor_tuple

__all__ = [
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
    "sub_networks",
]

_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the names of torch's dtypes, which these checkers took before they spoke the trainers' vocabulary
_OLD_NAMES = {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


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
    if precision not in CHECK_PRECISIONS:
        hint = f" (write {_OLD_NAMES[precision]!r})" if precision in _OLD_NAMES else ""
        raise ValueError(f"precision must be one of {CHECK_PRECISIONS}, got {precision!r}{hint}")
    return precision


def precision_available(precision: str, device: torch.device | str = "cpu") -> bool:
    """Whether ``precision`` can be measured on ``device`` (fp16 autocast needs CUDA)."""
    _check_precision(precision)
    device = torch.device(device)
    if precision == "fp16":
        return device.type == "cuda"
    if precision == "bf16" and device.type == "cuda":
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
            f"(fp16 autocast needs CUDA; bf16 needs a GPU that supports it)"
        )
    low = precision in ("bf16", "fp16")
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
    module: nn.Module, x: Tensor | Sequence[Tensor], precision: str | None = "fp32"
) -> ReconstructionError:
    """Relative reconstruction error ``||x - f^-1(f(x))|| / ||x||`` per sample, max and mean over the batch.

    Args:
        module: any module with ``forward`` and ``inverse`` (an :class:`~invseg.blocks.InvertibleModule`,
            an :class:`~invseg.blocks.InvertibleSequence`, ``IUNet(...).core``). Not modified.
        x: the input, a tensor ``(B, ...)`` or a tuple of tensors for multi-input modules (the error of
            sample ``b`` pools all tensors).
        precision: one of :data:`invseg.utils.CHECK_PRECISIONS` (a cast deep copy / autocast, see the module
            docstring), or ``None`` to run ``module`` exactly as given (the trainer's guard). Default ``"fp32"``.

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


def block_error_growth(
    module: nn.Module, x: Tensor | Sequence[Tensor], precision: str | None = "fp32"
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
            states.append(list(run_steps([step], states[-1], inverse=False)))
        out = []
        for j in range(1, len(steps) + 1):
            rec = run_steps(list(reversed(steps[:j])), states[j], inverse=True)
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
    precision: str = "fp64",
    seed: int = 0,
    unroll_tol: float = 1e-3,
) -> ConditionEstimate:
    """Local Lipschitz constants of ``f`` at ``x`` and of ``f^-1`` at ``y = f(x)``, and their product.

    Power iteration on ``J^T J`` through autograd (``J v`` by double backward) from a seeded random
    start, ``iterations`` times for each; the values converge from below (lower bounds of the local
    Jacobian norms). Runs on a copy cast to ``precision`` (fp64 or fp32) with plain autograd and
    frozen spectral state. For :class:`~invseg.blocks.InvertibleResidual` blocks, whose inverse is a
    no-grad fixed-point iteration, the inverse's Jacobian is the Neumann series of ``(I + J_g)^-1``
    truncated at relative accuracy ``unroll_tol``.

    Cost: one forward + inverse graph per estimate and ``2 * iterations`` backward passes (three
    times that for double backward) -- meant for analysis-sized inputs.

    Args:
        module: an invertible module (as for :func:`reconstruction_error`). Not modified.
        x: its input (a tensor or a tuple of tensors).
        iterations: power iterations (>= 1). Default 20.
        precision: ``"fp64"`` (default) or ``"fp32"``.
        seed: seed of the random start vector.
        unroll_tol: accuracy of the residual blocks' inverse Jacobian (in (0, 1)). Default 1e-3.

    Raises:
        ValueError: for bad arguments (naming them).
    """
    _check_invertible(module)
    xs = _as_inputs(x)
    check_int(iterations, "iterations")
    if precision not in ("fp64", "fp32"):
        raise ValueError(f"precision must be 'fp64' or 'fp32' for the condition estimate, got {precision!r}")
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
    precision: str = "fp32",
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
        precision: one of :data:`invseg.utils.CHECK_PRECISIONS`. Default ``"fp32"``.

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
# The adversarial weight setting
# --------------------------------------------------------------------------------------------


def sub_networks(module: nn.Module) -> list[nn.Module]:
    """The sub-networks of ``module``'s blocks: the couplings' ``subnet`` and the residual blocks' ``g``."""
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
    subnets = sub_networks(module)
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
