"""A checkpoint of ours written as a Hugging Face model directory:
config.json, generation_config.json, model.safetensors and the tokenizer's
files, which transformers (and what reads its format: vLLM, TGI, ...) loads."""

import json
import os

from convert.checkpoint import read_checkpoint_arrays, read_checkpoint
from convert.errors import ExportError, blamed_on, need, np, torch
from convert.sources import HF_LAYER_NAMES, HF_NAMES
from convert.tokenizers import (PRETOK_DIGITS_GPT2, PRETOK_GPT2, PRETOK_LLAMA3, PRETOK_QWEN2, TOK_SENTENCEPIECE,
                                TOKF_ADD_BOS, TOKF_ADD_EOS, TOKF_BYTE_FALLBACK, TOKF_DUMMY_PREFIX, TOKF_IGNORE_MERGES,
                                TOKF_NFC, TOKF_REMOVE_EXTRA_WS, LLAMA3_PATTERN, PIECE_CONTROL, PIECE_USER,
                                QWEN2_PATTERN)
from convert.vocab_out import chat_template_jinja, load_tokenizer, token_texts
from model import rope_scaling_of


def interleaved_to_hf(w, n_heads, head_dim):
    """hf_to_interleaved()'s inverse: q_proj or k_proj rows (or bias entries) from Meta's RoPE
    layout (pairs (x[2j], x[2j+1])) back to Hugging Face's (halves (x[j],
    x[j + head_dim/2])): within each head, row 2j becomes row j and row
    2j + 1 row head_dim/2 + j."""
    return w.reshape(n_heads, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _f32_number(x):
    """A float32 header field as the shortest decimal that reads back as the same float32."""
    return float(str(np.float32(x)))


def hf_config(args, dtype, tok, rope_scaling=None):
    """config.json of a LlamaForCausalLM with args' shape, or of a
    Qwen2ForCausalLM (Llama with q/k/v biases) when args has biases (tok:
    the tokenizer dict, for its ids; rope_scaling: Hugging Face's dict for
    scaled RoPE)."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len,
        "rope_theta": _f32_number(args.rope_theta), "rope_scaling": rope_scaling,
        "rms_norm_eps": _f32_number(args.norm_eps), "tie_word_embeddings": args.tied,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float32",
    }
    if args.attention_bias:     # Qwen2Config: q/k/v biases always, heads of hidden_size / num_attention_heads
        for key in ("head_dim", "attention_bias", "mlp_bias"):
            del config[key]
        config.update({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False})
    for key, name in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"), ("pad_token_id", "pad_id")):
        if tok[name] >= 0:
            config[key] = tok[name]
    return config


def hf_rope_scaling(args, state_dict, path):
    """config.json's rope_scaling for args (None for unscaled RoPE): the rule
    (linear, or llama3 with its parameters) that gives the stored
    frequencies exactly, as transformers has none but these. Raises
    ExportError naming path when no rule does."""
    if not args.scaled_rope:
        return None
    scaling = rope_scaling_of(state_dict["rope_inv_freq"].numpy(), args.head_dim, args.rope_theta)
    if scaling is None:
        raise ExportError(path, "its RoPE frequencies (rope_inv_freq) follow neither the linear nor the llama3 "
                                "scaling of rope_theta, so config.json's rope_scaling cannot say them")
    return scaling


def hf_state_dict(args, state_dict, dtype):
    """Our state_dict (float32 torch tensors) under Hugging Face's names, q/k
    rows and biases in its RoPE layout; a tied model has no lm_head, and no
    tensor holds the RoPE frequencies (hf_rope_scaling says them). bf16 matrices stay
    bf16 (exactly: their values are bf16's), norms float32 as ours are."""
    names = {ours: theirs for theirs, ours in HF_NAMES.items()}
    for i in range(args.n_layers):
        names.update({f"layers.{i}.{ours}.{kind}": f"model.layers.{i}.{theirs}.{kind}"
                      for theirs, ours in HF_LAYER_NAMES.items() for kind in ("weight", "bias")})
    out = {}
    for name, tensor in state_dict.items():
        if name == "rope_inv_freq":         # config.json's rope_scaling says it
            continue
        if ".attention.wq." in name:        # the weight's rows and the bias alike
            tensor = interleaved_to_hf(tensor, args.n_heads, args.head_dim)
        elif ".attention.wk." in name:
            tensor = interleaved_to_hf(tensor, args.n_kv_heads, args.head_dim)
        if dtype == "bf16" and tensor.dim() == 2:
            tensor = tensor.to(torch.bfloat16)
        out[names[name]] = tensor.contiguous()
    return out


def write_hf(directory, checkpoint, tokenizer):
    """Write checkpoint (ours) and tokenizer (our tokenizer.bin) into
    directory, which exists and is empty, as a Hugging Face LlamaForCausalLM
    (Qwen2ForCausalLM with q/k/v biases). f32 and bf16 weights are written as they are; q8_0 and q4_0 ones as the
    float32 numbers they decode to (safetensors has no such blocks). Needs
    torch, safetensors, transformers and tokenizers (sentencepiece and
    protobuf too for a sentencepiece tokenizer). Returns the checkpoint's
    weight type."""
    save_file = need("safetensors.torch").save_file
    need("transformers")
    _, dtype, _ = read_checkpoint_arrays(checkpoint)
    args, state_dict = read_checkpoint(checkpoint)
    tok = load_tokenizer(tokenizer, args.vocab_size)
    if args.attention_bias and args.head_dim * args.n_heads != args.dim:
        raise ExportError(checkpoint, f"head_dim {args.head_dim} with q/k/v biases: transformers' Qwen2 "
                                      f"takes heads of dim / n_heads = {args.dim // args.n_heads} only")
    rope_scaling = hf_rope_scaling(args, state_dict, checkpoint)
    written = "bf16" if dtype == "bf16" else "f32"
    _write_json(os.path.join(directory, "config.json"), hf_config(args, written, tok, rope_scaling))
    generation = {key: tok[name] for key, name in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"))
                  if tok[name] >= 0}
    _write_json(os.path.join(directory, "generation_config.json"), generation)
    save_file(hf_state_dict(args, state_dict, written), os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    with blamed_on(tokenizer):
        if tok["kind"] == TOK_SENTENCEPIECE:
            _save_sentencepiece(directory, tok, tokenizer, args.max_seq_len)
        else:
            _save_byte_level(directory, tok, tokenizer, args.max_seq_len)
    return dtype


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _special_tokens(tok, texts):
    """The bos/eos/unk/pad token texts that transformers' tokenizer classes take (None: none)."""
    return {key: texts[tok[name]] if tok[name] >= 0 else None
            for key, name in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("unk_token", "unk_id"),
                              ("pad_token", "pad_id"))}


def _save_sentencepiece(directory, tok, path, max_seq_len):
    """A sentencepiece tokenizer as Llama 2's repositories hold it:
    tokenizer.model (the sentencepiece model, rebuilt from our pieces), and
    the tokenizer.json that transformers' own converter makes of it."""
    model_pb2 = need("sentencepiece.sentencepiece_model_pb2")
    LlamaTokenizerFast = need("transformers").LlamaTokenizerFast
    texts = token_texts(tok, path)
    proto = model_pb2.ModelProto()
    for text, (_, score, kind) in zip(texts, tok["tokens"]):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, score, kind
    flags = tok["flags"]
    trainer = proto.trainer_spec
    trainer.model_type = model_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(texts)
    trainer.byte_fallback = bool(flags & TOKF_BYTE_FALLBACK)
    for name, field in (("unk_id", "unk"), ("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "pad")):
        setattr(trainer, f"{field}_id", tok[name])
        if tok[name] >= 0:
            setattr(trainer, f"{field}_piece", texts[tok[name]])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(flags & TOKF_DUMMY_PREFIX)
    normalizer.remove_extra_whitespaces = bool(flags & TOKF_REMOVE_EXTRA_WS)
    normalizer.escape_whitespaces = True
    model_path = os.path.join(directory, "tokenizer.model")
    with open(model_path, "wb") as f:
        f.write(proto.SerializeToString())
    fast = LlamaTokenizerFast(vocab_file=model_path, from_slow=True, legacy=True,
                              add_prefix_space=bool(flags & TOKF_DUMMY_PREFIX),
                              add_bos_token=bool(flags & TOKF_ADD_BOS), add_eos_token=bool(flags & TOKF_ADD_EOS),
                              model_max_length=max_seq_len, **_special_tokens(tok, texts))
    fast.chat_template = chat_template_jinja(tok)
    fast.save_pretrained(directory)


HF_PRETOKENIZERS = (PRETOK_GPT2, PRETOK_DIGITS_GPT2, PRETOK_LLAMA3, PRETOK_QWEN2)


def _save_byte_level(directory, tok, path, max_seq_len):
    """A byte-level BPE tokenizer as tokenizer.json, built with the
    tokenizers library from our vocabulary, merges and pre-tokenizer, and
    tokenizer_config.json (PreTrainedTokenizerFast)."""
    tokenizers = need("tokenizers")
    PreTrainedTokenizerFast = need("transformers").PreTrainedTokenizerFast
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
    if tok["pretokenizer"] not in HF_PRETOKENIZERS:
        raise ExportError(path, f"pre-tokenizer {tok['pretokenizer']}: tokenizer.json has no equivalent here")
    texts = token_texts(tok, path)
    vocab = {}
    for i, text in enumerate(texts):
        if vocab.setdefault(text, i) != i:
            raise ExportError(path, f"tokens {vocab[text]} and {i} are both {text!r}; "
                                    "a tokenizer.json vocabulary holds each text once")
    flags = tok["flags"]
    unk = texts[tok["unk_id"]] if tok["unk_id"] >= 0 else None
    bpe = models.BPE(vocab, [(texts[a], texts[b]) for a, b, _ in tok["merges"]], unk_token=unk,
                     ignore_merges=bool(flags & TOKF_IGNORE_MERGES))
    backend = tokenizers.Tokenizer(bpe)
    prefix = bool(flags & TOKF_DUMMY_PREFIX)
    if flags & TOKF_NFC:
        backend.normalizer = normalizers.NFC()
    if tok["pretokenizer"] in (PRETOK_LLAMA3, PRETOK_QWEN2):
        pattern = LLAMA3_PATTERN if tok["pretokenizer"] == PRETOK_LLAMA3 else QWEN2_PATTERN
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)])
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
        backend.pre_tokenizer = (byte_level if tok["pretokenizer"] == PRETOK_GPT2 else
                                 pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]))
    backend.decoder = decoders.ByteLevel()
    bos = texts[tok["bos_id"]] if flags & TOKF_ADD_BOS and tok["bos_id"] >= 0 else None
    eos = texts[tok["eos_id"]] if flags & TOKF_ADD_EOS and tok["eos_id"] >= 0 else None
    if bos or eos:          # BOS first, EOS last, as tokenizer.c adds them
        ends = {text: tok[name] for text, name in ((bos, "bos_id"), (eos, "eos_id")) if text}
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join(filter(None, (bos, "$A", eos))),
            pair=" ".join(filter(None, (bos, "$A", eos, bos, "$B", eos))), special_tokens=list(ends.items()))
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(texts[i], special=True, normalized=False)
                                for i, (_, _, kind) in enumerate(tok["tokens"]) if kind == PIECE_CONTROL])
    backend.add_tokens([AddedToken(texts[i], special=False, normalized=False)
                        for i, (_, _, kind) in enumerate(tok["tokens"]) if kind == PIECE_USER])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_seq_len,
                                   clean_up_tokenization_spaces=False, **_special_tokens(tok, texts))
    fast.chat_template = chat_template_jinja(tok)
    fast.save_pretrained(directory)
