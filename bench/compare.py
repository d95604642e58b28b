#!/usr/bin/env python3
"""compare.py: this tree's ./run against the engine at another commit, on
the same models, run by run (make bench-compare REF=<commit>).

    make bench-compare REF=3236eed
    python3 bench/compare.py --ref HEAD~1 --base-binary ./run --models 110m --dtypes q8_0 --runs 5

The engine at REF is taken from git (git archive, so uncommitted changes
never leak into it) into bench/out/ref-<commit>/ and built there with the
compiler and flags that built ./run (CC, CFLAGS and OPENMP from the
Makefile). For each model of bench/out (bench.py writes them) the two
binaries then take turns, A B A B ...: each turn a prompt of --prompt
tokens with one token generated (prompt speed), then --gen tokens generated
after an 8-token prompt (generation speed), greedily, on every core. The
table gives each speed's median and the median of the run-by-run ratios
(new over ref), so that a burst of load from elsewhere hits both sides.
The first line names the CPU: a ratio holds for that CPU only.
"""

import argparse
import io
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

ROOT = bench.ROOT
GEN = {"110m": 128, "1b": 32, "smollm2": 128, "tiny": 32}  # tokens generated per shape, by default


def build_ref(ref, out, cc, cflags):
    """The engine at commit ref, built with cc and cflags into out/ref-<sha>/run;
    returns its path. An unknown commit stops with git's message."""
    p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--short", ref + "^{commit}"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench-compare: {ref!r} is not a commit of this repository")
    sha = p.stdout.strip()
    where = out / f"ref-{sha}"
    binary = where / "run"
    stamp = where / "flags"
    flags = f"{cc} {cflags}"
    if binary.exists() and stamp.exists() and stamp.read_text() == flags:
        return binary, sha
    where.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(where)
    cmd = [*shlex.split(cc), *shlex.split(cflags), "-o", str(binary), str(where / "run.c"), "-lm"]
    bench.log(f"bench-compare: building {ref} ({sha}): {' '.join(cmd)}")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    stamp.write_text(flags)
    return binary, sha


def speeds(binary, model, prompt, n_gen, threads):
    """(prompt tok/s, generation tok/s) of one turn: the prompt with one
    token generated, then n_gen tokens after its first 8."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))

    def stats(tokens, n):
        cmd = [str(binary), str(model), "--tokens", " ".join(map(str, tokens)), "-n", str(n), "-t", "0"]
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        m = bench.STATS.search(p.stderr)
        if p.returncode != 0 or not m:
            raise SystemExit(f"bench-compare: {binary} {model} failed ({p.returncode}): {p.stderr.strip()[-300:]}")
        return float(m.group(2)), float(m.group(4))

    return stats(prompt, 1)[0], stats(prompt[:8], n_gen)[1]


def refusal(binary, model):
    """binary's one-line refusal of model (a weight type or version newer
    than it reads), or None when it runs it."""
    p = subprocess.run([str(binary), str(model), "--tokens", "1", "-n", "1", "-t", "0"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    return (p.stderr.strip().splitlines() or ["exit status %d" % p.returncode])[-1] if p.returncode else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True, help="the commit to compare against (a hash, tag, HEAD~1, ...)")
    parser.add_argument("--new", type=Path, default=ROOT / "run", help="the binary under test (default ./run)")
    parser.add_argument("--cc", default="cc", help="compiler that builds the ref, as for ./run (default cc)")
    parser.add_argument("--cflags", default="-O3 -march=x86-64-v3 -fopenmp",
                        help="its flags, as for ./run (the Makefile passes its own)")
    parser.add_argument("--models", default="110m,1b", help="shapes, of: " + ", ".join(bench.SHAPES))
    parser.add_argument("--dtypes", default=",".join(bench.DTYPES), help="weight types, of: " + ", ".join(bench.DTYPES))
    parser.add_argument("--runs", type=int, default=3, help="turns of each binary per model (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads (default: all cores)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--gen", type=int, default=0, help="generated tokens (default: 128 for 110m, 32 for 1b)")
    parser.add_argument("--out", type=Path, default=bench.OUT, help="models and the ref's build (default bench/out)")
    opts = parser.parse_args(argv)
    shapes, dtypes = opts.models.split(","), opts.dtypes.split(",")
    for s in shapes:
        if s not in bench.SHAPES:
            parser.error(f"unknown model {s}")
    for d in dtypes:
        if d not in bench.DTYPES:
            parser.error(f"unknown weight type {d}")
    for name in ("runs", "threads", "prompt"):
        if getattr(opts, name) <= 0:
            parser.error(f"--{name} must be positive")
    if opts.gen < 0:
        parser.error("--gen must be 0 (the default per shape) or more")
    if not opts.new.exists():
        parser.error(f"{opts.new}: no such binary (make run builds it)")

    ref, sha = build_ref(opts.ref, opts.out, opts.cc, opts.cflags)
    bench.make_models(opts.out, [(s, d) for s in shapes for d in dtypes])
    print(f"machine: {bench.machine()}")
    print(f"new: {opts.new} (this tree); ref: {opts.ref} ({sha}), built with {opts.cc} {opts.cflags}; "
          f"threads {opts.threads}; {opts.runs} turns each, alternating")
    print(f"{'model':6} {'type':5} {'prompt':>6} {'new pp':>8} {'ref pp':>8} {'pp x':>6} "
          f"{'gen':>4} {'new tg':>8} {'ref tg':>8} {'tg x':>6}")
    for shape in shapes:
        args = bench.export.ModelArgs(**bench.SHAPES[shape])
        prompt = bench.prompt_tokens(args, opts.prompt)
        n_gen = opts.gen or GEN[shape]
        if opts.prompt + n_gen > args.max_seq_len:
            parser.error(f"{shape} holds {args.max_seq_len} positions: --prompt and --gen ask for more")
        for dtype in dtypes:
            model = bench.model_path(opts.out, shape, dtype)
            speeds(opts.new, model, prompt[:8], 2, opts.threads)  # warms the page cache
            refused = refusal(ref, model)
            if refused:
                print(f"{shape:6} {dtype:5} the ref cannot run it: {refused}", flush=True)
                continue
            new, old = [], []
            for _ in range(opts.runs):
                new.append(speeds(opts.new, model, prompt, n_gen, opts.threads))
                old.append(speeds(ref, model, prompt, n_gen, opts.threads))
            med = [statistics.median(v[i] for v in side) for side in (new, old) for i in (0, 1)]
            pp_x = statistics.median(a[0] / b[0] for a, b in zip(new, old))
            tg_x = statistics.median(a[1] / b[1] for a, b in zip(new, old))
            print(f"{shape:6} {dtype:5} {opts.prompt:6} {med[0]:8.1f} {med[2]:8.1f} {pp_x:6.2f} "
                  f"{n_gen:4} {med[1]:8.1f} {med[3]:8.1f} {tg_x:6.2f}", flush=True)
    print("tok/s: medians; x: median of the run-by-run ratios, new over ref")


if __name__ == "__main__":
    sys.exit(main())
