"""Builds tests/test_kernels.c, which holds each fast kernel of run.c to its
plain version on random data, and runs it: with the Makefile's flags (AVX2
intrinsics and OpenMP), without -march (the portable paths alone), each
also with AVX-512 turned off by RUN_AVX512=0; and emulated: the AVX-512
kernels on any x86-64 CPU with AVX2, through tools/avx512_emulation.h and
SIMDe (make test-emu; skipped where SIMDe is not installed). The C
program's exit status is the verdict. KERNEL_TEST_CFLAGS adds flags (make
sanitize: the sanitizers)."""

import os
import platform
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMULATION = ["-include", str(ROOT / "tools" / "avx512_emulation.h"), "-Wno-psabi"]
BUILDS = {
    "default": ["-O2", "-march=x86-64-v3", "-fopenmp"],
    "portable": ["-O2", "-Wno-unknown-pragmas"],
    "emulated": ["-O2", "-march=x86-64-v3", "-fopenmp", *EMULATION],
}
# (build, RUN_AVX512): emulated, only the AVX-512 kernels are of interest
RUNS = [("default", "1"), ("default", "0"), ("portable", "1"), ("portable", "0"), ("emulated", "1")]


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    """build -> its test_kernels, compiled once."""
    built = {}

    def get(build):
        if build not in built:
            built[build] = compile_kernel_test(build, tmp_path_factory.mktemp("kernels") / "test_kernels")
        return built[build]
    return get


def compile_kernel_test(build, out):
    if build == "emulated" and platform.machine() != "x86_64":
        pytest.skip("the AVX-512 emulation builds for x86-64 only")
    extra = os.environ.get("KERNEL_TEST_CFLAGS", "").split()
    cmd = ["cc", *BUILDS[build], "-Wall", "-Wextra", "-Werror", "-Wno-unused-function", *extra,
           "-o", str(out), str(ROOT / "tests" / "test_kernels.c"), "-lm"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if build == "emulated" and "simde/x86/avx512.h: No such file" in p.stderr:
        pytest.skip("SIMDe is not installed (Debian: apt-get install libsimde-dev)")
    assert p.returncode == 0, p.stderr
    return out


@pytest.mark.parametrize("build,avx512", RUNS, ids=[f"{b}-{a}" for b, a in RUNS])
def test_kernels_match_their_references(binaries, build, avx512):
    p = subprocess.run([str(binaries(build))], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, RUN_AVX512=avx512))
    assert p.returncode == 0, p.stdout + p.stderr
    assert ", 0 failures" in p.stdout
    if build == "emulated":  # the emulation must have made choose_fast_kernels() take them
        assert "AVX-512 on this CPU" in p.stdout, p.stdout
