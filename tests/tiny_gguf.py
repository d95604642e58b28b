"""Tiny GGUF files for the tests, written with the gguf package's
GGUFWriter: a model's hyperparameters, a byte-level vocabulary, random
Q8_0 and Q4_0 blocks. The tests that write GGUF files share these, so
that each says only what its file has of its own."""

import gguf
import numpy as np

import export


def tiny_bytelevel_vocab():
    """A byte-level BPE vocabulary in GPT-2's alphabet: three special tokens
    (as SmolLM2's first three), the 256 bytes, and merges that spell a few words."""
    alphabet = export.gpt2_bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [alphabet[b] for b in range(256)]
    merges = []
    for word in ["the", " the", " and", "ing", " is", " capital", " of", " France", "\n\n", "  "]:
        text = "".join(alphabet[b] for b in word.encode())
        left = text[0]
        for c in text[1:]:
            if left + c not in tokens:
                tokens.append(left + c)
                merges.append(f"{left} {c}")
            left += c
    return tokens, merges


def gguf_name(name):
    """The GGUF name of our tensor name."""
    theirs = {ours: theirs for theirs, ours in export.GGUF_NAMES.items()}
    if name in theirs:
        return theirs[name]
    _, i, *part, kind = name.split(".")
    layer = {ours: theirs for theirs, ours in export.GGUF_LAYER_NAMES.items()}[".".join(part)]
    return f"blk.{i}.{layer}.{kind}"


def our_name(name):
    """gguf_name()'s inverse: our name of a GGUF tensor."""
    if name in export.GGUF_NAMES:
        return export.GGUF_NAMES[name]
    _, i, part, kind = name.split(".")
    return f"layers.{i}.{export.GGUF_LAYER_NAMES[part]}.{kind}"


def model_writer(path, arch="llama", *, dim, hidden, n_layers, n_heads, n_kv_heads, context, rope_theta,
                 eps=1e-5, name=None):
    """A GGUFWriter of path with a model's hyperparameters as {arch}.*
    metadata (heads of dim / n_heads); its tensors are the caller's."""
    w = gguf.GGUFWriter(str(path), arch)
    if name:
        w.add_name(name)
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(hidden)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_dimension_count(dim // n_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(eps)
    return w


def args_writer(path, args, name=None):
    """model_writer() for the ModelArgs args (their heads of dim / n_heads)."""
    return model_writer(path, dim=args.dim, hidden=args.hidden_dim, n_layers=args.n_layers, n_heads=args.n_heads,
                        n_kv_heads=args.n_kv_heads, context=args.max_seq_len, rope_theta=args.rope_theta,
                        eps=args.norm_eps, name=name)


def add_bytelevel_vocab(w):
    """tiny_bytelevel_vocab() as the writer's tokenizer: gpt2 with SmolLM2's
    pre-tokenizer, token 1 the bos and 2 the eos."""
    tokens, merges = tiny_bytelevel_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def finish(w):
    """Write the writer's header, metadata and tensors, and close the file."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GROUP_SCALE = {"Q8_0": 0.05 / 127, "Q4_0": 0.05 / 8}    # scales that make weights of about 0.05 at most


def random_group_blocks(rng, shape, kind):
    """Random Q8_0 or Q4_0 blocks (kind) for a (rows, cols) tensor, as bytes
    per row: every value byte random (Q8_0's -128 included, which llama.cpp
    never writes), each block's float16 scale its own, of either sign. Such
    blocks are what requantizing their weights would not give back."""
    qtype = gguf.GGMLQuantizationType[kind]
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    rows, cols = shape
    blocks = rng.integers(0, 256, (rows * cols // 32, block_bytes), dtype=np.uint8)
    scales = GROUP_SCALE[kind] * rng.uniform(0.25, 1, len(blocks)) * rng.choice([-1, 1], len(blocks))
    blocks[:, :2] = scales.astype("<f2").view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)
