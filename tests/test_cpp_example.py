"""The C++ example (scripts/cpp) configures and compiles against the same TensorRT headers as the
plugin (kernel-lens in CI) and fails cleanly without TensorRT at run time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from requires import skip_or_fail

SOURCE = Path(__file__).resolve().parents[1] / "scripts" / "cpp"
CUDA = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    missing = [tool for tool, ok in (("cmake", shutil.which("cmake")), ("CUDA toolkit", (CUDA / "include" / "cuda_runtime_api.h").is_file())) if not ok]
    if missing:
        skip_or_fail(f"{', '.join(missing)} is not installed")
    build = tmp_path_factory.mktemp("cpp")
    configure = subprocess.run(
        ["cmake", "-S", str(SOURCE), "-B", str(build), f"-DCUDAToolkit_ROOT={CUDA}", f"-DPython3_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    assert "TensorRT headers:" in configure.stdout
    compiled = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    return build / "run_engine"


def test_example_compiles_and_explains_usage(binary):
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: run_engine ENGINE" in result.stderr


def test_example_names_the_missing_tensorrt_library(binary, tmp_path):
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"\0")
    result = subprocess.run([str(binary), str(engine), "--tensorrt", "libnvinfer-does-not-exist.so"], capture_output=True, text=True)
    assert result.returncode == 2 and "cannot open libnvinfer-does-not-exist.so" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
