"""Builds tests/test_kernels.c, which holds each fast kernel of run.c to its
plain version on random data, and runs it: with the Makefile's flags (AVX2
intrinsics and OpenMP), without -march (the portable paths alone), and with
AVX-512 turned off by RUN_AVX512=0. The C program's exit status is the
verdict. KERNEL_TEST_CFLAGS adds flags (make sanitize: the sanitizers)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILDS = {
    "default": ["-O2", "-march=x86-64-v3", "-fopenmp"],
    "portable": ["-O2", "-Wno-unknown-pragmas"],
}


@pytest.fixture(scope="module", params=sorted(BUILDS))
def binary(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / "test_kernels"
    extra = os.environ.get("KERNEL_TEST_CFLAGS", "").split()
    cmd = ["cc", *BUILDS[request.param], "-Wall", "-Wextra", "-Werror", "-Wno-unused-function", *extra,
           "-o", str(out), str(ROOT / "tests" / "test_kernels.c"), "-lm"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return out


@pytest.mark.parametrize("avx512", ["1", "0"])
def test_kernels_match_their_references(binary, avx512):
    p = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, RUN_AVX512=avx512))
    assert p.returncode == 0, p.stdout + p.stderr
    assert ", 0 failures" in p.stdout
