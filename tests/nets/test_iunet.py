"""IUNet in 1D/2D/3D: shapes, invertible core, memory-efficient gradients, autocast, validation."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from invseg.layers import update_spectral_state
from invseg.nets import IUNet, create_model, iunet_channel_plan, list_models

with warnings.catch_warnings():  # memcnn installs a process-wide UserWarning filter at import
    warnings.simplefilter("ignore")
    import memcnn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: a single intra-op thread avoids OpenMP oversubscription on shared CI cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# (spatial_dims, channels, spatial size): 3 levels in 1D, 2 levels in 2D/3D, tiny sizes
CASES = {1: ((4, 4, 4), 16), 2: ((4, 8), 8), 3: ((4, 16), 4)}


def _model(d, coupling="additive", num_blocks=2, **kw):
    torch.manual_seed(0)
    channels, _ = CASES[d]
    K = 0.5 if coupling == "residual" else 0.9
    kw.setdefault("scaling", "soft")
    return IUNet(d, in_channels=2, out_channels=3, channels=channels, num_blocks=num_blocks, coupling=coupling,
                 K=K, sn_method="fft", **kw)


def _x(d, batch=2, seed=1):
    _, n = CASES[d]
    return torch.randn((batch, 2) + (n,) * d, generator=torch.Generator().manual_seed(seed))


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("coupling", ["additive", "affine", "residual"])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_shapes_and_core_round_trip(d, coupling):
    model = _model(d, coupling)
    _perturb(model)
    x = _x(d)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 3) + x.shape[2:]
        h = model.input_layer(x)
        z = model.core(h)
        assert z.shape == h.shape
        assert _rel(model.core.inverse(z), h) <= 1e-5
        assert _rel(model.core(model.core.inverse(z)), z) <= 1e-5


def test_core_passes_memcnn_checker():
    model = _model(2)
    _perturb(model)
    assert memcnn.is_invertible_module(model.core, test_input_shape=(1, 4, 8, 8), atol=1e-5)


def _grad_errors(a, b):
    pairs = [(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters())]
    assert all(g is not None and r is not None for g, r in pairs), "a parameter received no gradient"
    ga, gb = torch.cat([g.flatten() for g, _ in pairs]), torch.cat([r.flatten() for _, r in pairs])
    floor = 1e-4 * gb.norm()  # tensors with a tiny share of the gradient are judged against this floor
    worst = max(((g - r).norm() / (r.norm() + floor)).item() for g, r in pairs)
    return _rel(ga, gb), worst


@pytest.mark.parametrize("sn_mode", ["reparam", "project"])
@pytest.mark.parametrize("d, coupling", [(1, "additive"), (2, "additive"), (3, "additive"), (2, "affine"),
                                         (2, "residual")])
def test_memory_efficient_gradients_match_plain_over_steps(d, coupling, sn_mode):
    """SN "fft" (soft scaling), train mode, 3 Adam steps; spectral state updated after each step."""
    me = _model(d, coupling, sn_mode=sn_mode)
    plain = copy.deepcopy(me)
    plain.memory_efficient = False
    assert me.memory_efficient and not plain.memory_efficient
    me.train(), plain.train()
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (me, plain)]
    for step in range(3):
        x = _x(d, seed=step)
        target = torch.randint(0, 3, (x.shape[0],) + x.shape[2:], generator=torch.Generator().manual_seed(step))
        for m, opt in zip((me, plain), opts):
            opt.zero_grad()
            F.cross_entropy(m(x), target).backward()
        total, worst = _grad_errors(me, plain)
        assert total <= 1e-4 and worst <= 1e-4, (step, total, worst)
        for m, opt in zip((me, plain), opts):
            opt.step()
            update_spectral_state(m)
    assert any(not torch.equal(p, q) for p, q in zip(me.parameters(), _model(d, coupling, sn_mode=sn_mode).parameters()))


def test_leaf_input_gradient_matches_plain():
    me = _model(2)
    plain = copy.deepcopy(me)
    plain.memory_efficient = False
    x = _x(2)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    me(xa).square().mean().backward()
    plain(xb).square().mean().backward()
    assert _rel(xa.grad, xb.grad) <= 1e-5


@pytest.mark.parametrize("coupling", ["additive", "affine", "residual"])
def test_bf16_autocast_forward_backward(coupling):
    model = _model(2, coupling)
    x = _x(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        assert y.dtype == torch.bfloat16
        loss = F.cross_entropy(y.float(), torch.zeros((2,) + x.shape[2:], dtype=torch.long))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def _saved_activation_bytes(model, x):
    """Bytes of the distinct non-parameter storages saved for backward (saved_tensors_hooks)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def test_saved_activation_memory_is_flat_in_depth():
    x = _x(2, batch=1)
    me = {n: _saved_activation_bytes(_model(2, num_blocks=n), x) for n in (2, 8)}
    plain = {n: _saved_activation_bytes(_model(2, num_blocks=n, memory_efficient=False), x) for n in (2, 8)}
    assert me[8] <= 1.1 * me[2]  # flat (identical in fact: input, input-layer output, core output)
    assert plain[8] >= 2.5 * plain[2]  # plain autograd grows with the saved activations
    assert me[8] <= 0.1 * plain[8]


@pytest.mark.parametrize("d", [1, 2, 3])
def test_size_not_divisible_raises_naming_the_multiple(d):
    model = _model(d)
    multiple = 2 ** (len(CASES[d][0]) - 1)
    bad = torch.randn((1, 2) + (CASES[d][1] + 1,) * d)
    with pytest.raises(ValueError, match=f"multiple of 2\\*\\*\\(levels - 1\\) = {multiple}"):
        model(bad)
    with pytest.raises(ValueError, match="in_channels|expects input"):
        model(torch.randn((1, 5) + (CASES[d][1],) * d))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=(6, 8), coupling="additive"), "channels\\[1\\] / 4 = 2"),  # valid split: fine below
        (dict(channels=(4, 6)), "multiple of 2\\*\\*spatial_dims = 4"),
        (dict(channels=(4, 16)), "must be fewer than channels\\[0\\] = 4"),
        (dict(channels=(5, 8)), "even for a coupling split"),
        (dict(channels=()), "non-empty"),
        (dict(channels=(4, 8), num_blocks=(1, 2, 3)), "num_blocks"),
        (dict(channels=(4, 8), num_blocks=0), "num_blocks"),
        (dict(channels=(4, 8), num_blocks=(2, 0)), "bottom level needs"),
        (dict(channels=(4, 8), coupling="glow"), "coupling must be one of"),
        (dict(channels=(4, 8), coupling="residual", K=1.0), "0 < K < 1"),
        (dict(channels=(4, 8), coupling="residual", K=0.5, sn_method="none"), "needs spectral normalization"),
        (dict(channels=(4, 8), sn_method="power"), "sn_method"),
        (dict(channels=(4, 8), scaling="medium"), "scaling"),
        (dict(channels=(4, 8), spatial_dims=4), "spatial_dims"),
        (dict(channels=(4, 8), in_channels=0), "in_channels"),
        (dict(channels=(4, 8), hidden_channels=(4, 4, 4)), "hidden_channels"),
        (dict(channels=(4, 8), hidden_channels=0), "hidden_channels"),
        (dict(channels=(4, 8), head_channels=0), "head_channels"),
        (dict(channels=(4, 8), stem_channels=0), "stem_channels"),
        (dict(channels=(4, 8), head_kernel=2), "head_kernel"),
        (dict(channels=(4, 8), stem_stride=3), "stem_stride"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(spatial_dims=2, in_channels=1, out_channels=2)
    args.update(kwargs)
    if match.startswith("channels\\[1\\] / 4 = 2"):
        IUNet(**args)  # (6, 8): 2 channels go down, 4 stay as skip -- a valid plan
        return
    with pytest.raises(ValueError, match=match):
        IUNet(**args)


@pytest.mark.parametrize(
    "kwargs",
    [dict(input_norm=True), dict(head_channels=6), dict(hidden_channels=(6, 12)), dict(hidden_channels=5),
     dict(stem_channels=6, head_channels=6, head_kernel=3), dict(head_kernel=3), dict(num_blocks=(0, 2)),
     dict(stem_channels=6, head_channels=6, stem_stride=2), dict(stem_stride=2)],
)
def test_input_norm_head_and_hidden_options(kwargs):
    """The options around the core keep shapes, invertibility of the core and gradients to every parameter."""
    model = _model(3, **kwargs)
    x = _x(3)
    out = model(x)
    assert out.shape == (2, 3, 4, 4, 4)
    h = model.input_layer(x)
    torch.testing.assert_close(model.core.inverse(model.core(h)), h, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    if "hidden_channels" in kwargs:
        widths = {m.net[0].pointwise.out_channels for m in model.modules() if type(m).__name__ == "SNDSSubnet"}
        assert widths == ({6, 12} if kwargs["hidden_channels"] == (6, 12) else {5})
    if kwargs.get("input_norm"):  # the input's scale does not reach the core
        torch.testing.assert_close(model(3.0 * x), out, rtol=1e-3, atol=1e-4)


def test_stem_stride_runs_the_core_at_half_resolution():
    model = _model(3, stem_stride=2, stem_channels=6, head_channels=6)
    assert model.size_multiple == 4
    x = torch.randn(1, 2, 8, 8, 8)
    assert model.input_layer(x).shape == (1, 4, 4, 4, 4) and model(x).shape == (1, 3, 8, 8, 8)
    with pytest.raises(ValueError, match=r"stem_stride \* 2\*\*\(levels - 1\) = 4"):
        model(torch.randn(1, 2, 6, 8, 8))


def test_channel_plan():
    assert iunet_channel_plan(2, (8, 16, 32)) == [(4, 4), (8, 8)]
    assert iunet_channel_plan(3, (8, 32, 128)) == [(4, 4), (16, 16)]
    assert iunet_channel_plan(1, (6,)) == []


def test_registry():
    assert "iunet" in list_models()
    model = create_model("iunet", spatial_dims=1, in_channels=1, out_channels=2, channels=(4, 4))
    assert isinstance(model, IUNet)
    with pytest.raises(ValueError, match="unknown model name 'unet'; known models: .*iunet"):
        create_model("unet")


def test_register_model_rejects_bad_and_duplicate_names():
    from invseg.nets import register_model

    with pytest.raises(ValueError, match="lower-case"):
        register_model("IUNet")
    with pytest.raises(ValueError, match="already registered"):
        register_model("iunet")(lambda **kw: None)


def test_stem_and_head_recomputed_with_the_same_gradients():
    """memory_efficient recomputes the stem and head in backward: gradients equal plain autograd's."""
    model = _model(3, stem_channels=6, head_channels=6, head_kernel=3)
    plain = copy.deepcopy(model)
    plain.memory_efficient = False
    x = _x(3)
    for net in (model, plain):
        net(x).square().mean().backward()
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
