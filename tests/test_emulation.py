"""./run-emu (make run-emu: run.c's AVX-512 kernels emulated with SIMDe and
tools/avx512_emulation.h) against ./run on a CPU that has AVX-512 F, BW,
VL, DQ, VNNI and BF16, where ./run takes the same kernels natively: the
CPU is the reference. Random models of every weight type (f16: a GGUF's
F16 matrices, which ./run maps as they are), a prompt one
token at a time (-b 1) and in batches (-b 64, one of them partial), then
generation: the logits must be identical, bit for bit, since the emulation
does each instruction's arithmetic as the CPU does, in the same order. A
wrong lane, mask, shuffle or rounding in the emulation shows here. On other
CPUs (CI's) there is nothing native to compare with, and the tests skip:
make test-emu still holds ./run-emu to PyTorch there. Everywhere, the
emulated binary must hold no AVX-512 instruction. The tests run under make
test-emu, which builds both binaries from the same run.c and names the
emulated one in EMULATED_RUN_BINARY; elsewhere they skip."""

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export  # noqa: E402
from test_all import generate_ids, read_logits  # noqa: E402
from tests.test_gguf_run import write_gguf  # noqa: E402
from tests.test_smollm2 import tiny_bytelevel_vocab  # noqa: E402
from tests.test_weight_types import model_args, prompt_for  # noqa: E402

NATIVE, EMULATED = ROOT / "run", os.environ.get("EMULATED_RUN_BINARY")
FEATURES = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"}  # /proc/cpuinfo's names


def cpu_has_avx512():
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    flags = next((line.split(":")[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return FEATURES <= set(flags)


def random_model_file(dtype, tmp_path):
    """A random model of the weight type: (its path, vocab_size, a prompt).
    f16 is no type of our files: a GGUF of F16 matrices (64 positions)."""
    if dtype == "f16":
        path, vocab_size = tmp_path / "f16.gguf", len(tiny_bytelevel_vocab()[0])
        write_gguf(path, default="F16", tied=False, seed=2)
        return path, vocab_size, prompt_for(vocab_size, n=50)
    args = model_args("k_untied" if dtype in export.MIXES else "gqa4_untied")
    path = tmp_path / f"{dtype}.bin"
    types = export.kquant_mix_types(args, dtype) if dtype in export.MIXES else dtype
    export.write_checkpoint(path, args, export.random_model(args, seed=2).state_dict(), types)
    return path, args.vocab_size, prompt_for(args.vocab_size, n=70)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16", "q8_0", "q4_0", "q4_k_m"])
@pytest.mark.parametrize("batch", ["1", "64"])
def test_emulated_logits_equal_native(dtype, batch, tmp_path):
    if not cpu_has_avx512():
        pytest.skip("this CPU has no AVX-512 (with VNNI and BF16) to compare the emulation with")
    if EMULATED is None:
        pytest.skip("make test-emu runs it, with ./run-emu built from the same run.c as ./run")
    path, vocab_size, prompt = random_model_file(dtype, tmp_path)
    rows = []
    for binary in (NATIVE, EMULATED):
        ids, logits_path = generate_ids(path, prompt, 6, tmp_path, binary=binary, extra=("-b", batch))
        rows.append(read_logits(logits_path, vocab_size))
    native, emulated = rows
    assert native.shape == emulated.shape == (len(prompt) + 5, vocab_size)
    assert np.array_equal(native.view(np.uint32), emulated.view(np.uint32)), \
        f"max |diff| {np.abs(native - emulated).max():.3g}"


def test_emulated_binary_has_no_avx512_instruction():
    """No zmm register and no mask register (%k0..%k7), which only AVX-512
    instructions name: the kernels run emulated, also on a CPU that has
    AVX-512, where an instruction left native would pass unnoticed."""
    if EMULATED is None:
        pytest.skip("make test-emu runs it, with ./run-emu built from the same run.c as ./run")
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", EMULATED], capture_output=True, text=True,
                          check=True).stdout
    avx512 = [line for line in code.splitlines() if re.search(r"%zmm\d|%k[0-7]\b", line)]
    assert not avx512, "\n".join(avx512[:10])
