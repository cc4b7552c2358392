"""Pure functions for spectral norms of depthwise-separable convolutions (DESIGN §1).

Depthwise bound (N-d, strided, chunked, differentiable at the arg-max):
    depthwise_bound, depthwise_search, depthwise_search_channels, depthwise_sigma_at, depthwise_phase,
    depthwise_sigma_from_phase, fold_strides, depthwise_geometry, candidate_grids, grids_per_axis,
    depthwise_bound_dense (full-FFT reference and the paper's grid)
Pointwise / dense (warm-start power method on the connectivity matrix, and its certificate, DESIGN §1g):
    pointwise_norm, pointwise_norm_exact, power_iteration, connectivity_matrix, certified_pointwise_norm,
    rayleigh_bound, rotate_deflated, grow_deflated, exact_top_pair, exact_deflated, rounding_margin
References and baselines:
    exact_conv_norm (dense SVD, float64), lanczos_conv_norms (per channel, restarted Lanczos), conv_power_method
    (converged), naive_power_method
    (warm-start full operator), conv_spec, conv_apply, conv_adjoint
Full (dense-channel) convs, e.g. stems:
    full_conv_bound, full_conv_search, full_conv_sigma_at, full_conv_projection, full_conv_sigma_from_projection
Accounting:
    state_bytes, state_tensors
"""

from .accounting import state_bytes, state_tensors
from .depthwise import (
    DEFAULT_MEMORY_BUDGET,
    SMALL_INPUT_POINTS,
    SMALL_INPUT_WORK,
    SMALL_INPUT_WORK_PRUNED,
    SMALL_INPUT_POINTS_PRUNED,
    EXACT_FIRST_CANDIDATES,
    EXACT_MAX_SOLVES,
    depthwise_exact_small,
    use_exact_small,
    DepthwiseGeometry,
    candidate_grids,
    depthwise_bound,
    depthwise_bound_dense,
    depthwise_geometry,
    depthwise_phase,
    depthwise_search,
    depthwise_search_channels,
    depthwise_sigma_at,
    depthwise_sigma_from_phase,
    fold_strides,
    grids_per_axis,
    phase_from_tables,
    search_channels_full,
    search_transient_bytes,
)
from .full_conv import (
    full_conv_bound,
    full_conv_projection,
    full_conv_search,
    full_conv_sigma_at,
    full_conv_sigma_from_projection,
)
from .pointwise import (
    certified_pointwise_norm,
    connectivity_matrix,
    exact_deflated,
    exact_top_pair,
    grow_deflated,
    pointwise_norm,
    pointwise_norm_exact,
    power_iteration,
    rayleigh_bound,
    rotate_deflated,
    rounding_margin,
)
from .reference import (
    MAX_DENSE_SIZE,
    ConvSpec,
    conv_adjoint,
    conv_apply,
    conv_power_method,
    conv_spec,
    exact_conv_norm,
    lanczos_conv_norms,
    naive_power_method,
)

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "SMALL_INPUT_POINTS",
    "SMALL_INPUT_WORK",
    "SMALL_INPUT_WORK_PRUNED",
    "SMALL_INPUT_POINTS_PRUNED",
    "EXACT_FIRST_CANDIDATES",
    "EXACT_MAX_SOLVES",
    "depthwise_exact_small",
    "use_exact_small",
    "DepthwiseGeometry",
    "candidate_grids",
    "depthwise_bound",
    "depthwise_bound_dense",
    "depthwise_geometry",
    "depthwise_search",
    "depthwise_sigma_at",
    "depthwise_search_channels",
    "depthwise_phase",
    "depthwise_sigma_from_phase",
    "fold_strides",
    "grids_per_axis",
    "phase_from_tables",
    "search_channels_full",
    "search_transient_bytes",
    "connectivity_matrix",
    "pointwise_norm",
    "pointwise_norm_exact",
    "power_iteration",
    "certified_pointwise_norm",
    "rayleigh_bound",
    "rotate_deflated",
    "grow_deflated",
    "exact_top_pair",
    "exact_deflated",
    "rounding_margin",
    "MAX_DENSE_SIZE",
    "ConvSpec",
    "conv_adjoint",
    "conv_apply",
    "conv_power_method",
    "conv_spec",
    "exact_conv_norm",
    "lanczos_conv_norms",
    "naive_power_method",
    "full_conv_bound",
    "full_conv_search",
    "full_conv_sigma_at",
    "full_conv_projection",
    "full_conv_sigma_from_projection",
    "state_bytes",
    "state_tensors",
]
