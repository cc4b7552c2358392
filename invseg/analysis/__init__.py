"""invseg.analysis: checkers and measurements that tests, scripts and users call.

Memory and time (:mod:`invseg.analysis.memory`):

    StepSpec            what to build (factory "module:callable" + kwargs) and which step to measure
    StepMeasurement     measured peak / baseline bytes, median step time, saved-tensor bytes
    WorkerError         RuntimeError raised when the measuring process fails (carries its stderr)
    measure_step        measure one training step in a fresh process (peak RSS on CPU, CUDA counters)
    measure_steps       measure a list of specs with a progress bar
    SavedTensorCounter  context manager counting bytes packed by saved_tensors_hooks
    saved_tensor_bytes  bytes saved for backward while running a function
    format_bytes        human-readable binary size
"""

from invseg.analysis.memory import (
    SavedTensorCounter,
    StepMeasurement,
    StepSpec,
    WorkerError,
    format_bytes,
    measure_step,
    measure_steps,
    saved_tensor_bytes,
)

__all__ = [
    # memory and time of a training step
    "StepSpec",
    "StepMeasurement",
    "WorkerError",
    "measure_step",
    "measure_steps",
    "SavedTensorCounter",
    "saved_tensor_bytes",
    "format_bytes",
]
