"""Writes seed inputs for the fuzzers into DIR/<target>/: small valid files
that the fuzzer then mutates, so it starts deep inside the formats instead
of at the magic bytes."""

import dataclasses
import struct
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export  # noqa: E402

TEXTS = ["Once upon a time, a café.", "  tabs\tand\nnewlines  ", "naïve 東京 🙂👍🏽 <s> [INST]",
         "\xa0\u200b\u0301x"]


def checkpoint_seeds(out):
    for tied in (True, False):
        args = export.ModelArgs(dim=8, hidden_dim=12, n_layers=1, n_heads=2, n_kv_heads=1,
                                head_dim=4, vocab_size=10, max_seq_len=4, rope_theta=10000.0,
                                norm_eps=1e-5, tied=tied)
        state = export.random_model(args, 0).state_dict()
        export.write_checkpoint(out / f"ours-tied{int(tied)}.bin", args, state)
        export.write_llama2c(out / f"legacy-tied{int(tied)}.bin", args, state)
    # every weight type, in a shape whose widths are multiples of 32
    args = export.ModelArgs(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                            vocab_size=10, max_seq_len=4, rope_theta=10000.0, norm_eps=1e-5, tied=True)
    state = export.random_model(args, 0).state_dict()
    for dtype in export.WEIGHT_TYPES:
        export.write_checkpoint(out / f"ours-{dtype}.bin", args, state, dtype)
    # version 2: q/k/v biases and stored RoPE frequencies
    args = export.ModelArgs(dim=8, hidden_dim=12, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, vocab_size=10,
                            max_seq_len=4, attention_bias=True, scaled_rope=True)
    export.write_checkpoint(out / "ours-v2.bin", args, export.random_model(args, 0).state_dict())
    # version 3: a type for each matrix (the K types, which need widths of 256, make a seed of
    # 280 KB; these four exercise the table as well)
    args = export.ModelArgs(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                            vocab_size=10, max_seq_len=4, tied=False)
    names = [name for name, shape in export.checkpoint_tensors(args) if len(shape) == 2]
    kinds = ["f32", "q8_0", "q4_0", "bf16"]
    export.write_checkpoint(out / "ours-v3.bin", args, export.random_model(args, 0).state_dict(),
                            {name: kinds[i % len(kinds)] for i, name in enumerate(names)})


def gguf_seeds(out):
    """GGUF files as export.py --to-gguf writes them (its stand-in
    sentencepiece vocabulary): f32 tied, q8_0 and q4_0 blocks, bf16, qwen2
    with biases and rope_freqs; and one of F16, Q4_1, Q5_0 and Q5_1 tensors
    with a byte-level vocabulary and a ChatML template."""
    import gguf
    import numpy as np
    base = export.ModelArgs(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                            vocab_size=260, max_seq_len=4, tied=True)
    qwen2 = dataclasses.replace(base, tied=False, attention_bias=True, scaled_rope=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, args, dtype in [("f32", base, "f32"), ("q8_0", base, "q8_0"), ("q4_0", base, "q4_0"),
                                  ("bf16", base, "bf16"), ("qwen2", qwen2, "q8_0")]:
            export.write_checkpoint(f"{tmp}/{name}.bin", args, export.random_model(args, 0).state_dict(), dtype)
            export.write_gguf(out / f"gguf-{name}", f"{tmp}/{name}.bin")
    alphabet = export.gpt2_bytes_to_unicode()
    tokens = ["<|im_start|>", "<|im_end|>"] + [alphabet[b] for b in range(256)] + ["Ġt", "Ġth"]
    w = gguf.GGUFWriter(str(out / "gguf-bytelevel"), "llama")
    for key, value in {"context_length": 4, "embedding_length": 32, "block_count": 1, "feed_forward_length": 64,
                       "attention.head_count": 2}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * 258)
    w.add_token_merges(["Ġ t", "Ġt h"])
    w.add_chat_template("<|im_start|>system\nYou are kind.<|im_end|>")
    rng = np.random.default_rng(0)
    kinds = {"attn_q": "F16", "attn_k": "Q4_1", "attn_v": "Q5_0", "attn_output": "Q5_1", "ffn_gate": "Q8_0",
             "ffn_down": "F32", "ffn_up": "Q4_0"}
    shapes = {"ffn_gate": (64, 32), "ffn_up": (64, 32), "ffn_down": (32, 64)}
    w.add_tensor("token_embd.weight", rng.standard_normal((260, 32)).astype(np.float32))
    for part, kind in kinds.items():
        values = rng.standard_normal(shapes.get(part, (32, 32))).astype(np.float32)
        w.add_tensor(f"blk.0.{part}.weight", gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind]),
                     raw_dtype=gguf.GGMLQuantizationType[kind])
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, np.ones(32, np.float16), raw_dtype=gguf.GGMLQuantizationType.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama2c_tokenizer(sp):
    """llama2.c's tokenizer.bin: i32 max_token_length, then per token
    f32 score, i32 length, bytes (with U+2581 for spaces, as it stores them)."""
    pieces = [sp.id_to_piece(i).encode() for i in range(sp.get_piece_size())]
    out = struct.pack("<i", max(map(len, pieces)))
    for i, piece in enumerate(pieces):
        out += struct.pack("<fi", sp.get_score(i), len(piece)) + piece
    return out


def tokenizer_seeds(out):
    """The fuzz input is: u32 length of the tokenizer file, the file, text."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(TEXTS * 50))
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=f"{tmp}/sp", vocab_size=300,
                                       model_type="bpe", byte_fallback=True,
                                       character_coverage=0.99, normalization_rule_name="identity",
                                       minloglevel=2)
        export.write_tokenizer_sentencepiece(f"{tmp}/sp.model", f"{tmp}/tok.bin")
        files = {"ltok": Path(f"{tmp}/tok.bin").read_bytes(),
                 "llama2c": llama2c_tokenizer(spm.SentencePieceProcessor(model_file=f"{tmp}/sp.model"))}
    for name, data in files.items():
        for i, text in enumerate(TEXTS):
            (out / f"{name}-{i}").write_bytes(struct.pack("<I", len(data)) + data + text.encode())


def cli_seeds(out):
    """The fuzz input is: arguments separated by NUL, a double NUL, then
    float32 logits."""
    inf, nan = float("inf"), float("nan")
    cases = [
        (["model.bin", "-t", "0.7", "-k", "40", "-p", "0.9"], [0.5 * i for i in range(-8, 24)]),
        (["model.bin", "-t", "0", "--probs", "5"], [1.0, nan, 2.0, 0.0]),
        (["model.bin", "-t", "1e-37", "--repeat-penalty", "1e-37"], [3e38, -3e38, 100.0, 0.0, inf]),
        (["model.bin", "-p", "0.001", "--min-p", "1", "-t", "100"], [0.0] * 64),
        (["model.bin", "-m", "score", "--tokens", "1 2,3", "--stride", "4", "-c", "8"], [-inf, 1.0, 2.0]),
        (["--tokenize", "-z", "t", "-i", "x", "-m", "chat", "-y", "", "--template", "chatml"], [1.0, 1.0]),
        (["model.bin", "--frequency-penalty", "-100", "--presence-penalty", "100", "--repeat-window", "0",
          "-s", "123", "--stop", "x", "--probs-format", "json", "-n", "5", "-b", "4096"], [3.0, -1.0, 0.5]),
    ]
    for i, (args, logits) in enumerate(cases):
        data = b"\0".join(a.encode() for a in args) + b"\0\0" + struct.pack(f"<{len(logits)}f", *logits)
        (out / f"cli-{i}").write_bytes(data)


def export_seeds(out):
    """For fuzz_export.py, a byte that picks the source, then its file: 0
    and a GGUF file (f32, q8_0, Llama 3's RoPE scaling as rope_freqs, Q4_K
    and Q6_K blocks), 1 and
    Meta's consolidated.00.pth (its params.json is fuzz_export.PARAMS)."""
    import torch
    from model import META_LLAMA3_SCALING
    args = export.ModelArgs(dim=32, hidden_dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                            vocab_size=260, max_seq_len=8, tied=True)
    state = export.random_model(args, 0).state_dict()
    scaled = dataclasses.replace(args, scaled_rope=True)
    scaled_state = dict(state, rope_inv_freq=torch.from_numpy(export.rope_inverse_frequencies(
        args.head_dim, args.rope_theta, META_LLAMA3_SCALING)))
    with tempfile.TemporaryDirectory() as tmp:
        for name, (a, s, dtype) in {"f32": (args, state, "f32"), "q8_0": (args, state, "q8_0"),
                                    "rope_freqs": (scaled, scaled_state, "f32")}.items():
            export.write_checkpoint(f"{tmp}/{name}.bin", a, s, dtype)
            export.write_gguf(f"{tmp}/{name}.gguf", f"{tmp}/{name}.bin")
            (out / f"gguf-{name}").write_bytes(b"\0" + Path(f"{tmp}/{name}.gguf").read_bytes())
        k_args = dataclasses.replace(args, dim=256, hidden_dim=256, n_heads=2, head_dim=128)   # K widths: 256
        export.write_checkpoint(f"{tmp}/k.bin", k_args, export.random_model(k_args, 0).state_dict(),
                                export.kquant_mix_types(k_args, "q4_k_m"))
        export.write_gguf(f"{tmp}/k.gguf", f"{tmp}/k.bin")
        (out / "gguf-q4_k_m").write_bytes(b"\0" + Path(f"{tmp}/k.gguf").read_bytes())
        torch.save(state, f"{tmp}/meta.pth")
        (out / "meta").write_bytes(b"\1" + Path(f"{tmp}/meta.pth").read_bytes())


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for target, write_seeds in (("checkpoint", checkpoint_seeds), ("gguf", gguf_seeds), ("tokenizer", tokenizer_seeds),
                                ("cli", cli_seeds), ("export", export_seeds)):
        (root / target).mkdir(parents=True, exist_ok=True)
        write_seeds(root / target)
