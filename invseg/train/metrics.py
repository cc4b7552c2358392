"""Per-run metrics log (JSON lines) and its plot.

Each :meth:`MetricsLogger.log` call appends one JSON object ``{"step", "epoch", "time", ...}`` to
``<run_dir>/metrics.jsonl`` and flushes it, so the file is readable while training runs and
survives a crash up to the last complete line. A resumed run truncates the entries written after
its checkpoint, so the log continues the same trajectory without duplicates.

:func:`plot_metrics` draws one subplot per metric group with matplotlib's Agg canvas (no global
``matplotlib.use``): losses, learning rate, and one group per ``prefix/`` of the metric names;
metrics logged once per epoch are drawn against the epoch, the others against the step.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from invseg.train.checkpoint import _atomic_write
from invseg.utils import check_int, is_int

__all__ = ["MetricsLogger", "read_metrics", "plot_metrics"]

# Keys every record has; they are never plotted as metrics.
_RESERVED = ("step", "epoch", "time")


def _to_json_value(key: str, value: Any) -> Any:
    """Plain JSON value for a metric: numbers, 0-d tensors / numpy scalars, strings, bools, None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)  # one-element torch tensors and numpy arrays / scalars
    if callable(item):
        try:
            scalar = item()
        except (ValueError, RuntimeError):  # more than one element
            scalar = None
        if isinstance(scalar, (numbers.Real, bool)):
            return _to_json_value(key, scalar)
    raise ValueError(
        f"metric '{key}' must be a number, bool, string or None (or a one-element tensor), "
        f"got {type(value).__name__}"
    )


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; an incomplete final line (crash while writing) is skipped."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no trailing newline: the last write was cut short
                break
            raise ValueError(f"metrics file {path}, line {number}: invalid JSON: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(f"metrics file {path}, line {number}: expected a JSON object, got {line!r}")
        records.append(record)
    return records


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a metrics JSONL file into a list of dicts (one per logged call, in order).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If a line other than an incomplete last one is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    return _read_lines(path)


class MetricsLogger:
    """Append-only JSON-lines metrics log of one run.

    Call it on the main rank only; log values already averaged across ranks.

    Args:
        run_dir: Run directory (created).
        filename: Log file name inside ``run_dir``. Default ``"metrics.jsonl"``.
        resume_from_step: ``None`` (default): a fresh run, an existing log is replaced.
            An int: the step of the checkpoint being resumed; existing records with
            ``step > resume_from_step`` (written after that checkpoint) are dropped and new
            records are appended after the rest.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        filename: str = "metrics.jsonl",
        resume_from_step: int | None = None,
    ) -> None:
        check_int(resume_from_step, "resume_from_step", 0, allow_none=True)
        if not filename or os.sep in filename:
            raise ValueError(f"filename must be a plain file name inside run_dir, got {filename!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / filename
        if resume_from_step is None:
            mode = "w"
        else:
            mode = "a"
            if self.path.is_file():
                kept = [r for r in _read_lines(self.path) if r.get("step", -1) <= resume_from_step]
                self._rewrite(kept)
        self._fh = open(self.path, mode, encoding="utf-8")

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the log atomically with ``records`` (also drops a partial last line)."""
        text = "".join(json.dumps(record) + "\n" for record in records)
        _atomic_write(self.path, lambda fh: fh.write(text.encode("utf-8")))

    def log(self, *, step: int, epoch: int | None = None, **values: Any) -> dict[str, Any]:
        """Append one record ``{"step", "epoch", "time", **values}`` and flush it.

        Args:
            step: Global optimization step (the x-axis of per-step metrics and the resume key).
            epoch: Epoch index, or ``None``.
            **values: Metric values: numbers, one-element tensors / numpy scalars, bools,
                strings or ``None``. ``"time"`` is reserved (it holds ``time.time()``).

        Returns:
            The record written.
        """
        if self._fh.closed:
            raise ValueError(f"metrics logger for {self.path} is closed")
        if not is_int(step):
            raise ValueError(f"step must be an int, got {step!r}")
        if epoch is not None and not is_int(epoch):
            raise ValueError(f"epoch must be an int or None, got {epoch!r}")
        if "time" in values:
            raise ValueError("'time' is a reserved metric name (it holds the wall-clock time)")
        record: dict[str, Any] = {
            "step": int(step),
            "epoch": None if epoch is None else int(epoch),
            "time": time.time(),
        }
        for key, value in values.items():
            record[key] = _to_json_value(key, value)
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        return record

    def read(self) -> list[dict[str, Any]]:
        """All records in the log so far."""
        return read_metrics(self.path)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        fh = getattr(self, "_fh", None)
        if fh is not None and not fh.closed:
            fh.close()


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _group_name(key: str) -> str:
    """Subplot a metric belongs to: losses, learning rate, else its ``prefix/`` (or "metrics")."""
    leaf = key.rsplit("/", 1)[-1].lower()
    if "loss" in leaf:
        return "loss"
    if leaf in ("lr", "learning_rate") or leaf.endswith("_lr"):
        return "learning rate"
    if "/" in key:
        return key.split("/", 1)[0]
    return "metrics"


def plot_metrics(
    path_or_records: str | os.PathLike | Sequence[Mapping[str, Any]],
    png_path: str | os.PathLike,
    keys: Iterable[str] | None = None,
    title: str | None = None,
) -> Path:
    """Plot a metrics log to a PNG, one subplot per metric group.

    Groups: every metric whose name contains ``loss``; the learning rate; and one group per name
    prefix before ``/`` (``val/dice`` -> ``val``), others in ``metrics``. A metric logged at most
    once per epoch (every record has an epoch) is drawn against the epoch, others against the
    step; a group mixing both gets one subplot per x-axis. The y-axis is logarithmic where all
    values of a subplot are positive and span more than two decades.

    Args:
        path_or_records: A metrics JSONL file or the records themselves.
        png_path: Output PNG (parent directories are created; written atomically).
        keys: Metrics to plot (default: every numeric one except step/epoch/time).
        title: Figure title.

    Returns:
        ``png_path``.

    Raises:
        FileNotFoundError: If the metrics file does not exist.
        ValueError: If a requested key was never logged, or there is nothing numeric to plot.
    """
    # Agg canvas on a standalone Figure: no pyplot state, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(path_or_records, (str, os.PathLike)):
        source = str(path_or_records)
        records = read_metrics(path_or_records)
    else:
        source = "records"
        records = list(path_or_records)

    available: list[str] = []
    for record in records:
        for key, value in record.items():
            if key not in _RESERVED and _is_number(value) and key not in available:
                available.append(key)
    if keys is None:
        selected = available
    else:
        selected = list(keys)
        missing = [k for k in selected if k not in available]
        if missing:
            raise ValueError(
                f"plot_metrics: keys {missing} have no numeric values in {source}; "
                f"available: {', '.join(available) or 'none'}"
            )
    if not selected:
        raise ValueError(f"plot_metrics: no numeric metrics to plot in {source}")

    # Series per key: x against epoch if the key is logged at most once per epoch, else step.
    groups: dict[tuple[str, str], list[tuple[str, list[float], list[float]]]] = {}
    for key in selected:
        rows = [r for r in records if _is_number(r.get(key))]
        epochs = [r.get("epoch") for r in rows]
        per_epoch = bool(rows) and all(
            is_int(e) for e in epochs
        ) and len(set(epochs)) == len(epochs)
        axis = "epoch" if per_epoch else "step"
        xs = [float(r[axis]) if _is_number(r.get(axis)) else float(i) for i, r in enumerate(rows)]
        ys = [float(r[key]) for r in rows]
        groups.setdefault((_group_name(key), axis), []).append((key, xs, ys))

    n = len(groups)
    ncols = 1 if n == 1 else 2
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(6.0 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for index, ((group, axis), series) in enumerate(groups.items()):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        all_y = [y for _, _, ys in series for y in ys]
        for key, xs, ys in series:
            ax.plot(xs, ys, label=key, marker="o" if len(xs) <= 30 else None, markersize=3)
        if all_y and min(all_y) > 0 and max(all_y) / min(all_y) > 100.0:
            ax.set_yscale("log")
        ax.set_title(group)
        ax.set_xlabel(axis)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)

    png_path = Path(png_path)
    _atomic_write(png_path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    return png_path

