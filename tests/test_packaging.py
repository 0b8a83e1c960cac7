"""Packaging (issue 10, item 9): Triton is required only where PyPI has wheels for it, the wheel holds
``opd_kernels/`` only, and ``import opd_kernels`` plus the torch backend work with Triton absent."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:                      # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

#: Platforms PyPI has triton wheels for (checked against the index for 3.0.0 – 3.9.0: manylinux x86_64 for
#: every 3.x, manylinux aarch64 from 3.5.0; no macOS or Windows wheels), and those it has none for.
LINUX_X86 = dict(platform_system="Linux", platform_machine="x86_64", sys_platform="linux")
LINUX_ARM = dict(platform_system="Linux", platform_machine="aarch64", sys_platform="linux")
NO_WHEELS = [dict(platform_system="Darwin", platform_machine="arm64", sys_platform="darwin"),
             dict(platform_system="Darwin", platform_machine="x86_64", sys_platform="darwin"),
             dict(platform_system="Windows", platform_machine="AMD64", sys_platform="win32"),
             dict(platform_system="Linux", platform_machine="ppc64le", sys_platform="linux")]


def _dependencies():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]


def _required(env):
    """``{name: specifier}`` of the dependencies that apply in ``env``."""
    return {r.name: str(r.specifier) for r in _dependencies() if r.marker is None or r.marker.evaluate(env)}


def test_triton_required_only_where_wheels_exist():
    assert _required(LINUX_X86) == {"torch": ">=2.4", "triton": ">=3.2"}
    assert _required(LINUX_ARM) == {"torch": ">=2.4", "triton": ">=3.5"}    # first aarch64 wheels: 3.5.0
    for env in NO_WHEELS:
        assert _required(env) == {"torch": ">=2.4"}, env
    assert all(r.marker is not None for r in _dependencies() if r.name == "triton")


def _copy_repo(dst: Path) -> Path:
    """The repository's files without ignored build state (virtual environments, caches, runs)."""
    skip = {".git", ".venv", ".venv-triton-latest", ".cache", "runs", "build", "dist", ".pytest_cache",
            ".benchmarks", "__pycache__"}
    shutil.copytree(ROOT, dst, ignore=lambda d, names: [n for n in names if n in skip or n.endswith(".egg-info")])
    return dst


def test_wheel_holds_opd_kernels_only(tmp_path):
    src = _copy_repo(tmp_path / "src")
    out = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out)], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("opd_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"opd_kernels"}, sorted(tops)
    for must in ("opd_kernels/__init__.py", "opd_kernels/api.py", "opd_kernels/selftest.py",
                 "opd_kernels/triton/backend.py", "opd_kernels/triton/teacher_topk.py"):
        assert must in names
    assert not any(n.startswith(("reference/", "benchmarks/", "tests/", "examples/", "docs/")) for n in names)
    (info,) = dist_info
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    triton_reqs = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: triton")]
    assert triton_reqs and all("platform_machine" in line for line in triton_reqs), triton_reqs


HIDE_TRITON = '''
import importlib.abc, sys
class HideTriton(importlib.abc.MetaPathFinder):
    """As if triton were not installed."""
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, HideTriton())
'''

WITHOUT_TRITON = HIDE_TRITON + '''
import pkgutil, importlib
import torch
import opd_kernels as ok
assert not ok.triton_available()
# every module outside the kernel families imports without Triton
for info in pkgutil.iter_modules(ok.__path__):
    if info.name != "triton":
        importlib.import_module(f"opd_kernels.{info.name}")
import opd_kernels.triton                      # the package itself: kernel modules are imported lazily

g = torch.Generator().manual_seed(0)
n, v, h, k = 6, 50, 16, 4
hidden = torch.randn(n, h, generator=g, requires_grad=True)
weight = torch.randn(v, h, generator=g, requires_grad=True)
tgt = ok.teacher_topk(hidden.detach() + 0.1, weight.detach(), k)                        # backend="auto"
ref = ok.teacher_topk(hidden.detach() + 0.1, weight.detach(), k, backend="torch")
assert torch.equal(tgt.ids, ref.ids) and torch.equal(tgt.logprobs, ref.logprobs)
loss = ok.topk_rkl_loss(hidden, weight, tgt.ids, tgt.logprobs, backend="auto")
loss.backward()
assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
same = ok.topk_rkl_loss(hidden, weight, tgt.ids, tgt.logprobs, backend="torch")
assert torch.equal(loss, same)
sampled = ok.sampled_token_rkl_loss(hidden, weight, tgt.ids[:, 0], tgt.logprobs[:, 0])
assert torch.isfinite(sampled)
for call in (lambda: ok.topk_rkl_loss(hidden, weight, tgt.ids, tgt.logprobs, backend="triton"),
             lambda: ok.teacher_topk(hidden.detach(), weight.detach(), k, backend="triton")):
    try:
        call()
    except ValueError as exc:
        assert "Triton" in str(exc) and "backend='torch'" in str(exc), exc
    else:
        raise AssertionError("backend='triton' without Triton must raise ValueError")
assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules)
print("OK")
'''


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env))


def test_import_and_torch_backend_without_triton():
    for interpret in ("0", "1"):                 # TRITON_INTERPRET=1 without Triton changes nothing
        proc = _python(WITHOUT_TRITON, TRITON_INTERPRET=interpret)
        assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stdout[-2000:] + proc.stderr[-3000:]


def test_selftest_without_triton():
    code = HIDE_TRITON + "from opd_kernels.selftest import main\nsys.exit(main(['--quick', '--json']))"
    proc = _python(code, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["ok"] and r["env"]["triton"] == "absent" and r["triton_mode"] == "not available here"
    assert r["compile"] == [] and {c["kind"] for c in r["checks"]} == {"torch vs reference"}
    assert r["timing"]["auto_backend"] == "torch"
