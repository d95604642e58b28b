"""Readers of the model sources: reference, Meta, Hugging Face, llama2.c, GGUF."""

import dataclasses
import json
import math
import os
import re
import struct

from convert.checkpoint import Tensors, _f32_bytes, check_rope_frequencies, check_state_dict, checkpoint_tensors
from convert.errors import ExportError, need, np, torch
from convert.kquants import GGML_TYPES as KQUANT_GGML_TYPES
from convert.files import REQUIRED, checked_directory, json_field, read_json, regular_file
from convert.gguf_layout import check_gguf_layout
from convert.torch_zip import StoredTensor, read_torch_zip
from model import META_LLAMA3_SCALING, ModelArgs, rope_cos_sin, rope_inverse_frequencies



def _model_args(path, **fields):
    """ModelArgs(**fields), with a bad field reported as an ExportError naming path."""
    try:
        return ModelArgs(**fields)
    except (TypeError, ValueError) as e:
        raise ExportError(path, str(e)) from None


def _torch_load(path):
    """torch.load of a file that holds tensors and plain containers only (never code)."""
    load = torch.load           # first, so that a missing torch is reported as such
    regular_file(path)
    try:
        return load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ExportError(path, e.strerror or str(e)) from None
    except Exception as e:      # torch.load has no one error for "not a torch.save file"
        raise ExportError(path, f"not a torch.save file of tensors ({type(e).__name__})") from None


def _stored_tensors(path):
    """The tensors of a torch.save file by name, as StoredTensors, read only
    when they are asked for."""
    regular_file(path)
    return _check_tensors(path, read_torch_zip(path))


def _check_tensors(path, saved):
    """saved, read from path, checked to be a dict of floating-point tensors
    (torch's or StoredTensors) by name."""
    if not isinstance(saved, dict):
        raise ExportError(path, f"expected a dict of tensors by name, not a {type(saved).__name__}")
    for name, value in saved.items():
        if not isinstance(name, str):
            raise ExportError(path, f"tensor name {name!r} is not a string")
        _check_tensor(path, name, value)
    return saved


def _check_tensor(path, name, value):
    """Raise ExportError naming path unless value is a floating-point tensor."""
    if not isinstance(value, (torch.Tensor, StoredTensor)):
        raise ExportError(path, f"{name} is not a tensor but a {type(value).__name__}")
    if not value.is_floating_point():
        raise ExportError(path, f"{name}: {value.dtype} is not a floating-point type")


def save_reference(path, args, state_dict):
    """Save a reference model: torch.save({"args": str, "state_dict": {name: tensor}}).

    args is ModelArgs as a JSON object, kept a string because torch 1.13's
    weights_only loader rejects Python floats; the tensors are float32 and
    named as in Llama."""
    torch.save({"args": json.dumps(dataclasses.asdict(args)),
                "state_dict": {k: v.detach().float().contiguous() for k, v in state_dict.items()}}, path)


def load_reference(path):
    """Read a save_reference() file (all of it: a reference model is small)."""
    saved = _torch_load(path)
    if not isinstance(saved, dict) or set(saved) != {"args", "state_dict"}:
        raise ExportError(path, 'expected a dict with keys "args" and "state_dict" (see save_reference)')
    try:
        fields = json.loads(saved["args"])
    except (TypeError, json.JSONDecodeError):
        fields = None
    if not isinstance(fields, dict):
        raise ExportError(path, '"args" is not a JSON object of ModelArgs fields')
    args = _model_args(path, **fields)
    tensors = Tensors()
    for name, tensor in _check_tensors(path, saved["state_dict"]).items():
        tensors.add(name, tensor.shape, tensor.float)
    check_state_dict(args, tensors, path)
    return args, tensors


# Meta's own release: params.json beside consolidated.00.pth, .01.pth, ... one
# file per model-parallel rank. Names are already ours, RoPE already interleaved.

META_MAX_SEQ_LEN = 2048         # params.json does not say; --max-seq-len overrides


def _meta_concat_axis(name, shape, dim):
    """The axis along which one tensor's model-parallel slices (each of shape)
    are concatenated back into the whole tensor; None where they are copies.

    Column-parallel layers (wq, wk, wv, w1, w3, output) split their output rows,
    row-parallel ones (wo, w2) their input columns. Norms are replicated. The
    token embedding is split on dim (Llama 2) or on vocab (Llama 3): its width
    tells which."""
    if len(shape) < 2:
        return None
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    if name == "tok_embeddings.weight" and shape[1] != dim:
        return 1
    return 0


def _meta_tensor(slices, axis):
    """The whole float32 tensor from its model-parallel slices (StoredTensors),
    reading those slices alone."""
    if axis is None:
        return slices[0].float32()
    return np.concatenate([s.float32() for s in slices], axis=axis)


def load_meta(directory):
    """Read Meta's params.json and consolidated.*.pth from directory.

    hidden_dim is read off the w1 weight rather than recomputed from
    multiple_of and ffn_dim_multiplier; vocab_size off the embedding (Llama 2's
    params.json says -1). max_seq_len is META_MAX_SEQ_LEN.

    Each tensor is the concatenation of its slices in every shard; the shards
    are read lazily (read_torch_zip), so only the slices of the tensor asked
    for are read, and become float32 then."""
    params_path = os.path.join(checked_directory(directory), "params.json")
    params = read_json(params_path)

    def field(key, kind, default=REQUIRED):
        return json_field(params, key, kind, params_path, default)

    scaled_rope = field("use_scaled_rope", bool, False)
    dim, n_heads, n_layers = field("dim", int), field("n_heads", int), field("n_layers", int)
    norm_eps = field("norm_eps", float)
    names = sorted(n for n in os.listdir(directory) if re.fullmatch(r"consolidated\.\d+\.pth", n))
    if not names:
        raise ExportError(directory, "no consolidated.*.pth files")
    paths = [os.path.join(directory, n) for n in names]
    shards = [_stored_tensors(path) for path in paths]
    for path, shard in zip(paths[1:], shards[1:]):
        if set(shard) != set(shards[0]):
            raise ExportError(path, f"holds other tensors than {names[0]}")
        for name, tensor in shard.items():
            if tensor.shape != shards[0][name].shape:
                raise ExportError(path, f"{name}: shape {tuple(tensor.shape)}, but {tuple(shards[0][name].shape)} "
                                        f"in {names[0]}")
    tensors = Tensors()
    for name, first in shards[0].items():
        if name == "rope.freqs":        # Llama 1's RoPE table: we compute it
            continue
        slices = [shard[name] for shard in shards]
        axis = _meta_concat_axis(name, first.shape, dim) if len(slices) > 1 else None
        shape = list(first.shape)
        if axis is not None:
            shape[axis] *= len(slices)
        tensors.add(name, shape, lambda slices=slices, axis=axis: _meta_tensor(slices, axis))
    try:
        hidden_dim = tensors.shapes["layers.0.feed_forward.w1.weight"][0]
        vocab_size = tensors.shapes["tok_embeddings.weight"][0]
    except KeyError as e:
        raise ExportError(directory, f"tensor {e.args[0]} is missing") from None
    args = _model_args(params_path, dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=field("n_kv_heads", int, n_heads), head_dim=dim // n_heads,
                       vocab_size=vocab_size, max_seq_len=META_MAX_SEQ_LEN,
                       rope_theta=field("rope_theta", float, 10000.0), norm_eps=norm_eps,
                       tied="output.weight" not in tensors, scaled_rope=scaled_rope)
    if scaled_rope:             # Llama 3.1's reference code: META_LLAMA3_SCALING
        tensors["rope_inv_freq"] = torch.from_numpy(
            rope_inverse_frequencies(args.head_dim, args.rope_theta, META_LLAMA3_SCALING))
    check_state_dict(args, tensors, directory)
    return args, tensors


# Hugging Face: config.json, and the weights as safetensors or pytorch_model.bin,
# whole or sharded with an index. Names differ, and q/k rows are permuted.

HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LAYER_NAMES = {            # model.layers.{i}.X.weight -> layers.{i}.Y.weight
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}


def _hf_name(name):
    """Our name for a Hugging Face tensor; None for a tensor with no place in the checkpoint."""
    if name in HF_NAMES:
        return HF_NAMES[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m and m.group(2) in HF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{HF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    if re.fullmatch(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", name):
        return None                 # older files save the RoPE frequencies: we compute them
    raise ValueError(f"unexpected tensor {name}")


def _hf_tensors(directory):
    """Every tensor of a Hugging Face directory, as (file, name, shape, read),
    where read() returns the tensor (a torch tensor, as stored or float32).

    The index, when there is one, names the shard files; otherwise the
    weights are one model.safetensors or one pytorch_model.bin."""
    for weights in ("model.safetensors", "pytorch_model.bin"):
        index_path = os.path.join(directory, weights + ".index.json")
        if os.path.exists(index_path):
            weight_map = json_field(read_json(index_path), "weight_map", dict, index_path)
            if not all(isinstance(file, str) and file for file in weight_map.values()):
                raise ExportError(index_path, "weight_map: expected a file name for each tensor")
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(directory, weights)):
            files = [weights]
        else:
            continue
        for file in files:
            path = os.path.join(directory, file)
            yield from _safetensors_tensors(path) if weights == "model.safetensors" else _torch_tensors(path)
        return
    raise ExportError(directory, "no model.safetensors or pytorch_model.bin (nor a sharded index of either)")


SAFETENSORS_FLOATS = ("F64", "F32", "F16", "BF16")     # the floating-point types torch 1.13 has


def _safetensors_tensors(path):
    """Each tensor of a safetensors file as (path, name, shape, read), from its
    header alone. The file is read with pread(2), not mapped, so that a
    tensor's bytes leave memory with it (a mapping's pages would count
    against the process until the file is closed)."""
    need("torch")               # the tensors come as torch's
    safe_open = need("safetensors").safe_open
    regular_file(path)
    try:
        st = safe_open(path, framework="pt", backend="pread")
        slices = {name: st.get_slice(name) for name in st.keys()}
        found = [(name, tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()]
    except TypeError:           # an older safetensors, without backend
        raise ExportError(None, "this conversion needs safetensors 0.8 or later (pip install -U safetensors)") \
            from None
    except Exception as e:      # SafetensorError and OSError name no file
        raise ExportError(path, f"not a safetensors file ({e})") from None

    def read(name):
        try:
            return st.get_tensor(name)
        except Exception as e:
            raise ExportError(path, f"{name}: {e}") from None

    for name, shape, dtype in found:
        if dtype not in SAFETENSORS_FLOATS:
            raise ExportError(path, f"{name}: {dtype} is not a floating-point type "
                                    f"({', '.join(SAFETENSORS_FLOATS)})")
        yield path, name, shape, lambda name=name: read(name)


def _torch_tensors(path):
    """Each tensor of a pytorch_model*.bin file as (path, name, shape, read),
    from its pickle alone: read() reads the tensor's bytes (a torch tensor)."""
    for name, tensor in _stored_tensors(path).items():
        yield path, name, tensor.shape, lambda tensor=tensor: torch.from_numpy(tensor.float32())


def hf_to_interleaved(w, n_heads, head_dim):
    """Permute the rows of an HF q_proj or k_proj weight (or the entries of
    its bias) to Meta's RoPE layout; w is a torch tensor or a numpy array.

    Hugging Face rotates the halves (x[j], x[j + head_dim/2]) of each head,
    Meta the neighbours (x[2j], x[2j+1]). Within each head, HF row j becomes
    row 2j and HF row head_dim/2 + j becomes row 2j + 1. q and k move alike,
    so the scores q.k are unchanged and RoPE pairs the same numbers."""
    return w.reshape(n_heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(w.shape)


def load_hf(directory):
    """Read a Hugging Face LlamaForCausalLM or Qwen2ForCausalLM directory (bf16
    and f16 become float32). Qwen2 is Llama with q, k and v biases.

    Refuses, naming the field, what run.c does not compute: RoPE scalings
    other than llama3 and linear, RoPE over part of a head, sliding windows,
    other biases, other activations. Optional config fields take
    LlamaConfig's (Qwen2Config's) defaults."""
    config_path = os.path.join(checked_directory(directory), "config.json")
    config = read_json(config_path)

    def field(key, kind, default=REQUIRED):
        return json_field(config, key, kind, config_path, default)

    def refuse(key, what):
        raise ExportError(config_path, f"{key} = {json.dumps(config[key])[:80]}: {what}")

    model_type = config.get("model_type")
    if model_type not in ("llama", "qwen2"):
        raise ExportError(config_path, f"model_type {model_type!r}: only 'llama' and 'qwen2' are supported")
    scaling = field("rope_scaling", dict, {})
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    if config.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "only silu (SwiGLU) is implemented")
    if field("partial_rotary_factor", float, 1.0) != 1:
        refuse("partial_rotary_factor", "RoPE over part of a head is not implemented")
    if field("use_sliding_window", bool, False):
        refuse("use_sliding_window", "sliding-window attention is not implemented")
    if field("mlp_bias", bool, False):
        refuse("mlp_bias", "biases in the MLP are not implemented")
    if model_type == "llama" and field("attention_bias", bool, False):     # transformers' Llama: o_proj too
        refuse("attention_bias", "LlamaForCausalLM then has an o_proj bias too, which is not implemented "
                                 "(q/k/v biases alone are: Qwen2ForCausalLM)")
    dim, n_heads = field("hidden_size", int), field("num_attention_heads", int)
    head_dim = field("head_dim", int, dim // n_heads)
    if model_type == "qwen2" and head_dim != dim // n_heads:     # transformers' Qwen2 ignores head_dim
        refuse("head_dim", f"Qwen2 heads are hidden_size / num_attention_heads = {dim // n_heads}")
    args = _model_args(
        config_path, dim=dim, hidden_dim=field("intermediate_size", int), n_layers=field("num_hidden_layers", int),
        n_heads=n_heads, n_kv_heads=field("num_key_value_heads", int, n_heads),
        head_dim=head_dim, vocab_size=field("vocab_size", int),
        max_seq_len=field("max_position_embeddings", int, 2048), rope_theta=field("rope_theta", float, 10000.0),
        norm_eps=field("rms_norm_eps", float, 1e-6), tied=field("tie_word_embeddings", bool, False),
        attention_bias=model_type == "qwen2", scaled_rope=scaling is not None)

    shapes, tensors = dict(checkpoint_tensors(args)), Tensors()
    if scaling is not None:
        try:
            inv_freq = rope_inverse_frequencies(args.head_dim, args.rope_theta, scaling)
        except ValueError as e:
            raise ExportError(config_path, f"rope_scaling: {e}") from None
        tensors["rope_inv_freq"] = torch.from_numpy(inv_freq)
    for path, hf_name, shape, read in _hf_tensors(directory):
        try:
            name = _hf_name(hf_name)
        except ValueError as e:
            raise ExportError(path, str(e)) from None
        if name is None or (name == "output.weight" and args.tied):
            continue                # a tied lm_head is the embedding, saved twice
        if name not in shapes:      # a bias that the config does not have, say
            raise ExportError(path, f"unexpected tensor {hf_name}")
        if shape != shapes[name]:
            raise ExportError(path, f"{hf_name}: expected shape {shapes[name]}, got {shape}")
        if name in tensors:
            raise ExportError(path, f"{hf_name} appears twice")
        tensors.add(name, shape, lambda name=name, read=read: _hf_tensor(args, name, read()))
    check_state_dict(args, tensors, directory)
    return args, tensors


def _hf_tensor(args, name, tensor):
    """A Hugging Face tensor as ours: float32, q and k rows (weight and bias
    alike) in Meta's RoPE layout."""
    tensor = tensor.float()
    if ".attention.wq." in name:
        return hf_to_interleaved(tensor, args.n_heads, args.head_dim)
    if ".attention.wk." in name:
        return hf_to_interleaved(tensor, args.n_kv_heads, args.head_dim)
    return tensor


# llama2.c's legacy checkpoint (read unchanged, see docs/FORMATS.md): seven
# int32, then float32 tensors packed with no gaps, one tensor kind for all
# layers at a time. Two RoPE tables sit between the final norm and the
# optional classifier; readers skip them.
#
#      0    28  i32[7]   dim, hidden_dim, n_layers, n_heads, n_kv_heads,
#                        vocab_size (negative: an untied classifier follows), max_seq_len
#     28        f32 tensors, packed, tensor-major:
#               token_embedding (vocab, dim), rms_att (layer, dim),
#               wq (layer, dim, dim), wk (layer, kv_dim, dim), wv (layer, kv_dim, dim),
#               wo (layer, dim, dim), rms_ffn (layer, dim),
#               w1 (layer, hidden, dim), w2 (layer, dim, hidden), w3 (layer, hidden, dim),
#               rms_final (dim), freq_cis_real (seq_len, head_size/2),
#               freq_cis_imag (seq_len, head_size/2), [wcls (vocab, dim)]

LLAMA2C_HEADER = struct.Struct("<7i")
LLAMA2C_THETA, LLAMA2C_EPS = 10000.0, 1e-5      # fixed by llama2.c's run.c


def _llama2c_tensors(args):
    """The legacy file's tensors in file order, as (our name or a freq_cis table, shape).

    A (layer, ...) tensor is the layers' tensors one after another, so it
    appears here as n_layers entries in a row."""
    d, h, kvd, L = args.dim, args.hidden_dim, args.n_kv_heads * args.head_dim, range(args.n_layers)
    tensors = [("tok_embeddings.weight", (args.vocab_size, d))]
    for name, shape in [("attention_norm", (d,)), ("attention.wq", (d, d)), ("attention.wk", (kvd, d)),
                        ("attention.wv", (kvd, d)), ("attention.wo", (d, d)), ("ffn_norm", (d,)),
                        ("feed_forward.w1", (h, d)), ("feed_forward.w2", (d, h)),
                        ("feed_forward.w3", (h, d))]:
        tensors += [(f"layers.{i}.{name}.weight", shape) for i in L]
    rope = (args.max_seq_len, args.head_dim // 2)
    tensors += [("norm.weight", (d,)), ("freq_cis_real", rope), ("freq_cis_imag", rope)]
    if not args.tied:
        tensors.append(("output.weight", (args.vocab_size, d)))
    return tensors


def load_llama2c(path):
    """Read a llama2.c legacy checkpoint: head_dim = dim / n_heads, theta 10000, eps 1e-5."""
    size = os.path.getsize(regular_file(path))
    try:
        with open(path, "rb") as f:
            header = f.read(LLAMA2C_HEADER.size)
    except OSError as e:
        raise ExportError(path, e.strerror) from None
    if len(header) < LLAMA2C_HEADER.size:
        raise ExportError(path, f"{size} bytes: too short for the 28-byte llama2.c header")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len = LLAMA2C_HEADER.unpack(header)
    if n_heads <= 0 or dim % n_heads:
        raise ExportError(path, f"n_heads = {n_heads} does not divide dim = {dim}: not a llama2.c file?")
    args = _model_args(path, dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, head_dim=dim // n_heads, vocab_size=abs(vocab_size),
                       max_seq_len=max_seq_len, rope_theta=LLAMA2C_THETA, norm_eps=LLAMA2C_EPS,
                       tied=vocab_size > 0)
    tensors = _llama2c_tensors(args)
    expected = LLAMA2C_HEADER.size + 4 * sum(math.prod(shape) for _, shape in tensors)
    if size != expected:
        raise ExportError(path, f"{size} bytes: expected {expected} for {args.describe()}")
    state_dict, at = Tensors(), LLAMA2C_HEADER.size
    for name, shape in tensors:
        if not name.startswith("freq_cis"):
            state_dict.add(name, shape, lambda at=at, shape=shape: _llama2c_tensor(path, at, shape))
        at += 4 * math.prod(shape)
    return args, state_dict


def _llama2c_tensor(path, offset, shape):
    """The float32 tensor of shape at offset in the llama2.c file path."""
    floats = _read_at(path, offset, "<f4", math.prod(shape))
    return torch.from_numpy(floats.reshape(shape))


def _read_at(path, offset, dtype, count):
    """count items of the numpy dtype at offset in the file path. Read, not
    mapped: their memory is freed with them."""
    try:
        items = np.fromfile(path, dtype=dtype, count=count, offset=offset)
    except OSError as e:
        raise ExportError(path, e.strerror) from None
    if items.size != count:
        raise ExportError(path, f"cut short: {count} items of {np.dtype(dtype).name} at offset {offset} "
                                f"are not all there")
    return items


def write_llama2c(path, args, state_dict):
    """Write the llama2.c legacy format, the freq_cis tables included; return its size.

    Only models the legacy format can describe: head_dim = dim / n_heads,
    rope_theta 10000, norm_eps 1e-5."""
    if args.n_heads * args.head_dim != args.dim:
        raise ExportError(path, f"head_dim = {args.head_dim} is not dim / n_heads: llama2.c cannot hold it")
    if args.rope_theta != LLAMA2C_THETA or np.float32(args.norm_eps) != np.float32(LLAMA2C_EPS):
        raise ExportError(path, f"rope_theta {args.rope_theta:g}, norm_eps {args.norm_eps:g}: "
                                f"llama2.c fixes them at {LLAMA2C_THETA:g} and {LLAMA2C_EPS:g}")
    check_state_dict(args, state_dict, path)
    # llama2.c's tables: cos and sin of pos * theta^(-2i/head_size)
    cos, sin = rope_cos_sin(args.max_seq_len, args.head_dim, LLAMA2C_THETA)
    tables = {"freq_cis_real": cos, "freq_cis_imag": sin}
    with open(path, "wb") as f:
        f.write(LLAMA2C_HEADER.pack(args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads,
                                    args.vocab_size if args.tied else -args.vocab_size, args.max_seq_len))
        for name, _ in _llama2c_tensors(args):
            f.write(_f32_bytes(tables[name] if name in tables else state_dict[name]))
        return f.tell()


# llama.cpp's GGUF file: metadata (key -> value) and tensors, read with the
# gguf package (numpy only: this path, unlike the others, needs no torch, so
# that `make demo` can convert a model with numpy and gguf alone). Tensors
# named blk.{i}.attn_q.weight etc. are stored (out, in) like ours; llama.cpp's
# converter already permutes Hugging Face's q/k rows into Meta's interleaved
# RoPE layout for the llama architecture (its LlamaModel.permute is our
# hf_to_interleaved), so q and k are taken as they are. Every tensor type
# that the package's gguf.quants dequantizes is read (F32, F16, BF16, Q4_0 ..
# Q8_0, the K-quants Q2_K .. Q6_K, the IQ types, ...): each tensor's bytes are
# read from the file and decoded to float32 as gguf.quants does, a few rows at
# a time; other types are refused before anything is written. A Q8_0, Q4_0,
# Q4_K, Q5_K or Q6_K matrix also reads as its blocks, bit for bit
# (Tensors.blocks), so that the checkpoint can keep them.

GGUF_FLOAT_TYPES = (0, 1, 30)   # ggml types F32, F16, BF16: a source in these is not quantized
GGUF_BLOCK_TYPES = {"q4_0": 2, "q8_0": 8, **KQUANT_GGML_TYPES}  # ours whose blocks are ggml's: its number of each
GGUF_NAMES = {              # GGUF tensor name -> ours ({i}: the layer)
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "rope_freqs.weight": "rope_freqs",  # Llama 3's: what each pair's frequency is divided by
}
GGUF_LAYER_NAMES = {        # blk.{i}.X.weight -> layers.{i}.Y.weight
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}


def gguf_dequantize(raw, ggml_type):
    """The float32 weights that the raw bytes of a GGUF tensor of ggml_type
    hold, flat, in file order, decoded by gguf.quants. raw: a uint8 array of
    whole blocks, flat or one row of bytes per tensor row (gguf.quants then
    works a few rows at a time). ValueError for a type it cannot decode."""
    gguf = need("gguf")
    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
    except ValueError:
        raise ValueError(f"ggml type {ggml_type} is unknown") from None
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.shape[-1] % block_bytes:
        raise ValueError(f"{raw.shape[-1]} bytes are not a whole number of {qtype.name} blocks of {block_bytes}")
    try:
        weights = gguf.quants.dequantize(raw, qtype)
    except NotImplementedError:
        raise ValueError(f"ggml type {qtype.name} is not one that the gguf package dequantizes") from None
    return weights.astype(np.float32, copy=False).reshape(-1)


def gguf_quantized(reader):
    """Whether a GGUF file holds a tensor in a quantized type (not F32, F16 or BF16)."""
    return any(int(t.tensor_type) not in GGUF_FLOAT_TYPES for t in reader.tensors)


def _gguf_reader(source):
    """A gguf.GGUFReader of source (a path, or a reader already open)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    gguf = need("gguf")     # it imports numpy and pyyaml
    regular_file(source)
    try:
        check_gguf_layout(source)
        return gguf.GGUFReader(source)
    except ExportError:
        raise
    except OSError as e:
        raise ExportError(source, e.strerror or str(e)) from None
    except Exception as e:  # the reader raises ValueError, struct and numpy errors alike
        raise ExportError(source, f"not a GGUF file ({type(e).__name__}: {e})") from None


def gguf_metadata(source, key, default=None):
    """The value of a GGUF metadata key (str, int, float, bool or list), or default."""
    reader = _gguf_reader(source)
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def load_gguf(source):
    """Read a GGUF file of the llama or qwen2 architecture (its tensors read,
    when asked for, as float32 numpy arrays). qwen2 is llama with q, k and v
    biases, its q/k rows left in Hugging Face's layout by llama.cpp (its
    "NEOX" RoPE).

    source: a path or an open gguf.GGUFReader. Everything comes from the
    file's metadata (keys {arch}.*); refuses what run.c does not compute (RoPE
    scalings other than linear and rope_freqs, partial rotary, other
    architectures). Llama 3's scaling is the tensor rope_freqs.weight, by
    which llama.cpp divides each pair's frequency."""
    path = source if isinstance(source, (str, os.PathLike)) else source.data.filename
    reader = _gguf_reader(source)

    def meta(key, default=None):
        value = gguf_metadata(reader, key, default)
        if value is None:
            raise ExportError(path, f"metadata {key} is missing")
        return value

    arch = meta("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ExportError(path, f"general.architecture {arch!r}: only 'llama' and 'qwen2' are supported")
    scaling = meta(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ExportError(path, f"{arch}.rope.scaling.type {scaling!r} is not implemented (only linear)")
    n_heads, dim = meta(f"{arch}.attention.head_count"), meta(f"{arch}.embedding_length")
    if not all(isinstance(n, int) and n > 0 for n in (n_heads, dim)):
        raise ExportError(path, f"{arch}.attention.head_count {n_heads!r}, {arch}.embedding_length {dim!r}: "
                                "expected positive integers")
    head_dim = meta(f"{arch}.attention.key_length", meta(f"{arch}.rope.dimension_count", dim // n_heads))
    if meta(f"{arch}.attention.value_length", head_dim) != head_dim:
        raise ExportError(path, f"{arch}.attention.value_length differs from key_length")
    if meta(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise ExportError(path, f"{arch}.rope.dimension_count {meta(f'{arch}.rope.dimension_count')}: "
                                f"RoPE over part of a head of {head_dim} is not implemented")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ExportError(path, "tensor token_embd.weight is missing")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])
    args = _model_args(
        path, dim=dim, hidden_dim=meta(f"{arch}.feed_forward_length"), n_layers=meta(f"{arch}.block_count"),
        n_heads=n_heads, n_kv_heads=meta(f"{arch}.attention.head_count_kv", n_heads), head_dim=head_dim,
        vocab_size=vocab_size, max_seq_len=meta(f"{arch}.context_length"),
        rope_theta=meta(f"{arch}.rope.freq_base", 10000.0),
        norm_eps=meta(f"{arch}.attention.layer_norm_rms_epsilon"), tied="output.weight" not in tensors,
        attention_bias=arch == "qwen2", scaled_rope=scaling == "linear" or "rope_freqs.weight" in tensors)

    def ours(rows, name):
        """A tensor's rows (weights, or a matrix's rows of GGUF blocks) as
        ours: qwen2's q/k rows (weights and biases) from Hugging Face's
        layout, as load_hf() permutes them. A permutation of whole rows
        leaves each row's blocks as they are."""
        if arch == "qwen2" and (".attention.wq." in name or ".attention.wk." in name):
            heads = args.n_heads if ".wq." in name else args.n_kv_heads
            return hf_to_interleaved(rows, heads, args.head_dim)
        return rows

    def read(t, name, shape):
        return ours(_gguf_tensor(path, t, shape), name)

    def read_blocks(t, name, shape):
        return ours(_read_at(path, t.data_offset, np.uint8, int(t.n_bytes)).reshape(shape[0], -1), name)

    state_dict, problems = Tensors(), {}    # problems: ggml type -> why it cannot be read, or None
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
        if t.name in GGUF_NAMES:
            name = GGUF_NAMES[t.name]
        elif m and m.group(2) in GGUF_LAYER_NAMES:
            name = f"layers.{m.group(1)}.{GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
        else:               # other architectures' tensors
            raise ExportError(path, f"unexpected tensor {t.name}")
        shape = tuple(int(n) for n in reversed(t.shape))     # GGUF lists the fastest axis first
        ggml_type = int(t.tensor_type)
        if ggml_type not in problems:
            problems[ggml_type] = _gguf_type_problem(ggml_type)
        if problems[ggml_type]:
            raise ExportError(path, f"{t.name}: {problems[ggml_type]}")
        if name == "rope_freqs":    # read now: rope_inv_freq is made of it, below
            divisors = _gguf_tensor(path, t, shape)
            continue
        state_dict.add(name, shape, lambda t=t, name=name, shape=shape: read(t, name, shape))
        if len(shape) == 2:
            state_dict.source_types[name] = t.tensor_type.name
        kept = next((kind for kind, number in GGUF_BLOCK_TYPES.items() if number == ggml_type), None)
        if kept and len(shape) == 2:
            state_dict.add_blocks(name, kept, lambda t=t, name=name, shape=shape: read_blocks(t, name, shape))
    if args.scaled_rope:    # llama.cpp's frequency: base / rope_freqs, times 1 / factor for linear
        if "rope_freqs.weight" not in tensors:
            divisors = np.ones(args.head_dim // 2, np.float32)
        if divisors.shape != (args.head_dim // 2,):
            raise ExportError(path, f"rope_freqs.weight: expected shape ({args.head_dim // 2},), "
                                    f"got {divisors.shape}")
        check_rope_frequencies(divisors, path, "rope_freqs.weight")   # what each frequency is divided by
        linear = {"rope_type": "linear", "factor": meta(f"{arch}.rope.scaling.factor")} \
            if scaling == "linear" else None
        try:
            inv_freq = rope_inverse_frequencies(args.head_dim, args.rope_theta, linear)
        except ValueError as e:
            raise ExportError(path, f"{arch}.rope.scaling: {e}") from None
        with np.errstate(over="ignore"):    # a denormal divisor: inf, refused next
            state_dict["rope_inv_freq"] = (inv_freq.astype(np.float64) / divisors).astype(np.float32)
        check_rope_frequencies(state_dict["rope_inv_freq"], path,
                               "RoPE frequencies divided by rope_freqs.weight")
    check_state_dict(args, state_dict, path)
    return args, state_dict


def _gguf_type_problem(ggml_type):
    """Why tensors of ggml_type cannot be read (gguf.quants fails on one block
    of zeros), or None."""
    gguf = need("gguf")
    _, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    try:
        gguf_dequantize(np.zeros(block_bytes, np.uint8), ggml_type)
    except ValueError as e:
        return str(e)
    return None


def _gguf_tensor(path, t, shape):
    """The float32 weights of the GGUF tensor t, in our shape: its bytes read
    from the file, one row of bytes per row, and decoded."""
    raw = _read_at(path, t.data_offset, np.uint8, int(t.n_bytes))
    try:
        return gguf_dequantize(raw.reshape(math.prod(shape[:-1]), -1), int(t.tensor_type)).reshape(shape)
    except ValueError as e:
        raise ExportError(path, f"{t.name}: {e}") from None
