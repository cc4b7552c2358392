"""Atomic checkpoints, RNG-state capture for exact resume, and a per-run checkpoint manager.

A checkpoint is a plain dict (model / optimizer / scheduler / scaler state dicts, step, epoch,
the resolved config from :func:`invseg.config.to_dict`, and :func:`capture_rng_state`). It is
written atomically: a crash or a full disk while saving never leaves a partial file at the target
path, so ``last.pt`` is always either the previous or the new checkpoint.

Everything this module writes loads with ``torch.load(..., weights_only=True)`` (the safe
unpickler): the RNG states are stored as tensors and plain Python values, not numpy arrays.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "CheckpointManager",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: not a torch checkpoint, corrupt or truncated, not a dict, or
    rejected by the safe unpickler. A ``ValueError``; the command-line jobs exit with the data code (3) for it."""


def _fsync_dir(directory: Path) -> None:
    """Persist a rename on POSIX by fsyncing the directory (best effort: not on every platform)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Call ``write(binary_file)`` on a temp file next to ``path``, fsync it, then ``os.replace``.

    On any failure (including KeyboardInterrupt) the temp file is removed and ``path`` is left as
    it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target: os.replace is only atomic within one filesystem. Created with
    # mode 0o666 & ~umask like a normal file (tempfile.mkstemp would make it owner-only, 0o600).
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Save ``state`` with ``torch.save``, atomically.

    The data goes to a temporary file in the same directory, which is flushed, fsynced and then
    renamed over ``path`` with ``os.replace``. If anything fails midway, ``path`` keeps its
    previous content and the temporary file is removed.

    Args:
        state: The checkpoint dict.
        path: Target file; parent directories are created.

    Returns:
        The path written.
    """
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint state must be a dict, got {type(state).__name__}")
    path = Path(path)
    _atomic_write(path, lambda fh: torch.save(state, fh))
    return path


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", *, weights_only: bool = True
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: Checkpoint file.
        map_location: Passed to ``torch.load``. Default ``"cpu"`` (move tensors where needed
            afterwards; loading to CPU first avoids all ranks allocating on GPU 0).
        weights_only: Use torch's safe unpickler (default ``True``). Checkpoints from this module
            never need ``False``: RNG states are stored as tensors and plain Python values, not
            numpy arrays. Pass ``False`` only for a trusted file that holds other Python objects
            (e.g. numpy scalars), since the full unpickler can run arbitrary code.

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointError: (a ``ValueError``) If the file is not a readable checkpoint (corrupt, truncated, not a
            dict), or contains objects the safe unpickler rejects (the message says so).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    kind = _not_a_checkpoint(path)
    if kind is not None:
        raise CheckpointError(f"{path} is not a torch checkpoint: it is {kind}. Pass a file written by torch.save, "
                         "e.g. the best.pt or last.pt of a training run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if weights_only and "weights only" in str(err).lower():
            raise CheckpointError(
                f"checkpoint {path} contains Python objects that the safe loader (weights_only=True) "
                f"rejects; if you trust this file, load it with weights_only=False. Details: "
                f"{str(err).splitlines()[-1] if str(err) else err!r}"
            ) from err
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint: {err}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        if isinstance(err, (FileNotFoundError, PermissionError)):
            raise
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch checkpoint: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} must contain a dict, got {type(state).__name__}")
    return state


def _not_a_checkpoint(path: Path) -> str | None:
    """What the file looks like when it cannot be a ``torch.save`` file (zip archive or pickle), else None."""
    with open(path, "rb") as fh:
        head = fh.read(352)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save zip archive / legacy pickle
        return None
    if not head:
        return "an empty file"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file (a .nii.gz image?)"
    if head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "a NIfTI image"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "neither a zip archive nor a pickle"


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the global RNGs: python ``random``, numpy's global generator, torch CPU and CUDA.

    The result contains only tensors and plain Python values, so a checkpoint holding it loads
    with ``weights_only=True``. It describes the calling process only: under DDP each rank has its
    own streams, so a trainer that wants every rank's exact stream back saves one per rank.

    Returns:
        ``{"python": ..., "numpy": {...}, "torch": ByteTensor, "cuda": [ByteTensor per device]}``.
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(name),
            # uint32 (624,) -> int64 tensor: torch's safe unpickler accepts tensors, not ndarrays
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore RNGs captured by :func:`capture_rng_state` (missing entries are left untouched).

    CUDA states are restored for ``min(saved, available)`` devices; states saved on a machine
    with CUDA are ignored where none is available.
    """
    if not isinstance(state, dict):
        raise ValueError(f"rng state must be a dict from capture_rng_state(), got {type(state).__name__}")
    unknown = set(state) - {"python", "numpy", "torch", "cuda"}
    if unknown:
        raise ValueError(
            f"rng state has unknown entries {sorted(unknown)}; expected python, numpy, torch, cuda"
        )
    if "python" in state:
        py = state["python"]
        # pickle may hand back lists where random.setstate needs tuples
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        nps = state["numpy"]
        keys = nps["keys"]
        keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state(
            (
                nps["bit_generator"],
                keys.astype(np.uint32),
                int(nps["pos"]),
                int(nps["has_gauss"]),
                float(nps["cached_gaussian"]),
            )
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())  # must be a CPU ByteTensor
    if state.get("cuda") and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)


# --------------------------------------------------------------------------------------------
# Manager
# --------------------------------------------------------------------------------------------


class CheckpointManager:
    """Checkpoints of one run: ``last.pt``, ``best.pt`` and optionally a numbered history.

    Call it on the main rank only (under DDP every rank holds the same weights).

    Args:
        run_dir: Run directory (created). Files: ``last.pt`` (every save), ``best.pt`` (saves with
            ``is_best=True``), ``ckpt_<n>.pt`` (every save when ``keep_last=False``).
        keep_last: ``True`` (default): keep only the latest checkpoint, overwriting ``last.pt``
            atomically. ``False``: also keep every checkpoint as ``ckpt_<n>.pt``, with ``n`` the
            state's ``"epoch"`` if it is an int, else its ``"step"``, else a running count.
    """

    LAST = "last.pt"
    BEST = "best.pt"
    _NUMBERED = re.compile(r"^ckpt_(\d+)\.pt$")

    def __init__(self, run_dir: str | os.PathLike, keep_last: bool = True) -> None:
        if not isinstance(keep_last, bool):
            raise ValueError(f"keep_last must be a bool, got {keep_last!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self._count = 0

    @property
    def last_path(self) -> Path:
        """Path of ``last.pt``."""
        return self.run_dir / self.LAST

    @property
    def best_path(self) -> Path:
        """Path of ``best.pt``."""
        return self.run_dir / self.BEST

    def save(self, state: dict[str, Any], *, is_best: bool = False) -> Path:
        """Write ``last.pt`` (and ``best.pt`` if ``is_best``, and ``ckpt_<n>.pt`` if not keep_last).

        Returns:
            The path of ``last.pt``.
        """
        last = save_checkpoint(state, self.last_path)
        self._count += 1
        # Copy the bytes just written instead of serializing again; still atomic per file.
        copies = []
        if is_best:
            copies.append(self.best_path)
        if not self.keep_last:
            index = next(
                (state[k] for k in ("epoch", "step") if isinstance(state.get(k), int)
                 and not isinstance(state.get(k), bool)),
                self._count,
            )
            copies.append(self.run_dir / f"ckpt_{index:06d}.pt")
        for target in copies:
            def copy(fh, src=last):
                with open(src, "rb") as fsrc:
                    shutil.copyfileobj(fsrc, fh)
            _atomic_write(target, copy)
        return last

    def latest(self) -> Path | None:
        """``last.pt`` if it exists, else the highest-numbered ``ckpt_<n>.pt``, else ``None``."""
        if self.last_path.is_file():
            return self.last_path
        numbered = [
            (int(m.group(1)), p)
            for p in self.run_dir.iterdir()
            if (m := self._NUMBERED.match(p.name)) and p.is_file()
        ]
        return max(numbered)[1] if numbered else None

    def load_latest(self, map_location: Any = "cpu", *, weights_only: bool = True) -> dict[str, Any] | None:
        """Load :meth:`latest` (see :func:`load_checkpoint`), or return ``None`` if there is none."""
        path = self.latest()
        if path is None:
            return None
        return load_checkpoint(path, map_location=map_location, weights_only=weights_only)
