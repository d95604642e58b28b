#!/usr/bin/env python3
"""bench.py: how fast ./run is, against this machine's memory and llama.cpp.

    make bench                        # all shapes and weight types
    python3 bench/bench.py --models 110m --dtypes f32,q4_0 --runs 5

For each model shape (random weights, written by export.py into bench/out/,
which is git-ignored) and each weight type, ./run reads a 512-token prompt
and then generates 256 tokens greedily, on every core; the median of --runs
runs is reported:

  pp       prompt processing, tokens per second
  tg       generation, tokens per second
  GB/s     read bandwidth, measured by bench/membw before and after every
           run, with as many threads (the median of all readings)
  %bw      generation as a share of that roofline: the bytes a generated
           token must read (every matrix and norm it uses, and the KV cache
           up to its position) times tg, over the mean of the two readings
           around that run; the median over runs. Pairing each run with
           the readings beside it matters here: a shared machine's
           bandwidth swings by half from one minute to the next
  ttft     milliseconds from the start of ./run to its first token, for a
           one-token prompt: loading, mapping, one forward pass and sampling
  rss      peak resident memory (GNU time's %M, when /usr/bin/time is
           there) over the weights' file plus the KV cache of the run's
           positions

When llama-cpp-python is installed (make bench-peers), llama.cpp runs the
same weights, converted to GGUF by export.write_gguf() with identical values,
with the same prompt, threads and greedy continuation; its times are its own
(llama_perf_context, no Python in them), and its %bw is reckoned the same
way (with its f16 KV cache). Its runs alternate with ours, and the ratios
(ours over its) are medians of run-by-run ratios, so that a burst of load
from elsewhere on the machine hits both.
"""

import argparse
import dataclasses
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT))
import export  # noqa: E402

SHAPES = {
    # name: the 110M Llama-2 shape of llama2.c's stories110M (tied), and a
    # 1B-class GQA shape like TinyLlama-1.1B (untied)
    "110m": dict(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64,
                 vocab_size=32000, max_seq_len=1024, tied=True),
    "1b": dict(dim=2048, hidden_dim=5632, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64,
               vocab_size=32000, max_seq_len=1024, tied=False),
}
DTYPES = ["f32", "bf16", "q8_0", "q4_0"]
GGUF_TYPES = {"f32": "F32", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def machine():
    """One line about this machine: CPU, cores, vector extensions, memory."""
    cpu, flags = platform.processor() or "?", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni") if f in flags]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {' '.join(ext) or 'no AVX2'}, {mem:.0f} GiB"


def model_path(shape, dtype):
    return OUT / f"{shape}-{dtype}.bin"


def make_models(shapes, dtypes):
    """Writes the checkpoints that are missing: one random model per shape,
    written in each weight type (and as GGUF when peers run)."""
    OUT.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        missing = [d for d in dtypes if not model_path(shape, d).exists()]
        if not missing:
            continue
        args = export.ModelArgs(**SHAPES[shape])
        log(f"bench: writing {shape} ({args.describe()}) as {', '.join(missing)} into {OUT}")
        state = export.random_model(args, seed=0).state_dict()
        for dtype in missing:
            tmp = model_path(shape, dtype).with_suffix(".tmp")
            export.write_checkpoint(tmp, args, state, dtype)
            tmp.rename(model_path(shape, dtype))
        del state


def read_bandwidth(threads):
    p = subprocess.run([str(ROOT / "bench" / "membw"), "1024", "7"], capture_output=True, text=True, check=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    return float(p.stdout.split()[1])


@dataclasses.dataclass
class Result:
    pp: float        # prompt tokens per second
    tg: float        # generated tokens per second
    ttft_ms: float   # first token after start, less the prompt
    rss: float       # peak resident bytes


STATS = re.compile(r"prompt (\d+) tokens \(([\d.]+) tok/s\), generated (\d+) tokens \(([\d.]+) tok/s\), "
                   r"first token after (\d+) ms")


# Peak RSS: not from wait4, whose ru_maxrss keeps the high-water mark of
# the forked Python across exec; GNU time forks ./run from a small process.
TIME = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None


def run_once(path, prompt, n_gen, threads):
    """One ./run: prompt and generation speed from its statistics line, and
    its peak RSS; then the time to first token of a one-token prompt."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [str(ROOT / "run"), str(path), "--tokens", " ".join(map(str, prompt)), "-n", str(n_gen), "-t", "0"]
    p = subprocess.run(([TIME, "-f", "maxrss_kb %M"] if TIME else []) + cmd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, env=env, text=True)
    m = STATS.search(p.stderr)
    if p.returncode != 0 or not m:
        raise SystemExit(f"bench: {' '.join(cmd[:2])} failed ({p.returncode}): {p.stderr.strip()}")
    rss = re.search(r"maxrss_kb (\d+)", p.stderr)
    first = subprocess.run(cmd[:2] + ["--tokens", "1", "-n", "1", "-t", "0"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, env=env, text=True, check=True).stderr
    ttft = sum(int(v) for v in re.search(r"first token after (\d+) ms, load (\d+) ms", first).groups())
    return Result(float(m.group(2)), float(m.group(4)), ttft, int(rss.group(1)) * 1024.0 if rss else float("nan"))


def median_result(results):
    return Result(*(statistics.median(getattr(r, f.name) for r in results) for f in dataclasses.fields(Result)))


def bytes_per_token(args, dtype, pos_from, n_gen, peer=False):
    """Bytes one generated token reads: every matrix (the classifier, not the
    embedding table, of which it reads one row) and norm, plus the KV cache up
    to its position, averaged over the generated positions."""
    per_weight = {"f32": 4, "bf16": 2, "q8_0": 1 + 2 / 32, "q4_0": 0.5 + 2 / 32}[dtype]
    d, h, qd, kvd = args.dim, args.hidden_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    matrices = args.n_layers * (qd * d + 2 * kvd * d + d * qd + 3 * h * d) + args.vocab_size * d
    norms = (2 * args.n_layers + 1) * d * 4
    mean_pos = pos_from + (n_gen + 1) / 2
    kv = 2 * args.n_layers * mean_pos * kvd * kv_bytes(dtype, peer)
    return matrices * per_weight + norms + kv


def kv_bytes(dtype, peer=False):
    """Bytes per cached key or value element: run.c keeps f16 for q8_0 and
    q4_0, llama.cpp f16 for all."""
    return 2 if peer or dtype in ("q8_0", "q4_0") else 4


def footprint(path, args, dtype, n_pos):
    """The file's bytes plus the KV cache's for n_pos positions."""
    return os.path.getsize(path) + 2 * args.n_layers * n_pos * args.n_kv_heads * args.head_dim * kv_bytes(dtype)


# ----------------------------------------------------------------------------
# llama.cpp, through llama-cpp-python

def have_peers():
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        return False


def gguf_path(shape, dtype):
    return OUT / f"{shape}-{dtype}.gguf"


class LlamaCpp:
    """llama.cpp on a GGUF file, loaded once; run() does the task once and
    returns its prompt and generation speeds from llama.cpp's own timers, and
    its greedy tokens (to check that it runs the same model)."""

    def __init__(self, path, prompt, n_gen, threads):
        import llama_cpp
        self.lib, self.prompt, self.n_gen = llama_cpp, prompt, n_gen
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n_gen + 8, n_batch=len(prompt),
                                   n_ubatch=len(prompt), n_threads=threads, n_threads_batch=threads,
                                   verbose=False)

    def run(self):
        lib, llm = self.lib, self.llm
        llm.reset()
        lib.llama_perf_context_reset(llm.ctx)
        llm.eval(self.prompt)
        generated = []
        for _ in range(self.n_gen):
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            generated.append(int(np.argmax(logits)))
            if len(generated) < self.n_gen:
                llm.eval([generated[-1]])
        perf = lib.llama_perf_context(llm.ctx)
        return perf.n_p_eval / perf.t_p_eval_ms * 1000, perf.n_eval / perf.t_eval_ms * 1000, generated

    def close(self):
        self.llm.close()


# ----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SHAPES), help="shapes, of: " + ", ".join(SHAPES))
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="weight types, of: " + ", ".join(DTYPES))
    parser.add_argument("--runs", type=int, default=3, help="runs of each, median reported (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads (default: all cores)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--gen", type=int, default=256, help="generated tokens (default 256)")
    parser.add_argument("--no-peers", action="store_true", help="skip llama.cpp even when installed")
    opts = parser.parse_args(argv)
    shapes, dtypes = opts.models.split(","), opts.dtypes.split(",")
    for s in shapes:
        if s not in SHAPES:
            parser.error(f"unknown model {s}")
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"unknown weight type {d}")
    peers = have_peers() and not opts.no_peers

    subprocess.run(["make", "-s", "-C", str(ROOT), "run", "bench/membw"], check=True)
    make_models(shapes, dtypes)
    if peers:
        for shape in shapes:
            for dtype in dtypes:
                if not gguf_path(shape, dtype).exists():
                    log(f"bench: writing {gguf_path(shape, dtype).name}")
                    export.write_gguf(gguf_path(shape, dtype), model_path(shape, dtype))

    rng = np.random.default_rng(0)
    prompt = [1] + rng.integers(3, 32000, opts.prompt - 1).tolist()
    print(f"machine: {machine()}")
    print(f"threads: {opts.threads}; prompt {opts.prompt} tokens, then {opts.gen} generated, greedy; "
          f"median of {opts.runs} runs; a bandwidth reading before and after each run, ours and llama.cpp's in turn")
    header = f"{'model':5} {'type':5} {'MB':>6} {'pp tok/s':>9} {'tg tok/s':>9} {'GB/s':>5} {'%bw':>5} {'ttft':>6} {'rss':>6}"
    if peers:
        header += f" | {'llama.cpp pp':>12} {'tg':>7} {'%bw':>5} | {'pp x':>5} {'tg x':>5}  same tokens"
    print(header)
    for shape in shapes:
        args = export.ModelArgs(**SHAPES[shape])
        for dtype in dtypes:
            path = model_path(shape, dtype)
            run_once(path, prompt[:8], 2, opts.threads)  # warm the page cache
            peer = LlamaCpp(gguf_path(shape, dtype), prompt, opts.gen, opts.threads) if peers else None
            if peer:
                theirs = peer.run()[2]                   # warms it up
            ours, pp_ratio, tg_ratio, peer_pp, peer_tg, share, peer_share = [], [], [], [], [], [], []
            bandwidths = [read_bandwidth(opts.threads)]
            our_bytes = bytes_per_token(args, dtype, opts.prompt, opts.gen)
            for _ in range(opts.runs):                  # interleaved, so that all see the same load
                ours.append(run_once(path, prompt, opts.gen, opts.threads))
                bandwidths.append(read_bandwidth(opts.threads))
                share.append(ours[-1].tg * our_bytes / (statistics.mean(bandwidths[-2:]) * 1e9))
                if peer:
                    pp, tg, _ = peer.run()
                    bandwidths.append(read_bandwidth(opts.threads))
                    peer_pp.append(pp), peer_tg.append(tg)
                    pp_ratio.append(ours[-1].pp / pp), tg_ratio.append(ours[-1].tg / tg)
                    theirs_bytes = bytes_per_token(args, dtype, opts.prompt, opts.gen, peer=True)
                    peer_share.append(tg * theirs_bytes / (statistics.mean(bandwidths[-2:]) * 1e9))
            res, bw = median_result(ours), statistics.median(bandwidths)
            rss = res.rss / footprint(path, args, dtype, opts.prompt + opts.gen)
            line = (f"{shape:5} {dtype:5} {os.path.getsize(path) / 1e6:6.0f} {res.pp:9.1f} {res.tg:9.1f} "
                    f"{bw:5.1f} {100 * statistics.median(share):4.0f}% {res.ttft_ms:4.0f}ms {rss:6.3f}")
            if peer:
                peer.close()
                mine = [int(t) for t in subprocess.run(
                    [str(ROOT / "run"), str(path), "--tokens", " ".join(map(str, prompt)), "-n", "16", "-t", "0"],
                    capture_output=True, text=True, check=True).stdout.split()[len(prompt):]]
                same = sum(a == b for a, b in zip(mine, theirs[:16]))
                line += (f" | {statistics.median(peer_pp):12.1f} {statistics.median(peer_tg):7.1f} "
                         f"{100 * statistics.median(peer_share):4.0f}% | "
                         f"{statistics.median(pp_ratio):5.2f} {statistics.median(tg_ratio):5.2f}  {same}/16")
            print(line, flush=True)
    print("GB/s: read bandwidth (bench/membw), median of the readings; %bw: median of each run's share of "
          "the readings beside it; ratios: medians of ours over llama.cpp's, run by run")

if __name__ == "__main__":
    sys.exit(main())
