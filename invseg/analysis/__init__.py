"""invseg.analysis: checkers and measurements that tests, scripts and users call.

Sub-modules: memory (measured step memory/time), memory_compare (IUNet vs depth, SN state vs naive),
inversion (reconstruction/gradient error, condition, the K sweep), overhead (SN step-time overhead),
bound_accuracy (the paper's Figure-2 protocol), paper (Table 2 timing, MobileNetV2 per-layer bounds).
Names below are imported lazily on first access.

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

import importlib

# name -> defining module; imported on first access (PEP 562), so that a measurement worker that needs
# only invseg.analysis.memory does not pay for torch-heavy siblings (train, data, MONAI) at start-up.
_LAZY = {
    # invseg.analysis.memory
    "SavedTensorCounter": "invseg.analysis.memory",
    "StepMeasurement": "invseg.analysis.memory",
    "StepSpec": "invseg.analysis.memory",
    "WorkerError": "invseg.analysis.memory",
    "format_bytes": "invseg.analysis.memory",
    "measure_step": "invseg.analysis.memory",
    "measure_steps": "invseg.analysis.memory",
    "saved_tensor_bytes": "invseg.analysis.memory",
    # invseg.analysis.paper
    "MOBILENETV2_DEPTHWISE_STRIDES": "invseg.analysis.paper",
    "ClassifierTiming": "invseg.analysis.paper",
    "ExactNorm": "invseg.analysis.paper",
    "LayerBoundAccuracy": "invseg.analysis.paper",
    "depthwise_exact_norm": "invseg.analysis.paper",
    "format_bound_accuracy_table": "invseg.analysis.paper",
    "format_timing_table": "invseg.analysis.paper",
    "mobilenetv2_bound_accuracy": "invseg.analysis.paper",
    "mobilenetv2_depthwise_weights": "invseg.analysis.paper",
    "summarize_bound_accuracy": "invseg.analysis.paper",
    "time_classifier": "invseg.analysis.paper",
    # invseg.analysis.inversion
    "PRECISIONS": "invseg.analysis.inversion",
    "SETTINGS": "invseg.analysis.inversion",
    "ConditionEstimate": "invseg.analysis.inversion",
    "GradientError": "invseg.analysis.inversion",
    "InversionSweepConfig": "invseg.analysis.inversion",
    "ReconstructionError": "invseg.analysis.inversion",
    "StepError": "invseg.analysis.inversion",
    "SweepNetConfig": "invseg.analysis.inversion",
    "SweepResult": "invseg.analysis.inversion",
    "block_error_growth": "invseg.analysis.inversion",
    "condition_estimate": "invseg.analysis.inversion",
    "format_sweep_tables": "invseg.analysis.inversion",
    "gradient_error": "invseg.analysis.inversion",
    "plot_sweep": "invseg.analysis.inversion",
    "precision_available": "invseg.analysis.inversion",
    "reconstruction_error": "invseg.analysis.inversion",
    "run_inversion_sweep": "invseg.analysis.inversion",
    "scale_subnet_weights": "invseg.analysis.inversion",
    "synthetic_segmentation_batch": "invseg.analysis.inversion",
    "write_sweep": "invseg.analysis.inversion",
    # invseg.analysis.memory_compare
    "DepthSweepConfig": "invseg.analysis.memory_compare",
    "MeasureConfig": "invseg.analysis.memory_compare",
    "MemoryCase": "invseg.analysis.memory_compare",
    "MemoryCompareConfig": "invseg.analysis.memory_compare",
    "MemoryRecord": "invseg.analysis.memory_compare",
    "depth_summary": "invseg.analysis.memory_compare",
    "depth_sweep_cases": "invseg.analysis.memory_compare",
    "format_depth_table": "invseg.analysis.memory_compare",
    "format_sn_summary": "invseg.analysis.memory_compare",
    "format_sn_table": "invseg.analysis.memory_compare",
    "measure_case": "invseg.analysis.memory_compare",
    "monai_res_units": "invseg.analysis.memory_compare",
    "plot_depth_sweep": "invseg.analysis.memory_compare",
    "plot_sn_memory": "invseg.analysis.memory_compare",
    "run_cases": "invseg.analysis.memory_compare",
    "sn_compare_cases": "invseg.analysis.memory_compare",
    "sn_summary": "invseg.analysis.memory_compare",
    "spectral_state_summary": "invseg.analysis.memory_compare",
    "split_blocks": "invseg.analysis.memory_compare",
    "update_and_record_state": "invseg.analysis.memory_compare",
    # invseg.analysis.overhead
    "OverheadCase": "invseg.analysis.overhead",
    "OverheadResult": "invseg.analysis.overhead",
    "default_cases": "invseg.analysis.overhead",
    "run_overhead": "invseg.analysis.overhead",
    "format_overhead_table": "invseg.analysis.overhead",
    # invseg.analysis.bound_accuracy
    "bound_accuracy": "invseg.analysis.bound_accuracy",
    "bound_cost": "invseg.analysis.bound_accuracy",
    "format_accuracy_table": "invseg.analysis.bound_accuracy",
    "format_cost_table": "invseg.analysis.bound_accuracy",
    "plot_bound_accuracy": "invseg.analysis.bound_accuracy",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
