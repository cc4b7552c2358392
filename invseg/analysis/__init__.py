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

# the paper's measurements: Table 2 timing, MobileNetV2 per-layer bound accuracy (§3.3, §4.4)
from invseg.analysis.paper import (  # noqa: E402
    MOBILENETV2_DEPTHWISE_STRIDES,
    ClassifierTiming,
    ExactNorm,
    LayerBoundAccuracy,
    depthwise_exact_norm,
    format_bound_accuracy_table,
    format_timing_table,
    mobilenetv2_bound_accuracy,
    mobilenetv2_depthwise_weights,
    summarize_bound_accuracy,
    time_classifier,
)

__all__ += [
    "ClassifierTiming",
    "time_classifier",
    "format_timing_table",
    "ExactNorm",
    "depthwise_exact_norm",
    "MOBILENETV2_DEPTHWISE_STRIDES",
    "mobilenetv2_depthwise_weights",
    "LayerBoundAccuracy",
    "mobilenetv2_bound_accuracy",
    "summarize_bound_accuracy",
    "format_bound_accuracy_table",
]
