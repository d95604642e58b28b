"""make bench on a tiny model: every column is printed, with numbers, and
bench/peak's readings; the prompt's operation count against the PyTorch
reference model's own matrices."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402
import model  # noqa: E402

X86 = subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip() == "x86_64"


def test_bench_prompt_ops_count_the_reference_models_matrices():
    """prompt_ops(): the multiply-adds of every nn.Linear the reference runs on
    n tokens, plus the classifier once (for the last token), plus causal
    attention's scores and sums, times two."""
    args = model.ModelArgs(**{**bench.SHAPES["tiny"], "tied": False})
    reference = model.random_model(args, seed=0)
    macs = []
    for module in reference.modules():
        if isinstance(module, torch.nn.Linear) and module is not reference.output:
            module.register_forward_hook(lambda m, i, o: macs.append(i[0].shape[:-1].numel() * m.in_features
                                                                       * m.out_features))
    n = 10
    with torch.no_grad():
        reference(torch.arange(n)[None])
    attention = args.n_layers * args.n_heads * 2 * args.head_dim * sum(range(1, n + 1))
    assert bench.prompt_ops(args, n) == 2 * (sum(macs) + args.vocab_size * args.dim + attention)


@pytest.mark.skipif(not X86, reason="bench/peak measures x86 vector units only")
def test_bench_peak_prints_fma_and_int8():
    subprocess.run(["make", "-s", "-C", str(ROOT), "bench/peak"], check=True)
    out = subprocess.run([str(ROOT / "bench" / "peak"), "1"], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1")).stdout
    peaks = dict(line.split() for line in out.splitlines())
    assert {"fma_gflops", "int8_gops"} <= set(peaks), out
    assert all(float(v) > 0 for v in peaks.values()), out


def test_bench_prints_every_column(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--models", "tiny", "--dtypes", "q8_0",
                        "--runs", "1", "--prompt", "16", "--gen", "4", "--depth-model", "tiny",
                        "--depth-dtypes", "f32", "--depths", "24", "--depth-gen", "2", "--long-prompt", "32",
                        "--no-peers", "--out", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    header = next(line for line in lines if line.startswith("model type"))
    assert header.split() == ["model", "type", "MB", "pp", "tok/s", "GFLOP/s", "%peak", "tg", "tok/s", "GB/s",
                              "%bw", "ttft", "rss"]
    row = next(line for line in lines if line.startswith("tiny  q8_0")).split()
    assert len(row) == 11, row
    pp, gflops, tg, gbps = float(row[3]), float(row[4]), float(row[6]), float(row[7])
    assert pp > 0 and tg > 0 and gbps > 0 and gflops >= 0
    assert re.fullmatch(r"\d+%", row[8]) and re.fullmatch(r"\d+ms", row[9])
    if X86:
        assert re.fullmatch(r"\d+%", row[5]), row
        assert re.search(r"^peaks \(bench/peak, now\): fma_gflops [\d.]+, int8_gops [\d.]+", p.stdout, re.M)
    tasks = [line.split() for line in lines if line.startswith("tiny    f32")]
    assert [t[2:4] for t in tasks] == [["tg", "@24"], ["pp", "32"]], p.stdout
    assert all(float(t[4]) > 0 for t in tasks)
