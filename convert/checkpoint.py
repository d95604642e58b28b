"""The checkpoint file of run.c (docs/FORMATS.md): writer, reader, and the
encoding of each weight type."""

import math
import os
import struct
from collections.abc import Mapping

from convert.errors import ExportError, np, torch
from convert.kquants import BLOCK, BLOCK_BYTES, ENCODERS, K_TYPES, decode_kquant, kquant_scales_finite
from model import MAX_SEQ_LEN, ModelArgs

# The checkpoint file (drawn in docs/FORMATS.md and at the top of run.c). One table,
# checkpoint_tensors(), gives the order and shapes; the writer, the reader and
# the validation all walk it.

MAGIC = b"LLAM"
VERSION = 1                     # written when no flag is set, so such files stay as they always were
VERSION_FLAGS = 2               # the header's u32 flags at offset 60 say which optional tensors follow
VERSION_TYPES = 3               # a weight type for each matrix, in a table at offset 256
TYPE_PER_MATRIX = 0xFFFFFFFF    # version 3's weight_type
FLAG_QKV_BIAS = 1               # per layer bq, bk, bv (f32) after wv
FLAG_ROPE_FREQS = 2             # rope_inv_freq (f32, head_dim / 2) after the token embedding
FLAGS = struct.Struct("<I")
HEADER_SIZE = 256
ALIGN = 64                      # every tensor starts at a multiple of this
WEIGHT_TYPES = {"f32": 0, "q8_0": 1, "q4_0": 2, "bf16": 3}   # weight_type of the header
MATRIX_TYPES = {**WEIGHT_TYPES, "q4_k": 4, "q5_k": 5, "q6_k": 6}   # version 3's table: these too
WEIGHT_F32 = WEIGHT_TYPES["f32"]
GROUP_SIZE = 32                 # weights per scale in q8_0 and q4_0
# GGUF's Q8_0 and Q4_0 block: a group's float16 scale, then its values as
# ours (32 int8; 16 bytes of nibbles): bytes per block
GROUP_BLOCK_BYTES = {"q8_0": 2 + GROUP_SIZE, "q4_0": 2 + GROUP_SIZE // 2}
BLOCK_TYPES = K_TYPES + tuple(GROUP_BLOCK_BYTES)   # the types whose GGUF blocks a checkpoint keeps
# magic, version, 8 x i32 (dim .. max_seq_len), rope_theta, norm_eps,
# tied_classifier, weight_type, group_size: 60 bytes, then (version 2) the
# flags, then zeros up to 256
HEADER = struct.Struct("<4sI8i2f3I")


def checkpoint_tensors(args):
    """The checkpoint's tensors in file order: a list of (state_dict name, shape)."""
    d, h, qd, kvd = args.dim, args.hidden_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    tensors = [("tok_embeddings.weight", (args.vocab_size, d))]
    if args.scaled_rope:
        tensors.append(("rope_inv_freq", (args.head_dim // 2,)))
    for i in range(args.n_layers):
        tensors += [
            (f"layers.{i}.attention_norm.weight", (d,)),
            (f"layers.{i}.attention.wq.weight", (qd, d)),
            (f"layers.{i}.attention.wk.weight", (kvd, d)),
            (f"layers.{i}.attention.wv.weight", (kvd, d)),
        ]
        if args.attention_bias:
            tensors += [(f"layers.{i}.attention.wq.bias", (qd,)), (f"layers.{i}.attention.wk.bias", (kvd,)),
                        (f"layers.{i}.attention.wv.bias", (kvd,))]
        tensors += [
            (f"layers.{i}.attention.wo.weight", (d, qd)),
            (f"layers.{i}.ffn_norm.weight", (d,)),
            (f"layers.{i}.feed_forward.w1.weight", (h, d)),
            (f"layers.{i}.feed_forward.w2.weight", (d, h)),
            (f"layers.{i}.feed_forward.w3.weight", (h, d)),
        ]
    tensors.append(("norm.weight", (d,)))
    if not args.tied:
        tensors.append(("output.weight", (args.vocab_size, d)))
    return tensors


class Tensors(Mapping):
    """A model's tensors by name, each read from its source only when it is
    asked for, so that a conversion holds a few tensors, never the model.
    An entry is the tensor's shape, known without reading it (validation uses
    it), and a function that reads it: a float32 torch tensor or numpy array.
    Setting an entry puts a tensor in memory in its place. A dict of tensors
    serves wherever Tensors does.

    A matrix stored in a type of BLOCK_TYPES (a GGUF's Q8_0, Q4_0, Q4_K,
    Q5_K or Q6_K tensor) also reads as its GGUF blocks, bit for bit
    (add_blocks, blocks); source_types names the type each matrix has in
    the source (a GGUF's name for it)."""

    def __init__(self):
        self.shapes, self._readers = {}, {}
        self.block_types, self._block_readers, self.source_types = {}, {}, {}

    def add(self, name, shape, read):
        """Add (or replace) the tensor name: a replaced matrix's blocks go with it."""
        self.shapes[name] = tuple(int(n) for n in shape)
        self._readers[name] = read
        self.block_types.pop(name, None)
        self._block_readers.pop(name, None)

    def add_blocks(self, name, dtype, read_blocks):
        """Say that the matrix name (added) is stored in dtype (of
        BLOCK_TYPES): read_blocks() reads its (rows, bytes) uint8 GGUF blocks."""
        self.block_types[name], self._block_readers[name] = dtype, read_blocks

    def blocks(self, name):
        return self._block_readers[name]()

    def __setitem__(self, name, tensor):
        self.add(name, tensor.shape, lambda: tensor)

    def __getitem__(self, name):
        return self._readers[name]()

    def __contains__(self, name):       # Mapping's would read the tensor
        return name in self._readers

    def __iter__(self):
        return iter(self._readers)

    def __len__(self):
        return len(self._readers)


def tensor_shapes(tensors):
    """{name: shape} of a Tensors (its data left unread) or of a dict of tensors."""
    if isinstance(tensors, Tensors):
        return tensors.shapes
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def finite_tensors(state_dict, path):
    """state_dict as a Tensors whose tensors are checked, as each is read, to
    hold finite numbers: ExportError naming path (the source) and the tensor
    otherwise. A NaN or infinite weight makes run.c's logits NaN; numpy's
    warnings on the way there (a NaN scale of a quantized block, a float64
    beyond float32) are not printed."""
    checked = Tensors()
    for name, shape in tensor_shapes(state_dict).items():
        checked.add(name, shape, lambda name=name: _finite(state_dict, name, path))
    if isinstance(state_dict, Tensors):
        checked.source_types = dict(state_dict.source_types)
        for name, dtype in state_dict.block_types.items():
            checked.add_blocks(name, dtype, lambda name=name, dtype=dtype: _finite_blocks(state_dict, name, dtype,
                                                                                           path))
    return checked


def _finite_blocks(state_dict, name, dtype, path):
    blocks = state_dict.blocks(name)
    if not block_scales_finite(blocks, dtype):
        raise ExportError(path, f"{name} holds NaN or infinite numbers")
    return blocks


def _finite(state_dict, name, path):
    with np.errstate(all="ignore"):
        tensor = _f32_array(state_dict[name])
    if not np.isfinite(tensor).all():
        raise ExportError(path, f"{name} holds NaN or infinite numbers")
    return tensor


def check_state_dict(args, state_dict, path):
    """Raise ExportError naming path unless state_dict (a dict or Tensors) has
    exactly the tensors args implies, in their shapes; no data is read."""
    expected, shapes = dict(checkpoint_tensors(args)), tensor_shapes(state_dict)
    missing = [name for name in expected if name not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ExportError(path, f"tensor {missing[0]} is missing{more}")
    unexpected = [name for name in shapes if name not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ExportError(path, f"unexpected tensor {unexpected[0]}{more}")
    for name, shape in expected.items():
        got = tuple(shapes[name])
        if got != shape:
            raise ExportError(path, f"{name}: expected shape {shape}, got {got}")


def check_rope_frequencies(inv_freq, path, what="rope_inv_freq"):
    """Raise ExportError naming path (and what, the tensor they come from)
    unless every number of inv_freq (RoPE's inverse frequencies, or what
    they are divided by) is finite and positive,
    as run.c's rotations need (rope_theta, which gives them unscaled, is
    held to the same by ModelArgs)."""
    inv_freq = _f32_array(inv_freq)
    bad = np.flatnonzero(~(np.isfinite(inv_freq) & (inv_freq > 0)))
    if bad.size:
        raise ExportError(path, f"{what}: {inv_freq[bad[0]]} for pair {bad[0]}; RoPE needs finite positive "
                                "numbers")


def _f32_array(tensor):
    """The tensor (torch or numpy) as a float32 numpy array."""
    if not isinstance(tensor, np.ndarray):
        tensor = tensor.detach().cpu().float().numpy()
    return np.ascontiguousarray(tensor, dtype=np.float32)


def _f32_bytes(tensor):
    """The tensor (torch or numpy) as packed little-endian float32, row-major."""
    return _f32_array(tensor).astype("<f4", copy=False).tobytes()


def block_scales_finite(blocks, dtype):
    """Whether every float16 scale of GGUF blocks of dtype (BLOCK_TYPES) is
    finite, which makes every weight finite."""
    if dtype in K_TYPES:
        return kquant_scales_finite(blocks, dtype)
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, GROUP_BLOCK_BYTES[dtype])
    return bool(np.isfinite(b[:, :2].copy().view("<f2")).all())


def group_arrays(blocks, dtype):
    """GGUF's Q8_0 or Q4_0 blocks (dtype q8_0 or q4_0), (rows, bytes) uint8,
    as our matrix's arrays of dtype: values, then float16 scales (rows,
    groups), each the same numbers in the same order."""
    rows = blocks.shape[0]
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(rows, -1, GROUP_BLOCK_BYTES[dtype])
    values = np.ascontiguousarray(b[:, :, 2:]).reshape(rows, -1)
    scales = np.ascontiguousarray(b[:, :, :2]).view("<f2").reshape(rows, -1)
    return [values.view(np.int8) if dtype == "q8_0" else values, scales]


def group_blocks(values, scales):
    """group_arrays()'s inverse: a q8_0 or q4_0 matrix's arrays as GGUF's
    Q8_0 or Q4_0 blocks, (rows, bytes) uint8."""
    rows, groups = scales.shape
    blocks = np.concatenate((scales.astype("<f2").reshape(rows, groups, 1).view(np.uint8),
                             values.view(np.uint8).reshape(rows, groups, -1)), axis=2)
    return blocks.reshape(rows, -1)


def quantize_q8_0(w):
    """(rows, cols) float32 -> (int8 values (rows, cols), float16 scales (rows, cols/32))."""
    rows, cols = w.shape
    groups = w.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    d = (np.abs(groups).max(axis=-1) / 127).astype(np.float16)
    d32 = d.astype(np.float32)
    inv = np.divide(1, d32, out=np.zeros_like(d32), where=d32 != 0)
    q = np.clip(np.rint(groups * inv[..., None]), -127, 127).astype(np.int8)
    return q.reshape(rows, cols), d


def quantize_q4_0(w):
    """(rows, cols) float32 -> (packed uint8 (rows, cols/2), float16 scales (rows, cols/32))."""
    rows, cols = w.shape
    groups = w.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    biggest = np.take_along_axis(groups, np.abs(groups).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    d = (biggest / -8).astype(np.float16)
    d32 = d.astype(np.float32)
    inv = np.divide(1, d32, out=np.zeros_like(d32), where=d32 != 0)
    q = np.clip(np.rint(groups * inv[..., None]) + 8, 0, 15).astype(np.uint8)
    half = GROUP_SIZE // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return packed.reshape(rows, cols // 2), d


def to_bf16(w):
    """float32 -> bfloat16 bits as uint16, rounded to nearest even."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def encode_matrix(w, dtype):
    """A float32 matrix (rows, cols) in the checkpoint's weight type: the arrays
    that are written one after the other, each from a multiple of ALIGN."""
    if dtype == "f32":
        return [w.astype("<f4", copy=False)]
    if dtype == "bf16":
        return [to_bf16(w).astype("<u2", copy=False)]
    if dtype in K_TYPES:
        return [ENCODERS[dtype](w)]
    values, scales = quantize_q8_0(w) if dtype == "q8_0" else quantize_q4_0(w)
    return [values, scales.astype("<f2", copy=False)]


def decode_matrix(arrays, dtype):
    """encode_matrix()'s inverse: the float32 weights the engine computes with."""
    if dtype == "f32":
        return arrays[0].astype(np.float32)
    if dtype == "bf16":
        return (arrays[0].astype(np.uint32) << 16).view(np.float32)
    if dtype in K_TYPES:
        return decode_kquant(arrays[0], dtype)
    values, scales = arrays
    rows = values.shape[0]
    d = scales.astype(np.float32)[..., None]                          # (rows, groups, 1)
    if dtype == "q8_0":
        q = values.reshape(rows, -1, GROUP_SIZE).astype(np.float32)
    else:
        packed = values.reshape(rows, -1, GROUP_SIZE // 2)
        q = np.concatenate((packed & 15, packed >> 4), axis=-1).astype(np.float32) - 8
    return (d * q).reshape(rows, -1)


def matrix_arrays(shape, dtype):
    """(numpy dtype, shape) of each array of a (rows, cols) matrix in the weight type."""
    rows, cols = shape
    if dtype in K_TYPES:
        return [("u1", (rows, cols // BLOCK * BLOCK_BYTES[dtype]))]
    return {"f32": [("<f4", (rows, cols))], "bf16": [("<u2", (rows, cols))],
            "q8_0": [("i1", (rows, cols)), ("<f2", (rows, cols // GROUP_SIZE))],
            "q4_0": [("u1", (rows, cols // 2)), ("<f2", (rows, cols // GROUP_SIZE))]}[dtype]


def check_dtype(args, dtype, path):
    """Raise ExportError unless dtype is a weight type that can hold args' matrices."""
    if dtype not in WEIGHT_TYPES:
        raise ExportError(path, f"weight type {dtype!r}: expected one of {', '.join(WEIGHT_TYPES)}")
    widths = {"dim": args.dim, "hidden_dim": args.hidden_dim, "n_heads * head_dim": args.n_heads * args.head_dim}
    odd = [f"{name} = {v}" for name, v in widths.items() if v % GROUP_SIZE]
    if dtype in ("q8_0", "q4_0") and odd:
        raise ExportError(path, f"{dtype} needs matrix widths that are multiples of {GROUP_SIZE}; "
                                f"{', '.join(odd)} is not")


def matrix_types(args, dtype):
    """{matrix name: weight type} for dtype: one weight type for every matrix
    (a name of WEIGHT_TYPES), or already such a dict (returned as it is)."""
    if isinstance(dtype, dict):
        return dtype
    return {name: dtype for name, shape in checkpoint_tensors(args) if len(shape) == 2}


def check_matrix_types(args, types, path):
    """Raise ExportError naming path unless types gives each of args'
    matrices a type of MATRIX_TYPES that its width allows (a multiple of
    32 for q8_0 and q4_0, of 256 for the K types)."""
    matrices = {name: shape for name, shape in checkpoint_tensors(args) if len(shape) == 2}
    if set(types) != set(matrices):
        raise ExportError(path, "the weight types do not name every matrix of the model")
    for name, dtype in types.items():
        cols = matrices[name][1]
        if dtype not in MATRIX_TYPES:
            raise ExportError(path, f"{name}: weight type {dtype!r}: expected one of {', '.join(MATRIX_TYPES)}")
        group = BLOCK if dtype in K_TYPES else GROUP_SIZE if dtype in ("q8_0", "q4_0") else 1
        if cols % group:
            raise ExportError(path, f"{name}: {dtype} needs a width that is a multiple of {group}; it is {cols}")


def single_type(types):
    """The one weight type of the version 1 or 2 header that every matrix of
    types has, or None (then the file is version 3)."""
    kinds = set(types.values())
    return next(iter(kinds)) if len(kinds) == 1 and kinds <= set(WEIGHT_TYPES) else None


def describe_types(dtype):
    """A checkpoint's weight type for a report: "q8_0", or for version 3 how
    many matrices have each type: "q4_k x 50, q6_k x 15"."""
    if isinstance(dtype, str):
        return dtype
    counts = {kind: list(dtype.values()).count(kind) for kind in MATRIX_TYPES if kind in dtype.values()}
    return ", ".join(f"{kind} x {n}" for kind, n in counts.items())


def check_max_seq_len(args, path):
    """Raise ExportError naming path unless run.c allows a context of args.max_seq_len."""
    if args.max_seq_len > MAX_SEQ_LEN:
        raise ExportError(path, f"max_seq_len = {args.max_seq_len} is more than run.c's {MAX_SEQ_LEN} "
                                "(give a shorter one with --max-seq-len)")


def header_flags(args):
    """The header's flags for args: 0 for a model that version 1 describes."""
    return FLAG_QKV_BIAS * args.attention_bias | FLAG_ROPE_FREQS * args.scaled_rope


ENCODE_ROWS_BYTES = 32 << 20    # a matrix is encoded this many float32 bytes of rows at a time


def _encoded_rows(w, dtype):
    """encode_matrix(w, dtype) a block of rows at a time, so that its
    temporaries stay small: the arrays, each a list of row blocks. (The K
    types' scale search holds some ten temporaries the size of its rows, so
    they go by an eighth as many.)"""
    step = max(1, ENCODE_ROWS_BYTES // (4 * w.shape[1] * (8 if dtype in K_TYPES else 1)))
    blocks = [encode_matrix(w[r:r + step], dtype) for r in range(0, w.shape[0], step)]
    return [[block[k] for block in blocks] for k in range(len(blocks[0]))]


def write_checkpoint(path, args, state_dict, dtype="f32", progress=None):
    """Write the checkpoint with its matrices in dtype (norms, biases and
    RoPE frequencies stay f32) and return its size in bytes. dtype: one
    weight type for every matrix ("f32", "bf16", "q8_0" or "q4_0"), or a
    dict {matrix name: weight type of MATRIX_TYPES}. Version 1, or 2 when
    args has biases or scaled RoPE, when every matrix has the same one of
    the first four types; version 3 otherwise.

    state_dict: a dict of tensors or a Tensors, whose tensors are read one at
    a time, each written before the next is read; a matrix whose blocks it
    holds in the type asked for (a GGUF's Q4_K, say) is copied bit for bit.
    Its names, shapes and types are validated first, so a bad one leaves no
    file behind. progress, if given, is called after each tensor with
    (tensors written, tensors in all, bytes written, share of the weights
    written)."""
    check_state_dict(args, state_dict, path)
    types = matrix_types(args, dtype)
    if isinstance(dtype, str):
        check_dtype(args, dtype, path)
    check_matrix_types(args, types, path)
    check_max_seq_len(args, path)
    tensors = checkpoint_tensors(args)
    header, table = _header(args, types), b""
    if single_type(types) is None:
        table = bytes(MATRIX_TYPES[types[name]] for name, shape in tensors if len(shape) == 2)
    total_weights, weights_done = sum(math.prod(shape) for _, shape in tensors), 0
    with open(path, "wb") as f:
        f.write(header.ljust(HEADER_SIZE, b"\0") + table)
        for done, (name, shape) in enumerate(tensors, 1):
            blocks = stored_blocks(state_dict, name, types.get(name))
            if blocks is not None:
                _write_blocks(f, blocks, types[name])
            else:
                _write_tensor(f, _f32_array(state_dict[name]), types.get(name))
            weights_done += math.prod(shape)
            if progress:
                progress(done, len(tensors), f.tell(), weights_done / total_weights)
        return f.tell()


def _header(args, types):
    """The header's fields, packed (the zeros up to 256 not yet added):
    version 1 or 2 with the one weight type of types, or version 3."""
    dtype, flags = single_type(types), header_flags(args)
    if dtype is None:
        version, weight_type, group = VERSION_TYPES, TYPE_PER_MATRIX, 0
    else:
        version = VERSION_FLAGS if flags else VERSION
        weight_type, group = WEIGHT_TYPES[dtype], GROUP_SIZE if dtype in ("q8_0", "q4_0") else 0
    header = HEADER.pack(MAGIC, version, args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads,
                         args.head_dim, args.vocab_size, args.max_seq_len, args.rope_theta, args.norm_eps,
                         int(args.tied), weight_type, group)
    return header + FLAGS.pack(flags) if version != VERSION else header


def stored_blocks(state_dict, name, dtype):
    """The matrix name's GGUF blocks as state_dict stores them, if they are
    in dtype (to be copied bit for bit); else None."""
    if isinstance(state_dict, Tensors) and dtype in BLOCK_TYPES and state_dict.block_types.get(name) == dtype:
        return state_dict.blocks(name)
    return None


def _write_blocks(f, blocks, dtype):
    """Write a matrix's GGUF blocks of dtype as its arrays: a K type's as
    they are; Q8_0's and Q4_0's values and scales apart (group_arrays), the
    values a block of rows at a time, so that their copy stays small, the
    scales (1/17 or 1/9 of the bytes) after them."""
    f.write(b"\0" * (-f.tell() % ALIGN))
    if dtype in K_TYPES:
        f.write(np.ascontiguousarray(blocks).data)
        return
    step, scales = max(1, ENCODE_ROWS_BYTES // blocks.shape[1]), []
    for r in range(0, blocks.shape[0], step):
        values, row_scales = group_arrays(blocks[r:r + step], dtype)
        f.write(values.data)
        scales.append(row_scales)
    f.write(b"\0" * (-f.tell() % ALIGN))
    for row_scales in scales:
        f.write(row_scales.data)


def _write_tensor(f, w, dtype):
    """Write one float32 tensor: a norm as it is, a matrix in dtype; each
    array from a multiple of ALIGN. (A function, so that the tensor is freed
    before the next one is read.)"""
    for blocks in (_encoded_rows(w, dtype) if w.ndim == 2 else [[w.astype("<f4")]]):
        f.write(b"\0" * (-f.tell() % ALIGN))
        for block in blocks:
            f.write(np.ascontiguousarray(block).data)


def read_checkpoint_arrays(path):
    """Read a checkpoint as stored: (ModelArgs, dtype, {name: [arrays]}),
    where a vector (norm, bias, RoPE frequencies) is one float32 array and a
    matrix the arrays of its weight type. dtype: the weight type of every
    matrix (versions 1 and 2), or version 3's {matrix name: weight type}."""
    if os.path.getsize(path) < HEADER_SIZE:
        raise ExportError(path, f"{os.path.getsize(path)} bytes: shorter than the 256-byte header")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    magic, version, *ints, theta, eps, tied, weight_type, group_size = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ExportError(path, f'magic {magic!r}: expected "LLAM"')
    dtype = {v: k for k, v in WEIGHT_TYPES.items()}.get(weight_type)
    expected_group = GROUP_SIZE if dtype in ("q8_0", "q4_0") else 0
    per_matrix = version == VERSION_TYPES and weight_type == TYPE_PER_MATRIX and group_size == 0
    if not per_matrix and (version not in (VERSION, VERSION_FLAGS) or dtype is None or group_size != expected_group):
        raise ExportError(path, f"version {version}, weight_type {weight_type}, group_size {group_size}: "
                                f"expected version {VERSION} or {VERSION_FLAGS}, a weight_type of 0..3 "
                                f"and its group_size, or version {VERSION_TYPES}, weight_type {TYPE_PER_MATRIX:#x} "
                                "and group_size 0")
    flags = FLAGS.unpack_from(data, HEADER.size)[0] if version != VERSION else 0
    if flags & ~(FLAG_QKV_BIAS | FLAG_ROPE_FREQS):
        raise ExportError(path, f"flags = {flags:#x}: bits other than 1 (q/k/v biases) and 2 (RoPE frequencies)")
    try:
        args = ModelArgs(*ints, rope_theta=theta, norm_eps=eps, tied=tied,
                         attention_bias=bool(flags & FLAG_QKV_BIAS), scaled_rope=bool(flags & FLAG_ROPE_FREQS))
        if not per_matrix:
            check_dtype(args, dtype, path)
    except ValueError as e:
        raise ExportError(path, f"bad header: {e}") from None
    types, offset = matrix_types(args, dtype), HEADER_SIZE
    if per_matrix:
        dtype = types = _read_type_table(path, data, args)
        offset += len(types)
    tensors = {}
    for name, shape in checkpoint_tensors(args):
        tensors[name] = []
        for np_dtype, array_shape in (matrix_arrays(shape, types[name]) if len(shape) == 2 else [("<f4", shape)]):
            offset += -offset % ALIGN
            nbytes = np.dtype(np_dtype).itemsize * math.prod(array_shape)
            if offset + nbytes > data.size:
                raise ExportError(path, f"{data.size} bytes: truncated in {name}")
            tensors[name].append(data[offset:offset + nbytes].view(np_dtype).reshape(array_shape).copy())
            offset += nbytes
    if offset != data.size:
        raise ExportError(path, f"{data.size} bytes: expected {offset} for {args.describe()}")
    if args.scaled_rope:
        check_rope_frequencies(tensors["rope_inv_freq"][0], path)
    return args, dtype, tensors


def _read_type_table(path, data, args):
    """Version 3's table of weight types, one byte per matrix after the
    header, as {matrix name: weight type}; ExportError naming path for a
    byte that is no weight type, or one the matrix's width does not allow."""
    names = [name for name, shape in checkpoint_tensors(args) if len(shape) == 2]
    if HEADER_SIZE + len(names) > data.size:
        raise ExportError(path, f"{data.size} bytes: truncated in the table of weight types")
    kinds = {v: k for k, v in MATRIX_TYPES.items()}
    types = {}
    for name, code in zip(names, data[HEADER_SIZE:HEADER_SIZE + len(names)].tolist()):
        if code not in kinds:
            raise ExportError(path, f"weight type {code} for {name}: expected 0..{len(kinds) - 1}")
        types[name] = kinds[code]
    check_matrix_types(args, types, path)
    return types


def read_checkpoint(path):
    """Read a checkpoint back into (ModelArgs, state_dict): the writer's
    inverse, with quantized and bf16 weights decoded to the float32 values that
    run.c computes with."""
    args, dtype, tensors = read_checkpoint_arrays(path)
    types = matrix_types(args, dtype)
    state_dict = {name: torch.from_numpy(decode_matrix(arrays, types[name]) if name in types
                                         else arrays[0].astype(np.float32))
                  for name, arrays in tensors.items()}
    return args, state_dict

