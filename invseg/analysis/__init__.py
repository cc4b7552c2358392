"""invseg.analysis: checkers and measurements that tests, trainers, benchmarks and users call.

One implementation each (the experiments of :mod:`invseg.experiments` and the scripts build on them; the
checkers of invertible networks -- reconstruction, gradient and condition errors -- are in
:mod:`invseg.blocks.inversion`, beside the blocks they check).

Memory and time of a training step (:mod:`invseg.analysis.memory`, measured in a fresh process)::

    StepSpec            what to build (factory "module:callable" + kwargs) and which step to measure
    StepMeasurement     measured peak / baseline bytes, median step time, saved-tensor bytes
    WorkerError         RuntimeError raised when the measuring process fails (carries its stderr)
    measure_step        measure one training step (the trainers' step, invseg.train.step.train_step)
    measure_steps       measure a list of specs with a progress bar
    measure_call        peak memory of one call of any function (e.g. one bound evaluation)
    SavedTensorCounter  context manager counting bytes packed by saved_tensors_hooks
    saved_tensor_bytes  bytes saved for backward while running a function
    spectral_state_summary  persistent SN state of a model (bytes, tensors, layers)
    format_bytes        human-readable binary size

Spectral-normalization overhead and certificates (:mod:`invseg.analysis.overhead`)::

    OverheadCase, OverheadResult, default_cases, parse_method, run_overhead (step time per SN variant,
    interleaved in one process), update_breakdown (the update's time per mode), certificate_slack
    (how far a layer's certified bound is above its exact norm between searches), format_overhead_table

Accuracy and cost of the depthwise bound (:mod:`invseg.analysis.bound_accuracy`)::

    bound_accuracy (the paper's Figure-2 protocol), bound_cost (time and peak memory of one evaluation),
    depthwise_exact_norm / ExactNorm and reference_norms (the exact reference at any size: dense SVD or
    restarted Lanczos), per_filter_bounds, gaussian_filters
"""

from invseg.analysis.bound_accuracy import (
    BOUNDS,
    AccuracyRecord,
    CostRecord,
    ExactNorm,
    bound_accuracy,
    bound_cost,
    dense_norms,
    depthwise_exact_norm,
    gaussian_filters,
    measure_peak_bytes,
    per_filter_bounds,
    reference_norms,
)
from invseg.analysis.memory import (
    SavedTensorCounter,
    StepMeasurement,
    StepSpec,
    WorkerError,
    format_bytes,
    measure_call,
    measure_step,
    measure_steps,
    saved_tensor_bytes,
    spectral_state_summary,
)
from invseg.analysis.overhead import (
    OverheadCase,
    OverheadResult,
    certificate_slack,
    default_cases,
    format_overhead_table,
    parse_method,
    run_overhead,
    update_breakdown,
)

__all__ = [
    "StepSpec",
    "StepMeasurement",
    "WorkerError",
    "measure_step",
    "measure_steps",
    "measure_call",
    "SavedTensorCounter",
    "saved_tensor_bytes",
    "spectral_state_summary",
    "format_bytes",
    "OverheadCase",
    "OverheadResult",
    "default_cases",
    "parse_method",
    "run_overhead",
    "update_breakdown",
    "certificate_slack",
    "format_overhead_table",
    "BOUNDS",
    "AccuracyRecord",
    "CostRecord",
    "ExactNorm",
    "bound_accuracy",
    "bound_cost",
    "dense_norms",
    "depthwise_exact_norm",
    "gaussian_filters",
    "measure_peak_bytes",
    "per_filter_bounds",
    "reference_norms",
]
