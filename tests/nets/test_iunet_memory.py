"""IUNet training-step memory vs depth, measured (issue 3): recomputation keeps it flat.

Three training steps are measured in fresh processes (peak RSS of the step, invseg.analysis.measure_step),
concurrently: the memory-efficient IUNet at 2 and 8 blocks per level and the same IUNet with plain
autograd at 8 blocks per level. 2D, 128², channels (8, 16): every activation is 256-512 KiB, well above
the 64 KiB mmap threshold that lets RSS follow tensor memory, and each worker takes a few seconds.

``sn_method="none"``: the spectral update's chunked search (``"fft"``) allocates up to its 64 MiB budget
after ``optimizer.step()``, which would be the whole peak at this size (about 60 MiB for both depths) and
make the flatness check vacuous. The SN methods' memory is compared by ``scripts/memory_compare.py``.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest

from invseg.analysis import StepSpec, format_bytes, measure_step

SIZE = 128
CHANNELS = [8, 16]
POINTS = {"efficient_2": (True, 2), "efficient_8": (True, 8), "plain_8": (False, 8)}


def _spec(memory_efficient: bool, num_blocks: int) -> StepSpec:
    kwargs = dict(name="iunet", spatial_dims=2, in_channels=1, out_channels=2, channels=CHANNELS,
                  num_blocks=num_blocks, sn_method="none", memory_efficient=memory_efficient)
    return StepSpec("invseg.nets:create_model", kwargs, input_shape=(1, 1, SIZE, SIZE), threads=1, steps=1,
                    post_step="invseg.layers:update_spectral_state")


@pytest.fixture(scope="module")
def measured():
    with ThreadPoolExecutor(len(POINTS)) as pool:  # threads wait on one worker process each
        futures = {k: pool.submit(measure_step, _spec(*v)) for k, v in POINTS.items()}
        return {k: f.result() for k, f in futures.items()}


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
