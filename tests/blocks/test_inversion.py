"""Tests of invseg.blocks.inversion: the reconstruction / gradient / condition checkers.

Every number asserted is measured on a real (tiny) network; the "unstable" cases are built so that
the checkers must report a failure (unnormalized sub-networks with scaled-up weights).
"""

import copy
import math
from pathlib import Path

import pytest
import torch

from invseg.blocks.inversion import (
    ConditionEstimate,
    GradientError,
    ReconstructionError,
    block_error_growth,
    condition_estimate,
    gradient_error,
    precision_available,
    reconstruction_error,
    scale_subnet_weights,
)
from invseg.blocks import (
    AdditiveCoupling,
    AffineCoupling,
    ChannelSplit,
    InvertibleChannelMixing,
    InvertibleResidual,
    InvertibleSequence,
    sn_ds_subnet,
)
from invseg.nets import IUNet

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "inversion_error.py"
# tiny IUNets: 2D (4, 8) channels at 16^2, 3D (2, 8) channels at 8^3, batch 2
NETS = {2: ([4, 8], 16), 3: ([2, 8], 8)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # a shared 2-core machine runs these tiny models far faster on one thread
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _iunet(dims=2, coupling="additive", K=1.0, sn_method="fft", seed=0, **kw):
    channels, _ = NETS[dims]
    torch.manual_seed(seed)
    return IUNet(dims, 1, 2, channels, num_blocks=2, coupling=coupling, K=K, sn_method=sn_method, **kw)


def _core_input(model, dims=2, seed=1):
    _, size = NETS[dims]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 1) + (size,) * dims, generator=gen)
    with torch.no_grad():
        return model.input_layer(x)


# --- the three required assertions ------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])  # 3D: the float64 cast re-orthogonalizes the float32 Haar basis
@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_float64_error_is_at_rounding_level(dims, coupling):
    model = _iunet(dims, coupling, K=2.0)
    r = reconstruction_error(model.core, _core_input(model, dims), "fp64")
    assert isinstance(r, ReconstructionError) and r.precision == "fp64"
    assert len(r.per_sample) == 2 and r.mean <= r.max
    assert 0 <= r.max < 1e-14  # float64 eps = 2.2e-16; ~16 steps
    # float32 of the same network is ~1e8 times larger: the precision really changes
    assert reconstruction_error(model.core, _core_input(model, dims), "fp32").max > 1e3 * r.max


@pytest.mark.parametrize(
    "coupling,K",
    [("additive", 0.5), ("additive", 0.9), ("additive", 1.0), ("affine", 0.5), ("affine", 1.0),
     ("residual", 0.5), ("residual", 0.9)],
)
def test_float32_error_for_K_at_most_one_is_below_1e5(coupling, K):
    model = _iunet(2, coupling, K=K)
    r = reconstruction_error(model.core, _core_input(model), "fp32")
    assert 0 < r.max < 1e-5


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_unnormalized_scaled_network_is_worse_than_the_same_network_with_K1(coupling):
    plain = _iunet(2, coupling, sn_method="none")
    sn = _iunet(2, coupling, K=1.0, sn_method="fft")
    # the same raw weights (the SN state is searched afresh for them: its keys are not in plain's state dict)
    missing, unexpected = sn.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.rsplit(".", 1)[-1].startswith("sn_") for k in missing)
    h = _core_input(plain)
    before = reconstruction_error(plain.core, h, "fp32").max
    for m in (plain, sn):
        assert scale_subnet_weights(m, 8.0) > 0
    err_plain = reconstruction_error(plain.core, h, "fp32").max
    err_sn = reconstruction_error(sn.core, h, "fp32").max
    assert err_sn < 1e-5
    assert err_plain > 100 * err_sn  # measured: ~1e-2 .. 1e+3 against ~1e-7
    assert err_plain > 100 * before  # the scaling, not the network, made it fail


# --- reconstruction_error and block_error_growth on any invertible module ----------------------


def _block(kind):
    sub = sn_ds_subnet(2, K=0.9)
    return {
        "additive": lambda: AdditiveCoupling(4, sub),
        "affine": lambda: AffineCoupling(4, sub, reverse=True),
        "residual": lambda: InvertibleResidual(4, sub, K=0.9),
        "mixing": lambda: InvertibleChannelMixing(2, 4),
        "split": lambda: ChannelSplit(1),
    }[kind]()


@pytest.mark.parametrize("kind", ["additive", "affine", "residual", "mixing", "split"])
@pytest.mark.parametrize("precision", ["fp64", "fp32", "bf16", None])
def test_reconstruction_error_of_single_blocks(kind, precision):
    torch.manual_seed(0)
    block = _block(kind)
    x = torch.randn(3, 4, 8, 8)
    state = copy.deepcopy(block.state_dict())
    r = reconstruction_error(block, x, precision)
    assert len(r.per_sample) == 3 and r.max == max(r.per_sample)
    bound = {"fp64": 1e-14, "fp32": 1e-5, None: 1e-5, "bf16": 5e-2}[precision]
    if kind == "residual" and precision == "fp64":
        bound = 1e-5  # the fixed-point inverse stops at tol = 1e-6 (error <= K / (1 - K) * tol)
    assert r.max < bound
    if precision is not None:  # measured on a copy: the caller's module (and its SN state) is not modified
        for k, v in block.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_reconstruction_error_multi_input_module():
    # a sequence that ends with a split has two outputs; its inverse takes both
    seq = InvertibleSequence([InvertibleChannelMixing(2, 4), ChannelSplit(1)], memory_efficient=False)
    r = reconstruction_error(seq, torch.randn(2, 4, 4, 4), "fp64")
    assert r.max < 1e-14


def test_block_error_growth_of_an_iunet_core():
    model = _iunet(2, "additive", K=4.0)
    h = _core_input(model)
    growth = block_error_growth(model.core, h, "fp32")
    # flattened: 2 levels x 2 blocks x (coupling + mixing) down, split, down, bottom, up, merge, level
    assert len(growth) == 4 + 2 + 4 + 2 + 4
    assert [g.depth for g in growth] == list(range(1, 17))
    assert "AdditiveCoupling" in growth[0].step and "ChannelSplit" in growth[4].step
    full = reconstruction_error(model.core, h, "fp32").max
    assert growth[-1].max == pytest.approx(full, rel=1e-6, abs=1e-12)
    assert all(0 <= g.max < 1e-5 for g in growth)
    assert block_error_growth(_block("additive"), torch.randn(1, 4, 8, 8), "fp64")[0].depth == 1


# --- condition estimate against a dense Jacobian ------------------------------------------------


@pytest.mark.parametrize("coupling,K", [("additive", 4.0), ("affine", 1.0), ("residual", 0.9)])
def test_condition_estimate_matches_dense_jacobian(coupling, K):
    torch.manual_seed(0)
    model = IUNet(1, 1, 2, [4, 4], num_blocks=1, coupling=coupling, K=K)  # 1D: a dense Jacobian is 32 x 32
    h = model.input_layer(torch.randn(1, 1, 8)).detach().double()
    core = copy.deepcopy(model.core).double()
    with torch.no_grad():
        core(h)  # initialise the copy's spectral state
    jac = torch.autograd.functional.jacobian(lambda t: core(t), h).reshape(h.numel(), h.numel())
    s = torch.linalg.svdvals(jac)
    c = condition_estimate(model.core, h, iterations=60)
    assert isinstance(c, ConditionEstimate)
    assert c.lip_forward <= s[0] * (1 + 1e-9) and c.lip_forward > 0.97 * s[0]
    # the inverse's Jacobian is J^-1: its norm is 1 / sigma_min (residual: through the unrolled inverse)
    assert c.lip_inverse <= (1 / s[-1]) * (1 + 1e-3) and c.lip_inverse > 0.97 / s[-1]
    assert c.condition == pytest.approx(c.lip_forward * c.lip_inverse)


def test_condition_estimate_of_an_orthogonal_block_is_one():
    c = condition_estimate(InvertibleChannelMixing(2, 4), torch.randn(1, 4, 4, 4), iterations=5)
    assert c.lip_forward == pytest.approx(1.0, abs=1e-9) and c.lip_inverse == pytest.approx(1.0, abs=1e-9)


# --- gradient error --------------------------------------------------------------------------------


@pytest.mark.parametrize("coupling,K", [("additive", 1.0), ("affine", 0.9), ("residual", 0.9)])
def test_gradient_error_with_sn_is_small(coupling, K):
    model = _iunet(2, coupling, K=K)
    x = torch.randn(2, 1, 16, 16)
    g = gradient_error(model, x)
    assert isinstance(g, GradientError)
    assert g.num_tensors == sum(1 for p in model.parameters() if p.requires_grad)
    assert g.relative <= 1e-4 and g.input_relative is not None and g.input_relative <= 1e-4
    assert model.memory_efficient  # the caller's model is untouched


def test_gradient_error_reports_the_failure_of_an_unstable_network():
    model = _iunet(2, "additive", sn_method="none")
    scale_subnet_weights(model, 8.0)
    x = torch.randn(2, 1, 16, 16)
    g = gradient_error(lambda: model, x, loss_fn=lambda out: out.square().mean())
    assert g.relative > 1e-2  # memory-efficient backward rebuilt wrong activations
    assert g.max_tensor >= g.relative * 0.999 and g.worst_tensor


# --- settings and validation ---------------------------------------------------------------------


@pytest.mark.parametrize("sn_method", ["fft", "none"])
def test_scale_subnet_weights(sn_method):
    model = _iunet(2, "affine", K=2.0, sn_method=sn_method)
    h = _core_input(model)
    with torch.no_grad():
        before = model.core(h)
    n = scale_subnet_weights(model, 10.0)
    assert n == 6 * 2 * 2  # 6 couplings x 2 DS convs x (depthwise + pointwise)
    with torch.no_grad():
        after = model.core(h)
    change = float((after - before).norm() / before.norm())
    if sn_method == "fft":
        # normalization undoes the x10 (x10^4 per sub-network); what remains is the pointwise power
        # method's re-convergence from its warm start (stopping rule eps = 1e-2)
        assert change < 2e-2
    else:
        assert change > 1.0


def test_bad_arguments_raise():
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="forward and inverse"):
        reconstruction_error(torch.nn.Linear(4, 4), x)
    with pytest.raises(ValueError, match="precision must be one of"):
        reconstruction_error(InvertibleChannelMixing(2, 4), x, "float8")
    assert not precision_available("fp16", "cpu")
    with pytest.raises(ValueError, match="fp16"):
        reconstruction_error(InvertibleChannelMixing(2, 4), x, "fp16")
    with pytest.raises(ValueError, match="memory_efficient"):
        gradient_error(torch.nn.Conv2d(4, 4, 1), x)
    with pytest.raises(ValueError, match="iterations"):
        condition_estimate(InvertibleChannelMixing(2, 4), x, iterations=0)
    with pytest.raises(ValueError, match="factor"):
        scale_subnet_weights(_iunet(), -1.0)
    with pytest.raises(ValueError, match="no coupling or residual"):
        scale_subnet_weights(InvertibleChannelMixing(2, 4), 2.0)


def test_non_finite_reconstruction_is_inf():
    # the trainer's guard relies on this: a NaN error would compare False against every threshold
    block = InvertibleChannelMixing(2, 4)
    block.inverse = lambda y: torch.full_like(y, float("nan"))
    r = reconstruction_error(block, torch.randn(3, 4, 4, 4), precision=None)
    assert r.max == math.inf and all(v == math.inf for v in r.per_sample)
