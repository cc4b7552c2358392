"""Memory-efficient backward for sequences of invertible blocks (recompute by inversion).

Mechanism (memcnn's, re-implemented): the forward pass of an :class:`InvertibleSequence` runs
without building a graph and keeps only its outputs; the backward pass walks the steps from last
to first and, for each, rebuilds the step's inputs from its outputs with ``inverse`` and
back-propagates through a re-run of that single step (:meth:`InvertibleModule.backward_step`).
Activation memory is then independent of the number of steps.

Why not ``memcnn.InvertibleModuleWrapper`` (DESIGN §4): in memcnn 1.5.2 a leaf input's ``.grad``
is doubled (it assigns ``.grad`` by hand *and* returns the gradient), its Function casts inputs to
float32 under autocast (``custom_fwd(cast_inputs=torch.float32)``), it frees inputs with the
deprecated ``storage().resize_(0)``, uses the deprecated ``torch.cuda.amp`` decorators and, through
``memcnn.models.affine``, installs a process-wide ``warnings.filterwarnings('ignore', UserWarning)``
at import. memcnn is kept as the independent checker of the block contract
(``memcnn.is_invertible_module``, used in the tests). This implementation:

* frees activations by dropping references (the Function saves only its outputs),
* returns input *and* parameter gradients through autograd (parameters are inputs of the
  Function), so a leaf input's ``.grad`` is exact, ``torch.autograd.grad`` works and gradient
  hooks fire once,
* replays the autocast state of the forward pass in backward (no dtype is forced),
* evaluates the recomputation inside :func:`invseg.layers.spectral_state_frozen`, so spectral
  normalization state cannot change between forward and recompute (DESIGN §1f),
* lets blocks reuse what their inversion computes (one sub-network evaluation per coupling).

Blocks must be deterministic (no dropout / RNG): no RNG state is replayed. Double backward
(``create_graph=True``) through the memory-efficient path is not supported (``once_differentiable``);
use ``memory_efficient=False`` for higher-order gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from invseg.blocks.base import InvertibleModule
from invseg.utils import tensor_tuple
from invseg.layers import spectral_state_frozen

__all__ = ["InvertibleSequence", "run_steps"]


def _trainable(module: nn.Module) -> tuple[nn.Parameter, ...]:
    return tuple(p for p in module.parameters() if p.requires_grad)


def run_steps(steps: Iterable[InvertibleModule], xs: Sequence[Tensor], inverse: bool = False) -> tuple[Tensor, ...]:
    """Apply ``steps`` to a stack of tensors; each step consumes its inputs from the top."""
    stack = list(xs)
    for step in steps:
        n = step.num_outputs if inverse else step.num_inputs
        args = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        stack.extend(tensor_tuple(step.inverse(*args) if inverse else step(*args)))
    return tuple(stack)


def _reverse_pass(
    steps: Sequence[InvertibleModule],
    ys: Sequence[Tensor],
    grad_ys: Sequence[Tensor],
    params: Sequence[nn.Parameter],
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], list[Tensor | None]]:
    """Walk ``steps`` backwards from outputs ``ys``: rebuild inputs, accumulate gradients.

    Returns the reconstructed inputs, their gradients and one gradient per entry of ``params``.
    """
    index = {id(p): i for i, p in enumerate(params)}
    grads: list[Tensor | None] = [None] * len(params)
    values, dvalues = list(ys), list(grad_ys)
    for step in reversed(steps):
        n = step.num_outputs
        y, dy = tuple(values[len(values) - n :]), tuple(dvalues[len(dvalues) - n :])
        # drop our references: the step's outputs are freed as soon as it no longer needs them
        del values[len(values) - n :], dvalues[len(dvalues) - n :]
        step_params = _trainable(step)
        x, dx, dp = step.backward_step(y, dy, step_params)
        del y, dy
        for p, g in zip(step_params, dp):
            if g is None:
                continue
            i = index[id(p)]
            grads[i] = g if grads[i] is None else grads[i] + g
        values.extend(t.detach() for t in x)
        dvalues.extend(dx)
    return tuple(values), tuple(dvalues), grads


class _InvertibleSequenceFunction(torch.autograd.Function):
    """Forward without graph keeping only the outputs; backward by inversion, step by step."""

    @staticmethod
    def forward(ctx, seq: "InvertibleSequence", num_inputs: int, *inputs_and_params: Tensor):
        xs = inputs_and_params[:num_inputs]
        device_type = xs[0].device.type
        ctx.seq = seq
        ctx.params = inputs_and_params[num_inputs:]
        ctx.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
            torch.is_autocast_cache_enabled(),
        )
        with torch.no_grad():
            ys = run_steps(seq.steps, [x.detach() for x in xs])
        del xs, inputs_and_params  # the inputs are not kept: they are rebuilt in backward
        ctx.save_for_backward(*ys)
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_ys: Tensor):
        device_type, enabled, dtype, cache = ctx.autocast
        ys = ctx.saved_tensors
        with (
            torch.enable_grad(),
            torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache),
            spectral_state_frozen(ctx.seq),
        ):
            _, dxs, dparams = _reverse_pass(ctx.seq.steps, ys, grad_ys, ctx.params)
        return (None, None, *dxs, *dparams)


class InvertibleSequence(InvertibleModule):
    """Composition of invertible steps, with an optional memory-efficient backward.

    The steps act on a stack of tensors: each step takes its ``num_inputs`` tensors from the top of
    the stack and pushes its ``num_outputs`` results, so single-tensor blocks chain as usual and a
    :class:`~invseg.blocks.ChannelSplit` ... :class:`~invseg.blocks.ChannelMerge` pair keeps a skip
    connection on the stack in between (this is how :class:`~invseg.nets.IUNet`'s invertible core
    is one sequence). ``inverse`` applies the steps' inverses in reverse order.

    With ``memory_efficient=True`` (and grad enabled), the forward pass keeps only the sequence's
    outputs; the inputs and all intermediate activations are freed and rebuilt by inversion during
    backward, one step at a time (see the module docstring). Peak activation memory in backward is
    then that of the outputs, the skip tensors and one step's graph, independent of the number of
    steps; the extra compute is one forward of every step (one sub-network evaluation per
    coupling, fixed-point iterations for residual blocks). Gradients equal those of plain
    autograd up to the inversion's rounding. Inputs given by the caller stay alive as long as the
    caller holds them. With ``memory_efficient=False`` it is plain autograd through the same
    modules.

    Args:
        steps: the invertible modules, applied in order.
        memory_efficient: use the recompute-by-inversion backward. Default True.

    Raises:
        ValueError: when ``steps`` is empty, contains a module that is not an
            :class:`~invseg.blocks.InvertibleModule`, or the steps' arities do not compose.
    """

    def __init__(self, steps: Iterable[InvertibleModule], memory_efficient: bool = True) -> None:
        super().__init__()
        steps = list(steps)
        if not steps:
            raise ValueError("steps must contain at least one invertible module, got none")
        for i, s in enumerate(steps):
            if not isinstance(s, InvertibleModule):
                raise ValueError(f"steps[{i}] must be an InvertibleModule, got {type(s).__name__}")
        # stack depth bookkeeping: how many inputs the composition needs and how many it returns
        depth, lowest = 0, 0
        for s in steps:
            lowest = min(lowest, depth - s.num_inputs)
            depth += s.num_outputs - s.num_inputs
        self.num_inputs = -lowest if lowest < 0 else 1
        self.num_outputs = self.num_inputs + depth
        if self.num_outputs < 1:
            raise ValueError("the steps consume every tensor: the sequence would have no output")
        self.steps = nn.ModuleList(steps)
        self.memory_efficient = bool(memory_efficient)

    def forward(self, *x: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Apply the steps in order (memory-efficient when enabled and a gradient is needed)."""
        self._check_arity(x, self.num_inputs, "inputs")
        needs_grad = torch.is_grad_enabled() and (
            any(t.requires_grad for t in x) or any(p.requires_grad for p in self.parameters())
        )
        if self.memory_efficient and needs_grad:
            params = _trainable(self)
            ys = _InvertibleSequenceFunction.apply(self, len(x), *x, *params)
        else:
            ys = run_steps(self.steps, x)
        return ys[0] if len(ys) == 1 else tuple(ys)

    def inverse(self, *y: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Apply the steps' inverses in reverse order (plain autograd, no memory saving)."""
        self._check_arity(y, self.num_outputs, "outputs")
        xs = run_steps(reversed(self.steps), y, inverse=True)
        return xs[0] if len(xs) == 1 else xs

    def backward_step(self, y, grad_y, params):
        """Nested sequences walk their own steps backwards (no nested recomputation)."""
        x, dx, dp = _reverse_pass(self.steps, y, grad_y, params)
        return x, dx, tuple(dp)

    def __len__(self) -> int:
        return len(self.steps)

    @staticmethod
    def _check_arity(ts: Sequence[Tensor], n: int, what: str) -> None:
        if len(ts) != n:
            raise ValueError(f"the sequence takes {n} {what}, got {len(ts)}")

    def extra_repr(self) -> str:
        return f"memory_efficient={self.memory_efficient}"
