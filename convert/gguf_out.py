"""A checkpoint of ours written as a llama.cpp GGUF file."""

import os

from convert.checkpoint import group_blocks, matrix_types, read_checkpoint_arrays
from convert.errors import ExportError, blamed_on, np
from convert.hf_out import interleaved_to_hf
from convert.sources import GGUF_LAYER_NAMES, GGUF_NAMES
from convert.tokenizers import (PRETOK_DIGITS_GPT2, PRETOK_GPT2, PRETOK_LLAMA3, PRETOK_QWEN2, TOK_SENTENCEPIECE,
                                TOKF_ADD_BOS, TOKF_ADD_EOS, TOKF_DUMMY_PREFIX, TOKF_IGNORE_MERGES, TOKF_REMOVE_EXTRA_WS)
from convert.vocab_out import chat_template_jinja, load_tokenizer, token_texts
from model import rope_inverse_frequencies, rope_scaling_of

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) for ours; llama.cpp
# ignores merges (keeps a pre-token that is a token whole) for Llama 3's only.
GGUF_PRETOKENIZER_NAMES = {PRETOK_GPT2: "gpt-2", PRETOK_DIGITS_GPT2: "smollm", PRETOK_LLAMA3: "llama-bpe",
                           PRETOK_QWEN2: "qwen2"}
# general.file_type: llama.cpp's LlamaFileType of a file mostly in our type
# (a K type: its _M mix, MOSTLY_Q4_K_M, MOSTLY_Q5_K_M, or MOSTLY_Q6_K)
GGUF_FILE_TYPES = {"f32": 0, "q4_0": 2, "q8_0": 7, "bf16": 32, "q4_k": 15, "q5_k": 17, "q6_k": 18}


def write_gguf(path, checkpoint, tokenizer=None):
    """Write a checkpoint of ours as a llama.cpp GGUF file that holds the
    same weights, bit for bit: q8_0 and q4_0 groups become Q8_0 and Q4_0
    blocks (the scale, then the group's values), q4_k, q5_k and q6_k blocks
    (GGUF's own) Q4_K, Q5_K and Q6_K, bf16 BF16, f32 F32; norms and biases
    F32. The architecture is "llama", or "qwen2" for a model with
    q/k/v biases. llama.cpp's llama rotates interleaved RoPE pairs as we do
    (its converter permutes Hugging Face's q/k rows into Meta's layout, our
    hf_to_interleaved, and transformers' GGUF loader permutes them back), so
    its q/k go as they are; its qwen2 rotates Hugging Face's halves
    ("NEOX"), so qwen2's q/k rows and biases go back to that layout. Scaled
    RoPE: a linear scaling as rope.scaling.type and .factor, any other as
    llama.cpp's rope_freqs.weight, what each pair's unscaled frequency is
    divided by (for each pair the float32 divisor that our reader turns
    back into the stored frequency, where one exists; else the nearest).
    tokenizer: our tokenizer.bin, written as llama.cpp's tokenizer.ggml.*
    metadata with its chat template; None writes a stand-in vocabulary
    (<unk>, <s>, </s>, the 256 byte tokens, then "t259", "t260", ...):
    enough for llama.cpp to load the file and run token ids, which is what
    bench/bench.py does with it. Needs the gguf package. Returns the file
    size."""
    import gguf
    args, dtype, tensors = read_checkpoint_arrays(checkpoint)
    types = matrix_types(args, dtype)
    mostly = max(set(types.values()), key=list(types.values()).count)
    tok = load_tokenizer(tokenizer, args.vocab_size) if tokenizer else None
    if tok is None and args.vocab_size < 259:
        raise ExportError(path, f"vocab_size {args.vocab_size}: the stand-in vocabulary needs 259 tokens")
    arch = "qwen2" if args.attention_bias else "llama"
    factor = _linear_factor(args, tensors["rope_inv_freq"][0]) if args.scaled_rope else None
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(os.path.splitext(os.path.basename(checkpoint))[0])
    writer.add_file_type(GGUF_FILE_TYPES[mostly])
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    if factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    writer.add_vocab_size(args.vocab_size)
    if tok is None:
        writer.add_tokenizer_model("llama")
        pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        pieces += [f"t{i}" for i in range(len(pieces), args.vocab_size)]
        writer.add_token_list(pieces)
        writer.add_token_scores([0.0] * args.vocab_size)
        writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (args.vocab_size - 259))
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    else:
        with blamed_on(tokenizer):
            _add_tokenizer(writer, tok, tokenizer)
    names = {ours: theirs for theirs, ours in GGUF_NAMES.items()}
    for i in range(args.n_layers):
        names.update({f"layers.{i}.{ours}.{kind}": f"blk.{i}.{theirs}.{kind}"
                      for theirs, ours in GGUF_LAYER_NAMES.items() for kind in ("weight", "bias")})
    names["rope_inv_freq"] = "rope_freqs.weight"
    block = {kind: gguf.GGMLQuantizationType[kind.upper()]
             for kind in ("q8_0", "q4_0", "bf16", "q4_k", "q5_k", "q6_k")}
    for name, arrays in tensors.items():
        if name == "rope_inv_freq" and factor is not None:
            continue
        if name == "rope_inv_freq":
            arrays = [_rope_divisors(arrays[0], args.head_dim, args.rope_theta)]
        elif arch == "qwen2" and (".attention.wq." in name or ".attention.wk." in name):
            heads = args.n_heads if ".wq." in name else args.n_kv_heads
            arrays = [interleaved_to_hf(a, heads, args.head_dim) for a in arrays]
        kind = types.get(name, "f32")
        if arrays[0].ndim == 1 or kind == "f32":
            writer.add_tensor(names[name], arrays[0].astype(np.float32))
        elif kind in ("bf16", "q4_k", "q5_k", "q6_k"):       # bytes (rows, 2 cols), or (rows, blocks)
            writer.add_tensor(names[name], arrays[0].view(np.uint8), raw_dtype=block[kind])
        else:                                                # q8_0, q4_0: (rows, bytes) of blocks
            writer.add_tensor(names[name], group_blocks(*arrays), raw_dtype=block[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.path.getsize(path)


def _linear_factor(args, inv_freq):
    """The factor of the linear RoPE scaling that gives inv_freq, the
    stored frequencies, exactly from GGUF's float32 factor; None if none does."""
    scaling = rope_scaling_of(inv_freq, args.head_dim, args.rope_theta)
    if scaling is None or scaling["rope_type"] != "linear":
        return None
    factor = float(np.float32(scaling["factor"]))
    linear = rope_inverse_frequencies(args.head_dim, args.rope_theta, {"rope_type": "linear", "factor": factor})
    return factor if np.array_equal(linear, inv_freq) else None


def _rope_divisors(inv_freq, head_dim, theta):
    """llama.cpp's rope_freqs for the stored frequencies inv_freq: for each
    pair the float32 d, among the nearest few to base / inv_freq, for which
    load_gguf's float32(base / d) is inv_freq; where none is, the nearest."""
    base = rope_inverse_frequencies(head_dim, theta).astype(np.float64)
    nearest = (base / inv_freq).astype(np.float32)
    divisors, up, down = nearest.copy(), nearest, nearest
    exact = (base / nearest).astype(np.float32) == inv_freq
    for _ in range(4):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
        for candidate in (up, down):
            found = ~exact & ((base / candidate).astype(np.float32) == inv_freq)
            divisors[found] = candidate[found]
            exact |= found
    return divisors


def _add_tokenizer(writer, tok, path):
    """Our tokenizer (a read_tokenizer() dict, read from path) as llama.cpp's
    tokenizer.ggml.* metadata. Sentencepiece is llama.cpp's "llama" model
    (pieces, scores and types as sentencepiece's); byte-level BPE its "gpt2"
    model, with merges and the pre-tokenizer by llama.cpp's name. The token
    types have the same numbers in both files."""
    texts = token_texts(tok, path)
    flags = tok["flags"]
    if tok["kind"] == TOK_SENTENCEPIECE:
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([score for _, score, _ in tok["tokens"]])
        writer.add_remove_extra_whitespaces(bool(flags & TOKF_REMOVE_EXTRA_WS))
    else:
        pre = GGUF_PRETOKENIZER_NAMES.get(tok["pretokenizer"])
        if pre is None:
            raise ExportError(path, f"pre-tokenizer {tok['pretokenizer']}: llama.cpp has no name for it")
        if bool(flags & TOKF_IGNORE_MERGES) != (pre == "llama-bpe"):
            raise ExportError(path, "ignore_merges without Llama 3's pre-tokenizer (or that without it): "
                                    "llama.cpp ties the two together")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges([f"{texts[a]} {texts[b]}" for a, b, _ in tok["merges"]])
    writer.add_token_list(texts)
    writer.add_token_types([kind for _, _, kind in tok["tokens"]])
    writer.add_add_space_prefix(bool(flags & TOKF_DUMMY_PREFIX))
    writer.add_add_bos_token(bool(flags & TOKF_ADD_BOS))
    writer.add_add_eos_token(bool(flags & TOKF_ADD_EOS))
    for name, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                      ("unk_id", writer.add_unk_token_id), ("pad_id", writer.add_pad_token_id)):
        if tok[name] >= 0:
            add(tok[name])
    template = chat_template_jinja(tok)
    if template:
        writer.add_chat_template(template)


# Converters. Each reads one source and returns (ModelArgs, state_dict) in the
# reference's names and in float32, checked with check_state_dict.
