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

# --- inversion error (invseg.analysis.inversion) -----------------------------------------------
# reconstruction_error     ||x - f^-1(f(x))|| / ||x|| of any invertible module, per precision
# block_error_growth       the same error for every prefix of a sequence (nested ones flattened)
# condition_estimate       Lip(f) at x and Lip(f^-1) at f(x) by power iteration through autograd
# gradient_error           memory-efficient vs plain backprop gradients on identical weights
# scale_subnet_weights     the sweep's adversarial setting (sub-network weights scaled up)
# run_inversion_sweep      inversion error vs K (InversionSweepConfig), tables, plot, files
from invseg.analysis.inversion import (
    PRECISIONS,
    SETTINGS,
    ConditionEstimate,
    GradientError,
    InversionSweepConfig,
    ReconstructionError,
    StepError,
    SweepNetConfig,
    SweepResult,
    block_error_growth,
    condition_estimate,
    format_sweep_tables,
    gradient_error,
    plot_sweep,
    precision_available,
    reconstruction_error,
    run_inversion_sweep,
    scale_subnet_weights,
    synthetic_segmentation_batch,
    write_sweep,
)

__all__ += [
    # inversion error
    "PRECISIONS",
    "SETTINGS",
    "ReconstructionError",
    "StepError",
    "ConditionEstimate",
    "GradientError",
    "precision_available",
    "reconstruction_error",
    "block_error_growth",
    "condition_estimate",
    "gradient_error",
    "scale_subnet_weights",
    "synthetic_segmentation_batch",
    "SweepNetConfig",
    "InversionSweepConfig",
    "SweepResult",
    "run_inversion_sweep",
    "format_sweep_tables",
    "plot_sweep",
    "write_sweep",
]

# --- measured memory comparisons (invseg.analysis.memory_compare) -----------------------------
# DepthSweepConfig / depth_sweep_cases   IUNet (recompute) vs plain vs MONAI UNet over depth (issue 3)
# MemoryCompareConfig / sn_compare_cases SN state + step peak: "fft" vs "naive" vs "none" (issue 7)
# run_cases / measure_case               measure each point in a fresh process, SN state recorded there
# spectral_state_summary                 persistent SN state of a model (library accounting)
from invseg.analysis.memory_compare import (  # noqa: E402
    DepthSweepConfig,
    MeasureConfig,
    MemoryCase,
    MemoryCompareConfig,
    MemoryRecord,
    depth_summary,
    depth_sweep_cases,
    format_depth_table,
    format_sn_summary,
    format_sn_table,
    measure_case,
    monai_res_units,
    plot_depth_sweep,
    plot_sn_memory,
    run_cases,
    sn_compare_cases,
    sn_summary,
    spectral_state_summary,
    split_blocks,
    update_and_record_state,
)

__all__ += [
    # measured memory comparisons
    "MeasureConfig",
    "DepthSweepConfig",
    "MemoryCompareConfig",
    "MemoryCase",
    "MemoryRecord",
    "split_blocks",
    "monai_res_units",
    "depth_sweep_cases",
    "sn_compare_cases",
    "measure_case",
    "run_cases",
    "spectral_state_summary",
    "update_and_record_state",
    "depth_summary",
    "sn_summary",
    "format_depth_table",
    "format_sn_table",
    "format_sn_summary",
    "plot_depth_sweep",
    "plot_sn_memory",
]
