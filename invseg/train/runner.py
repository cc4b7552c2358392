"""Run machinery shared by the training engines: one run folder, its checkpoints, log and guards.

A :class:`TrainingRun` owns everything a training run writes::

    run_dir/
        config.yaml     the resolved config (written when the run starts)
        last.pt         latest checkpoint (atomic: temp file + rename), see TrainingRun.save
        best.pt         checkpoint with the best validation metric so far
        metrics.jsonl   one JSON object per TrainingRun.log call
        metrics.png     loss / metric curves (TrainingRun.plot)

Typical loop (every rank runs it; only rank 0 writes files)::

    run = TrainingRun(cfg.output.run_dir, cfg, ctx=ctx, resume=cfg.output.resume)
    state = run.resume_into(model, optimizer, scheduler, scaler)   # None for a fresh run
    step = state["step"] if state else 0
    while step < max_steps:
        loss = ...
        check_finite(loss, step, run.last_checkpoint)            # or run.check_finite(loss, step)
        ...
        run.log(step, epoch, **{"train/loss": loss.item()})
        run.save(model, optimizer, scheduler, scaler, epoch=e, step=step, best_metric=b, is_best=...)
    run.plot(); run.close()

A resumed run continues the same trajectory: the checkpoint holds the model (its ``state_dict``
includes the spectral-normalization state buffers), optimizer, scheduler and grad-scaler states,
the RNG states of every rank, the epoch, step and best metric, and the resolved config; the
metrics log drops the records written after the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from invseg.config import to_dict
from invseg.train.checkpoint import (
    CheckpointManager,
    _atomic_write,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from invseg.train.distributed import DistributedContext, barrier, unwrap_model
from invseg.train.metrics import MetricsLogger, plot_metrics, read_metrics
from invseg.utils import check_int, is_int

__all__ = ["TrainingRun", "NonFiniteLossError", "check_finite", "StepTimer", "ResumableSampler", "SeededItems",
           "config_differences"]

#: Keys of a checkpoint written by :meth:`TrainingRun.save`.
CHECKPOINT_KEYS = (
    "model", "optimizer", "scheduler", "scaler", "epoch", "step", "best_metric",
    "config", "rng", "rng_per_rank", "world_size", "extra",
)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is left untouched."""


def check_finite(loss: torch.Tensor | float, step: int, last_checkpoint: str | os.PathLike | None = None) -> None:
    """Raise :class:`NonFiniteLossError` if ``loss`` is NaN or infinite.

    Call it before ``backward()``/``optimizer.step()`` so that no non-finite update reaches the
    weights; nothing is saved after the error, so the last checkpoint on disk stays the last good one.

    Args:
        loss: The loss of this step (a tensor, reduced to a Python float: one host sync).
        step: The global optimization step, for the message.
        last_checkpoint: Path of the last good checkpoint (``None``: no checkpoint written yet).

    Raises:
        NonFiniteLossError: With the step, the value, and where the last good checkpoint is.
    """
    value = float(loss.detach().float().item()) if isinstance(loss, torch.Tensor) else float(loss)
    if math.isfinite(value):
        return
    if last_checkpoint is not None and Path(last_checkpoint).is_file():
        where = f"the last good checkpoint is kept at {last_checkpoint}; resume from it with a lower learning rate or a different precision"
    elif last_checkpoint is not None:
        where = f"no checkpoint had been written yet (it would be {last_checkpoint}); nothing was saved"
    else:
        where = "no checkpoint path was given; nothing was saved"
    raise NonFiniteLossError(f"non-finite training loss {value} at step {step}: training stopped; {where}")


class StepTimer:
    """Wall-clock time of training steps (synchronizing CUDA so GPU time is measured, not launch time).

    Use as ``with timer: ...one step...``; ``timer.last`` is the duration of the last step,
    ``timer.median()`` the median over the recorded steps after ``skip`` warm-up steps.

    Args:
        device: The device the steps run on (CUDA is synchronized before reading the clock).
        skip: Number of first steps left out of :meth:`median` / :meth:`mean` (warm-up). Default 1.
    """

    def __init__(self, device: torch.device | str | None = None, skip: int = 1) -> None:
        check_int(skip, "skip", 0)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.skip = skip
        self.times: list[float] = []
        self.last = float("nan")
        self._start: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> StepTimer:
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type, *exc: Any) -> None:
        self._sync()
        if exc_type is None and self._start is not None:
            self.last = time.perf_counter() - self._start
            self.times.append(self.last)
        self._start = None

    def _kept(self) -> list[float]:
        kept = self.times[self.skip:]
        return kept if kept else self.times

    def median(self) -> float:
        """Median step time in seconds (``nan`` before any step)."""
        kept = sorted(self._kept())
        if not kept:
            return float("nan")
        mid = len(kept) // 2
        return kept[mid] if len(kept) % 2 else 0.5 * (kept[mid - 1] + kept[mid])

    def mean(self) -> float:
        """Mean step time in seconds (``nan`` before any step)."""
        kept = self._kept()
        return sum(kept) / len(kept) if kept else float("nan")


class ResumableSampler(torch.utils.data.Sampler):
    """Deterministic, shardable, resumable sampler that also hands each item its own random seed.

    For epoch ``e`` it draws a permutation of ``range(num_items)`` (or keeps the order when
    ``shuffle=False``) and one seed per position from a ``torch.Generator`` seeded with
    ``(seed, e)`` -- never from the global RNG -- pads it to a multiple of ``num_replicas`` by
    repeating the first items (as ``DistributedSampler``), and yields this rank's shard
    ``positions[rank::num_replicas]`` as ``(index, item_seed)`` pairs. A dataset wrapper seeds its
    random augmentation with ``item_seed``, so the data a step sees depend only on
    ``(seed, epoch, position)``: not on worker processes, prefetching or interruptions. To resume
    mid-epoch call :meth:`set_epoch` and then :meth:`set_start` with the number of items of this
    shard already consumed.

    Args:
        num_items: Dataset length (>= 1).
        shuffle: Permute every epoch. Default ``True``.
        seed: Base seed. Default 0.
        num_replicas: Number of ranks. Default 1.
        rank: This rank, ``0 .. num_replicas - 1``. Default 0.
    """

    def __init__(self, num_items: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        check_int(num_items, "num_items")
        if not is_int(num_replicas) or not is_int(rank) or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        self.num_items, self.shuffle, self.seed = num_items, bool(shuffle), int(seed)
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its permutation and seeds) and start from its first item."""
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` items of this rank's shard in the current epoch (once)."""
        if not 0 <= start <= self.shard_size:
            raise ValueError(f"start must be in [0, {self.shard_size}], got {start}")
        self.start = int(start)

    @property
    def shard_size(self) -> int:
        """Items per rank and epoch."""
        return -(-self.num_items // self.num_replicas)

    def _positions(self) -> tuple[list[int], list[int]]:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=g) if self.shuffle else torch.arange(self.num_items)
        total = self.shard_size * self.num_replicas
        order = torch.cat([order, order[: total - self.num_items]]) if total > self.num_items else order
        seeds = torch.randint(0, 2**31 - 1, (total,), generator=g)
        return order[self.rank :: self.num_replicas].tolist(), seeds[self.rank :: self.num_replicas].tolist()

    def __iter__(self):
        order, seeds = self._positions()
        start, self.start = self.start, 0  # a mid-epoch start applies to one pass only
        return iter(list(zip(order[start:], seeds[start:])))

    def __len__(self) -> int:
        return self.shard_size - self.start


class SeededItems(torch.utils.data.Dataset):
    """The dataset side of :class:`ResumableSampler`: ``items[(index, seed)]`` is item ``index`` with its
    random augmentation seeded by ``seed``, in any worker process.

    Both kinds of random transforms are seeded: MONAI's (``dataset.transform.set_random_state(seed)``,
    when the transform has it; they draw from their own numpy generators) and those that draw from
    torch's global RNG (torchvision's), which run inside ``torch.random.fork_rng`` with
    ``torch.manual_seed(seed)`` so that the caller's RNG is left as it was.

    Args:
        dataset: a map-style dataset; its ``transform`` (if any) is re-seeded per item.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=int(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.dataset[int(index)]


def _plain_config(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return to_dict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise ValueError(f"config must be a config dataclass or a mapping, got {type(config).__name__}")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(dotted_key, old_value, new_value), ...]`` where two plain config dicts differ (sorted by key).

    A key present on one side only reads as ``<absent>`` on the other.
    """
    a, b = _flatten(old), _flatten(new)
    missing = "<absent>"
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


def _state_or_none(obj: Any) -> dict | None:
    return None if obj is None else obj.state_dict()


class TrainingRun:
    """The folder, checkpoints and metrics log of one training run (single process or DDP).

    Only the main rank (``ctx.is_main``) writes files; every rank must call :meth:`save` (it gathers
    each rank's RNG state) and :meth:`resume_into`.

    Args:
        run_dir: Run folder (created on the main rank).
        config: The resolved config (a config dataclass or a plain dict); written to
            ``config.yaml`` and stored in every checkpoint.
        ctx: The process's :class:`DistributedContext` (default ``None``: single process).
        resume: ``"auto"`` (default): resume from ``run_dir/last.pt`` if it exists, else start
            fresh; ``"never"``: start fresh (an existing metrics log is replaced, ``last.pt`` is
            overwritten at the first save); any other string: the path of a checkpoint to resume
            from (``FileNotFoundError`` if it does not exist).
        keep_last: Passed to :class:`CheckpointManager` (``False`` also keeps ``ckpt_<n>.pt``).
        frozen: Dotted config prefixes (e.g. ``("model",)``) that must equal the resume
            checkpoint's config: a difference raises ``ValueError`` naming every differing key and
            how to start a new run, *before* anything in the run folder is written (``config.yaml``
            of the old run stays). Other differences are allowed and listed in :attr:`config_changes`.

    Attributes:
        run_dir: The run folder.
        resume_path: The checkpoint this run resumes from, or ``None``.
        checkpoints: The :class:`CheckpointManager` (main rank only, else ``None``).
        logger: The :class:`MetricsLogger` (main rank only, else ``None``).
        config_changes: ``(key, checkpoint value, value now)`` for every config key that differs
            from the resume checkpoint's (empty for a fresh run).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: Any,
        ctx: DistributedContext | None = None,
        resume: str = "auto",
        keep_last: bool = True,
        frozen: tuple[str, ...] = (),
    ) -> None:
        if not isinstance(resume, (str, os.PathLike)) or not os.fspath(resume):
            raise ValueError(f"resume must be 'auto', 'never' or a checkpoint path, got {resume!r}")
        self.run_dir = Path(run_dir)
        self.config = _plain_config(config)
        self.ctx = ctx
        self.is_main = ctx is None or ctx.is_main
        self.world_size = 1 if ctx is None else ctx.world_size
        self.rank = 0 if ctx is None else ctx.rank

        resume = os.fspath(resume)
        last = self.run_dir / CheckpointManager.LAST
        if resume == "never":
            self.resume_path: Path | None = None
        elif resume == "auto":
            self.resume_path = last if last.is_file() else None
        else:
            self.resume_path = Path(resume)
            if not self.resume_path.is_file():
                raise FileNotFoundError(
                    f"resume: checkpoint {self.resume_path} does not exist (resume must be 'auto', "
                    f"'never' or the path of an existing checkpoint)"
                )
        # Every rank reads the checkpoint (optimizer state and RNG streams are per rank).
        self._resume_state: dict[str, Any] | None = (
            load_checkpoint(self.resume_path) if self.resume_path is not None else None
        )
        resume_step = None if self._resume_state is None else int(self._resume_state.get("step", 0))
        self.config_changes: list[tuple[str, Any, Any]] = []
        if self._resume_state is not None and isinstance(self._resume_state.get("config"), Mapping):
            self.config_changes = config_differences(self._resume_state["config"], self.config)
            blocked = [c for c in self.config_changes
                       if any(c[0] == f or c[0].startswith(f + ".") for f in frozen)]
            if blocked:
                listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in blocked)
                raise ValueError(
                    f"cannot resume from {self.resume_path}: it was trained with other settings that the "
                    f"checkpoint's weights depend on ({listed}). Start a new run with --set output.resume=never "
                    f"(replaces the run in {self.run_dir}) or --set output.run_dir=<another folder>; or set these "
                    "keys back to resume"
                )

        self.checkpoints: CheckpointManager | None = None
        self.logger: MetricsLogger | None = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
            self.checkpoints = CheckpointManager(self.run_dir, keep_last=keep_last)
            self.logger = MetricsLogger(self.run_dir, resume_from_step=resume_step)
        barrier()  # the folder exists for everyone before anyone goes on

    # ---------------------------------------------------------------- files

    @property
    def config_path(self) -> Path:
        """``run_dir/config.yaml``."""
        return self.run_dir / "config.yaml"

    @property
    def last_checkpoint(self) -> Path:
        """``run_dir/last.pt`` (it may not exist yet)."""
        return self.run_dir / CheckpointManager.LAST

    @property
    def best_checkpoint(self) -> Path:
        """``run_dir/best.pt`` (it may not exist yet)."""
        return self.run_dir / CheckpointManager.BEST

    @property
    def metrics_path(self) -> Path:
        """``run_dir/metrics.jsonl``."""
        return self.run_dir / "metrics.jsonl"

    @property
    def plot_path(self) -> Path:
        """``run_dir/metrics.png``."""
        return self.run_dir / "metrics.png"

    def _write_config(self) -> None:
        text = yaml.safe_dump(self.config, sort_keys=False, default_flow_style=None)
        _atomic_write(self.config_path, lambda fh: fh.write(text.encode("utf-8")))

    def write_json(self, name: str, data: Mapping[str, Any]) -> Path | None:
        """Write ``run_dir/<name>`` as JSON, atomically, on the main rank (returns its path, else None)."""
        import json

        if not self.is_main:
            return None
        path = self.run_dir / name
        text = json.dumps(dict(data), indent=2, sort_keys=False)
        _atomic_write(path, lambda fh: fh.write((text + "\n").encode("utf-8")))
        return path

    # ---------------------------------------------------------------- resume / save

    @property
    def resumed(self) -> bool:
        """Whether this run resumes from a checkpoint."""
        return self.resume_path is not None

    def resume_into(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any = None,
        scaler: Any = None,
    ) -> dict[str, Any] | None:
        """Load the resume checkpoint into the given objects (all ranks), or return ``None``.

        Loads the unwrapped model's ``state_dict`` (spectral state buffers included), the optimizer,
        scheduler and scaler states where both the object and the saved state exist, and this rank's
        RNG states (when the world size differs from the saved one, the RNG streams are not restored
        and a warning says so: the trajectory then differs from an uninterrupted run).

        Returns:
            ``None`` for a fresh run, else ``{"epoch", "step", "best_metric", "extra", "config",
            "path"}`` from the checkpoint.

        Raises:
            ValueError: If the checkpoint's model state does not match ``model`` (the message names
                the checkpoint and the missing / unexpected keys).
        """
        state = self._resume_state
        if state is None:
            return None
        path = self.resume_path
        try:
            unwrap_model(model).load_state_dict(state["model"])
        except (RuntimeError, KeyError) as err:
            raise ValueError(f"checkpoint {path} does not match the model: {err}") from err
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == self.world_size:
            restore_rng_state(per_rank[self.rank])
        elif state.get("rng") is not None and self.world_size == 1 and int(state.get("world_size", 1)) == 1:
            restore_rng_state(state["rng"])
        else:
            warnings.warn(
                f"checkpoint {path} was written by {state.get('world_size')} process(es), this run has "
                f"{self.world_size}: RNG streams are not restored, the trajectory will differ",
                stacklevel=2,
            )
        self._resume_state = None  # free the memory; resume_into applies once
        return {
            "epoch": int(state.get("epoch", 0)),
            "step": int(state.get("step", 0)),
            "best_metric": state.get("best_metric"),
            "extra": state.get("extra"),
            "config": state.get("config"),
            "path": str(path),
        }

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any = None,
        scaler: Any = None,
        *,
        epoch: int,
        step: int,
        best_metric: float | None,
        is_best: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> Path | None:
        """Write ``last.pt`` (and ``best.pt`` when ``is_best``) atomically; call it on every rank.

        The checkpoint holds the unwrapped model's ``state_dict`` (spectral state included),
        optimizer / scheduler / scaler states, ``epoch``, ``step``, ``best_metric`` (a Python
        float or ``None``), the resolved config, the RNG state of every rank (gathered to rank 0)
        and ``extra`` (plain Python values / tensors only: it must load with ``weights_only=True``).

        Returns:
            The path of ``last.pt`` on the main rank, ``None`` on the others.
        """
        rng = capture_rng_state()
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, rng)
            per_rank = gathered
        else:
            per_rank = [rng]
        path = None
        if self.is_main:
            state = {
                "model": unwrap_model(model).state_dict(),
                "optimizer": _state_or_none(optimizer),
                "scheduler": _state_or_none(scheduler),
                "scaler": _state_or_none(scaler),
                "epoch": int(epoch),
                "step": int(step),
                "best_metric": None if best_metric is None else float(best_metric),
                "config": self.config,
                "rng": per_rank[0],
                "rng_per_rank": per_rank,
                "world_size": int(self.world_size),
                "extra": dict(extra) if extra is not None else {},
            }
            assert self.checkpoints is not None
            path = self.checkpoints.save(state, is_best=is_best)
        barrier()  # nobody runs ahead (and could be killed) before last.pt is complete
        return path

    # ---------------------------------------------------------------- log / plot / guard

    def log(self, step: int, epoch: int | None = None, **values: Any) -> dict[str, Any] | None:
        """Append one metrics record on the main rank (values already reduced across ranks)."""
        if self.logger is None:
            return None
        return self.logger.log(step=step, epoch=epoch, **values)

    def plot(self, title: str | None = None, by_step: bool = False) -> Path | None:
        """Draw ``metrics.png`` from the log on the main rank (``None`` if nothing numeric was logged).

        Args:
            title: Figure title.
            by_step: Draw every metric against the step. Default ``False``: :func:`plot_metrics`
                draws metrics logged at most once per epoch against the epoch.
        """
        if not self.is_main or not self.metrics_path.is_file():
            return None
        try:
            records = read_metrics(self.metrics_path)
            if by_step:
                records = [{**r, "epoch": None} for r in records]
            return plot_metrics(records, self.plot_path, title=title)
        except ValueError:  # nothing numeric yet
            return None

    def check_finite(self, loss: torch.Tensor | float, step: int) -> None:
        """:func:`check_finite` with this run's ``last.pt`` as the last good checkpoint."""
        check_finite(loss, step, self.last_checkpoint)

    def close(self) -> None:
        """Close the metrics log (idempotent)."""
        if self.logger is not None:
            self.logger.close()

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
