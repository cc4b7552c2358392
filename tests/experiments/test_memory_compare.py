"""Tests of invseg.experiments.memory_compare / memory_depth and their scripts.

The state accounting is checked in-process against hand-counted tensors; the scripts' smoke tests
spawn two tiny workers each (run concurrently, ``measure.jobs=2``).
"""

import contextlib
import importlib.util
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from invseg.analysis import StepSpec, WorkerError
from invseg.analysis.memory import spectral_state_summary
from invseg.experiments.memory_compare import (
    MemoryCase,
    MemoryCompareConfig,
    MemoryRecord,
    format_sn_summary,
    format_sn_table,
    measure_case,
    plot_sn_memory,
    sn_compare_cases,
    sn_summary,
)
from invseg.experiments.memory_depth import (
    DepthSweepConfig,
    depth_summary,
    depth_sweep_cases,
    format_depth_table,
    monai_res_units,
    plot_depth_sweep,
    split_blocks,
)
from invseg.config import load_config
from invseg.layers import SNDSConv
from invseg.nets.ds_stack import DSStack
from invseg.spectral import state_bytes, state_tensors

ROOT = Path(__file__).resolve().parents[2]
I64, F32 = 8, 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- accounting against hand-counted tensors ----------------------------------------------------


def _hand_count(method: str, d: int, c_in: int, size: tuple) -> tuple[int, list]:
    """Bytes and shapes of the persistent SN state of one SNDSConv(c_in -> *) after a forward on size."""
    if method == "fft":
        # depthwise: sn_state (1 + 2d int64: channel, grid, frequency), sn_input_size (d int64), sn_bound (the
        # certified bound per channel, c_in floats); pointwise: sn_v (c_in floats), sn_bound and sn_deflated (floats)
        shapes = [(1 + 2 * d,), (d,), (c_in,), (c_in,), (), ()]
        return (1 + 2 * d) * I64 + d * I64 + 2 * c_in * F32 + 2 * F32, shapes
    if method == "naive":
        # each part: one input-sized feature map (1, c_in, *N) in fp32, its input size (d int64) and σ (a float)
        fmap = (1, c_in, *size)
        return 2 * (c_in * int(torch.tensor(size).prod()) * F32 + d * I64 + F32), [fmap, (d,), (), fmap, (d,), ()]
    return 0, []


@pytest.mark.parametrize("method", ["fft", "naive", "none"])
@pytest.mark.parametrize("d,size", [(2, (12, 10)), (3, (6, 5, 4))])
def test_state_accounting_matches_hand_count(method, d, size):
    c_in, c_out = 5, 3
    layer = SNDSConv(d, c_in, c_out, method=method)
    layer(torch.randn(2, c_in, *size))  # the naive buffers are allocated lazily by the first forward
    expected, shapes = _hand_count(method, d, c_in, size)
    assert state_bytes(layer) == expected
    assert sorted(tuple(t.shape) for t in state_tensors(layer)) == sorted(shapes)
    summary = spectral_state_summary(layer)
    assert summary["state_bytes"] == expected
    assert summary["num_state_tensors"] == len(shapes)
    assert summary["num_sn_layers"] == 2  # depthwise + pointwise parts
    largest = {"fft": max((1 + 2 * d) * I64, c_in * F32), "naive": c_in * int(torch.tensor(size).prod()) * F32,
               "none": 0}[method]
    assert summary["largest_state_tensor_bytes"] == largest


def test_naive_state_follows_input_size_and_not_batch():
    layer = SNDSConv(3, 4, 4, method="naive")
    layer(torch.randn(2, 4, 6, 6, 6))
    first = state_bytes(layer)
    assert first == _hand_count("naive", 3, 4, (6, 6, 6))[0]
    layer(torch.randn(1, 4, 8, 8, 8))  # a new size replaces the feature maps
    assert state_bytes(layer) == _hand_count("naive", 3, 4, (8, 8, 8))[0] > first


@pytest.mark.parametrize("method", ["fft", "naive", "none"])
def test_ds_stack_state_is_depth_times_layer_state(method):
    c, depth, size = 6, 3, (4, 6, 8)
    net = DSStack(3, 1, 2, channels=c, depth=depth, sn_method=method)
    net(torch.randn(1, 1, *size))
    expected = depth * _hand_count(method, 3, c, size)[0]
    summary = spectral_state_summary(net)
    assert summary["state_bytes"] == expected
    assert summary["num_sn_layers"] == 2 * depth  # SN layer modules, whatever their method


# --- depth rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth,levels,expected", [
    (5, 2, [2, 1]), (10, 2, [3, 4]), (20, 2, [7, 6]), (30, 2, [10, 10]), (3, 2, [1, 1]),
    (7, 3, [2, 1, 1]), (9, 3, [2, 2, 1]), (4, 1, [4]),
])
def test_split_blocks(depth, levels, expected):
    blocks = split_blocks(depth, levels)
    assert blocks == expected
    assert 2 * sum(blocks[:-1]) + blocks[-1] == depth


@pytest.mark.parametrize("depth,levels", [(2, 2), (4, 3), (5, 0), (2.0, 1)])
def test_split_blocks_rejects(depth, levels):
    with pytest.raises(ValueError, match="depth|levels"):
        split_blocks(depth, levels)


@pytest.mark.parametrize("depth,levels,units", [(5, 2, 2), (10, 2, 5), (30, 2, 15), (3, 2, 1), (9, 3, 2)])
def test_monai_res_units(depth, levels, units):
    assert monai_res_units(depth, levels) == units


# --- grids and validation ----------------------------------------------------------------------


def test_depth_sweep_cases_grid():
    cfg = load_config(DepthSweepConfig, None, ["depths=[5,10]", "sizes=[16,32]"])
    cases = depth_sweep_cases(cfg)
    assert len(cases) == 2 * 2 * 3
    eff = [c for c in cases if c.network == "iunet" and c.depth == 10 and c.size == 16][0]
    assert eff.spec.factory_kwargs["memory_efficient"] is True and eff.spec.factory_kwargs["num_blocks"] == [3, 4]
    assert eff.spec.input_shape == (1, 1, 16, 16, 16) and eff.spec.threads == 1
    plain = [c for c in cases if c.network == "iunet_plain" and c.depth == 10 and c.size == 16][0]
    assert plain.spec.factory_kwargs["memory_efficient"] is False
    monai = [c for c in cases if c.network == "monai_unet" and c.depth == 5][0]
    assert monai.spec.factory == "monai.networks.nets:UNet" and monai.spec.factory_kwargs["num_res_units"] == 2
    assert monai.spec.post_step is None
    # cuda: the GPU sizes and no thread setting
    cuda = depth_sweep_cases(load_config(DepthSweepConfig, None, ["measure.device=cuda"]))
    assert sorted({c.size for c in cuda}) == [32, 64, 128] and all(c.spec.threads is None for c in cuda)


def test_sn_compare_default_config_grid():
    cfg = load_config(MemoryCompareConfig, ROOT / "configs" / "memory_vs_naive.yaml")
    cases = sn_compare_cases(cfg)
    assert len(cases) == 2 * 2 * 2 * 3  # models x batches x sizes x methods
    assert {c.sn_method for c in cases} == {"fft", "naive", "none"}
    stack = [c for c in cases if c.network == "ds_stack"][0]
    assert stack.spec.factory_kwargs["channels"] == 32 and stack.spec.factory_kwargs["depth"] == 8
    assert all(c.spec.post_step.endswith(":update_and_record_state") for c in cases)


@pytest.mark.parametrize("overrides,match", [
    (["sizes=[12,33]"], "multiple of 2"),
    (["iunet.channels=[8,12]"], "channels\\[1\\]"),
    (["batch_sizes=[]"], "batch_sizes"),
    (["measure.jobs=0"], "jobs"),
])
def test_sn_compare_rejects(overrides, match):
    cfg = load_config(MemoryCompareConfig, None, overrides)
    with pytest.raises(ValueError, match=match):
        sn_compare_cases(cfg)


def test_depth_sweep_rejects_too_shallow():
    with pytest.raises(ValueError, match="depth must be"):
        depth_sweep_cases(load_config(DepthSweepConfig, None, ["depths=[2]"]))


def test_config_rejects_unknown_method():
    with pytest.raises(ValueError, match="methods"):
        load_config(MemoryCompareConfig, None, ["methods=[fast]"])


# --- summaries, tables and plots on hand-made records --------------------------------------------


def _rec(network, method, size, peak, state, time_s=1.0, batch=1, depth=None, blocks=None):
    return MemoryRecord(network, method, batch, size, depth, blocks, peak_bytes=peak, state_bytes=state,
                        state_plus_peak_bytes=peak + state, run_peak_bytes=peak + state, step_time_s=time_s)


def test_sn_summary_ratios_at_largest_size(tmp_path):
    recs = [
        _rec("ds_stack", "fft", 16, 100, 10), _rec("ds_stack", "naive", 16, 120, 1000),
        _rec("ds_stack", "fft", 32, 800, 10, 2.0), _rec("ds_stack", "naive", 32, 1000, 8000, 6.0),
        _rec("ds_stack", "none", 32, 780, 0, 1.6),
        MemoryRecord("ds_stack", "naive", 1, 48, None, None, error="timed out"),  # failed: ignored
    ]
    (s,) = sn_summary(recs)
    assert s["size"] == 32
    assert s["state_naive_over_fft"] == 800
    assert s["state_plus_peak_naive_over_fft"] == pytest.approx(9000 / 810)
    assert s["peak_fft_over_none"] == pytest.approx(800 / 780)
    assert s["time_naive_over_fft"] == pytest.approx(3.0)
    table = format_sn_table(recs)
    assert table.count("\n") == len(recs) + 1 and "failed" in table
    assert "800" in format_sn_summary([s])
    png = plot_sn_memory(recs, tmp_path / "sn.png")
    assert png.stat().st_size > 1000


def test_depth_summary_and_table(tmp_path):
    recs = [
        _rec("iunet", "fft", 32, 100, 1, 2.0, depth=5, blocks=[2, 1]),
        _rec("iunet", "fft", 32, 105, 1, 6.0, depth=30, blocks=[10, 10]),
        _rec("iunet_plain", "fft", 32, 200, 1, 1.0, depth=5, blocks=[2, 1]),
        _rec("iunet_plain", "fft", 32, 900, 1, 4.0, depth=30, blocks=[10, 10]),
        _rec("monai_unet", "-", 32, 300, 0, 0.5, depth=5, blocks=[2]),
    ]
    (s,) = depth_summary(recs)
    assert s["growth"]["iunet"] == pytest.approx(0.05) and s["growth"]["iunet_plain"] == pytest.approx(3.5)
    assert s["growth"]["monai_unet"] is None  # depth 30 missing
    assert s["plain_over_efficient_peak"] == pytest.approx(900 / 105)
    assert s["efficient_over_plain_time"] == pytest.approx(1.5)
    table = format_depth_table(recs)
    assert "[10, 10]" in table and "res units 2" in table and "1.50" in table
    assert plot_depth_sweep(recs, tmp_path / "d.png").stat().st_size > 1000


# --- measuring in workers: the scripts on tiny grids (2 workers each, all 4 concurrently) ----------
# The state recorded inside each worker (update_and_record_state) must equal the hand count here.


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """Run both scripts' main at once (threads; each main waits on 2 concurrent worker processes)."""
    out = {name: tmp_path_factory.mktemp(name) for name in ("memory_compare", "bench_memory")}
    argv = {
        "memory_compare": ["--set", "models=[ds_stack]", "--set", "methods=[fft,naive]", "--set", "batch_sizes=[2]",
                           "--set", "sizes=[8]", "--set", "ds_stack.channels=4", "--set", "ds_stack.depth=2",
                           "--set", "measure.jobs=2", "--set", f"out_dir={out['memory_compare']}"],
        "bench_memory": ["--set", "depths=[3]", "--set", "sizes=[8]", "--set", "channels=[4,16]",
                         "--set", "networks=[iunet,monai_unet]", "--set", "measure.jobs=2",
                         "--set", f"out_dir={out['bench_memory']}"],
    }
    mains = {name: _load_script(name).main for name in argv}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(mains[name], argv[name]) for name in argv}
        rcs = {name: f.result() for name, f in futures.items()}
    return rcs, buf.getvalue(), out


def test_memory_compare_script(script_runs):
    rcs, text, out = script_runs
    assert rcs["memory_compare"] == 0
    assert "| ds_stack | 2 | 8³ | fft |" in text and "| ds_stack | 2 | 8³ | naive |" in text
    data = json.loads((out["memory_compare"] / "results.json").read_text())
    by_method = {r["sn_method"]: r for r in data["records"]}
    assert by_method["fft"]["state_bytes"] == 2 * _hand_count("fft", 3, 4, (8, 8, 8))[0]
    # naive: (1, C, *N) per layer part, whatever the batch (2 here)
    assert by_method["naive"]["state_bytes"] == 2 * _hand_count("naive", 3, 4, (8, 8, 8))[0]
    for r in data["records"]:
        assert r["error"] is None and r["num_sn_layers"] == 4 and r["step_time_s"] > 0
        assert r["state_plus_peak_bytes"] == r["state_bytes"] + r["peak_bytes"]
    assert data["summary"][0]["state_naive_over_fft"] == pytest.approx(
        by_method["naive"]["state_bytes"] / by_method["fft"]["state_bytes"])
    assert data["machine"]["device"] == "cpu"
    assert (out["memory_compare"] / "memory_vs_size.png").is_file()
    assert (out["memory_compare"] / "config.yaml").is_file()


def test_bench_memory_script(script_runs):
    rcs, text, out = script_runs
    assert rcs["bench_memory"] == 0
    assert "| 8³ | 3 | [1, 1] |" in text
    data = json.loads((out["bench_memory"] / "results.json").read_text())
    assert {r["network"] for r in data["records"]} == {"iunet", "monai_unet"}
    assert all(r["error"] is None and r["step_time_s"] > 0 for r in data["records"])
    monai = [r for r in data["records"] if r["network"] == "monai_unet"][0]
    assert monai["state_bytes"] == 0 and monai["blocks"] == [1]
    assert (out["bench_memory"] / "depth_sweep.png").is_file()


def test_measure_case_reports_failure():
    # a worker killed by the timeout becomes a failed record, not an exception
    spec = StepSpec("invseg.nets.ds_stack:DSStack", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2},
                    input_shape=(1, 1, 4, 4, 4), threads=1)
    rec = measure_case(MemoryCase("ds_stack", "fft", 1, 4, 8, None, spec), timeout=0.2)
    assert not rec.ok and "timed out" in rec.error and rec.peak_bytes is None
    with pytest.raises(WorkerError):
        measure_case(MemoryCase("ds_stack", "fft", 1, 4, 8, None, spec), timeout=0.2, on_error="raise")


def test_scripts_reject_bad_config(capsys):
    assert _load_script("memory_compare").main(["--set", "sizes=[7]"]) == 2
    assert "multiple of 2" in capsys.readouterr().err
