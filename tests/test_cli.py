"""Tests of invseg.cli (configs, exit codes, running a job) and of the installed package.

The install tests build a wheel from a copy of the sources, install it into a fresh virtual environment
that sees the system's site-packages (torch, MONAI, ... are not downloaded), and run the main jobs from
a folder outside the repository, as a user who never cloned it would.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from invseg import cli
from invseg.apps import COMMANDS

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- exit codes


def _library_error(module: str, name: str) -> type[BaseException]:
    import importlib

    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(
    "make, code",
    [
        (lambda: cli.CLIError("x", cli.ExitCode.DATA), cli.ExitCode.DATA),
        (lambda: cli.CLIError("x"), cli.ExitCode.USAGE),
        (lambda: KeyboardInterrupt(), cli.ExitCode.INTERRUPTED),
        (lambda: ValueError("model.K must be > 0"), cli.ExitCode.USAGE),
        (lambda: FileNotFoundError("dataset.json"), cli.ExitCode.DATA),
        (lambda: PermissionError("best.pt"), cli.ExitCode.DATA),
        (lambda: IsADirectoryError("best.pt"), cli.ExitCode.DATA),
        (lambda: OSError(errno.ENOSPC, "No space left on device"), cli.ExitCode.ERROR),
        (lambda: RuntimeError("CUDA error"), cli.ExitCode.ERROR),
        (lambda: TypeError("bug"), cli.ExitCode.ERROR),
        # the library's own classes, imported from where users import them
        (lambda: _library_error("invseg.train", "NonFiniteLossError")("loss nan"), cli.ExitCode.DIVERGED),
        (lambda: _library_error("invseg.train", "InvertibilityError")("guard"), cli.ExitCode.DIVERGED),
        (lambda: _library_error("invseg.data", "UnreadableImageError")("x.nii.gz"), cli.ExitCode.DATA),
        (lambda: _library_error("invseg.train.checkpoint", "CheckpointError")("best.pt is a gzip file"),
         cli.ExitCode.DATA),
    ],
)
def test_exit_code_of_each_error(make, code):
    assert cli.exit_code(make()) == code


def test_exit_code_table_is_the_readme_table():
    assert cli.exit_code_table() in (REPO / "README.md").read_text()
    assert [int(c) for c in cli.EXIT_CODE_MEANINGS] == [int(c) for c in cli.ExitCode]


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(log_level="info", **kw)


@pytest.mark.parametrize(
    "job, code, err",
    [
        (lambda a: None, 0, ""),
        (lambda a: cli.ExitCode.INCOMPLETE, 5, ""),
        (lambda a: (_ for _ in ()).throw(ValueError("train.lr must be > 0, got -1")), 2, "error: train.lr must be"),
        (lambda a: (_ for _ in ()).throw(FileNotFoundError("no such file: x.nii.gz")), 3, "error: no such file"),
        (lambda a: (_ for _ in ()).throw(KeyboardInterrupt("run it again to resume")), 130,
         "interrupted; run it again to resume"),
    ],
)
def test_run_returns_the_code_and_prints_one_line(job, code, err, capsys):
    assert cli.run(job, _args()) == code
    printed = capsys.readouterr().err
    assert err in printed and "Traceback" not in printed


def test_run_lets_unexpected_errors_through_and_debug_prints_tracebacks(capsys):
    def bug(args):
        raise TypeError("a bug")

    with pytest.raises(TypeError, match="a bug"):  # Python prints the traceback and exits 1
        cli.run(bug, _args())

    def bad(args):
        raise ValueError("bad value")

    assert cli.run(bad, argparse.Namespace(log_level="debug")) == 2
    assert "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------- configs


def test_shipped_configs_are_the_package_folder_and_the_top_level_symlink():
    names = cli.shipped_configs()
    assert "seg3d_synthetic" in names and "inversion_vs_K" in names
    assert cli.config_dir() == REPO / "invseg" / "configs"
    assert (REPO / "configs").resolve() == cli.config_dir()  # the README's configs/NAME.yaml paths in a clone


@pytest.mark.parametrize("spec", ["seg3d_synthetic", "seg3d_synthetic.yaml", "configs/seg3d_synthetic.yaml"])
def test_resolve_config_finds_a_shipped_config_from_any_folder(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.resolve_config(spec) == cli.config_dir() / "seg3d_synthetic.yaml"


def test_resolve_config_prefers_an_existing_file_and_names_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    own = tmp_path / "configs" / "seg3d_synthetic.yaml"
    own.write_text("train: {max_steps: 3}\n")
    assert cli.resolve_config("configs/seg3d_synthetic.yaml") == Path("configs/seg3d_synthetic.yaml")
    with pytest.raises(cli.CLIError, match=r"nope\.yaml.*shipped: .*seg3d_synthetic") as info:
        cli.resolve_config("nope.yaml")
    assert info.value.code == cli.ExitCode.USAGE
    with pytest.raises(cli.CLIError):
        cli.resolve_config("elsewhere/seg3d_synthetic.yaml")  # only a bare name or configs/NAME is looked up


def test_load_config_by_name_with_overrides():
    from invseg.train import SegConfig

    parser = argparse.ArgumentParser()
    cli.add_config_arguments(parser, default="seg3d_synthetic")
    cfg = cli.load_config(SegConfig, parser.parse_args(["--set", "train.max_steps=3"]))
    assert cfg.train.max_steps == 3 and cfg.output.run_dir == "outputs/seg3d_synthetic"  # the rest from the file
    with pytest.raises(ValueError, match="train.lrr"):
        cli.load_config(SegConfig, parser.parse_args(["--set", "train.lrr=2"]))
    with pytest.raises(cli.CLIError, match="--config nope"):
        cli.load_config(SegConfig, parser.parse_args(["--config", "nope"]))


def test_list_configs_prints_the_names_and_exits_0(capsys):
    parser = cli.add_config_arguments(argparse.ArgumentParser())
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--list-configs"])
    assert info.value.code == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == cli.shipped_configs()


# ---------------------------------------------------------------- the commands and the scripts


def test_console_commands_are_the_apps_and_every_script_uses_the_helper():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {name: f"invseg.apps.{module}:main" for name, module in COMMANDS.items()}
    for module in COMMANDS.values():  # the README's commands: a wrapper of the same main
        assert f"from invseg.apps.{module} import main" in (REPO / "scripts" / f"{module}.py").read_text()
    for path in sorted((REPO / "scripts").glob("*.py")):
        text = path.read_text()
        assert "from invseg import cli" in text or "from invseg.apps." in text, path.name


def test_help_answers_without_loading_torch():
    code = ("import sys\nfrom invseg.apps import {m}\ntry:\n    {m}.main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nassert 'torch' not in sys.modules, '{m} --help imported torch'\nprint('ok')")
    for module in COMMANDS.values():
        out = subprocess.run([sys.executable, "-c", code.format(m=module)], capture_output=True, text=True,
                             timeout=60, cwd=REPO)
        assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ---------------------------------------------------------------- installed without a clone


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding a wheel of this tree; returns (venv python, bin folder, a folder outside the repo)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):  # what pyproject.toml reads, and the package
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "invseg", src / "invseg", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the repo on the path
    env["OMP_NUM_THREADS"] = "1"

    def call(*cmd, cwd=root):
        out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
        assert out.returncode == 0, f"{cmd}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return out

    # no downloads: the build uses the installed setuptools, the venv sees torch etc. in the system site-packages
    call(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", root / "wheel", src)
    wheels = list((root / "wheel").glob("invseg-*.whl"))
    assert len(wheels) == 1
    venv = root / "venv"
    call(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv)
    python = venv / "bin" / "python"
    call(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheels[0])
    work = root / "work"  # the user's folder: no repository, no configs/
    work.mkdir()
    return python, venv / "bin", work, call


def test_installed_package_is_the_venv_copy(installed):
    python, _, work, call = installed
    # the system site-packages may hold an editable invseg (its finder): the venv's copy must win
    out = call(python, "-c", "import invseg, invseg.cli; print(invseg.__file__); print(invseg.cli.config_dir())",
               cwd=work)
    package, configs = out.stdout.split()
    venv = python.parent.parent
    assert Path(package).is_relative_to(venv) and Path(configs).is_relative_to(venv), out.stdout
    assert sorted(p.stem for p in Path(configs).glob("*.yaml")) == cli.shipped_configs()


def test_installed_commands_answer_help_and_list_configs(installed):
    _, bin_dir, work, call = installed
    for name in COMMANDS:
        out = call(bin_dir / name, "--help", cwd=work)
        assert "exit codes: 0 ok" in out.stdout, name
    out = call(bin_dir / "invseg-train-seg3d", "--list-configs", cwd=work)
    assert [line.split()[0] for line in out.stdout.splitlines()] == cli.shipped_configs()


def test_installed_main_job_trains_and_predicts_from_another_folder(installed):
    python, bin_dir, work, call = installed
    tiny = ["--set", "data.synthetic_root=data", "--set", "data.synthetic_size=[24,24,24]",
            "--set", "data.synthetic_num_volumes=3", "--set", "data.num_val=1", "--set", "data.patch_size=[16,16,16]",
            "--set", "model.kwargs.channels=[4,8]", "--set", "train.max_steps=2", "--set", "train.val_every=2",
            "--set", "train.device=cpu", "--set", "train.progress=false", "--set", "output.run_dir=run"]
    # the README's form of the shipped config, with no configs/ folder here
    out = call(bin_dir / "invseg-train-seg3d", "--config", "configs/seg3d_synthetic.yaml", *tiny, cwd=work)
    assert "best mean foreground Dice" in out.stdout
    assert (work / "run" / "best.pt").is_file() and (work / "data" / "dataset.json").is_file()
    out = call(python, "-m", "invseg.apps.predict_seg3d", "--checkpoint", "run/best.pt", "--input",
               "data/imagesTr/synth_000.nii.gz", "--output", "pred", "--device", "cpu", cwd=work)
    assert (work / "pred" / "synth_000_seg.nii.gz").is_file(), out.stdout
    # a mistyped config name ends with the usage code, one line naming the shipped configs, no traceback
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    bad = subprocess.run([str(bin_dir / "invseg-train-seg3d"), "--config", "seg3d_synthetc"],
                         capture_output=True, text=True, cwd=work, timeout=120, env=env)
    assert bad.returncode == cli.ExitCode.USAGE and "Traceback" not in bad.stderr
    assert "seg3d_synthetc" in bad.stderr and "shipped: " in bad.stderr
