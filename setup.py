"""Build of record for alr: the CPU extension always, the CUDA extension when gated in.

Install with ``pip install --no-build-isolation -e .`` so that the build uses the torch
already installed (build isolation would fetch a multi-GB CUDA build of torch).

Environment switches:
    ALR_BUILD_CUDA  "0": never build ``alr._C_cuda``; "1": require it (a failed gate
                    raises); unset or anything else: build it when every gate passes.
    ALR_DEBUG       "1": compile with ``-O0 -g`` instead of ``-O3``.
    MAX_JOBS        parallel compile jobs (read by torch's BuildExtension).
    TORCH_CUDA_ARCH_LIST  GPU architectures for ``alr._C_cuda`` (default below).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent.resolve()
BUILD_CUDA = os.environ.get("ALR_BUILD_CUDA", "auto")
DEBUG = os.environ.get("ALR_DEBUG") == "1"

OPT_FLAGS = ["-O0", "-g"] if DEBUG else ["-O3"]
# -g0 undoes the -g of Python's build flags: debug information made the kernel translation
# units (hundreds of template instantiations each) compile 55% longer (82 s against 52 s
# for kernels_avx2.cpp here) and their objects 8x larger.
NO_DEBUG_INFO = [] if DEBUG else ["-g0"]
# ATen's at::parallel_for is an inline template: it runs serially unless the
# translation unit that calls it is compiled with OpenMP.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
# No -ffast-math / --use_fast_math: kernels must match the reference's rounding, and
# --fmad=false keeps nvcc from contracting a*b+c into an fma where the CPU kernels and
# torch round twice (see csrc/alr_math.h). No -std: torch's BuildExtension adds the
# standard its headers need (C++20 since torch 2.14, whose headers fail under C++17).
CXX_FLAGS = [*OPT_FLAGS, *NO_DEBUG_INFO, "-fno-math-errno", *OPENMP_FLAGS]
NVCC_FLAGS = [*OPT_FLAGS, "-lineinfo", "--fmad=false"]
# Build machines have no GPU, so torch cannot detect one; without a list it would
# compile for every architecture it knows. SASS for Ampere and Hopper, PTX for newer.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def read_version() -> str:
    """Returns ``__version__`` from alr/__init__.py, read as text so alr is not imported."""
    text = (ROOT / "alr" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("alr/__init__.py does not define __version__")
    return match.group(1)


def sources(*patterns: str) -> list[str]:
    """Source files matching the glob patterns, relative to the repository root."""
    return sorted(
        str(path.relative_to(ROOT)) for pattern in patterns for path in ROOT.glob(pattern)
    )


def nvcc_major() -> int | None:
    """Major version of CUDA_HOME's nvcc, or None when it cannot be run or read."""
    try:
        result = subprocess.run(
            [str(Path(CUDA_HOME) / "bin" / "nvcc"), "--version"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.", result.stdout)
    return int(match.group(1)) if match else None


def cuda_skip_reason(cuda_sources: list[str]) -> str | None:
    """Why alr._C_cuda cannot be built here, or None when every gate passes.

    The gates never query devices: build machines have nvcc but no GPU. The nvcc check
    matters because torch's BuildExtension raises on a major-version mismatch, which
    would take the CPU extension down with it.
    """
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    if not cuda_sources:
        return "csrc/cuda has no sources"
    nvcc = nvcc_major()
    if nvcc is None:
        return f"cannot run or read {CUDA_HOME}/bin/nvcc --version"
    if nvcc != int(torch.version.cuda.split(".")[0]):
        return f"nvcc in {CUDA_HOME} is CUDA {nvcc}, torch was built with CUDA {torch.version.cuda}"
    return None


def cuda_extensions(define_macros: list[tuple[str, str]]) -> list[CUDAExtension]:
    """The alr._C_cuda extension when gated in, else an empty list and one line saying why."""
    if BUILD_CUDA == "0":
        print("alr: not building alr._C_cuda: ALR_BUILD_CUDA=0")
        return []
    cuda_sources = sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    reason = cuda_skip_reason(cuda_sources)
    if reason is not None:
        if BUILD_CUDA == "1":
            raise RuntimeError(f"ALR_BUILD_CUDA=1 but alr._C_cuda cannot be built: {reason}")
        print(f"alr: not building alr._C_cuda: {reason}")
        return []
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    return [
        CUDAExtension(
            "alr._C_cuda",
            cuda_sources,
            include_dirs=[str(ROOT / "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=OPENMP_FLAGS,
        )
    ]


def extensions(version: str) -> list[CppExtension]:
    """alr._C (csrc/*.cpp + csrc/cpu/*.cpp), then alr._C_cuda where it can be built."""
    # The C++ side stringifies ALR_VERSION, which avoids quoting a string through ninja.
    define_macros = [("ALR_VERSION", version)]
    cpu = CppExtension(
        "alr._C",
        sources("csrc/*.cpp", "csrc/cpu/*.cpp"),
        include_dirs=[str(ROOT / "csrc")],
        define_macros=define_macros,
        extra_compile_args=CXX_FLAGS,
        extra_link_args=OPENMP_FLAGS,
    )
    return [cpu, *cuda_extensions(define_macros)]


VERSION = read_version()

setup(
    name="alr",
    version=VERSION,
    description="Fused adaptive-learning-rate optimizers for PyTorch",
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    # The Triton sources live in kernels/ but install only as alr.kernels: PyPI has an
    # unrelated top-level `kernels` package.
    packages=["alr", "alr.kernels"],
    package_dir={"alr.kernels": "kernels"},
    ext_modules=extensions(VERSION),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
