"""Importing invseg has no global side effects, and its small modules do not load MONAI (fresh processes).

Each check runs in a fresh interpreter (module caches and global state of this test process would hide what an
import does), in an empty working directory, with a thread count that is not the default. The probe prints one
JSON report; the assertions say which import did what.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

# Modules that must import without MONAI (the criterion is ``python -c "import invseg.train.amp"``); each
# one is checked right after its own import, so the first offender is named.
LIGHT = [
    "invseg",
    "invseg.utils",
    "invseg.spectral",
    "invseg.layers",
    "invseg.blocks",
    "invseg.nets",
    "invseg.train.amp",
    "invseg.train.step",
    "invseg.cli",
]
# Packages imported with every submodule for the side-effect check (MONAI is allowed: invseg.data is built on it).
HEAVY = ["invseg.train", "invseg.data", "invseg.analysis", "invseg.experiments", "invseg.apps"]

_PROBE = r"""
import importlib, json, logging, os, pkgutil, sys, warnings
import torch
torch.set_num_threads(3)  # not a default: an import that sets threads shows up
state = lambda: dict(
    threads=torch.get_num_threads(), interop=torch.get_num_interop_threads(), dtype=str(torch.get_default_dtype()),
    deterministic=torch.are_deterministic_algorithms_enabled(), matmul=torch.get_float32_matmul_precision(),
    grad=torch.is_grad_enabled(), anomaly=torch.is_anomaly_enabled(), root_handlers=len(logging.getLogger().handlers))
before = state()
report = dict(monai_after={}, warnings=[], imported=[], filter_calls=[])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    filters = list(warnings.filters)

    # who changes the warning filters: MONAI's dependencies do at import (sympy, scipy, urllib3, nibabel), so
    # each call is attributed to the file that makes it
    def spy(function):
        def call(*args, **kwargs):
            report["filter_calls"].append(sys._getframe(1).f_code.co_filename)
            return function(*args, **kwargs)
        return call
    warnings.filterwarnings, warnings.simplefilter = spy(warnings.filterwarnings), spy(warnings.simplefilter)
    # argv[1]: modules imported alone, MONAI checked after each; argv[2]: packages imported with every submodule
    for walk, arg in ((False, sys.argv[1]), (True, sys.argv[2])):
        for name in filter(None, arg.split(",")):
            module = importlib.import_module(name)
            names = [name]
            if walk and hasattr(module, "__path__"):
                names += [i.name for i in pkgutil.walk_packages(module.__path__, name + ".")]
                for sub in names[1:]:
                    importlib.import_module(sub)
            report["imported"] += names
            report["monai_after"][name] = "monai" in sys.modules
        report["filters_changed_walk" if walk else "filters_changed"] = warnings.filters != filters
# deprecations raised by third-party code at import (version churn) are not invseg's doing
skip = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
report["warnings"] = [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught
                      if "invseg" in w.filename or not issubclass(w.category, skip)]
report["state_before"], report["state_after"] = before, state()
report["cuda_initialized"] = torch.cuda.is_initialized()
report["invseg_loggers"] = sorted(n for n, lg in logging.Logger.manager.loggerDict.items()
                                  if n.startswith("invseg") and getattr(lg, "handlers", None))
print(json.dumps(report))
"""


def _probe(modules: list[str], packages: list[str], tmp_path: Path) -> dict:
    work, home = tmp_path / "cwd", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HOME=str(home), TMPDIR=str(home), XDG_CACHE_HOME=str(home / ".cache"),
               MPLCONFIGDIR=str(home / "mpl"))
    # the package under test, wherever it is (a worktree on PYTHONPATH, or the installed one)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = subprocess.run([sys.executable, "-c", _PROBE, ",".join(modules), ",".join(packages)], capture_output=True, text=True,
                         timeout=180, cwd=work, env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["cwd_files"] = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    report["invseg_files"] = sorted(str(p.relative_to(home)) for p in home.rglob("*") if "invseg" in str(p))
    return report


def _assert_no_side_effects(report: dict) -> None:
    package = str(Path(__file__).resolve().parents[2] / "invseg")
    mine = [f for f in report["filter_calls"] if f.startswith(package)]
    assert mine == [], f"changed the warning filters: {mine}"
    assert report["warnings"] == [], report["warnings"]
    before, after = report["state_before"], report["state_after"]
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert changed == {}, f"an import changed torch's global state (before, after): {changed}"
    assert not report["cuda_initialized"], "an import initialised CUDA"
    assert report["invseg_loggers"] == [], report["invseg_loggers"]
    assert report["cwd_files"] == [] and report["invseg_files"] == [], (
        f"an import wrote files: {report['cwd_files']} (working directory), {report['invseg_files']} (home/tmp)")


def test_imports_have_no_side_effects_and_small_modules_do_not_load_monai(tmp_path):
    # one interpreter (each start costs seconds): the small modules first, then the heavy packages
    report = _probe(LIGHT, HEAVY, tmp_path)
    light = report["imported"][:len(LIGHT)]
    assert light == LIGHT
    loaded = [name for name in LIGHT if report["monai_after"][name]]
    assert loaded == [], f"importing {loaded[0]} loads MONAI"
    assert not report["filters_changed"]  # the small modules and their dependencies leave the filters alone
    # every submodule was imported (the engines, the data loaders, the checkers), not just the lazy packages
    for name in ("invseg.train.seg", "invseg.train.classify", "invseg.data.decathlon", "invseg.experiments.inversion",
                 "invseg.cli", "invseg.apps.train_seg3d"):
        assert name in report["imported"]
    # the probe's MONAI detection works: invseg.data is built on MONAI
    assert report["monai_after"]["invseg.data"]
    _assert_no_side_effects(report)


def test_probe_catches_an_import_that_changes_the_warning_filters(tmp_path):
    # the same probe does catch a package with import side effects (memcnn changes the filters at import)
    report = _probe(["memcnn"], [], tmp_path)
    assert report["filters_changed"] and any("memcnn" in f for f in report["filter_calls"])
