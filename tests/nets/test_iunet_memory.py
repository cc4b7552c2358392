"""IUNet training-step memory vs depth, measured (issue 3): recomputation keeps it flat.

Three training steps are measured in fresh processes (peak RSS of the step, invseg.analysis.measure_step),
concurrently: the memory-efficient IUNet at 2 and 8 blocks per level and the same IUNet with plain
autograd at 8 blocks per level. 2D, 128², channels (8, 16): every activation is 256-512 KiB, well above
the 64 KiB mmap threshold that lets RSS follow tensor memory, and each worker takes a few seconds.

The flatness and 3x checks use ``sn_method="none"`` to isolate the recomputation; a second test keeps the
once-per-step batched update (``"fft"``, ``post_step=update_spectral_state``) and checks it flat too. (It
was not, before the batched search was limited to one layer's transient: 7.0 MiB at 2 blocks/level ->
20.8 MiB at 8.)
"""

from concurrent.futures import ThreadPoolExecutor

import pytest

from invseg.analysis import StepSpec, format_bytes, measure_step

SIZE = 128
CHANNELS = [8, 16]
POINTS = {"efficient_2": (True, 2, "none"), "efficient_8": (True, 8, "none"), "plain_8": (False, 8, "none")}
FFT_POINTS = {"fft_2": (True, 2, "fft"), "fft_8": (True, 8, "fft")}


def _spec(memory_efficient: bool, num_blocks: int, sn_method: str) -> StepSpec:
    kwargs = dict(name="iunet", spatial_dims=2, in_channels=1, out_channels=2, channels=CHANNELS,
                  num_blocks=num_blocks, sn_method=sn_method, memory_efficient=memory_efficient)
    return StepSpec("invseg.nets:create_model", kwargs, input_shape=(1, 1, SIZE, SIZE), threads=1, steps=1,
                    post_step="invseg.layers:update_spectral_state")


def _measure_all(points: dict) -> dict:
    with ThreadPoolExecutor(len(points)) as pool:  # threads wait on one worker process each
        futures = {k: pool.submit(measure_step, _spec(*v)) for k, v in points.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.fixture(scope="module")
def measured():
    return _measure_all(POINTS)


def test_recomputation_keeps_peak_flat_from_2_to_8_blocks(measured):
    small, large = measured["efficient_2"].peak_bytes, measured["efficient_8"].peak_bytes
    # the peak must be made of activations (> 1 MiB), not measurement noise
    assert small > 2**20, format_bytes(small)
    assert large < 1.10 * small, f"{format_bytes(small)} -> {format_bytes(large)}"


def test_recomputation_is_3x_smaller_than_plain_at_8_blocks(measured):
    efficient, plain = measured["efficient_8"], measured["plain_8"]
    assert 3 * efficient.peak_bytes <= plain.peak_bytes, (format_bytes(efficient.peak_bytes),
                                                          format_bytes(plain.peak_bytes))
    # plain autograd keeps every block's activations: its peak follows its saved tensors
    assert plain.peak_bytes >= 0.8 * plain.saved_tensor_bytes
    assert efficient.saved_tensor_bytes < plain.saved_tensor_bytes / 10


@pytest.mark.slow
def test_fft_update_keeps_peak_flat_from_2_to_8_blocks():
    measured = _measure_all(FFT_POINTS)
    small, large = measured["fft_2"].peak_bytes, measured["fft_8"].peak_bytes
    assert large < 1.10 * small, f"{format_bytes(small)} -> {format_bytes(large)}"
