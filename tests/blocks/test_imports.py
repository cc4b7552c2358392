"""Importing invseg has no global side effects on the warning filters (checked in fresh processes)."""

import subprocess
import sys


def test_import_leaves_warning_filters_unchanged():
    # torch itself installs filters at import: record after importing torch, then import invseg
    code = (
        "import warnings, torch; before = list(warnings.filters);"
        "import invseg, invseg.blocks, invseg.nets, invseg.layers;"
        "assert warnings.filters == before, (before, warnings.filters); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    # the same check does catch a package that changes the filters (memcnn does, at import)
    bad = code.replace("import invseg, invseg.blocks, invseg.nets, invseg.layers", "import memcnn")
    out = subprocess.run([sys.executable, "-c", bad], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "AssertionError" in out.stderr
