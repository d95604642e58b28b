#!/usr/bin/env python3
"""bench_convert.py: export.py converting a model at full size, in bounded memory.

    make bench-convert                                  # the 7B shape: 13.5 GB of bf16
    python3 bench/bench_convert.py --shape 1b --dtypes q4_0

Writes a random Hugging Face model of the shape (bf16 safetensors shards
with an index, as save_pretrained writes them; generated tensor by tensor
from a fixed random block, so that writing 13.5 GB takes seconds, not
minutes) into bench/out/convert-SHAPE/ (git-ignored; kept, and reused by
the next run), converts it with export.py to each weight type, and reports
for each:

  time     wall-clock seconds of the whole export.py process
  MB/s     the source's size over that time
  rss      peak resident memory of export.py, measured in a small process
           that runs it (the wait4 of a process that forked from a big one
           reports the big one's high-water mark)
  size     the checkpoint's size

Then ./run loads the q4_0 checkpoint (when converted) and generates a few
tokens greedily: its generation speed, tokens per second.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"

SHAPES = {
    # Llama-2-7B (untied, 32 kv heads), and a 1B-class GQA shape like TinyLlama-1.1B
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}
SHARD_BYTES = 2 << 30           # safetensors shards of about this size
BF16_ONE = 0x3F80


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def hf_shapes(config):
    """Each tensor of a LlamaForCausalLM of config, (name, shape), in save_pretrained's order."""
    d, h = config["hidden_size"], config["intermediate_size"]
    head_dim = d // config["num_attention_heads"]
    kvd = config["num_key_value_heads"] * head_dim
    tensors = [("model.embed_tokens.weight", (config["vocab_size"], d))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (d, d)),
                    (p + "self_attn.k_proj.weight", (kvd, d)), (p + "self_attn.v_proj.weight", (kvd, d)),
                    (p + "self_attn.o_proj.weight", (d, d)), (p + "post_attention_layernorm.weight", (d,)),
                    (p + "mlp.gate_proj.weight", (h, d)), (p + "mlp.up_proj.weight", (h, d)),
                    (p + "mlp.down_proj.weight", (d, h))]
    tensors += [("model.norm.weight", (d,)), ("lm_head.weight", (config["vocab_size"], d))]
    return tensors


def random_bf16_bits(rng):
    """A block of random bf16 bit patterns of a prime length (tiled, it
    repeats with no row period): any sign and mantissa, exponents 2^-7 to
    2^-4, so that weights are of a trained model's size."""
    r = rng.integers(0, 1 << 16, size=1_000_003, dtype=np.uint16)
    return (r & 0x807F) | ((0x78 | ((r >> 7) & 3)) << 7).astype(np.uint16)


def write_model(directory, config):
    """The random model as bf16 safetensors shards with an index, and config.json."""
    import torch
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    block = random_bf16_bits(np.random.default_rng(0))
    tensors = hf_shapes(config)
    groups, size = [[]], 0
    for name, shape in tensors:
        nbytes = 2 * int(np.prod(shape))
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name, shape in group:
            n = int(np.prod(shape))
            bits = np.full(n, BF16_ONE, np.uint16) if len(shape) == 1 else np.resize(block, n)
            shard[name] = torch.from_numpy(bits.view(np.int16).reshape(shape)).view(torch.bfloat16)
            weight_map[name] = file
        save_file(shard, directory / file, metadata={"format": "pt"})
        log(f"bench: wrote {file}")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps(dict(
        config, model_type="llama", architectures=["LlamaForCausalLM"], max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
        torch_dtype="bfloat16"), indent=1))


# Runs argv[1:] and prints its peak resident memory in KiB: a small process
# forks it, so that wait4's ru_maxrss is its own.
PEAK_RSS = """
import resource, subprocess, sys
status = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(status)
"""


def measured(cmd):
    """Run cmd: (seconds, peak RSS in bytes, its stdout, its stderr)."""
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, cmd)], capture_output=True, text=True)
    seconds = time.monotonic() - start
    if p.returncode != 0:
        raise SystemExit(f"bench: {' '.join(map(str, cmd))} failed ({p.returncode}): {p.stderr.strip()}")
    *err, rss = p.stderr.splitlines()
    return seconds, int(rss) * 1024, p.stdout, "\n".join(err)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="7b", help="the model's shape (default: 7b)")
    parser.add_argument("--dtypes", default="bf16,q8_0,q4_0",
                        help="the weight types to convert to, comma-separated (default: bf16,q8_0,q4_0)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens ./run generates from the q4_0 model")
    opts = parser.parse_args()
    dtypes = opts.dtypes.split(",")
    if not set(dtypes) <= {"f32", "bf16", "q8_0", "q4_0"}:
        parser.error(f"--dtypes {opts.dtypes}: expected some of f32, bf16, q8_0, q4_0")

    source = OUT / f"convert-{opts.shape}"
    if not (source / "config.json").exists():
        log(f"bench: writing a random {opts.shape} model as bf16 safetensors into {source}")
        write_model(source, SHAPES[opts.shape])
    source_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    rows = []
    for dtype in dtypes:
        out = OUT / f"convert-{opts.shape}-{dtype}.bin"
        log(f"bench: export.py {out.name} --hf {source.name} --dtype {dtype}")
        seconds, rss, _, _ = measured([sys.executable, ROOT / "export.py", out, "--hf", source, "--dtype", dtype])
        rows.append((f"bf16 -> {dtype}", f"{seconds:.1f} s", f"{source_bytes / 1e6 / seconds:.0f}",
                     f"{rss / 1e9:.2f} GB", f"{out.stat().st_size / 1e9:.2f} GB"))
    print(f"{opts.shape}: {source_bytes / 1e9:.2f} GB of bf16 safetensors in "
          f"{len(list(source.glob('*.safetensors')))} shards")
    print("| conversion | time | MB/s | peak RSS | size |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    q4 = OUT / f"convert-{opts.shape}-q4_0.bin"
    if "q4_0" in dtypes:
        _, rss, _, err = measured([ROOT / "run", q4, "--tokens", "1 450 4996 310", "-n", opts.tokens, "-t", 0])
        m = re.search(r"generated (\d+) tokens \(([\d.]+) tok/s\).*load (\d+) ms", err)
        if not m:
            raise SystemExit(f"bench: no statistics from ./run: {err}")
        print(f"./run {q4.name}: {m.group(1)} tokens at {m.group(2)} tok/s, loaded in {m.group(3)} ms, "
              f"peak RSS {rss / 1e9:.2f} GB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
