#!/usr/bin/env python3
"""bench.py: how fast ./run is, against this machine's memory and llama.cpp.

    make bench                        # all shapes and weight types
    python3 bench/bench.py --models 110m --dtypes f32,q4_0 --runs 5
    python3 bench/bench.py --depths none  # without the long-context section

For each model shape (random weights, written by export.py into bench/out/,
which is git-ignored) and each weight type, ./run reads a 512-token prompt
and then generates 256 tokens greedily, on every core; the median of --runs
runs is reported:

  pp       prompt processing, tokens per second
  GFLOP/s  the prompt's arithmetic over its time. A prompt of n tokens from
           position 0 does, in multiply-adds, n times those of one token's
           matrices (per layer dim*(q_dim + 2*kv_dim) + q_dim*dim for the
           attention's projections and 3*dim*hidden for the MLP), plus
           vocab*dim for the classifier, which only the last token needs,
           plus the attention itself: for the token at position p,
           2*n_heads*head_dim*(p+1) per layer (scores and the weighted sum
           of values), n*(n+1)/2 positions in all. GFLOP/s counts two
           operations per multiply-add, for int8 dot products too (GOP/s)
  %peak    that over the machine's peak for the kernels' instruction mix,
           measured by bench/peak beside every run as bandwidth is: f32 on
           f32 FMAs; bf16 on f32 FMAs too (its weights widen to f32);
           q8_0, q4_0 and q4_k_m on int8 dot products
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
from elsewhere on the machine hits both. llama.cpp runs as llama-bench
does by default: flash attention (llama-bench's "auto" is on for a CPU;
the binding's own default is off), batches of 512 tokens, the weights
mapped, its f16 KV cache, and all threads for prompts and generation alike.

Long contexts (--depths): a random model of SmolLM2-135M's shape (context
8192, GQA) in f32 (whose KV cache is f32 in ./run) and q8_0 (f16 cache)
generates, for each depth D, --depth-gen tokens at positions up to D (after
a prompt of D - depth-gen tokens, so that 8192 fits the context): tg at
depth, where attention reads up to D cached positions; and it reads one
prompt of --long-prompt tokens (pp); llama.cpp the same, with its f16 KV
cache.
These runs are long on a small machine: --depth-runs of each (default 1).
"""

import argparse
import dataclasses
import math
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
from convert.checkpoint import checkpoint_tensors, matrix_types  # noqa: E402
from convert.kquants import MIXES, kquant_mix_types  # noqa: E402

SHAPES = {
    # name: the 110M Llama-2 shape of llama2.c's stories110M (tied), and a
    # 1B-class GQA shape like TinyLlama-1.1B (untied)
    "110m": dict(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64,
                 vocab_size=32000, max_seq_len=1024, tied=True),
    "1b": dict(dim=2048, hidden_dim=5632, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64,
               vocab_size=32000, max_seq_len=1024, tied=False),
    # the long-context section's: SmolLM2-135M's shape and context (tied)
    "smollm2": dict(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                    vocab_size=49152, max_seq_len=8192, tied=True),
    # a few seconds in all, for the tests
    "tiny": dict(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                 vocab_size=512, max_seq_len=128, tied=True),
}
DTYPES = ["f32", "bf16", "q8_0", "q4_0", "q4_k_m"]  # q4_k_m: llama.cpp's mix of Q4_K and Q6_K matrices


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


def model_path(out, shape, dtype):
    return out / f"{shape}-{dtype}.bin"


def make_models(out, models):
    """Writes the checkpoints of models, (shape, dtype) pairs, that are
    missing: one random model per shape, written in each weight type."""
    out.mkdir(parents=True, exist_ok=True)
    for shape in dict.fromkeys(s for s, _ in models):
        missing = [d for s, d in dict.fromkeys(models) if s == shape and not model_path(out, s, d).exists()]
        if not missing:
            continue
        args = export.ModelArgs(**SHAPES[shape])
        log(f"bench: writing {shape} ({args.describe()}) as {', '.join(missing)} into {out}")
        state = export.random_model(args, seed=0).state_dict()
        for dtype in missing:
            tmp = model_path(out, shape, dtype).with_suffix(".tmp")
            export.write_checkpoint(tmp, args, state, weight_types(args, dtype))
            tmp.rename(model_path(out, shape, dtype))
        del state


def weight_types(args, dtype):
    """The weight type of each matrix: dtype, or for a mix llama.cpp's choice."""
    return kquant_mix_types(args, dtype) if dtype in MIXES else dtype


def read_bandwidth(threads):
    p = subprocess.run([str(ROOT / "bench" / "membw"), "1024", "7"], capture_output=True, text=True, check=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    return float(p.stdout.split()[1])


def read_peaks(threads):
    """bench/peak's lines as {"fma_gflops": .., "int8_gops": .., ...}: what
    this CPU has (nothing where it measures nothing)."""
    p = subprocess.run([str(ROOT / "bench" / "peak"), "3"], capture_output=True, text=True, check=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    return {k: float(v) for k, v in (line.split() for line in p.stdout.splitlines())}


def read_machine(threads):
    """Bandwidth and arithmetic peaks, read once: the rooflines of a run."""
    return read_bandwidth(threads), read_peaks(threads)


def peak_for(dtype, peaks):
    """The peak (G operations per second) of the instruction mix that a
    prompt in this weight type runs on, or None where it was not measured."""
    key = {"f32": "fma_gflops", "bf16": "fma_gflops"}.get(dtype, "int8_gops")
    return peaks.get(key)


def prompt_ops(args, n):
    """Operations (two per multiply-add) of a prompt of n tokens from position
    0: the matrices of every token, the classifier of the last, and the
    attention over positions 1 .. n (see the docstring at the top)."""
    d, h, qd, kvd = args.dim, args.hidden_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    per_token = args.n_layers * (d * (qd + 2 * kvd) + qd * d + 3 * d * h)
    attention = args.n_layers * 2 * args.n_heads * args.head_dim * n * (n + 1) / 2
    return 2 * (n * per_token + args.vocab_size * d + attention)


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


def run_once(path, prompt, n_gen, threads, ttft=True):
    """One ./run: prompt and generation speed from its statistics line, and
    its peak RSS; then (ttft) the time to first token of a one-token prompt."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [str(ROOT / "run"), str(path), "--tokens", " ".join(map(str, prompt)), "-n", str(n_gen), "-t", "0"]
    p = subprocess.run(([TIME, "-f", "maxrss_kb %M"] if TIME else []) + cmd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, env=env, text=True)
    m = STATS.search(p.stderr)
    if p.returncode != 0 or not m:
        raise SystemExit(f"bench: {' '.join(cmd[:2])} failed ({p.returncode}): {p.stderr.strip()}")
    rss = re.search(r"maxrss_kb (\d+)", p.stderr)
    first_ms = float("nan")
    if ttft:
        first = subprocess.run(cmd[:2] + ["--tokens", "1", "-n", "1", "-t", "0"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=env, text=True, check=True).stderr
        first_ms = sum(int(v) for v in re.search(r"first token after (\d+) ms, load (\d+) ms", first).groups())
    return Result(float(m.group(2)), float(m.group(4)), first_ms, int(rss.group(1)) * 1024.0 if rss else float("nan"))


def median_result(results):
    return Result(*(statistics.median(getattr(r, f.name) for r in results) for f in dataclasses.fields(Result)))


def bytes_per_token(args, dtype, pos_from, n_gen, peer=False):
    """Bytes one generated token reads: every matrix (the classifier, not the
    embedding table, of which it reads one row) and norm, plus the KV cache up
    to its position, averaged over the generated positions."""
    d, kvd = args.dim, args.n_kv_heads * args.head_dim
    types = matrix_types(args, weight_types(args, dtype))
    shapes = dict(checkpoint_tensors(args))
    read = [name for name in types if name != "tok_embeddings.weight" or args.tied]  # the classifier's
    matrices = sum(shapes[name][0] * shapes[name][1] * BYTES_PER_WEIGHT[types[name]] for name in read)
    norms = (2 * args.n_layers + 1) * d * 4
    mean_pos = pos_from + (n_gen + 1) / 2
    kv = 2 * args.n_layers * mean_pos * kvd * kv_bytes(dtype, peer)
    return matrices + norms + kv


BYTES_PER_WEIGHT = {"f32": 4, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_k": 144 / 256, "q5_k": 176 / 256,
                    "q6_k": 210 / 256}


def kv_bytes(dtype, peer=False):
    """Bytes per cached key or value element: run.c keeps f16 for quantized
    weights, llama.cpp f16 for all."""
    return 2 if peer or dtype not in ("f32", "bf16") else 4


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


def gguf_path(out, shape, dtype):
    return out / f"{shape}-{dtype}.gguf"


class LlamaCpp:
    """llama.cpp on a GGUF file, loaded once; run() does the task once and
    returns its prompt and generation speeds from llama.cpp's own timers, and
    its greedy tokens (to check that it runs the same model). The context is
    set up as llama-bench's defaults do (see the docstring at the top)."""

    def __init__(self, path, prompt, n_gen, threads):
        import llama_cpp
        self.lib, self.prompt, self.n_gen = llama_cpp, prompt, n_gen
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + n_gen, n_batch=2048,
                                   n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                                   flash_attn=True, use_mmap=True, verbose=False)

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
        tg = perf.n_eval / perf.t_eval_ms * 1000 if perf.t_eval_ms > 0 else float("nan")  # none when n_gen is 1
        return perf.n_p_eval / perf.t_p_eval_ms * 1000, tg, generated

    def close(self):
        self.llm.close()


# ----------------------------------------------------------------------------

def numbers(text):
    """A comma-separated list of positive whole numbers, or none."""
    if text == "none":
        return []
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = [0]
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of positive numbers or 'none'")
    return values


def percent(value):
    return "    -" if math.isnan(value) else f"{100 * value:4.0f}%"


def table(opts, shapes, dtypes, peers):
    """The main table: every shape and weight type, a prompt then generation."""
    print(f"prompt {opts.prompt} tokens, then {opts.gen} generated, greedy; median of {opts.runs} runs; "
          f"a bandwidth and peak reading before and after each run, ours and llama.cpp's in turn")
    header = (f"{'model':5} {'type':5} {'MB':>6} {'pp tok/s':>9} {'GFLOP/s':>8} {'%peak':>5} {'tg tok/s':>9} "
              f"{'GB/s':>5} {'%bw':>5} {'ttft':>6} {'rss':>6}")
    if peers:
        header += f" | {'llama.cpp pp':>12} {'%peak':>5} {'tg':>7} {'%bw':>5} | {'pp x':>5} {'tg x':>5}  same tokens"
    print(header)
    for shape in shapes:
        args = export.ModelArgs(**SHAPES[shape])
        prompt = prompt_tokens(args, opts.prompt)
        ops = prompt_ops(args, opts.prompt)
        for dtype in dtypes:
            path = model_path(opts.out, shape, dtype)
            run_once(path, prompt[:8], 2, opts.threads, ttft=False)  # warm the page cache
            peer = LlamaCpp(gguf_path(opts.out, shape, dtype), prompt, opts.gen, opts.threads) if peers else None
            if peer:
                theirs = peer.run()[2]                   # warms it up
            ours, pp_ratio, tg_ratio, peer_pp, peer_tg = [], [], [], [], []
            share, peer_share, arith, peer_arith = [], [], [], []
            readings = [read_machine(opts.threads)]

            def shares(pp, tg, n_bytes):
                """A run's share of the bandwidth and of the peak, from the
                readings on either side of it."""
                (bw0, peaks0), (bw1, peaks1) = readings[-2:]
                top = [peak_for(dtype, p) for p in (peaks0, peaks1)]
                return (tg * n_bytes / (statistics.mean((bw0, bw1)) * 1e9),
                        pp * ops / opts.prompt / (statistics.mean(top) * 1e9) if None not in top else float("nan"))

            for _ in range(opts.runs):                  # interleaved, so that all see the same load
                ours.append(run_once(path, prompt, opts.gen, opts.threads))
                readings.append(read_machine(opts.threads))
                b, a = shares(ours[-1].pp, ours[-1].tg, bytes_per_token(args, dtype, opts.prompt, opts.gen))
                share.append(b), arith.append(a)
                if peer:
                    pp, tg, _ = peer.run()
                    readings.append(read_machine(opts.threads))
                    peer_pp.append(pp), peer_tg.append(tg)
                    pp_ratio.append(ours[-1].pp / pp), tg_ratio.append(ours[-1].tg / tg)
                    b, a = shares(pp, tg, bytes_per_token(args, dtype, opts.prompt, opts.gen, peer=True))
                    peer_share.append(b), peer_arith.append(a)
            res, bw = median_result(ours), statistics.median(r[0] for r in readings)
            rss = res.rss / footprint(path, args, dtype, opts.prompt + opts.gen)
            line = (f"{shape:5} {dtype:5} {os.path.getsize(path) / 1e6:6.0f} {res.pp:9.1f} "
                    f"{res.pp * ops / opts.prompt / 1e9:8.1f} {percent(statistics.median(arith))} {res.tg:9.1f} "
                    f"{bw:5.1f} {percent(statistics.median(share))} {res.ttft_ms:4.0f}ms {rss:6.3f}")
            if peer:
                peer.close()
                mine = [int(t) for t in subprocess.run(
                    [str(ROOT / "run"), str(path), "--tokens", " ".join(map(str, prompt)), "-n", "16", "-t", "0"],
                    capture_output=True, text=True, check=True).stdout.split()[len(prompt):]]
                same = sum(a == b for a, b in zip(mine, theirs[:16]))
                line += (f" | {statistics.median(peer_pp):12.1f} {percent(statistics.median(peer_arith))} "
                         f"{statistics.median(peer_tg):7.1f} {percent(statistics.median(peer_share))} | "
                         f"{statistics.median(pp_ratio):5.2f} {statistics.median(tg_ratio):5.2f}  {same}/16")
            print(line, flush=True)
    peaks = read_peaks(opts.threads)
    print("peaks (bench/peak, now): " + (", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) or "not measured"))
    print("GB/s: read bandwidth (bench/membw), median of the readings; %bw: median of each run's share of "
          "the readings beside it; GFLOP/s: the prompt's operations over its time (GOP/s for the quantized types); "
          "%peak: the same over the peak read beside it (bench/peak); ratios: medians of ours over llama.cpp's, "
          "run by run")


def depth_section(opts, peers):
    """Long contexts: tg after a prompt of each depth, and pp of a long prompt."""
    shape = opts.depth_model
    args = export.ModelArgs(**SHAPES[shape])
    print(f"\nlong contexts: {shape} ({args.describe()}); tg @D: {opts.depth_gen} tokens generated at positions "
          f"D-{opts.depth_gen} .. D-1; pp: a prompt of {opts.long_prompt or '-'} tokens; {opts.depth_runs} run(s), median; "
          f"KV cache: ours f32 for f32, f16 for q8_0; llama.cpp's f16")
    tasks = [(f"tg @{d}", d - opts.depth_gen, opts.depth_gen) for d in opts.depths]
    if opts.long_prompt:
        tasks.append((f"pp {opts.long_prompt}", opts.long_prompt, 1))
    header = f"{'model':7} {'type':5} {'task':8} {'ours tok/s':>10}"
    if peers:
        header += f" | {'llama.cpp':>9} | {'x':>5}"
    print(header)
    for dtype in opts.depth_dtypes:
        for name, n_prompt, n_gen in tasks:
            prompt = prompt_tokens(args, n_prompt)
            pick = (lambda pp, tg: tg) if name.startswith("tg") else (lambda pp, tg: pp)
            peer = LlamaCpp(gguf_path(opts.out, shape, dtype), prompt, n_gen, opts.threads) if peers else None
            ours, theirs = [], []
            for _ in range(opts.depth_runs):
                r = run_once(model_path(opts.out, shape, dtype), prompt, n_gen, opts.threads, ttft=False)
                ours.append(pick(r.pp, r.tg))
                if peer:
                    theirs.append(pick(*peer.run()[:2]))
            line = f"{shape:7} {dtype:5} {name:8} {statistics.median(ours):10.1f}"
            if peer:
                peer.close()
                line += (f" | {statistics.median(theirs):9.1f} | "
                         f"{statistics.median(a / b for a, b in zip(ours, theirs)):5.2f}")
            print(line, flush=True)


def prompt_tokens(args, n):
    """n tokens for a prompt: BOS, then random ones from the vocabulary."""
    return [1] + np.random.default_rng(0).integers(3, args.vocab_size, n - 1).tolist()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="110m,1b", help="shapes, of: " + ", ".join(SHAPES) + " (default 110m,1b)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="weight types, of: " + ", ".join(DTYPES))
    parser.add_argument("--runs", type=int, default=3, help="runs of each, median reported (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads (default: all cores)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--gen", type=int, default=256, help="generated tokens (default 256)")
    parser.add_argument("--depths", type=numbers, default="2048,8192",
                        help="long contexts: tg at positions up to each of these, comma-separated, or none "
                        "(default 2048,8192)")
    parser.add_argument("--depth-gen", type=int, default=32, help="tokens generated at each depth (default 32)")
    parser.add_argument("--long-prompt", type=int, default=4096, help="long contexts: pp of a prompt this long; "
                        "0 skips it (default 4096)")
    parser.add_argument("--depth-runs", type=int, default=1, help="runs of each long-context task (default 1)")
    parser.add_argument("--depth-model", default="smollm2", help="the long contexts' shape (default smollm2)")
    parser.add_argument("--depth-dtypes", default="f32,q8_0", help="the long contexts' weight types (default f32,q8_0)")
    parser.add_argument("--out", type=Path, default=OUT, help="where models are written and kept (default bench/out)")
    parser.add_argument("--no-peers", action="store_true", help="skip llama.cpp even when installed")
    opts = parser.parse_args(argv)
    shapes, dtypes = opts.models.split(","), opts.dtypes.split(",")
    opts.depth_dtypes = opts.depth_dtypes.split(",")
    for s in shapes + [opts.depth_model]:
        if s not in SHAPES:
            parser.error(f"unknown model {s}")
    for d in dtypes + opts.depth_dtypes:
        if d not in DTYPES:
            parser.error(f"unknown weight type {d}")
    for name in ("runs", "threads", "prompt", "gen", "depth_gen", "depth_runs"):
        if getattr(opts, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if opts.long_prompt < 0:
        parser.error("--long-prompt must be 0 or more")
    depth = bool(opts.depths or opts.long_prompt)
    for shape in shapes:
        if opts.prompt + opts.gen > SHAPES[shape]["max_seq_len"]:
            parser.error(f"--prompt and --gen need {opts.prompt + opts.gen} positions; {shape} holds "
                         f"{SHAPES[shape]['max_seq_len']}")
    if any(d <= opts.depth_gen for d in opts.depths):
        parser.error("--depths must be above --depth-gen")
    if depth and max(opts.depths + [opts.long_prompt + 1]) > SHAPES[opts.depth_model]["max_seq_len"]:
        parser.error(f"the long contexts need more positions than {opts.depth_model} holds "
                     f"({SHAPES[opts.depth_model]['max_seq_len']})")
    peers = have_peers() and not opts.no_peers

    subprocess.run(["make", "-s", "-C", str(ROOT), "run", "bench/membw", "bench/peak"], check=True)
    models = [(s, d) for s in shapes for d in dtypes] + [(opts.depth_model, d) for d in opts.depth_dtypes if depth]
    make_models(opts.out, models)
    if peers:
        for shape, dtype in models:
            if not gguf_path(opts.out, shape, dtype).exists():
                log(f"bench: writing {gguf_path(opts.out, shape, dtype).name}")
                export.write_gguf(gguf_path(opts.out, shape, dtype), model_path(opts.out, shape, dtype))

    print(f"machine: {machine()}")
    print(f"threads: {opts.threads}")
    if peers:
        import llama_cpp
        print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}; "
              f"{llama_cpp.llama_print_system_info().decode().strip()}")
    elif not opts.no_peers:
        print("llama.cpp: not installed (make bench-peers installs it), so no ratios")
    table(opts, shapes, dtypes, peers)
    if depth:
        depth_section(opts, peers)


if __name__ == "__main__":
    sys.exit(main())
