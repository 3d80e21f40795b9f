"""The build of record produced what it promises.

``alr._C`` is built, loads and reports itself honestly; the Triton folder is installed
as ``alr.kernels`` and never as a top-level ``kernels`` package; the CMake developer
build of the same sources still configures and compiles; and the native test executable
passes under AddressSanitizer and UndefinedBehaviorSanitizer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alr import _extension

ROOT = Path(__file__).resolve().parents[1]


def _package_version() -> str:
    text = (ROOT / "alr" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE)
    assert match is not None, "alr/__init__.py does not define __version__"
    return match.group(1)


def _run_python(code: str, cwd: Path) -> str:
    """Runs ``code`` in a fresh interpreter that sees only what is installed.

    ``-I`` drops the current folder and PYTHONPATH from sys.path, so the repository's
    source folders are found only if the install put them there.
    """
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cpu_extension_is_built() -> None:
    info = _extension.build_info()
    assert info["cpu_extension"] is True, info["errors"]
    assert _extension.load_cpu_extension() is not None
    assert _extension.cpu_extension_error() is None


def test_build_info_reports_versions_and_compiler() -> None:
    info = _extension.build_info()
    assert info["version"] == _package_version()
    # The C++ side reports the torch headers it was compiled against: X.Y.Z, no local tag.
    assert info["torch_version"] == re.match(r"\d+\.\d+\.\d+", torch.__version__).group()
    assert info["cxx_compiler"]
    # Without OpenMP, at::parallel_for in the CPU kernels would run on one thread.
    assert info["openmp"] is sys.platform.startswith("linux")
    assert all(name.startswith("alr::") for name in info["cpu_kernels"])
    json.dumps(info)  # tests/run.sh prints it as JSON


def test_extension_errors_match_loaded_modules() -> None:
    info = _extension.build_info()
    cuda_module = _extension.load_cuda_extension()
    assert info["cuda_extension"] is (cuda_module is not None)
    assert (_extension.cuda_extension_error() is None) is (cuda_module is not None)
    assert info["errors"].get("cuda") == _extension.cuda_extension_error()


def test_cuda_extension_is_built_where_it_can_be() -> None:
    """Where torch is a CUDA build and the nvcc on PATH has its major CUDA version (the CI
    machine: no GPU, nvcc 13, torch 2.14 for CUDA 13), alr._C_cuda must have been built, so
    that a CUDA kernel that stops compiling, or a build gate that stops passing, fails CI."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is not a CUDA build")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH")
    release = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    if release is None or int(release.group(1)) != int(torch.version.cuda.split(".")[0]):
        pytest.skip(f"nvcc's CUDA ({release and release.group(1)}) is not torch's ({torch.version.cuda})")
    assert _extension.load_cuda_extension() is not None, _extension.cuda_extension_error()


def test_cuda_extension_registers_its_kernels() -> None:
    """Where alr._C_cuda was built (a CUDA build of torch and a matching nvcc, GPU or not),
    it imports without a GPU, registers every op under the CUDA dispatch key, and the
    ``cuda`` backend reports itself available for CUDA tensors."""
    if _extension.load_cuda_extension() is None:
        pytest.skip(f"alr._C_cuda is not built here: {_extension.cuda_extension_error()}")
    from alr import _native, backends

    info = _extension.build_info()
    ops = sorted(f"alr::{op}" for op in _native.OPS)
    assert info["cuda"] is True and info["cuda_kernels"] == ops
    assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
    assert all(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") for op in ops)
    assert _native.ops_available("CUDA")
    assert backends.backend_unavailable_reason("cuda") is None
    assert backends.resolve("cuda", torch.device("cuda"), torch.bfloat16) is _native
    with pytest.raises(ValueError, match="float16 parameters, but a parameter is torch.float64"):
        backends.resolve("cuda", torch.device("cuda"), torch.float64)


def test_kernels_installed_only_as_alr_kernels(tmp_path: Path) -> None:
    code = (
        "import importlib.util, json, alr.kernels\n"
        "ok, reason = alr.kernels.is_available()\n"
        "print(json.dumps({'top_level_kernels': importlib.util.find_spec('kernels') is not None,"
        " 'ok': ok, 'reason': reason}))"
    )
    result = json.loads(_run_python(code, cwd=tmp_path))
    assert result["top_level_kernels"] is False
    assert isinstance(result["ok"], bool)
    assert (result["reason"] is None) is result["ok"]


needs_cmake = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("ninja") is None, reason="needs cmake and ninja"
)


def _run_all(commands: list[list[str | Path]]) -> str:
    output = ""
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        output += result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
    return output


@pytest.mark.slow
@needs_cmake
def test_cmake_developer_build_compiles() -> None:
    """CMakeLists.txt is used by nobody's pip install, so this keeps it from rotting.

    The build folder persists under build/ so that a re-run only checks it is up to date.
    The native tests are built (and run) by the sanitizer test below. A Debug build: what
    is checked is the build description, and -O0 compiles the kernels 5x faster than -O3.
    """
    build_dir = ROOT / "build" / "cmake-test"
    python = f"-DPython_EXECUTABLE={sys.executable}"
    _run_all(
        [
            ["cmake", "-S", ROOT, "-B", build_dir, "-G", "Ninja", python, "-DALR_BUILD_NATIVE_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Debug"],
            ["cmake", "--build", build_dir],
        ]
    )
    assert list(build_dir.glob("_C*.so"))
    assert (build_dir / "compile_commands.json").is_file()


@pytest.mark.slow
@needs_cmake
def test_native_tests_pass_under_sanitizers() -> None:
    """csrc/tests on every kernel variant and instruction set this CPU runs, and the ops'
    input layer (tests/sanitized_ops.py: bad list lengths, shapes, dtypes, hyper and alphas;
    0-size, 0-d, transposed, channels-last and master-copy inputs) through the ``_C`` module
    itself, both built with ``-fsanitize=address,undefined`` (UBSan halts on the first
    error, see CMakeLists.txt)."""
    build_dir = ROOT / "build" / "cmake-sanitize"
    python = f"-DPython_EXECUTABLE={sys.executable}"
    output = _run_all(
        [
            ["cmake", "-S", ROOT, "-B", build_dir, "-G", "Ninja", python, "-DALR_SANITIZE=ON"],
            ["cmake", "--build", build_dir, "--target", "alr_native_tests", "_C"],
            ["ctest", "--test-dir", build_dir, "--output-on-failure"],
        ]
    )
    assert "100% tests passed" in output, output[-3000:]
    # libstdc++ preloaded too: else ASan's __cxa_throw interceptor finds no real one to call
    # when torch (uninstrumented) throws, and a TORCH_CHECK aborts the process.
    preload = [
        subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True, check=True).stdout.strip()
        for lib in ("libasan.so", "libstdc++.so")
    ]
    env = dict(os.environ, LD_PRELOAD=" ".join(preload), ASAN_OPTIONS="detect_leaks=0")
    ops = subprocess.run(
        [sys.executable, ROOT / "tests" / "sanitized_ops.py", build_dir],
        capture_output=True, text=True, check=False, env=env, timeout=600,
    )  # fmt: skip
    assert ops.returncode == 0, (ops.stdout + ops.stderr)[-6000:]
    assert json.loads(ops.stdout.strip().splitlines()[-1]) == {"bad": 16, "good": 4}


def test_import_and_step_without_extension_or_triton(tmp_path: Path) -> None:
    """With alr._C and triton unimportable, alr still imports and steps on the reference,
    and an explicit native backend raises with the import failure as its reason."""
    # torch is imported before the blocker: torch 2.14's CUDA build probes for Triton with
    # importlib.util.find_spec at import time (without importing it).
    code = """
import sys, warnings
import torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name in ("alr._C", "alr._C_cuda", "triton"):
            raise ImportError(f"blocked {name}")
sys.meta_path.insert(0, Block())
import alr
assert "triton" not in sys.modules
assert alr.available_backends() == ["reference"], alr.available_backends()
p = torch.nn.Parameter(torch.ones(3))
p.grad = torch.ones(3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    alr.ALROptimizer([p], lr=0.1).step()
assert any(issubclass(w.category, alr.ALRBackendFallbackWarning) for w in caught)
assert torch.all(p < 1)
try:
    opt = alr.ALROptimizer([p], backend="cpu")
    opt.step()
except RuntimeError as e:
    print(e)
"""
    message = _run_python(code, tmp_path)
    assert "blocked alr._C" in message
