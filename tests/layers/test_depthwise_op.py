"""Tests of invseg.layers.depthwise_op: values and gradients equal to torch's depthwise conv."""

import pytest
import torch
import torch.nn.functional as F

from invseg.layers import SNDepthwiseConv, depthwise_conv

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# (dims, channels, batch, size, kernel, stride, padding, dilation)
_CASES = [
    (1, 3, 2, 11, 3, 1, 1, 1),
    (1, 2, 1, 10, 4, 1, 2, 1),  # even kernel
    (1, 4, 2, 13, 5, 2, 2, 1),
    (1, 1, 3, 9, 3, 3, 0, 2),  # stride and dilation on one axis
    (2, 3, 2, 9, 3, 1, 1, 1),
    (2, 2, 1, 8, 2, 1, 0, 1),
    (2, 2, 2, (9, 7), (3, 5), (1, 2), (1, 2), (2, 1)),  # per-axis tuples
    (2, 5, 1, 10, 4, 2, 1, 1),
    (2, 1, 2, 7, 3, 1, 4, 1),  # padding beyond the kernel's reach
    (2, 2, 2, 8, 1, 1, 0, 1),  # 1x1 kernel
    (3, 2, 2, 6, 3, 1, 1, 1),
    (3, 3, 1, 7, 2, 1, 1, 1),
    (3, 2, 2, (6, 7, 5), (3, 2, 3), (2, 1, 1), (1, 0, 2), (1, 2, 1)),
    (3, 1, 2, 8, 3, 2, 1, 2),
    (3, 4, 1, 6, 4, 1, 2, 1),
    (3, 2, 1, 5, 3, 1, 3, 1),  # padding beyond the kernel's reach
]


def _inputs(case, dtype, bias, seed=0):
    d, c, b, n, k, *_ = case
    n = (n,) * d if isinstance(n, int) else n
    k = (k,) * d if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, *n, generator=gen, dtype=dtype).requires_grad_()
    w = torch.randn(c, 1, *k, generator=gen, dtype=dtype).requires_grad_()
    bb = torch.randn(c, generator=gen, dtype=dtype).requires_grad_() if bias else None
    return x, w, bb


def _values_and_grads(fn, x, w, b, gy=None):
    y = fn(x, w, b)
    if gy is None:
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    leaves = [t for t in (x, w, b) if t is not None]
    return [y, *torch.autograd.grad(y, leaves, gy)], gy


@pytest.mark.parametrize("backward", ["auto", "custom"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", _CASES)
def test_matches_torch_float64(case, bias, backward):
    *_, s, p, dl = case
    x, w, b = _inputs(case, torch.float64, bias)
    c = w.shape[0]
    ref, gy = _values_and_grads(lambda x, w, b: _CONV[w.dim() - 2](x, w, b, s, p, dl, c), x, w, b)
    out, _ = _values_and_grads(lambda x, w, b: depthwise_conv(x, w, b, s, p, dl, backward=backward), x, w, b, gy)
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [
    (3, 8, 2, 12, 3, 1, 1, 1),
    (3, 5, 1, (10, 9, 11), 4, 1, 2, 1),
    (3, 4, 2, 10, 3, 2, 1, 1),
    (2, 16, 2, 24, 5, 1, 2, 1),
    (2, 6, 2, 20, 3, 1, 2, 2),
    (1, 8, 2, 40, 3, 1, 1, 1),
])
def test_matches_torch_float32(case):
    """float32: the same as torch's to ~1e-5 of each tensor's largest entry (the sums run in another order)."""
    *_, s, p, dl = case
    x, w, b = _inputs(case, torch.float32, True)
    c = w.shape[0]
    ref, gy = _values_and_grads(lambda x, w, b: _CONV[w.dim() - 2](x, w, b, s, p, dl, c), x, w, b)
    out, _ = _values_and_grads(lambda x, w, b: depthwise_conv(x, w, b, s, p, dl, backward="custom"), x, w, b, gy)
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32
        assert (o - r).abs().max() <= 1e-5 * r.abs().max()


@pytest.mark.parametrize("d,stride,dilation,padding", [
    (1, 1, 1, 1), (1, 2, 1, 1), (2, 1, 2, 2), (2, 2, 1, 1), (2, (2, 1), (1, 2), (0, 2)), (3, 1, 1, 1), (3, 2, 1, 1),
])
def test_gradcheck_and_gradgradcheck(d, stride, dilation, padding):
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(2, 2, *[5] * d, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, *[3] * d, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return depthwise_conv(x, w, b, stride, padding, dilation, backward="custom")

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_memory_layouts(layout):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 8, 9, 7, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        x0 = base.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "transposed":
        x0 = base.transpose(2, 4).contiguous().transpose(2, 4)
    else:
        x0 = torch.randn(2, 6, 8, 9, 14, generator=gen, dtype=torch.float64)[:, ::2, :, :, ::2]
    assert not x0.is_contiguous()
    w = torch.randn(x0.shape[1], 1, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    x = x0.clone().requires_grad_()
    xr = x0.clone().requires_grad_()
    y = depthwise_conv(x, w, None, 1, 1)
    yr = F.conv3d(xr, w, None, 1, 1, 1, x0.shape[1])
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    gxr, gwr = torch.autograd.grad(yr, (xr, w), gy)
    torch.testing.assert_close(gx, gxr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, gwr, rtol=1e-12, atol=1e-12)


def test_cpu_autocast_bf16():
    """Under CPU autocast: the value of F.conv3d under autocast (bf16), float32 gradients close to it."""
    x, w, b = _inputs((3, 4, 2, 8, 3), torch.float32, True)
    ref, out = [], []
    for fn, store in ((lambda: F.conv3d(x, w, b, 1, 1, 1, 4), ref), (lambda: depthwise_conv(x, w, b, 1, 1), out)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn()
        store.append(y)
        store.extend(torch.autograd.grad(y.float().square().sum(), (x, w, b)))
    assert out[0].dtype == torch.bfloat16 and out[0].grad_fn.name() != ref[0].grad_fn.name()
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    for o, r, leaf in zip(out[1:], ref[1:], (x, w, b)):
        assert o.dtype == leaf.dtype == torch.float32
        assert (o - r).abs().max() <= 2e-2 * r.abs().max()


def _backward_name(*args, **kwargs):
    return depthwise_conv(*args, **kwargs).grad_fn.name()


@pytest.mark.parametrize("d,k,stride,dilation,custom", [
    (3, 3, 1, 1, True), (3, 2, 1, 1, True), (3, 3, 2, 1, False), (3, 1, 1, 1, False),
    (2, 5, 1, 1, True), (2, 3, 1, 2, True), (2, 3, 1, 1, False), (2, 5, 2, 1, False), (1, 3, 1, 1, False),
])
def test_auto_dispatch(d, k, stride, dilation, custom):
    """backward="auto" takes the custom backward exactly where it was measured faster (CPU)."""
    x = torch.randn(1, 2, *[9] * d, requires_grad=True)
    w = torch.randn(2, 1, *[k] * d, requires_grad=True)
    name = _backward_name(x, w, None, stride, dilation * (k - 1) // 2, dilation)
    assert (name == "_DepthwiseConvBackward") is custom
    assert _backward_name(x, w, backward="custom") == "_DepthwiseConvBackward"
    assert _backward_name(x, w, backward="torch") != "_DepthwiseConvBackward"


def test_no_grad_is_torch_op():
    x, w, b = _inputs((3, 2, 1, 6, 3), torch.float32, True)
    with torch.no_grad():
        y = depthwise_conv(x, w, b, 1, 1, backward="custom")
    assert y.grad_fn is None
    torch.testing.assert_close(y, F.conv3d(x, w, b, 1, 1, 1, 2).detach(), rtol=0, atol=0)


def test_sn_depthwise_layer_uses_it():
    """SNDepthwiseConv (zeros and circular padding) computes the same values and gradients as before."""
    for mode in ("zeros", "circular"):
        layer = SNDepthwiseConv(3, 2, 3, method="none", padding_mode=mode).double()
        x = torch.randn(2, 2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        assert y.grad_fn.name() == "_DepthwiseConvBackward"
        xp = F.pad(x, [1] * 6, mode="circular") if mode == "circular" else x
        yr = F.conv3d(xp, layer.weight, layer.bias, 1, 0 if mode == "circular" else 1, 1, 2)
        torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
        g = torch.autograd.grad(y.sum(), (x, layer.weight, layer.bias))
        gr = torch.autograd.grad(yr.sum(), (x, layer.weight, layer.bias))
        for a, r in zip(g, gr):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


_X = torch.zeros(2, 3, 6, 6)
_W = torch.zeros(3, 1, 3, 3)


@pytest.mark.parametrize("x,w,kwargs,match", [
    (_X, torch.zeros(3, 2, 3, 3), {}, r"weight must have shape \(C, 1, \*kernel\)"),
    (_X, torch.zeros(3, 3), {}, r"weight must have shape .* with 1, 2 or 3 spatial dims"),
    (_X, torch.zeros(3, 1, 2, 2, 2, 2), {}, r"weight must have shape .* with 1, 2 or 3 spatial dims"),
    (torch.zeros(2, 3, 6), _W, {}, r"x must have shape \(B, C, \*spatial\) with 2 spatial dims"),
    (torch.zeros(2, 4, 6, 6), _W, {}, r"x must have as many channels as weight has filters \(3\)"),
    (_X, _W, {"bias": torch.zeros(4)}, r"bias must be None or of shape \(3,\)"),
    (_X, _W, {"stride": 0}, r"stride must be >= 1"),
    (_X, _W, {"padding": -1}, r"padding must be >= 0"),
    (_X, _W, {"padding": (1, 1, 1)}, r"padding must be an int or a sequence of 2 ints"),
    (_X, _W, {"dilation": 0}, r"dilation must be >= 1"),
    (_X, _W, {"dilation": 4}, r"padded input .* must be at least the dilated kernel"),
    (_X, _W, {"backward": "fast"}, r"backward must be 'auto', 'custom' or 'torch'"),
])
def test_bad_input_raises(x, w, kwargs, match):
    with pytest.raises(ValueError, match="depthwise_conv: " + match):
        depthwise_conv(x, w, **kwargs)


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")  # torch's own recording backend
@pytest.mark.slow  # ~14 s with a cold inductor cache on 2 cores (4 s warm)
def test_torch_compile_fullgraph():
    """Compiles without graph breaks (fullgraph) with inductor on the CPU, same values and gradients; the
    backward graph holds the custom backward's two convolutions, not torch's ``convolution_backward``."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    x, w, b = _inputs((3, 3, 2, 6, 3), torch.float32, True)

    def loss(x, w, b):
        return depthwise_conv(x, w, b, 1, 1).square().sum()

    ref = [loss(x, w, b)]
    ref += torch.autograd.grad(ref[0], (x, w, b))
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    got = [compiled(x, w, b)]
    got += torch.autograd.grad(got[0], (x, w, b))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)

    recorder = AotEagerAndRecordGraphs()
    torch._dynamo.reset()
    torch.compile(loss, fullgraph=True, backend=recorder)(x, w, b).backward()
    (graph,) = recorder.bw_graphs
    assert "convolution_backward" not in graph.code
    assert graph.code.count("aten.convolution.default") == 2
