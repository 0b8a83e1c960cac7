"""The code's structure as a contract: kernel families discovered by the compile check, compile signatures
derived from the kernels, one tile/override mechanism, NaN poisoning only under tests."""

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from opd_kernels import compile_check  # noqa: E402
from opd_kernels.triton import _common, _compile, _configs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {"gather", "lse_sweep", "blocked_bwd", "sparse_bwd", "teacher_topk"}


def test_compile_check_discovers_every_kernel_family():
    names = {m.__name__.rsplit(".", 1)[1] for m in compile_check.family_modules()}
    assert names == FAMILIES
    assert not os.path.exists(os.path.join(ROOT, "opd_kernels", "triton", "student_loss.py"))


@pytest.mark.parametrize("arch", [90, 80])
def test_compile_signatures_follow_the_kernels(arch):
    """Every spec's signature is derived from its kernel's parameters, in order, with every constexpr set."""
    specs = compile_check.collect_specs([4096], arch)
    names = [spec.kernel for spec in specs]
    assert len(names) == len(set(names)), "duplicate compile spec names"
    families = {spec.fn.fn.__module__.rsplit(".", 1)[1] if hasattr(spec.fn, "fn") else spec.fn.__module__
                for spec in specs}
    assert {f.rsplit(".", 1)[-1] for f in families} == FAMILIES, "every family compiles at least one kernel"
    for spec in specs:
        sig = spec.signature
        params = _compile.kernel_params(spec.fn)
        assert list(sig) == [name for name, _ in params], spec.kernel
        for name, is_const in params:
            assert (sig[name] == "constexpr") == is_const, (spec.kernel, name)
        dtype = spec.config.get("dtype", "bf16")                  # the input dtype the spec builds for
        for name in ("h_ptr", "w_ptr", "b_ptr"):
            assert sig.get(name, f"*{dtype}") == f"*{dtype}", (spec.kernel, name, sig.get(name))


def _kernel_file(tmp_path, body):
    path = tmp_path / "kern.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n@triton.jit\n" + body)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib
        mod = importlib.import_module("kern")
        return importlib.reload(mod).k
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("kern", None)


def test_derive_signature_rules_and_errors(tmp_path):
    fn = _kernel_file(tmp_path, "def k(h_ptr, out_ptr, N, H, inv_tau, tiles_per_split, row_stride, "
                                "BN: tl.constexpr):\n    pass\n")
    sig = _compile.derive_signature(fn, {"h_ptr": "*bf16"}, {"BN": 64})
    assert sig == dict(h_ptr="*bf16", out_ptr="*fp32", N="i32", H="i32", inv_tau="fp32", tiles_per_split="i32",
                       row_stride="i64", BN="constexpr")
    with pytest.raises(ValueError, match="constexpr BN"):
        _compile.derive_signature(fn, {}, {})
    with pytest.raises(ValueError, match="unknown constexprs"):
        _compile.derive_signature(fn, {}, {"BN": 64, "BX": 1})
    odd = _kernel_file(tmp_path, "def k(x_ptr, mystery):\n    pass\n")
    with pytest.raises(ValueError, match="no type rule for parameter 'mystery'"):
        _compile.derive_signature(odd, {}, {})


def test_one_override_mechanism_for_both_families():
    cpu = torch.device("cpu")
    base = _configs.student_tiles("dz", cpu)
    with _configs.overrides(dz=dict(BV=32), teacher=dict(BN=16, C=64, programs=3), programs=5,
                            dz_block_bytes=1234):
        assert _configs.student_tiles("dz", cpu)["BV"] == 32
        assert _configs.target_programs(cpu) == 5 and _configs.limit("dz_block_bytes") == 1234
        plan = _configs.teacher_tiles(8, cpu)
        assert (plan["BN"], plan["C"], plan["programs"]) == (16, 64, 3)
        with _configs.overrides(programs=2):                     # nested scopes merge and restore
            assert _configs.target_programs(cpu) == 2 and _configs.student_tiles("dz", cpu)["BV"] == 32
        assert _configs.target_programs(cpu) == 5
    assert _configs.student_tiles("dz", cpu) == base
    assert _configs.teacher_tiles(8, cpu)["C"] == 32
    with pytest.raises(TypeError, match="unknown override"):
        with _configs.overrides(bogus=1):
            pass
    with pytest.raises(TypeError, match="unknown teacher override"):
        with _configs.overrides(teacher=dict(method="heap")):
            _configs.teacher_tiles(8, cpu)


def test_poison_only_under_tests():
    """Tests poison outputs (tests/conftest.py); production allocates with torch.empty (no memset)."""
    assert os.environ.get("OPD_KERNELS_POISON") == "1"
    assert torch.isnan(_common.alloc((3, 4), torch.float32, "cpu")).all()
    assert (_common.alloc((2,), torch.long, "cpu", poison=-1) == -1).all()
    code = ("import os, torch; os.environ.pop('OPD_KERNELS_POISON', None)\n"
            "from unittest import mock\n"
            "from opd_kernels.triton import _common\n"
            "with mock.patch.object(torch, 'full', side_effect=AssertionError('filled')):\n"
            "    x = _common.alloc((3, 4), torch.float32, 'cpu')\n"
            "print(tuple(x.shape))\n")
    env = {k: v for k, v in os.environ.items() if k != "OPD_KERNELS_POISON"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "(3, 4)", out.stderr


def test_layout_section_of_readme_matches_the_tree():
    """Every file named in the README's layout block exists."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    import re
    named = set(re.findall(r"([\w/]+\.py)", block))
    assert named, "layout block names no files"
    for rel in named:
        candidates = [os.path.join(d, rel) for d in ("", "opd_kernels", "opd_kernels/triton", "tests", "reference")]
        assert any(os.path.exists(os.path.join(ROOT, c)) for c in candidates), f"README layout names {rel}"
