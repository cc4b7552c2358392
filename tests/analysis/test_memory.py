"""Tests of invseg.analysis.memory: the measured step memory follows real memory.

Each measure_step starts a fresh Python process (~2 s for the torch import): the measurements are
shared through a module-scoped fixture and the number of workers is kept small.
"""

import pytest
import torch

from invseg.analysis import (
    SavedTensorCounter,
    StepMeasurement,
    StepSpec,
    WorkerError,
    format_bytes,
    measure_step,
    measure_steps,
    saved_tensor_bytes,
)
from invseg.analysis._toy import conv_chain

TOY = "invseg.analysis._toy:conv_chain"
# A chain of 1x1 convs on (1, C, S, S): each conv keeps its input, one activation = C*S*S*4 bytes.
C, S = 64, 64
ACT_BYTES = C * S * S * 4  # 1 MiB
DEPTHS = (8, 16)


def _chain_spec(depth: int, device: str = "cpu", **kw) -> StepSpec:
    return StepSpec(TOY, {"channels": C, "depth": depth}, input_shape=(1, C, S, S), target="sum",
                    device=device, threads=1, **kw)


@pytest.fixture(scope="module")
def chain_measurements():
    return {d: measure_step(_chain_spec(d)) for d in DEPTHS}


# --- measurement in a fresh process (CPU, peak RSS) ------------------------------------------

def test_cpu_result_is_rss(chain_measurements):
    for depth, m in chain_measurements.items():
        assert isinstance(m, StepMeasurement)
        assert m.method == "rss" and m.device == "cpu"
        assert m.threads == 1
        assert m.spec == _chain_spec(depth)
        assert len(m.peak_bytes_per_step) == len(m.step_times_s) == m.spec.steps
        assert m.peak_bytes == max(m.peak_bytes_per_step)
        assert m.step_time_s > 0
        assert m.param_bytes == depth * C * C * 4 and m.num_params == depth * C * C
        assert m.baseline_bytes > m.startup_bytes > 0
        d = m.to_dict()
        assert d["spec"]["input_shape"] == [1, C, S, S] and d["peak_bytes"] == m.peak_bytes


@pytest.mark.parametrize("depth", DEPTHS)
def test_peak_matches_hand_count(chain_measurements, depth):
    m = chain_measurements[depth]
    # Saved for backward (input x and parameters excluded): out_1..out_depth, exactly.
    assert m.saved_tensor_bytes == depth * ACT_BYTES
    # The measured peak: saved activations + a few transient tensors (grad of output, grad input).
    hand = depth * ACT_BYTES
    assert 0.5 * hand <= m.peak_bytes <= 3 * hand, format_bytes(m.peak_bytes)


def test_peak_grows_with_depth(chain_measurements):
    small, large = (chain_measurements[d] for d in DEPTHS)
    extra = (DEPTHS[1] - DEPTHS[0]) * ACT_BYTES
    growth = large.peak_bytes - small.peak_bytes
    assert 0.7 * extra <= growth <= 1.5 * extra, (format_bytes(small.peak_bytes), format_bytes(large.peak_bytes))


def test_other_targets_optimizers_precisions():
    # Segmentation labels from the output channels, Adam, bf16 autocast and a post_step hook.
    spec = StepSpec(TOY, {"channels": 8, "depth": 3, "kernel_size": 3}, input_shape=(2, 8, 32, 32),
                    target="segmentation", optimizer="adam", precision="bf16", steps=2,
                    threads=1, post_step="builtins:id")
    m = measure_step(spec)
    assert m.method == "rss" and len(m.step_times_s) == 2
    assert m.peak_bytes >= 0 and m.saved_tensor_bytes > 0


# --- failures come back as RuntimeError with the worker's message ---------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"factory": "invseg.analysis._toy:no_such_factory"}, "no_such_factory"),
    ({"factory": TOY, "post_step": "invseg.no_such_module:update"}, "invseg.no_such_module"),
])
def test_worker_failure_raises_with_message(kwargs, message):
    spec = StepSpec(input_shape=(1, 16, 8, 8), **kwargs)
    with pytest.raises(RuntimeError, match=message) as info:
        measure_step(spec)
    assert isinstance(info.value, WorkerError)
    assert info.value.returncode not in (0, None)
    assert "ImportError" in info.value.stderr


def test_timeout_raises():
    with pytest.raises(RuntimeError, match="timed out"):
        measure_step(_chain_spec(2), timeout=0.2)


def test_measure_steps_order_and_on_error(monkeypatch):
    import invseg.analysis.memory as memory

    specs = [_chain_spec(1), _chain_spec(2), _chain_spec(3)]

    def fake(spec, *, timeout, env):
        if spec.factory_kwargs["depth"] == 2:
            raise WorkerError("CUDA out of memory")
        return spec.factory_kwargs["depth"]

    monkeypatch.setattr(memory, "measure_step", fake)
    with pytest.raises(WorkerError, match="out of memory"):
        measure_steps(specs, progress=False)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        assert measure_steps(specs, progress=False, on_error="none") == [1, None, 3]
    with pytest.raises(ValueError, match="on_error"):
        measure_steps(specs, on_error="ignore")


# --- CUDA (skipped without a GPU) -------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_matches_hand_count():
    small, large = measure_step(_chain_spec(DEPTHS[0], "cuda")), measure_step(_chain_spec(DEPTHS[1], "cuda"))
    for depth, m in zip(DEPTHS, (small, large)):
        assert m.method == "cuda" and m.device == "cuda"
        assert m.saved_tensor_bytes == depth * ACT_BYTES
        assert depth * ACT_BYTES <= m.peak_bytes <= (depth + 4) * ACT_BYTES, format_bytes(m.peak_bytes)
    growth = large.peak_bytes - small.peak_bytes
    assert growth == pytest.approx((DEPTHS[1] - DEPTHS[0]) * ACT_BYTES, rel=0.1)


# --- in-process helpers -----------------------------------------------------------------------

@pytest.mark.parametrize("spatial_dims, depth", [(1, 2), (2, 3), (3, 1)])
def test_saved_tensor_bytes_counts_activations(spatial_dims, depth):
    model = conv_chain(channels=4, depth=depth, spatial_dims=spatial_dims)
    x = torch.randn(2, 4, *([6] * spatial_dims))
    act = x.numel() * 4
    # conv_i saves its input (x, out_1..out_{depth-1}) and its weight; square saves out_depth.
    assert saved_tensor_bytes(lambda: model(x).square().sum(), exclude=model.parameters()) == (depth + 1) * act
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert saved_tensor_bytes(lambda: model(x).square().sum()) == (depth + 1) * act + weights


def test_saved_tensor_counter_counts_storage_once():
    x = torch.randn(100, requires_grad=True)
    with SavedTensorCounter() as counter:
        y = x * x  # saves x twice (self and other)
        z = x[:10].exp()  # a view of x's storage saved by exp? exp saves its result, a new storage
    assert counter.count == 2
    assert counter.bytes == 100 * 4 + 10 * 4
    assert saved_tensor_bytes(lambda: (y.sum(), z.sum())) == 0  # sum saves no tensor
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: x * x) == 0


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1536, "1.50 KiB"), (3 * 2**20, "3.00 MiB"),
    (2.5 * 2**30, "2.50 GiB"), (2**50, "1024.00 TiB"), (-2048, "-2.00 KiB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("kwargs, message", [
    ({"factory": "invseg.analysis._toy.conv_chain"}, "factory"),
    ({"input_shape": (1,)}, "input_shape"),
    ({"input_shape": (1, 0, 4)}, "input_shape"),
    ({"target": "regression"}, "target"),
    ({"device": "tpu"}, "device"),
    ({"precision": "fp8"}, "precision"),
    ({"optimizer": "lbfgs"}, "optimizer"),
    ({"steps": 0}, "steps"),
    ({"warmup": 0}, "warmup"),
    ({"threads": 0}, "threads"),
    ({"num_classes": 0}, "num_classes"),
    ({"lr": -1.0}, "lr"),
    ({"post_step": "update"}, "post_step"),
    ({"factory_kwargs": {"act": object()}}, "factory_kwargs"),
])
def test_step_spec_rejects_bad_arguments(kwargs, message):
    args = {"factory": TOY, **kwargs}
    with pytest.raises(ValueError, match=message):
        StepSpec(**args)


def test_step_spec_round_trip():
    spec = _chain_spec(4, precision="bf16", post_step="invseg.layers:update_spectral_state")
    assert StepSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown StepSpec keys"):
        StepSpec.from_dict({**spec.to_dict(), "batch": 2})
