"""The Makefile's choice of flags by machine, seen through `make -n` with a
stand-in `uname`, compiler and `brew` on the PATH (macOS cannot be built
here), and a real cross build for aarch64 when Debian's cross compiler is
installed (make test-arm runs that build's logits under qemu)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def stand_ins(tmp_path, uname_s, uname_m, triple, has_openmp, libomp=None):
    """A bin/ folder whose uname, cc and (with libomp) brew answer as a
    machine of that kind would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "uname": f'case "$1" in -s) echo {uname_s};; -m) echo {uname_m};; *) echo {uname_s};; esac\n',
        # a compiler that knows its target, and fails on -fopenmp as Apple's clang does
        "cc": f'for a in "$@"; do\n'
              f'  [ "$a" = -dumpmachine ] && {{ echo {triple}; exit 0; }}\n'
              f'  [ "$a" = -fopenmp ] && exit {0 if has_openmp else 1}\n'
              f'done\nexit 0\n',
    }
    if libomp:
        scripts["brew"] = f'[ "$1 $2" = "--prefix libomp" ] && echo {libomp}\n'
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    return bin_dir


def planned_build(bin_dir=None, *make_args):
    """The commands `make -n -B run` would run (with the stand-ins first on the PATH)."""
    env = dict(os.environ)
    env.pop("CFLAGS", None)
    env.pop("OPENMP", None)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    p = subprocess.run(["make", "-n", "-B", "run", *make_args], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True)
    return p.stdout


def compile_line(plan):
    lines = [line for line in plan.splitlines() if " -o run " in line]
    assert len(lines) == 1, plan
    return lines[0].split()


def test_macos_arm64_without_libomp_builds_without_threads(tmp_path):
    plan = planned_build(stand_ins(tmp_path, "Darwin", "arm64", "arm64-apple-darwin23.4.0", has_openmp=False))
    words = compile_line(plan)
    assert words[:2] == ["cc", "-O3"]
    assert not any(w.startswith(("-march", "-fopenmp", "-Xpreprocessor")) for w in words), words
    assert "-Wno-unknown-pragmas" in words
    assert "without threads" in plan and "brew install libomp" in plan


def test_macos_arm64_with_homebrew_libomp(tmp_path):
    prefix = "/opt/homebrew/opt/libomp"
    plan = planned_build(stand_ins(tmp_path, "Darwin", "arm64", "arm64-apple-darwin23.4.0",
                                   has_openmp=False, libomp=prefix))
    words = compile_line(plan)
    assert not any(w.startswith("-march") for w in words), words
    joined = " ".join(words)
    assert f"-Xpreprocessor -fopenmp -I{prefix}/include -L{prefix}/lib -lomp" in joined
    assert "without threads" not in plan


def test_macos_intel_keeps_the_x86_flags(tmp_path):
    plan = planned_build(stand_ins(tmp_path, "Darwin", "x86_64", "x86_64-apple-darwin23.4.0", has_openmp=False))
    assert "-march=x86-64-v3" in compile_line(plan)


def test_aarch64_linux_with_openmp(tmp_path):
    words = compile_line(planned_build(stand_ins(tmp_path, "Linux", "aarch64", "aarch64-linux-gnu", has_openmp=True)))
    assert words[:2] == ["cc", "-O3"] and "-fopenmp" in words
    assert not any(w.startswith("-march") for w in words), words


def test_x86_64_linux_keeps_its_flags(tmp_path):
    words = compile_line(planned_build(stand_ins(tmp_path, "Linux", "x86_64", "x86_64-linux-gnu", has_openmp=True)))
    assert "-march=x86-64-v3" in words and "-fopenmp" in words


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="aarch64-linux-gnu-gcc is not installed (.ci/run installs it)")
def test_cross_build_for_aarch64_has_no_warnings(tmp_path):
    """make CC=aarch64-linux-gnu-gcc run, out of tree: the flags for aarch64,
    with OpenMP, and not one warning."""
    # -B: through VPATH, make would otherwise take ROOT's ./run for the target
    p = subprocess.run(["make", "--no-print-directory", "-B", "-C", str(tmp_path), "-f", str(ROOT / "Makefile"),
                        f"VPATH={ROOT}", "CC=aarch64-linux-gnu-gcc", "run"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "warning" not in p.stdout + p.stderr, p.stderr
    line = next(line for line in p.stdout.splitlines() if " -o run " in line).split()
    assert "-fopenmp" in line and not any(w.startswith("-march") for w in line), line
    head = (tmp_path / "run").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
