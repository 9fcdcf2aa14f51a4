"""The TensorRT plugin library: where its sources are, how to build it, where the build is.

    tokenfuse plugin build      # CMake + nvcc, TensorRT headers from TENSORRT_ROOT/system/JetPack/kernel-lens
    tokenfuse plugin path       # prints the library for --plugins, trtexec --dynamicPlugins, load_library
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..exporter.errors import UsageError

SOURCE_DIR = Path(__file__).resolve().parent
LIBRARY_NAME = "libtokenfuse_plugins.so"
# sm_87 is Jetson Orin; the PTX of sm_90 runs on newer GPUs.
DEFAULT_ARCHITECTURES = "75-real;80-real;86-real;87-real;89-real;90-real;90-virtual"


def default_build_dir() -> Path:
    """TOKENFUSE_PLUGIN_DIR, else a per-version folder in the user's cache."""
    if os.environ.get("TOKENFUSE_PLUGIN_DIR"):
        return Path(os.environ["TOKENFUSE_PLUGIN_DIR"])
    from .. import __version__

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tokenfuse" / f"plugins-{__version__}"


def library_path(build_dir: Path | None = None) -> Path | None:
    """The built library, or None when it has not been built."""
    path = Path(build_dir or default_build_dir()) / LIBRARY_NAME
    return path if path.is_file() else None


def _pypi_nvcc() -> Path | None:
    """nvcc from the PyPI wheel nvidia-cuda-nvcc (nvidia/cu13/bin/nvcc; cuda_nvcc/bin for CUDA 12),
    which scripts/setup.sh installs into .venv when the system has no CUDA toolkit."""
    try:
        import nvidia
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        found = sorted(Path(root).glob("*/bin/nvcc"))
        if found:
            return found[-1]
    return None


def nvcc_path() -> Path:
    for candidate in (
        os.environ.get("CUDACXX"),
        os.environ.get("CUDA_HOME") and Path(os.environ["CUDA_HOME"], "bin", "nvcc"),
        shutil.which("nvcc"),
        "/usr/local/cuda/bin/nvcc",
        _pypi_nvcc(),
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise UsageError("nvcc not found: install the CUDA toolkit (or run scripts/setup.sh, which installs nvidia-cuda-nvcc "
                     "into .venv) or set CUDA_HOME")


def cmake_path() -> str | None:
    """cmake on PATH, else the one the PyPI wheel `cmake` put beside this Python (scripts/setup.sh
    installs it into .venv when the system has none; .venv/bin need not be on PATH)."""
    beside = Path(sys.executable).parent / "cmake"
    return shutil.which("cmake") or (str(beside) if beside.is_file() else None)


def _kernel_lens_headers() -> Path | None:
    """TensorRT's public headers from the PyPI package kernel-lens (pip install --no-deps kernel-lens)."""
    try:
        import kernel_lens
    except ImportError:
        return None
    include = Path(kernel_lens.__file__).parent / "include" / "tensorrt"
    return include if (include / "NvInferRuntime.h").is_file() else None


def _first_error(lines: list[str]) -> str:
    """The message of CMake's first error (the indented lines after "CMake Error"), else the
    compiler's first "error:" line."""
    for i, line in enumerate(lines):
        if line.startswith("CMake Error"):
            message = []
            for follow in lines[i + 1:]:
                if message and not follow.strip():
                    break
                message.append(follow.strip())
            return " ".join(m for m in message if m)
    return next((line.strip() for line in lines if "error:" in line), lines[-1] if lines else "no output")


def build(build_dir: Path | None = None, *, architectures: str = DEFAULT_ARCHITECTURES, tensorrt_root: str | None = None,
          jobs: int | None = None, log=print) -> Path:
    """Configure and compile the library with CMake; returns its path.

    The compile happens in a scratch folder and the library is moved into `build_dir` only when it
    succeeded, so a failed build leaves no half-written library behind.
    """
    cmake = cmake_path()
    if cmake is None:
        raise UsageError("cmake not found: install CMake >= 3.18 (apt-get install cmake, or scripts/setup.sh, "
                         "which installs the cmake wheel into .venv)")
    nvcc = nvcc_path()
    build_dir = Path(build_dir or default_build_dir())
    configure = [cmake, "-S", str(SOURCE_DIR), f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={architectures}"]
    # The PyPI runtime wheel ships libcudart.so.13 but no unversioned libcudart.so, which is what
    # CMake's FindCUDAToolkit looks for: name it (the plugin itself links libcudart_static.a).
    versioned = sorted(nvcc.resolve().parents[1].glob("lib/libcudart.so.*"))
    if versioned and not (nvcc.resolve().parents[1] / "lib" / "libcudart.so").exists():
        configure.append(f"-DCUDA_CUDART={versioned[-1]}")
    root = tensorrt_root or os.environ.get("TENSORRT_ROOT")
    if root:
        configure.append(f"-DTENSORRT_ROOT={root}")
    # Defined even when empty, so CMake does not look for kernel-lens in some other Python.
    configure.append(f"-DKERNEL_LENS_INCLUDE_DIR={_kernel_lens_headers() or ''}")
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cmake-", dir=build_dir) as scratch:
        steps = (
            ("configuring", configure + ["-B", scratch]),
            ("compiling kernels for " + architectures.replace(";", ", "), [cmake, "--build", scratch, "-j", str(jobs or os.cpu_count() or 1)]),
        )
        for what, command in steps:
            log(f"plugin: {what} ...")
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                output = (done.stdout + done.stderr).strip().splitlines()
                sys.stderr.write("\n".join(output[-40:]) + "\n")
                raise UsageError(f"plugin build failed while {what.split(' ')[0]}: {_first_error(output)}")
        built = Path(scratch, LIBRARY_NAME)
        target = build_dir / LIBRARY_NAME
        os.replace(built, target)
    log(f"plugin: built {target}")
    return target
