"""The command line's entry points."""

import subprocess
import sys

from typer.testing import CliRunner

from rnntool import __version__
from rnntool.cli import app


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"rnntool {__version__}"


def test_help_does_not_import_the_engine():
    # --help must stay fast: no torch, numba or h5py behind it.
    code = (
        "import sys; from rnntool.cli import app; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "assert 'Usage' in r.output; "
        "print(sorted(m for m in ('torch', 'numba', 'h5py', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
