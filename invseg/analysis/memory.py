"""Measured peak memory and time of one training step.

A training step is measured in a **fresh Python process** (``python -m
invseg.analysis._worker``) so that nothing left over from the caller (other models, cached
allocator blocks, earlier peaks) leaks into the number. The step measured is the trainers' step,
:func:`invseg.train.step.train_step`::

    optimizer.zero_grad(set_to_none=True)
    out = model(x); loss = loss_fn(out)        # under autocast for bf16 / fp16
    scaler.scale(loss).backward()              # the grad scaler is enabled for fp16 only
    scaler.step(optimizer); scaler.update()
    post_step(model)                           # optional, e.g. the once-per-step spectral update

How memory is measured (DESIGN §4, "Measuring memory on CPU"):

* **CUDA** (``method="cuda"``): ``torch.cuda.reset_peak_memory_stats()``, then the peak
  ``torch.cuda.max_memory_allocated()`` during the step minus ``torch.cuda.memory_allocated()``
  right before it.
* **CPU** (``method="rss"``): PyTorch has no CPU peak-allocation counter, and saved-tensor hooks
  miss what custom autograd Functions (memcnn, checkpointing) keep. The worker reads ``VmRSS`` from
  ``/proc/self/status``, resets the peak by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0),
  runs the step and reads ``VmHWM``; the peak of the step is ``VmHWM - VmRSS``. The worker is
  started with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc serves tensor-sized blocks with
  ``mmap`` and returns them to the OS on free: RSS then follows live tensor memory. There is no
  fallback: where ``clear_refs`` cannot be written the worker fails with a ``RuntimeError``.
  Resolution: blocks under 64 KiB come from the malloc heap, which is not returned to the OS, and
  the kernel's RSS counters lag by a few hundred KiB; tiny models can read as 0 or slightly
  negative. Checked: a chain of 1x1 convs on a 1 MiB activation grows by 1.00 MiB per conv (as
  on CUDA); without the mmap threshold the same peaks read 1-5 MiB instead of 12-20 MiB.

At least one warm-up step runs first (optimizer state, gradients' first allocation, library
workspaces), then ``steps`` measured steps; the peak is the maximum over them (the peak counter is
reset before each) and the time the median. The bytes saved for backward
(:func:`saved_tensor_bytes`) are reported beside the measurement, but they are not the measure:
tensors held by custom autograd Functions and by the allocator escape them.

Example::

    spec = StepSpec("invseg.analysis._toy:conv_chain", {"channels": 32, "depth": 8},
                    input_shape=(1, 32, 64, 64), target="sum")
    m = measure_step(spec)
    print(format_bytes(m.peak_bytes), m.step_time_s)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

__all__ = [
    "StepSpec",
    "StepMeasurement",
    "WorkerError",
    "SavedTensorCounter",
    "measure_step",
    "measure_steps",
    "measure_call",
    "saved_tensor_bytes",
    "format_bytes",
    "STATE_FILE_ENV",
    "spectral_state_summary",
    "update_and_record_state",
]

TARGETS = ("segmentation", "classification", "sum")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adam")

# glibc: allocations of at least this size are served by mmap and unmapped on free (DESIGN §4).
MALLOC_MMAP_THRESHOLD = 65536
# Characters of the worker's stderr carried by a WorkerError.
_STDERR_TAIL = 4000


def _check_callable_path(name: str, value: Any) -> None:
    """Check a ``"package.module:callable"`` string."""
    if not isinstance(value, str) or value.count(":") != 1 or not all(value.split(":")):
        raise ValueError(f"{name} must be a 'package.module:callable' string, got {value!r}")


@dataclass
class StepSpec:
    """What to build and which training step to measure.

    Everything must be JSON-serializable: the spec travels to the worker process as JSON (tuples
    inside ``factory_kwargs`` arrive as lists).

    Attributes:
        factory: ``"package.module:callable"`` returning an ``nn.Module``, e.g.
            ``"invseg.nets:create_model"`` (with ``{"name": "iunet", ...}``) or
            ``"monai.networks.nets:UNet"``.
        factory_kwargs: keyword arguments of the factory. Default ``{}``.
        input_shape: input shape ``(B, C, *spatial)``; the input is ``torch.randn`` in fp32.
        target: ``"segmentation"`` (integer labels ``(B, *spatial_out)``, cross-entropy),
            ``"classification"`` (labels ``(B,)``, cross-entropy) or ``"sum"``
            (``loss = output.float().square().mean()``). Default ``"segmentation"``.
        num_classes: number of classes for the labels; ``None`` (default) takes the output
            channels ``out.shape[1]``. When given it must equal them.
        device: ``"cpu"`` or ``"cuda"``. Default ``"cpu"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``; bf16/fp16 run forward and loss under
            ``torch.autocast``, fp16 with a ``GradScaler``. Default ``"fp32"``.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``. Default ``"sgd"``.
        lr: learning rate. Default ``1e-3``.
        steps: measured steps after the warm-up (peak = max, time = median). Default 3.
        warmup: warm-up steps, at least 1 (the first allocates gradients and optimizer state).
            Default 1.
        seed: seed of ``torch.manual_seed`` in the worker. Default 0.
        threads: ``torch.set_num_threads`` in the worker; ``None`` (default) keeps torch's default.
        post_step: optional ``"module:callable"`` called as ``post_step(model)`` after every
            ``optimizer.step()``, e.g. ``"invseg.layers:update_spectral_state"``. If it cannot be
            imported the worker fails.
    """

    factory: str
    factory_kwargs: dict = field(default_factory=dict)
    input_shape: tuple = (1, 1, 32, 32)
    target: str = "segmentation"
    num_classes: int | None = None
    device: str = "cpu"
    precision: str = "fp32"
    optimizer: str = "sgd"
    lr: float = 1e-3
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    threads: int | None = None
    post_step: str | None = None

    def __post_init__(self) -> None:
        _check_callable_path("factory", self.factory)
        if not isinstance(self.factory_kwargs, Mapping):
            raise ValueError(f"factory_kwargs must be a dict, got {type(self.factory_kwargs).__name__}")
        self.factory_kwargs = dict(self.factory_kwargs)
        try:
            json.dumps(self.factory_kwargs)
        except TypeError as err:
            raise ValueError(f"factory_kwargs must be JSON-serializable, got {self.factory_kwargs!r}: {err}") from None
        shape = tuple(self.input_shape)
        if len(shape) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise ValueError(f"input_shape must be (B, C, *spatial) of positive ints, got {self.input_shape!r}")
        self.input_shape = shape
        for name, value, allowed in (
            ("target", self.target, TARGETS),
            ("device", self.device, DEVICES),
            ("precision", self.precision, PRECISIONS),
            ("optimizer", self.optimizer, OPTIMIZERS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.precision == "fp16" and self.device != "cuda":
            raise ValueError("precision='fp16' (float16 autocast with loss scaling) needs device='cuda', got "
                             f"device={self.device!r}; use 'bf16' or 'fp32' on the CPU")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ValueError(f"num_classes must be None or a positive int, got {self.num_classes!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if not isinstance(self.warmup, int) or self.warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (the first step allocates gradients and "
                             f"optimizer state), got {self.warmup!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be None or an int >= 1, got {self.threads!r}")
        if self.post_step is not None:
            _check_callable_path("post_step", self.post_step)

    def to_dict(self) -> dict:
        """The spec as a JSON-ready dict (``input_shape`` as a list)."""
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StepSpec":
        """Rebuild a spec from :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown StepSpec keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


@dataclass
class StepMeasurement:
    """Measured memory and time of one training step (see the module docstring for the method).

    Attributes:
        spec: the measured :class:`StepSpec`.
        peak_bytes: peak memory of the step above the memory in use right before it (max over the
            measured steps): ``VmHWM - VmRSS`` on CPU, ``max_memory_allocated - memory_allocated``
            on CUDA. Activations, gradients, optimizer temporaries, workspaces.
        baseline_bytes: memory in use right before the step that gave the peak: RSS on CPU
            (interpreter and libraries included), allocated bytes on CUDA (model, gradients freed by
            ``set_to_none``, optimizer state, input).
        startup_bytes: memory in use before the model was built (RSS after imports on CPU,
            allocated bytes on CUDA, normally 0). On CUDA ``baseline_bytes - startup_bytes`` is
            what the model, optimizer state and data hold between steps; on CPU it also holds the
            library state loaded lazily by the first step (oneDNN kernels, thread pools: ~100+ MB).
        step_time_s: median wall time of the measured steps (CUDA synchronized).
        saved_tensor_bytes: bytes packed by ``saved_tensors_hooks`` during the forward and loss of
            the first warm-up step, parameters and buffers excluded. Reported beside the peak; it
            misses what custom autograd Functions keep.
        param_bytes: bytes of the model's parameters.
        num_params: number of parameter elements.
        device: ``"cpu"`` or ``"cuda"``.
        method: ``"rss"`` (CPU) or ``"cuda"``.
        device_name: CPU / GPU name as reported by the worker.
        threads: ``torch.get_num_threads()`` in the worker.
        torch_version: torch version in the worker.
        peak_bytes_per_step: peak of each measured step.
        step_times_s: wall time of each measured step.
    """

    spec: StepSpec
    peak_bytes: int
    baseline_bytes: int
    startup_bytes: int
    step_time_s: float
    saved_tensor_bytes: int
    param_bytes: int
    num_params: int
    device: str
    method: str
    device_name: str = ""
    threads: int = 0
    torch_version: str = ""
    peak_bytes_per_step: list = field(default_factory=list)
    step_times_s: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dict; the spec is nested under ``"spec"``."""
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.to_dict()
        return d


class WorkerError(RuntimeError):
    """The step worker failed (exception, crash, timeout or missing result).

    Attributes:
        returncode: exit status of the worker, ``None`` on timeout.
        stderr: tail of the worker's stderr (also in the message).
    """

    def __init__(self, message: str, *, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class SavedTensorCounter:
    """Context manager counting the bytes packed by ``torch.autograd.graph.saved_tensors_hooks``.

    Each storage is counted once, by ``(device, data_ptr)``, with the size of its whole storage (a
    saved view keeps its base alive). Storages of ``exclude`` (e.g. parameters) are not counted.
    The pack hook returns the tensor unchanged, so memory and gradients are not affected.

    Limits: what custom autograd Functions keep on ``ctx`` outside ``save_for_backward`` is not
    seen; a storage freed and reallocated at the same address inside the region counts once.

    Args:
        exclude: tensors whose storages are not counted. Default none.

    Attributes:
        bytes: bytes of the distinct storages packed so far.
        count: number of distinct storages packed so far.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {self._key(t) for t in exclude}
        self._seen: set = set()
        self.bytes = 0
        self.count = 0
        self._ctx = None

    @staticmethod
    def _key(t: torch.Tensor):
        try:
            return (str(t.device), t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            return (str(t.device), id(t))

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        try:
            return int(t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            return t.numel() * t.element_size()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = self._key(t)
        if key not in self._seen and key not in self._excluded:
            self._seen.add(key)
            self.bytes += self._nbytes(t)
            self.count += 1
        return t

    def __enter__(self) -> "SavedTensorCounter":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        self._ctx = None


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes saved for backward while running ``fn()``.

    Counts the distinct storages packed by ``saved_tensors_hooks`` (see
    :class:`SavedTensorCounter`); the result of ``fn`` is dropped when this returns, so run only the
    forward (and loss) in ``fn``. This is an accounting of autograd's saved tensors, not a memory
    measurement: custom autograd Functions may keep tensors it cannot see. Use
    :func:`measure_step` for memory.

    Args:
        fn: callable without arguments running a forward pass.
        exclude: tensors not to count, e.g. ``model.parameters()``. Default none.

    Returns:
        Number of bytes.
    """
    with SavedTensorCounter(exclude) as counter:
        fn()
    return counter.bytes


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``format_bytes(1536) == "1.50 KiB"``; negatives keep their sign."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _worker_env(extra: Mapping[str, str] | None) -> dict:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MALLOC_MMAP_THRESHOLD)
    # Make the package importable by the worker even without an installed copy.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


def _run_worker(job: dict, what: str, timeout: float, env: Mapping[str, str] | None) -> dict:
    """Run ``python -m invseg.analysis._worker`` on ``job`` in a fresh process; its JSON result."""
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    with tempfile.TemporaryDirectory(prefix="invseg_worker_") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "invseg.analysis._worker", str(result_path)]
        try:
            proc = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True,
                                  timeout=timeout, env=_worker_env(env))
        except subprocess.TimeoutExpired as err:
            tail = (err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or "")
            tail = tail[-_STDERR_TAIL:]
            raise WorkerError(f"measuring worker for {what} timed out after {timeout} s\n{tail}",
                              stderr=tail) from None
        tail = proc.stderr[-_STDERR_TAIL:]
        if proc.returncode != 0:
            raise WorkerError(f"measuring worker for {what} failed with exit status {proc.returncode}:\n{tail}",
                              returncode=proc.returncode, stderr=tail)
        if not result_path.is_file():
            raise WorkerError(f"measuring worker for {what} wrote no result\n{tail}",
                              returncode=proc.returncode, stderr=tail)
        return json.loads(result_path.read_text())


def measure_step(spec: StepSpec, *, timeout: float = 600, env: Mapping[str, str] | None = None) -> StepMeasurement:
    """Measure the peak memory and time of one training step in a fresh process.

    Runs ``python -m invseg.analysis._worker`` with the spec as JSON on stdin and
    ``MALLOC_MMAP_THRESHOLD_=65536`` in its environment; see the module docstring for the method.

    Args:
        spec: the step to measure.
        timeout: seconds before the worker is killed. Default 600.
        env: extra environment variables for the worker (e.g. ``CUDA_VISIBLE_DEVICES``).

    Returns:
        The :class:`StepMeasurement`.

    Raises:
        ValueError: ``spec`` is not a StepSpec or ``timeout`` is not positive.
        WorkerError: (a ``RuntimeError``) the worker failed, timed out or returned no result; the
            message carries the tail of its stderr (e.g. an import error, CUDA out of memory, or
            an unwritable ``/proc/self/clear_refs``).
    """
    if not isinstance(spec, StepSpec):
        raise ValueError(f"spec must be a StepSpec, got {type(spec).__name__}")
    result = _run_worker({"kind": "step", "spec": spec.to_dict()}, spec.factory, timeout, env)
    return StepMeasurement(spec=spec, **result)


def measure_call(setup: str, kwargs: Mapping[str, Any] | None = None, device: str = "cpu", *,
                 timeout: float = 600, env: Mapping[str, str] | None = None) -> int:
    """Peak memory (bytes) of one call of a function, measured in a fresh process like a training step.

    ``setup(**kwargs)`` (a ``"package.module:callable"``) runs in the worker and returns a function
    without arguments; it is called once to warm up, then once more under the peak counters (above the
    memory in use right before that call: ``VmHWM - VmRSS`` on CPU, CUDA peak counters on GPU).

    Raises:
        ValueError: a malformed ``setup``, a non-JSON ``kwargs``, an unknown ``device`` or a bad ``timeout``.
        WorkerError: the worker failed, timed out or returned no result.
    """
    _check_callable_path("setup", setup)
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    kwargs = dict(kwargs or {})
    try:
        json.dumps(kwargs)
    except TypeError as err:
        raise ValueError(f"kwargs must be JSON-serializable, got {kwargs!r}: {err}") from None
    job = {"kind": "call", "setup": setup, "kwargs": kwargs, "device": device}
    return int(_run_worker(job, setup, timeout, env)["peak_bytes"])


def measure_steps(specs: Sequence[StepSpec], progress: bool = True, *, timeout: float = 600,
                  on_error: str = "raise", env: Mapping[str, str] | None = None) -> list:
    """Measure several specs one after the other, each in its own fresh process.

    Args:
        specs: the steps to measure.
        progress: show a tqdm bar. Default True.
        timeout: per-spec timeout in seconds. Default 600.
        on_error: ``"raise"`` (default) re-raises the first :class:`WorkerError`; ``"none"`` puts
            ``None`` at that position and emits a ``RuntimeWarning`` with the message (for sweeps
            where large sizes may run out of memory).
        env: extra environment variables for the workers.

    Returns:
        A list of :class:`StepMeasurement` (or ``None`` for failures with ``on_error="none"``), in
        the order of ``specs``.
    """
    if on_error not in ("raise", "none"):
        raise ValueError(f"on_error must be 'raise' or 'none', got {on_error!r}")
    from tqdm.auto import tqdm

    results = []
    for spec in tqdm(list(specs), desc="measure_step", disable=not progress):
        try:
            results.append(measure_step(spec, timeout=timeout, env=env))
        except WorkerError as err:
            if on_error == "raise":
                raise
            warnings.warn(f"measure_step failed for {spec}: {err}", RuntimeWarning, stacklevel=2)
            results.append(None)
    return results


# --------------------------------------------------------------------------------------------
# The SN state of the measured model (recorded by a post_step hook inside the worker)
# --------------------------------------------------------------------------------------------

#: Environment variable naming the JSON file where :func:`update_and_record_state` writes the SN state.
STATE_FILE_ENV = "INVSEG_SN_STATE_FILE"


def spectral_state_summary(model: torch.nn.Module) -> dict:
    """Persistent spectral-normalization state of ``model``, from the library's accounting.

    Uses :func:`invseg.spectral.state_tensors` / :func:`invseg.spectral.state_bytes` (each storage
    once) and :func:`invseg.layers.spectral_layers`.

    Returns:
        ``{"state_bytes", "num_state_tensors", "largest_state_tensor_bytes", "num_sn_layers"}``.
    """
    from invseg.layers import spectral_layers
    from invseg.spectral import state_bytes, state_tensors

    tensors = state_tensors(model)
    sizes = [t.numel() * t.element_size() for t in tensors]
    return {
        "state_bytes": int(state_bytes(model)),
        "num_state_tensors": len(tensors),
        "largest_state_tensor_bytes": int(max(sizes, default=0)),
        "num_sn_layers": len(spectral_layers(model)),
    }


def update_and_record_state(model: torch.nn.Module) -> None:
    """``post_step`` hook of a measured step: the once-per-step SN update, and one state record.

    Calls :func:`invseg.layers.update_spectral_state` ``(model)``; then, if the environment variable
    :data:`STATE_FILE_ENV` names a file that does not exist yet, writes
    :func:`spectral_state_summary` ``(model)`` there as JSON. The first call is in the worker's warm-up
    step, so the measured steps only pay an ``os.path.exists``. The state is therefore measured on the
    very model whose step is measured, at the measured size (naive buffers are allocated lazily at the
    first forward).
    """
    from invseg.layers import update_spectral_state

    update_spectral_state(model)
    path = os.environ.get(STATE_FILE_ENV)
    if path and not os.path.exists(path):
        Path(path).write_text(json.dumps(spectral_state_summary(model)))
