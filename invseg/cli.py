"""The command line shared by every invseg job and script: configs, overrides, logging, exit codes.

Each job (``invseg-train-seg3d`` or ``python -m invseg.apps.train_seg3d``, and the thin
``scripts/*.py`` wrappers) parses its arguments with :func:`make_parser` and runs its body under
:func:`run`, which turns the errors a user can fix into one line on stderr and one exit code:

* 0 ``OK``: the job finished;
* 1 ``ERROR``: an unexpected error (a bug or the environment); Python's traceback is printed;
* 2 ``USAGE``: bad arguments or config: unknown key, wrong type, a value breaking a rule, a config
  file or shipped name that does not exist (argparse's own code);
* 3 ``DATA``: an input file missing or unreadable: dataset, NIfTI volume, checkpoint;
* 4 ``DIVERGED``: training diverged: a non-finite loss, or the invertibility guard failed;
* 5 ``INCOMPLETE``: a benchmark finished but some of its cases failed (marked in its output);
* 130 ``INTERRUPTED``: Ctrl-C / SIGINT (128 + 2, the shell's convention); a training run resumes.

Why these: 2 is what argparse already exits with, so every "fix the command" error shares it; 3
separates "fix the files or the mount" from "fix the command" (a scheduler may retry 3, never 2);
4 lets a sweep mark a run as diverged and go on (``scripts/sweep_cifar_grid.py``); 5 keeps a
partial benchmark table apart from a crash; 130 is what a shell reports for Ctrl-C.

Configs: ``--config`` takes a YAML path or the name of a config shipped in the package
(``seg3d_synthetic``, see ``--list-configs``); ``configs/NAME.yaml`` also finds the shipped file
when no such file exists under the current folder, so the README's commands work outside a clone.
``--set KEY=VALUE`` overrides are :mod:`invseg.config`'s.

This module does not import torch.
"""

from __future__ import annotations

import argparse
import enum
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from invseg import config as _config

__all__ = [
    "ExitCode",
    "EXIT_CODE_MEANINGS",
    "CLIError",
    "exit_code",
    "exit_code_table",
    "config_dir",
    "shipped_configs",
    "resolve_config",
    "make_parser",
    "add_config_arguments",
    "load_config",
    "setup_logging",
    "run",
]

T = TypeVar("T")


class ExitCode(enum.IntEnum):
    """Exit status of every invseg job (the table in this module's docstring and the README)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    DATA = 3
    DIVERGED = 4
    INCOMPLETE = 5
    INTERRUPTED = 130


EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "the job finished",
    ExitCode.ERROR: "unexpected error (a bug or the environment); Python's traceback is printed",
    ExitCode.USAGE: "bad arguments or config: unknown key, wrong type, a value breaking a rule, a config file or "
                    "shipped name that does not exist (argparse's own code)",
    ExitCode.DATA: "an input file missing or unreadable: dataset, NIfTI volume, checkpoint",
    ExitCode.DIVERGED: "training diverged: non-finite loss, or the invertibility guard failed",
    ExitCode.INCOMPLETE: "a benchmark finished but some of its cases failed (marked in its output)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C, SIGINT); a training run resumes when started again",
}


class CLIError(Exception):
    """An error a job detected itself, with the exit code it ends with (default :attr:`ExitCode.USAGE`)."""

    def __init__(self, message: str, code: ExitCode = ExitCode.USAGE):
        super().__init__(message)
        self.code = ExitCode(code)


# The library's own error classes, matched by name along the exception's MRO (restricted to classes
# defined in invseg) so that mapping an error never imports the modules that define them: importing
# invseg.train.seg to test `isinstance` would load MONAI. tests/test_cli.py checks the real classes.
_DIVERGED_ERRORS = {"NonFiniteLossError", "InvertibilityError"}
_DATA_ERRORS = {"UnreadableImageError", "CheckpointError"}
# OSErrors that mean "this path is wrong"; others (disk full, I/O error) are the environment's.
_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _invseg_names(err: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(err).__mro__ if cls.__module__.split(".")[0] == "invseg"}


def exit_code(err: BaseException) -> ExitCode:
    """The exit code for an exception raised by a job (:attr:`ExitCode.ERROR` for anything unexpected)."""
    if isinstance(err, CLIError):
        return err.code
    if isinstance(err, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    names = _invseg_names(err)
    if names & _DIVERGED_ERRORS:
        return ExitCode.DIVERGED
    if names & _DATA_ERRORS or isinstance(err, _PATH_ERRORS):
        return ExitCode.DATA
    if isinstance(err, ValueError):  # the library validates its arguments at the door with ValueError
        return ExitCode.USAGE
    return ExitCode.ERROR


def exit_code_table() -> str:
    """The exit codes as a markdown table (the README's copy is checked against it)."""
    lines = ["| exit code | meaning |", "|---|---|"]
    lines += [f"| {int(code)} | {meaning} |" for code, meaning in EXIT_CODE_MEANINGS.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def config_dir() -> Path:
    """The folder of the configs shipped in the package (``invseg/configs``)."""
    return Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the shipped configs (``--config NAME``), sorted."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def resolve_config(spec: str | os.PathLike) -> Path:
    """The YAML file that ``--config spec`` means.

    An existing file wins. Otherwise a bare name (``seg3d_synthetic`` or ``seg3d_synthetic.yaml``)
    or a path of the form ``configs/NAME.yaml`` (as in the README, run outside a clone) is looked up
    among the shipped configs.

    Raises:
        CLIError: (:attr:`ExitCode.USAGE`) when neither exists; the message lists the shipped names.
    """
    path = Path(spec)
    if path.is_file():
        return path
    parent = path.parent.as_posix()
    if parent in (".", "configs"):
        name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
        shipped = config_dir() / f"{name}.yaml"
        if shipped.is_file():
            return shipped
    raise CLIError(f"--config {os.fspath(spec)}: no such file, and not a shipped config "
                   f"(shipped: {', '.join(shipped_configs())})", ExitCode.USAGE)


class _ListConfigs(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        for name in shipped_configs():
            print(f"{name:32s} {config_dir() / (name + '.yaml')}")
        parser.exit(0)


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> argparse.ArgumentParser:
    """Add ``--config PATH|NAME``, repeatable ``--set KEY=VALUE`` and ``--list-configs`` to ``parser``.

    Args:
        parser: The parser to extend (returned).
        default: The config used without ``--config``: a shipped name (``"seg3d_synthetic"``) or a
            path; ``None``: the dataclass defaults.
    """
    _config.add_config_arguments(parser, default_config=default)
    parser.add_argument("--list-configs", action=_ListConfigs,
                        help="print the shipped configs (usable as --config NAME) and exit")
    return parser


def load_config(cls: type[T], args: argparse.Namespace) -> T:
    """Load ``cls`` from the ``--config``/``--set`` arguments of :func:`add_config_arguments`.

    Raises:
        CLIError: (:attr:`ExitCode.USAGE`) for a config that does not exist.
        ValueError: On an unknown key or wrong type (from :func:`invseg.config.load_config`).
    """
    spec = getattr(args, "config", None)
    path = None if spec is None else resolve_config(spec)
    return _config.load_config(cls, path, getattr(args, "overrides", None) or ())


# --------------------------------------------------------------------------------------------
# Parser, logging, running a job
# --------------------------------------------------------------------------------------------


def make_parser(doc: str | None, *, prog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser from a job's docstring: first line the description, the rest and the exit codes the epilog.

    Adds ``--log-level`` (read by :func:`run`).
    """
    lines = (doc or "").strip().splitlines()
    description = lines[0] if lines else None
    rest = "\n".join(lines[1:]).strip()
    codes = ", ".join(f"{int(c)} {c.name.lower()}" for c in ExitCode)
    epilog = (rest + "\n\n" if rest else "") + f"exit codes: {codes} (see the README)"
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="level of the invseg loggers; debug also prints the traceback of a handled error "
                             "(default info)")
    return parser


def setup_logging(level: str = "info") -> None:
    """Log to stderr as ``LEVEL name: message`` (once per process) and set the invseg loggers' level."""
    numeric = getattr(logging, level.upper())
    root = logging.getLogger()
    if not root.handlers:  # leave a configuration made by the caller (or pytest) alone
        logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("invseg").setLevel(numeric)



def run_training(train: Callable[..., dict], cfg) -> dict | None:
    """Run a trainer ``train(cfg, ctx)`` (``invseg.train.train_seg`` / ``train_classifier``) as a job does.

    Sets ``cfg.train.threads`` torch threads (when given), initialises the process group from
    ``cfg.train.device`` (torchrun or a single process), and always tears it down. Returns the summary on the
    main process, ``None`` on the others.

    Raises:
        CLIError: the device cannot be used (e.g. ``train.device=cuda`` without CUDA), exit code USAGE.
        KeyboardInterrupt: with how to resume, on the main process.
    """
    from invseg.train import cleanup_distributed, init_distributed  # torch: only when a job runs

    if cfg.train.threads is not None:
        import torch

        torch.set_num_threads(cfg.train.threads)  # a shared CPU runs far faster without oversubscription
    try:
        ctx = init_distributed(cfg.train.device)
    except RuntimeError as err:  # e.g. train.device=cuda on a machine without CUDA
        raise CLIError(str(err), ExitCode.USAGE) from err
    try:
        summary = train(cfg, ctx)
    except KeyboardInterrupt:
        if not ctx.is_main:
            raise
        raise KeyboardInterrupt(f"run the same command again to resume from {cfg.output.run_dir}/last.pt "
                                "(if a checkpoint was written)") from None
    finally:
        cleanup_distributed()
    return summary if ctx.is_main else None

def run(job: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run ``job(args)`` and return its exit code; a known error becomes one ``error: ...`` line.

    ``job`` returns ``None`` or an :class:`ExitCode`/int. Errors mapped by :func:`exit_code` to
    anything but :attr:`ExitCode.ERROR` print their message (and, with ``--log-level debug``, the
    traceback) and return their code; unexpected errors propagate, so Python prints the traceback
    and exits 1. A :class:`KeyboardInterrupt` prints ``interrupted`` and its message, if any (a job
    raises ``KeyboardInterrupt("run the same command again to resume ...")`` to add a hint). The
    ``--config`` of :func:`add_config_arguments` is resolved (:func:`resolve_config`) before ``job``
    starts, so a mistyped name answers at once.
    """
    level = getattr(args, "log_level", "info")
    setup_logging(level)
    try:
        if getattr(args, "config", None) is not None:  # a mistyped --config answers before the job's imports
            args.config = os.fspath(resolve_config(args.config))
        rc = job(args)
    except KeyboardInterrupt as err:
        hint = str(err)
        print("\ninterrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except Exception as err:  # noqa: BLE001 - mapped below; unexpected ones are re-raised
        code = exit_code(err)
        if code == ExitCode.ERROR:
            raise
        if level == "debug":
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return int(code)
    return int(ExitCode.OK if rc is None else rc)
