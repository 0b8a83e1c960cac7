"""The references under ``reference/`` are the spec: importing them must not import ``opd_kernels``."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHECK = (
    "import sys\n"
    "import reference.losses, reference.teacher, reference.primitives\n"
    "leaked = sorted(m for m in sys.modules if m == 'opd_kernels' or m.startswith('opd_kernels.'))\n"
    "assert 'opd_kernels' not in sys.modules and not leaked, leaked\n"
)


def test_reference_imports_no_opd_kernels():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"reference imports opd_kernels or fails to import:\n{proc.stderr}"
