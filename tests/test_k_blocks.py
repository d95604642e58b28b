"""run.c's K types against the gguf package: dequantize_block() (through
tests/block_driver.c) must decode random Q4_K, Q5_K and Q6_K blocks to the
floats that gguf.quants.dequantize gives. Both compute each weight from the
same f16 scales and small integers in float32; only the rounding of
d * scale * q - dmin * min may differ (run.c's compiler may fuse the
multiply and the subtraction), by an ulp of the terms: the tolerance is
2^-22 of the block's largest term."""

import subprocess

import gguf
import numpy as np
import pytest

from tests.test_kernels import ROOT

TYPES = {"q4_k": gguf.GGMLQuantizationType.Q4_K, "q5_k": gguf.GGMLQuantizationType.Q5_K,
         "q6_k": gguf.GGMLQuantizationType.Q6_K}


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    exe = tmp_path_factory.mktemp("driver") / "block_driver"
    subprocess.run(["cc", "-O2", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas", "-o", str(exe),
                    str(ROOT / "tests" / "block_driver.c"), "-lm"], check=True)
    return exe


def random_blocks(qtype, count, rng):
    """count random blocks: random bytes, with finite f16 scales."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (count, size), dtype=np.uint8)
    scales = rng.uniform(-4, 4, (count, 2)).astype(np.float16).view(np.uint8).reshape(count, 4)
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        blocks[:, 208:210] = scales[:, :2]          # d, last
    else:
        blocks[:, 0:4] = scales                     # d, dmin, first
    return blocks


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_block_matches_gguf(driver, name):
    qtype = TYPES[name]
    blocks = random_blocks(qtype, 4000, np.random.default_rng(list(TYPES).index(name)))
    p = subprocess.run([str(driver), name], input=blocks.tobytes(), capture_output=True, check=True)
    ours = np.frombuffer(p.stdout, dtype=np.float32).reshape(len(blocks), 256)
    theirs = gguf.quants.dequantize(blocks.reshape(-1), qtype).reshape(len(blocks), 256)
    scale = np.abs(theirs).max(axis=1, keepdims=True) + 1e-30
    assert np.all(np.abs(ours - theirs) <= scale * 2.0 ** -22), np.abs(ours - theirs).max()
