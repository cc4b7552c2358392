"""A depthwise convolution whose CPU backward is fast (1D/2D/3D).

``depthwise_conv(x, weight, ...)`` returns exactly ``F.conv{d}d(x, weight, ..., groups=C)``. On the CPU
torch's backward of a depthwise 3-D conv takes ~15× its forward (``convolution_backward``, measured by
``scripts/bench_depthwise_op.py``), while its forward is fast. This op keeps torch's forward and computes
the backward with two *forward* depthwise convolutions:

* input gradient: the adjoint of a unit-stride conv is the conv of the output gradient with the flipped
  kernel (padding ``dilation·(k−1) − padding``). A strided conv is a unit-stride conv followed by a
  subsampling, so its adjoint first spreads the output gradient onto the unit-stride output grid (zeros
  in between) and then applies the same flipped conv.
* weight gradient: ``dW[c, t] = Σ_{b,n} gy[b,c,n] · x_pad[b,c, s·n + δ·t]`` is a depthwise conv of the
  input (batch folded into channels: ``B·C`` groups) with the output gradient as its kernel: the roles of
  stride ``s`` and dilation ``δ`` swap; the ``B`` partial results are summed.
* bias gradient: ``gy`` summed over batch and space.

The backward is written with differentiable torch ops, so double backward works. Where the custom
backward is not measured faster (CUDA: cuDNN; strides; 1-D and small 2-D kernels on the CPU, see
:func:`_custom_is_faster`) the op is plain ``F.conv{d}d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from invseg.utils import conv_fn, int_tuple

__all__ = ["depthwise_conv"]

_ALL = (slice(None), slice(None))  # batch and channel axes in an index


def _custom_is_faster(device: str, k: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> bool:
    """Where the custom backward is used by default: where ``scripts/bench_depthwise_op.py`` measured it
    faster than torch's (forward + backward, 1 thread, 2-core AMD EPYC VM, torch 2.14). CPU only (CUDA has
    cuDNN); unit stride only (strided, the spread output gradient makes it 1.4–1.8× slower than torch's in
    3-D). 3-D: 2–12× faster for k = 2..5; 2-D: as fast as torch's (0.9–1.1×) for k <= 3 without dilation,
    1.8–5× faster for k >= 4 or dilation > 1; 1-D: torch's is as fast or faster."""
    if device != "cpu" or any(s > 1 for s in stride) or all(kk == 1 for kk in k):
        return False
    if len(k) == 3:
        return True
    return len(k) == 2 and (max(k) >= 4 or any(dl > 1 for dl in dilation))


def _check(x, weight, bias, stride, padding, dilation):
    """Validate the arguments; return ``(d, stride, padding, dilation)`` as ``d``-tuples."""
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (3, 4, 5):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"depthwise_conv: weight must have shape (C, 1, *kernel) with 1, 2 or 3 spatial dims, "
                         f"got {shape}")
    d = weight.dim() - 2
    c = weight.shape[0]
    if weight.shape[1] != 1:
        raise ValueError(f"depthwise_conv: weight must have shape (C, 1, *kernel) (one filter per channel), "
                         f"got {tuple(weight.shape)}")
    if not isinstance(x, torch.Tensor) or x.dim() != d + 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"depthwise_conv: x must have shape (B, C, *spatial) with {d} spatial dims for a "
                         f"{d}-D weight, got {shape}")
    if x.shape[1] != c:
        raise ValueError(f"depthwise_conv: x must have as many channels as weight has filters ({c}), "
                         f"got x of shape {tuple(x.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c,)):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"depthwise_conv: bias must be None or of shape ({c},), got {shape}")
    stride = int_tuple(stride, d, "depthwise_conv: stride", minimum=1)
    padding = int_tuple(padding, d, "depthwise_conv: padding", minimum=0)
    dilation = int_tuple(dilation, d, "depthwise_conv: dilation", minimum=1)
    k = weight.shape[2:]
    span = [dl * (kk - 1) + 1 for kk, dl in zip(k, dilation)]
    if any(n + 2 * p < e for n, p, e in zip(x.shape[2:], padding, span)):
        raise ValueError(f"depthwise_conv: padded input {tuple(n + 2 * p for n, p in zip(x.shape[2:], padding))} "
                         f"must be at least the dilated kernel {tuple(span)} on every axis")
    return d, stride, padding, dilation


def _input_grad(gy, weight, size, stride, padding, dilation):
    """``∂L/∂x`` of ``y = conv(x, weight)`` from ``gy = ∂L/∂y``: (B, C, *size)."""
    if any(s > 1 for s in stride):
        gy = _spread(gy, weight.shape[2:], size, stride, padding, dilation)
    d = weight.dim() - 2
    pad = [dl * (kk - 1) - p for kk, p, dl in zip(weight.shape[2:], padding, dilation)]
    if any(q < 0 for q in pad):  # padding beyond the kernel's reach: the outer outputs read only zeros
        gy = F.pad(gy, [q for q in reversed(pad) for _ in range(2)])
        pad = [0] * d
    flipped = weight.flip(list(range(2, d + 2)))
    return conv_fn(d)(gy, flipped, None, 1, pad, dilation, weight.shape[0])


def _spread(gy, k, size, stride, padding, dilation):
    """gy of a strided conv on the unit-stride output grid (``N + 2p − δ(k−1)`` per axis), zeros in between:
    the strided conv is the unit-stride one subsampled, so its adjoint spreads and then convolves."""
    full = [n + 2 * p - dl * (kk - 1) for n, p, dl, kk in zip(size, padding, dilation, k)]
    spread = gy.new_zeros(*gy.shape[:2], *full)
    spread[_ALL + tuple(slice(0, s * (m - 1) + 1, s) for s, m in zip(stride, gy.shape[2:]))] = gy
    return spread


def _weight_grad(x, gy, k, stride, padding, dilation):
    """``∂L/∂weight`` (C, 1, *k): a (B·C)-group conv of x with gy as its kernel, summed over the batch."""
    d = len(k)
    b, c = x.shape[:2]
    # stride and dilation swap roles; the output can be a few taps longer than k (floor in the output size)
    out = conv_fn(d)(x.reshape(1, b * c, *x.shape[2:]), gy.reshape(b * c, 1, *gy.shape[2:]), None, dilation, padding,
                   stride, b * c)
    out = out[_ALL + tuple(slice(0, kk) for kk in k)]
    return out.reshape(b, c, 1, *k).sum(0)


class _DepthwiseConv(torch.autograd.Function):
    """Forward: torch's conv; backward: :func:`_input_grad`, :func:`_weight_grad`, the summed bias grad."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, bias is not None)
        return conv_fn(weight.dim() - 2)(x, weight, bias, stride, padding, dilation, weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.conf
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _input_grad(gy, weight, x.shape[2:], stride, padding, dilation)
        if ctx.needs_input_grad[1]:
            gw = _weight_grad(x, gy, weight.shape[2:], stride, padding, dilation)
        if has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum([0, *range(2, gy.dim())])
        return gx, gw, gb, None, None, None


def depthwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    *,
    backward: str = "auto",
) -> torch.Tensor:
    """Depthwise convolution: ``F.conv{d}d(x, weight, bias, stride, padding, dilation, groups=C)``.

    The same values and gradients (x, weight, bias; double backward included) as torch's op. On the CPU
    at unit stride (3-D; 2-D with k >= 4 or dilation) the backward is computed by forward convolutions
    (module docstring), several times faster than torch's; elsewhere this is torch's op. Works under
    ``torch.compile(fullgraph=True)`` (dynamo traces the autograd.Function, forward and backward).

    Args:
        x: input ``(B, C, *N)`` with 1, 2 or 3 spatial dims (any memory layout).
        weight: one filter per channel, ``(C, 1, *k)``; ``weight.dim() - 2`` is the number of spatial dims.
        bias: ``(C,)`` or None (default).
        stride: int or per-axis (default 1).
        padding: zero padding, int or per-axis (default 0).
        dilation: int or per-axis (default 1).
        backward: ``"auto"`` (default: the custom backward where it is measured faster, see above),
            ``"custom"`` (always, any device and dims: for tests and benchmarks) or ``"torch"`` (never).

    Returns:
        ``(B, C, *N_out)`` with ``N_out = (N + 2·padding − dilation·(k − 1) − 1) // stride + 1``.

    Under autocast the inputs are cast to the autocast dtype first, as autocast does for ``F.conv``.

    Raises:
        ValueError: if the weight is not ``(C, 1, *k)`` with 1–3 spatial dims, x not ``(B, C, *N)`` with
            the same C and dims, bias not ``(C,)``, an argument not an int / per-axis tuple in range, or the
            padded input smaller than the dilated kernel.
    """
    d, stride, padding, dilation = _check(x, weight, bias, stride, padding, dilation)
    if backward not in ("auto", "custom", "torch"):
        raise ValueError(f"depthwise_conv: backward must be 'auto', 'custom' or 'torch', got {backward!r}")
    custom = backward == "custom" or (
        backward == "auto" and _custom_is_faster(x.device.type, tuple(weight.shape[2:]), stride, dilation))
    custom = custom and torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if not custom:
        return conv_fn(d)(x, weight, bias, stride, padding, dilation, weight.shape[0])
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # what autocast does for F.conv (its inputs in the lower precision, float64 left alone), made
        # explicit: inside the Function the backward would otherwise meet a low-precision gy and full-precision
        # saved inputs. The casts are recorded by autograd, so the gradients come back in each input's dtype.
        low = torch.get_autocast_dtype(device)

        def cast(t):
            return t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(low)

        with torch.autocast(device, enabled=False):
            return _DepthwiseConv.apply(cast(x), cast(weight), cast(bias), stride, padding, dilation)
    return _DepthwiseConv.apply(x, weight, bias, stride, padding, dilation)
