#!/usr/bin/env python3
"""export.py: the PyTorch reference Llama, and the writers of run.c's files.

The file reads top to bottom in three sections:

  Model export       ModelArgs and Llama, a plain PyTorch model that run.c is
                     tested against; converters that read Meta, Hugging Face,
                     llama2.c, GGUF and reference files; the checkpoint writer.
  Tokenizer export   tokenizer.bin, from sentencepiece or tokenizer.json,
                     and (its own section) from a GGUF file's metadata.
  Command line       export.py OUTPUT (--reference PT | --meta DIR | --hf DIR
                                       | --llama2c FILE | --gguf FILE
                                       | --tokenizer-model FILE)

The GGUF path needs numpy and gguf (with pyyaml, which gguf imports) only;
everything else needs torch too.

Every converter returns (ModelArgs, state_dict) with the reference's parameter
names, so one writer serves them all. It writes this checkpoint (the drawing is
the one in docs/FORMATS.md and run.c; all little-endian, sizes in bytes):

  offset  size  type     field
  ------  ----  -------  ---------------------------------------------------------
       0     4  char[4]  magic "LLAM"
       4     4  u32      version = 1
       8     4  i32      dim            width of the residual stream
      12     4  i32      hidden_dim     width of the SwiGLU MLP
      16     4  i32      n_layers
      20     4  i32      n_heads        query heads
      24     4  i32      n_kv_heads     key/value heads; divides n_heads (MHA, GQA, MQA)
      28     4  i32      head_dim       not assumed to be dim / n_heads
      32     4  i32      vocab_size
      36     4  i32      max_seq_len
      40     4  f32      rope_theta
      44     4  f32      norm_eps
      48     4  u32      tied_classifier 1: logits use token_embedding; 0: a classifier follows
      52     4  u32      weight_type    0 f32, 1 q8_0, 2 q4_0, 3 bf16 (of the matrices)
      56     4  u32      group_size     32 for q8_0 and q4_0, 0 for f32 and bf16
      60   196  zero     header is 256 bytes
     256        tensors, in this order, each starting at an offset that is a
                multiple of 64 (zero bytes pad the gap):

     token_embedding     (vocab_size, dim)                 weight_type
     for each layer:
       attn_norm         (dim)                             f32
       wq                (n_heads * head_dim, dim)         weight_type
       wk                (n_kv_heads * head_dim, dim)      weight_type
       wv                (n_kv_heads * head_dim, dim)      weight_type
       wo                (dim, n_heads * head_dim)         weight_type
       ffn_norm          (dim)                             f32
       w1 (gate)         (hidden_dim, dim)                 weight_type
       w2 (down)         (dim, hidden_dim)                 weight_type
       w3 (up)           (hidden_dim, dim)                 weight_type
     final_norm          (dim)                             f32
     classifier          (vocab_size, dim)                 weight_type, only if tied_classifier = 0

     The file ends right after the last tensor.

A matrix (rows, cols) of each weight type (norms are always f32):

  f32   rows x cols float32
  bf16  rows x cols bfloat16, the top 16 bits of the float32, rounded to nearest even
  q8_0  values: rows x cols int8, then (from the next multiple of 64)
        scales: rows x cols/32 float16, one per group of 32 weights of a row
          group g of row r:  | q[0] | q[1] | ... | q[31] |     w[i] = d * q[i],  q in -127..127
          d = max|w| / 127 over the group (as float16); q = round(w / d)
  q4_0  values: rows x cols/2 bytes, 16 per group, then the scales as in q8_0
          byte j of a group:  | q[j + 16] (high 4 bits) | q[j] (low 4 bits) |
          w[i] = d * (q[i] - 8),  q in 0..15; d = m / -8 where m is the group's
          weight of largest magnitude, so that m itself is exact (q = 0)
  cols must be a multiple of 32 for q8_0 and q4_0 (so dim, hidden_dim and
  n_heads * head_dim are). q8_0 and q4_0 hold llama.cpp's Q8_0 and Q4_0 blocks,
  with the scales gathered apart from the values.

Matrices are row-major (out, in), as nn.Linear.weight: y = W x. RoPE rotates
the interleaved pairs (x[2i], x[2i+1]) of each head by the angle
pos * rope_theta^(-2i / head_dim), Meta's convention; Hugging Face's q/k rows
are permuted into it here, so run.c knows one convention only.
"""

import argparse
import contextlib
import dataclasses
import errno
import importlib
import json
import math
import numbers
import os
import re
import signal
import stat
import struct
import sys
import tempfile


class ExportError(Exception):
    """Anything a user can get wrong: an input that cannot be read or used, an
    output that cannot be written, a package that is not installed. str() is
    the one line export.py prints after "export.py: ", 'WHICH: what is wrong'
    (WHICH names the file, or is left out when there is none)."""

    def __init__(self, which, what):
        message = str(what) if which is None else f"{which}: {what}"
        super().__init__(" ".join(message.splitlines()))


# Third-party packages. Each conversion needs only some of them (--help none,
# --gguf numpy and gguf, --hf torch and maybe safetensors and sentencepiece),
# so a missing one is reported when a conversion needs it, not on import.

PIP_NAMES = {"yaml": "pyyaml", "google": "protobuf"}     # where the import name is not the PyPI name


def missing_package(module):
    """The ExportError for a package that is not installed (module: its import name)."""
    name = PIP_NAMES.get(module.split(".")[0], module.split(".")[0])
    return ExportError(None, f"this conversion needs the Python package '{name}' (pip install {name})")


def need(module):
    """Import module, one that only some conversions use."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:     # the module, or one that it imports
        raise missing_package(e.name or module) from None


class _Missing:
    """Stands in for numpy, or for torch, nn and F, where it is not installed,
    so that this file still loads. Using it raises missing_package(). Module
    is there so that the reference model's classes below can be defined."""
    Module = object

    def __init__(self, module):
        self._module = module

    def __getattr__(self, attr):
        if attr.startswith("__"):      # Python's own probing (copy, pickle, ...)
            raise AttributeError(attr)
        raise missing_package(self._module)


try:
    import numpy as np
except ModuleNotFoundError as e:
    np = _Missing(e.name or "numpy")
try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ModuleNotFoundError as e:
    torch = nn = F = _Missing(e.name or "torch")

# ----------------------------------------------------------------------------
# Model export
#
# Shapes below use B = batch, T = time (positions), H = heads, D = head_dim.


F32_MAX = 3.4028234663852886e38
# The largest sizes that run.c loads (its MAX_DIM, MAX_HIDDEN, ...): ModelArgs
# refuses more, so that nothing is written that run.c would refuse. The
# longest context is checked when a checkpoint is written, after
# --max-seq-len has had its say; until then max_seq_len is any i32.
MAX_SIZES = {"dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
             "head_dim": 4096, "vocab_size": 1 << 22}
MAX_SEQ_LEN = 1 << 20


@dataclasses.dataclass
class ModelArgs:
    """The hyperparameters of a model: the fields of the checkpoint header."""

    dim: int                    # width of the residual stream
    hidden_dim: int             # width of the SwiGLU MLP
    n_layers: int
    n_heads: int                # query heads
    n_kv_heads: int             # key/value heads; divides n_heads (MHA, GQA, MQA)
    head_dim: int               # not assumed to be dim / n_heads
    vocab_size: int
    max_seq_len: int            # longest context run.c will allocate for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tied: bool = False          # the classifier is the token embedding

    def __post_init__(self):
        # Numbers arrive from JSON, numpy, torch and file headers: store plain
        # Python types, and refuse anything else (a string, a bool for a
        # count) and shapes that no forward pass could run.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if f.type is int:        # the header stores i32
                most = MAX_SIZES.get(f.name, 2**31 - 1)
                if not (number and value == int(value) and 0 < value <= most):
                    raise ValueError(f"{f.name} = {value!r}: expected an integer from 1 to {most}")
                value = int(value)
            elif f.type is float:    # the header stores f32: neither 0 nor inf there
                if not (number and 0 < value <= F32_MAX and struct.unpack("<f", struct.pack("<f", value))[0]):
                    raise ValueError(f"{f.name} = {value!r}: expected a positive number that float32 holds")
                value = float(value)
            else:
                if not (isinstance(value, numbers.Integral) and value in (0, 1)):
                    raise ValueError(f"{f.name} = {value!r}: expected true or false")
                value = bool(value)
            setattr(self, f.name, value)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads = {self.n_kv_heads} does not divide n_heads = {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = {self.head_dim}: RoPE rotates pairs, so it must be even")
        if self.n_heads * self.head_dim > MAX_SIZES["dim"]:
            raise ValueError(f"n_heads * head_dim = {self.n_heads * self.head_dim}: expected at most "
                             f"{MAX_SIZES['dim']}")

    def describe(self):
        """One line for people: 'dim 64, hidden 172, 5 layers, ...'."""
        return (f"dim {self.dim}, hidden {self.hidden_dim}, {self.n_layers} layers, "
                f"{self.n_heads} heads ({self.n_kv_heads} kv) of {self.head_dim}, "
                f"vocab {self.vocab_size} ({'tied' if self.tied else 'untied'}), "
                f"seq {self.max_seq_len}, theta {self.rope_theta:g}, eps {self.norm_eps:g}")


# The reference model. It is written for clarity, not speed: float32 all the way,
# every position recomputed on every call, no KV cache. run.c must agree with it.


def rope_cos_sin(seq_len, head_dim, theta):
    """cos and sin of the RoPE angles pos * theta^(-2i/head_dim), each (seq_len, head_dim/2).

    Computed in float64 and rounded once to float32 at the end, so the
    reference is as close to the exact angles as float32 allows."""
    pos = torch.arange(seq_len, dtype=torch.float64)
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(pos, freqs)                          # (T, D/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate the pairs (x[2i], x[2i+1]) of every head: x (B, T, H, D), cos/sin (T, D/2).

    Each pair is a complex number x[2i] + i x[2i+1], multiplied by
    cos + i sin; this is that product written out in real arithmetic."""
    x0, x1 = x[..., 0::2], x[..., 1::2]                       # (B, T, H, D/2)
    cos, sin = cos[:, None, :], sin[:, None, :]               # broadcast over heads
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2)                                # pairs back to (B, T, H, D)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps), scaled per channel; always in float32
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA/MQA: query head h reads key/value head h // (n_heads / n_kv_heads),
        # so each kv head is repeated for its consecutive group of query heads
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)         # (B, H, T, T)
        future = torch.ones(T, T, dtype=torch.bool).triu(1)               # key after query
        scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(dim=-1) @ v                                  # (B, H, T, D)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)   # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)   # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)   # up

    def forward(self, x):
        # SwiGLU: the silu of the gate, times the up projection, projected down
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """The reference Llama. Its state_dict names are the ones every converter returns:

      tok_embeddings.weight                    (vocab_size, dim)
      layers.{i}.attention_norm.weight         (dim)
      layers.{i}.attention.wq.weight           (n_heads * head_dim, dim)
      layers.{i}.attention.wk.weight           (n_kv_heads * head_dim, dim)
      layers.{i}.attention.wv.weight           (n_kv_heads * head_dim, dim)
      layers.{i}.attention.wo.weight           (dim, n_heads * head_dim)
      layers.{i}.ffn_norm.weight               (dim)
      layers.{i}.feed_forward.w1.weight        (hidden_dim, dim)
      layers.{i}.feed_forward.w2.weight        (dim, hidden_dim)
      layers.{i}.feed_forward.w3.weight        (hidden_dim, dim)
      norm.weight                              (dim)
      output.weight                            (vocab_size, dim), absent when tied

    These are Meta's names, so Meta checkpoints load as they are."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if not args.tied:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens):
        """tokens (B, T) int64, at positions 0..T-1 -> logits (B, T, vocab_size) float32."""
        T = tokens.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"{T} tokens is more than max_seq_len = {self.args.max_seq_len}")
        cos, sin = rope_cos_sin(T, self.args.head_dim, self.args.rope_theta)
        h = self.tok_embeddings(tokens)                       # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        classifier = self.tok_embeddings.weight if self.args.tied else self.output.weight
        return F.linear(h, classifier)                        # (B, T, vocab_size)


def generate_greedy(model, prompt_ids, n):
    """The n tokens that follow prompt_ids when each step takes the argmax (a list of ints)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def random_model(args, seed=0):
    """A reference Llama with random weights, the same for the same args and seed.

    The embedding and the matrices are N(0, 0.02^2), the usual Llama init.
    Norm weights are 1 + N(0, 0.1^2) rather than 1, so that an implementation
    which forgets to scale by them gives different logits. The caller's
    global RNG is left as it was."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):     # Llama() draws a default init we overwrite
        model = Llama(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.02 * noise)
    return model.eval()


# The checkpoint file (drawn at the top of this file). One table,
# checkpoint_tensors(), gives the order and shapes; the writer, the reader and
# the validation all walk it.

MAGIC = b"LLAM"
VERSION = 1
HEADER_SIZE = 256
ALIGN = 64                      # every tensor starts at a multiple of this
WEIGHT_TYPES = {"f32": 0, "q8_0": 1, "q4_0": 2, "bf16": 3}   # weight_type of the header
WEIGHT_F32 = WEIGHT_TYPES["f32"]
GROUP_SIZE = 32                 # weights per scale in q8_0 and q4_0
# magic, version, 8 x i32 (dim .. max_seq_len), rope_theta, norm_eps,
# tied_classifier, weight_type, group_size: 60 bytes, then zeros up to 256
HEADER = struct.Struct("<4sI8i2f3I")


def checkpoint_tensors(args):
    """The checkpoint's tensors in file order: a list of (state_dict name, shape)."""
    d, h, qd, kvd = args.dim, args.hidden_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    tensors = [("tok_embeddings.weight", (args.vocab_size, d))]
    for i in range(args.n_layers):
        tensors += [
            (f"layers.{i}.attention_norm.weight", (d,)),
            (f"layers.{i}.attention.wq.weight", (qd, d)),
            (f"layers.{i}.attention.wk.weight", (kvd, d)),
            (f"layers.{i}.attention.wv.weight", (kvd, d)),
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


def check_state_dict(args, state_dict, path):
    """Raise ExportError naming path unless state_dict has exactly the tensors args implies."""
    expected = dict(checkpoint_tensors(args))
    missing = [name for name in expected if name not in state_dict]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ExportError(path, f"tensor {missing[0]} is missing{more}")
    unexpected = [name for name in state_dict if name not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ExportError(path, f"unexpected tensor {unexpected[0]}{more}")
    for name, shape in expected.items():
        got = tuple(state_dict[name].shape)
        if got != shape:
            raise ExportError(path, f"{name}: expected shape {shape}, got {got}")


def _f32_array(tensor):
    """The tensor (torch or numpy) as a float32 numpy array."""
    if not isinstance(tensor, np.ndarray):
        tensor = tensor.detach().cpu().float().numpy()
    return np.ascontiguousarray(tensor, dtype=np.float32)


def _f32_bytes(tensor):
    """The tensor (torch or numpy) as packed little-endian float32, row-major."""
    return _f32_array(tensor).astype("<f4", copy=False).tobytes()


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
    values, scales = quantize_q8_0(w) if dtype == "q8_0" else quantize_q4_0(w)
    return [values, scales.astype("<f2", copy=False)]


def decode_matrix(arrays, dtype):
    """encode_matrix()'s inverse: the float32 weights the engine computes with."""
    if dtype == "f32":
        return arrays[0].astype(np.float32)
    if dtype == "bf16":
        return (arrays[0].astype(np.uint32) << 16).view(np.float32)
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


def check_max_seq_len(args, path):
    """Raise ExportError naming path unless run.c allows a context of args.max_seq_len."""
    if args.max_seq_len > MAX_SEQ_LEN:
        raise ExportError(path, f"max_seq_len = {args.max_seq_len} is more than run.c's {MAX_SEQ_LEN} "
                                "(give a shorter one with --max-seq-len)")


def write_checkpoint(path, args, state_dict, dtype="f32"):
    """Write the version 1 checkpoint with its matrices in dtype ("f32",
    "bf16", "q8_0" or "q4_0"; norms stay f32) and return its size in bytes.

    The state_dict and dtype are validated first, so a bad one leaves no file behind."""
    check_state_dict(args, state_dict, path)
    check_dtype(args, dtype, path)
    check_max_seq_len(args, path)
    group = GROUP_SIZE if dtype in ("q8_0", "q4_0") else 0
    header = HEADER.pack(MAGIC, VERSION, args.dim, args.hidden_dim, args.n_layers, args.n_heads,
                         args.n_kv_heads, args.head_dim, args.vocab_size, args.max_seq_len,
                         args.rope_theta, args.norm_eps, int(args.tied), WEIGHT_TYPES[dtype], group)
    with open(path, "wb") as f:
        f.write(header.ljust(HEADER_SIZE, b"\0"))
        for name, shape in checkpoint_tensors(args):
            w = _f32_array(state_dict[name])
            for array in (encode_matrix(w, dtype) if len(shape) == 2 else [w.astype("<f4")]):
                f.write(b"\0" * (-f.tell() % ALIGN))
                f.write(np.ascontiguousarray(array).tobytes())
        return f.tell()


def read_checkpoint_arrays(path):
    """Read a version 1 checkpoint as stored: (ModelArgs, dtype, {name: [arrays]}),
    where a norm is one float32 array and a matrix the arrays of its weight type."""
    if os.path.getsize(path) < HEADER_SIZE:
        raise ExportError(path, f"{os.path.getsize(path)} bytes: shorter than the 256-byte header")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    magic, version, *ints, theta, eps, tied, weight_type, group_size = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ExportError(path, f'magic {magic!r}: expected "LLAM"')
    dtype = {v: k for k, v in WEIGHT_TYPES.items()}.get(weight_type)
    expected_group = GROUP_SIZE if dtype in ("q8_0", "q4_0") else 0
    if version != VERSION or dtype is None or group_size != expected_group:
        raise ExportError(path, f"version {version}, weight_type {weight_type}, group_size {group_size}: "
                                f"expected version {VERSION}, a weight_type of 0..3 and its group_size")
    try:
        args = ModelArgs(*ints, rope_theta=theta, norm_eps=eps, tied=tied)
        check_dtype(args, dtype, path)
    except ValueError as e:
        raise ExportError(path, f"bad header: {e}") from None
    tensors, offset = {}, HEADER_SIZE
    for name, shape in checkpoint_tensors(args):
        tensors[name] = []
        for np_dtype, array_shape in (matrix_arrays(shape, dtype) if len(shape) == 2 else [("<f4", shape)]):
            offset += -offset % ALIGN
            nbytes = np.dtype(np_dtype).itemsize * math.prod(array_shape)
            if offset + nbytes > data.size:
                raise ExportError(path, f"{data.size} bytes: truncated in {name}")
            tensors[name].append(data[offset:offset + nbytes].view(np_dtype).reshape(array_shape).copy())
            offset += nbytes
    if offset != data.size:
        raise ExportError(path, f"{data.size} bytes: expected {offset} for {args.describe()}")
    return args, dtype, tensors


def read_checkpoint(path):
    """Read a version 1 checkpoint back into (ModelArgs, state_dict): the writer's
    inverse, with quantized and bf16 weights decoded to the float32 values that
    run.c computes with."""
    args, dtype, tensors = read_checkpoint_arrays(path)
    state_dict = {name: torch.from_numpy(decode_matrix(arrays, dtype) if arrays[0].ndim == 2
                                         else arrays[0].astype(np.float32))
                  for name, arrays in tensors.items()}
    return args, state_dict


def write_gguf(path, checkpoint):
    """Write a checkpoint of ours as a llama.cpp GGUF file (architecture
    "llama") that holds the same weights, bit for bit: q8_0 and q4_0 groups
    become Q8_0 and Q4_0 blocks (the scale, then the group's values), bf16
    BF16, f32 F32, norms F32. RoPE needs no permutation: llama.cpp's llama
    rotates interleaved pairs too. The vocabulary is a stand-in (<unk>, <s>,
    </s>, the 256 byte tokens, then "t259", "t260", ...): enough for
    llama.cpp to load the file and run token ids, which is what bench/bench.py
    does with it. Needs the gguf package. Returns the file size."""
    import gguf
    args, dtype, tensors = read_checkpoint_arrays(checkpoint)
    if args.vocab_size < 259:
        raise ExportError(path, f"vocab_size {args.vocab_size}: the stand-in vocabulary needs 259 tokens")
    writer = gguf.GGUFWriter(str(path), "llama")
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
    writer.add_vocab_size(args.vocab_size)
    writer.add_tokenizer_model("llama")
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"t{i}" for i in range(len(pieces), args.vocab_size)]
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * args.vocab_size)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (args.vocab_size - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {ours: theirs for theirs, ours in GGUF_NAMES.items()}
    for i in range(args.n_layers):
        names.update({f"layers.{i}.{ours}.weight": f"blk.{i}.{theirs}.weight"
                      for theirs, ours in GGUF_LAYER_NAMES.items()})
    block = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
             "bf16": gguf.GGMLQuantizationType.BF16}
    for name, arrays in tensors.items():
        if arrays[0].ndim == 1 or dtype == "f32":
            writer.add_tensor(names[name], arrays[0].astype(np.float32))
        elif dtype == "bf16":                                # bytes (rows, 2 cols)
            writer.add_tensor(names[name], arrays[0].view(np.uint8), raw_dtype=block[dtype])
        else:                                                # (rows, groups, 2 + value bytes)
            values, scales = arrays
            rows, groups = scales.shape
            blocks = np.concatenate((scales.reshape(rows, groups, 1).view(np.uint8),
                                     values.view(np.uint8).reshape(rows, groups, -1)), axis=2)
            writer.add_tensor(names[name], blocks.reshape(rows, -1), raw_dtype=block[dtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.path.getsize(path)


# Converters. Each reads one source and returns (ModelArgs, state_dict) in the
# reference's names and in float32, checked with check_state_dict.


def _model_args(path, **fields):
    """ModelArgs(**fields), with a bad field reported as an ExportError naming path."""
    try:
        return ModelArgs(**fields)
    except (TypeError, ValueError) as e:
        raise ExportError(path, str(e)) from None


# Reading the user's files. Each reader checks what it reads and raises
# ExportError naming the file; the library errors (OSError, json, torch,
# safetensors, gguf, protobuf) are turned into one where the file is read.

def _regular_file(path):
    """path, checked to name a regular file: a FIFO would block, /dev/zero never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ExportError(path, e.strerror) from None
    if stat.S_ISDIR(mode):
        raise ExportError(path, "is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise ExportError(path, "not a regular file")
    return path


def _directory(path):
    """path, checked to name a directory."""
    if not os.path.isdir(path):
        raise ExportError(path, "not a directory" if os.path.exists(path) else "No such directory")
    return path


def _read_bytes(path):
    """The contents of the regular file path."""
    _regular_file(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ExportError(path, e.strerror) from None


JSON_KINDS = {  # what a JSON field must hold, by the Python type asked for: (description, test)
    int: ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    dict: ("an object", lambda v: isinstance(v, dict)),
    list: ("an array", lambda v: isinstance(v, list)),
}
REQUIRED = object()


def _read_json(path):
    """The JSON object (a dict) that the file path holds."""
    try:
        value = json.loads(_read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ExportError(path, f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ExportError(path, f"expected a JSON object, not {json.dumps(value)[:40]}")
    return value


def _json_field(obj, key, kind, path, default=REQUIRED):
    """obj[key], checked to be of kind (a key of JSON_KINDS), from a JSON object
    read from path; default where the key is absent or null."""
    value = obj.get(key)
    if value is None:
        if default is REQUIRED:
            raise ExportError(path, f"{key} is missing")
        return default
    description, test = JSON_KINDS[kind]
    if not test(value):
        raise ExportError(path, f"{key} = {json.dumps(value)[:60]}: expected {description}")
    return value


def _torch_load(path):
    """torch.load of a file that holds tensors and plain containers only (never code)."""
    load = torch.load           # first, so that a missing torch is reported as such
    _regular_file(path)
    try:
        return load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ExportError(path, e.strerror or str(e)) from None
    except Exception as e:      # torch.load has no one error for "not a torch.save file"
        raise ExportError(path, f"not a torch.save file of tensors ({type(e).__name__})") from None


def _check_tensors(path, saved):
    """saved, read from path, checked to be a dict of floating-point tensors by name."""
    if not isinstance(saved, dict):
        raise ExportError(path, f"expected a dict of tensors by name, not a {type(saved).__name__}")
    for name, value in saved.items():
        if not isinstance(name, str):
            raise ExportError(path, f"tensor name {name!r} is not a string")
        _check_tensor(path, name, value)
    return saved


def _check_tensor(path, name, value):
    """Raise ExportError naming path unless value is a floating-point tensor."""
    if not isinstance(value, torch.Tensor):
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
    """Read a save_reference() file."""
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
    state_dict = {k: v.float() for k, v in _check_tensors(path, saved["state_dict"]).items()}
    check_state_dict(args, state_dict, path)
    return args, state_dict


# Meta's own release: params.json beside consolidated.00.pth, .01.pth, ... one
# file per model-parallel rank. Names are already ours, RoPE already interleaved.

META_MAX_SEQ_LEN = 2048         # params.json does not say; --max-seq-len overrides


def _merge_meta_shards(name, shards, dim):
    """Concatenate one tensor's model-parallel slices back into the whole tensor.

    Column-parallel layers (wq, wk, wv, w1, w3, output) split their output rows,
    row-parallel ones (wo, w2) their input columns. Norms are replicated. The
    token embedding is split on dim (Llama 2) or on vocab (Llama 3): its width
    tells which."""
    if len(shards) == 1 or shards[0].dim() < 2:
        return shards[0]
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return torch.cat(shards, dim=1)
    if name == "tok_embeddings.weight" and shards[0].shape[1] != dim:
        return torch.cat(shards, dim=1)
    return torch.cat(shards, dim=0)


def load_meta(directory):
    """Read Meta's params.json and consolidated.*.pth from directory.

    hidden_dim is read off the w1 weight rather than recomputed from
    multiple_of and ffn_dim_multiplier; vocab_size off the embedding (Llama 2's
    params.json says -1). max_seq_len is META_MAX_SEQ_LEN."""
    params_path = os.path.join(_directory(directory), "params.json")
    params = _read_json(params_path)

    def field(key, kind, default=REQUIRED):
        return _json_field(params, key, kind, params_path, default)

    if field("use_scaled_rope", bool, False):
        raise ExportError(params_path, "use_scaled_rope (Llama 3.1 RoPE scaling) is not implemented")
    dim, n_heads, n_layers = field("dim", int), field("n_heads", int), field("n_layers", int)
    norm_eps = field("norm_eps", float)
    names = sorted(n for n in os.listdir(directory) if re.fullmatch(r"consolidated\.\d+\.pth", n))
    if not names:
        raise ExportError(directory, "no consolidated.*.pth files")
    paths = [os.path.join(directory, n) for n in names]
    shards = [_check_tensors(path, _torch_load(path)) for path in paths]
    for path, shard in zip(paths[1:], shards[1:]):
        if set(shard) != set(shards[0]):
            raise ExportError(path, f"holds other tensors than {names[0]}")
        for name, tensor in shard.items():
            if tensor.shape != shards[0][name].shape:
                raise ExportError(path, f"{name}: shape {tuple(tensor.shape)}, but {tuple(shards[0][name].shape)} "
                                        f"in {names[0]}")
    state_dict = {name: _merge_meta_shards(name, [s[name] for s in shards], dim).float()
                  for name in shards[0]
                  if name != "rope.freqs"}     # Llama 1's RoPE table: we compute it
    try:
        hidden_dim = state_dict["layers.0.feed_forward.w1.weight"].shape[0]
        vocab_size = state_dict["tok_embeddings.weight"].shape[0]
    except KeyError as e:
        raise ExportError(directory, f"tensor {e.args[0]} is missing") from None
    args = _model_args(params_path, dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=field("n_kv_heads", int, n_heads), head_dim=dim // n_heads,
                       vocab_size=vocab_size, max_seq_len=META_MAX_SEQ_LEN,
                       rope_theta=field("rope_theta", float, 10000.0), norm_eps=norm_eps,
                       tied="output.weight" not in state_dict)
    check_state_dict(args, state_dict, directory)
    return args, state_dict


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
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    if m and m.group(2) in HF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{HF_LAYER_NAMES[m.group(2)]}.weight"
    if re.fullmatch(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", name):
        return None                 # older files save the RoPE frequencies: we compute them
    raise ValueError(f"unexpected tensor {name}")


def _hf_tensors(directory):
    """Every tensor of a Hugging Face directory, as (file, name, tensor).

    The index, when there is one, names the shard files; otherwise the
    weights are one model.safetensors or one pytorch_model.bin."""
    for weights in ("model.safetensors", "pytorch_model.bin"):
        index_path = os.path.join(directory, weights + ".index.json")
        if os.path.exists(index_path):
            weight_map = _json_field(_read_json(index_path), "weight_map", dict, index_path)
            if not all(isinstance(file, str) and file for file in weight_map.values()):
                raise ExportError(index_path, "weight_map: expected a file name for each tensor")
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(directory, weights)):
            files = [weights]
        else:
            continue
        for file in files:
            path = os.path.join(directory, file)
            if weights == "model.safetensors":
                yield from ((path, name, tensor) for name, tensor in _read_safetensors(path))
            else:
                for name, tensor in _check_tensors(path, _torch_load(path)).items():
                    yield path, name, tensor
        return
    raise ExportError(directory, "no model.safetensors or pytorch_model.bin (nor a sharded index of either)")


def _read_safetensors(path):
    """Each (name, torch tensor) of a safetensors file, read as they are asked for."""
    need("torch")               # the tensors come as torch's
    safe_open = need("safetensors").safe_open
    _regular_file(path)
    try:
        st = safe_open(path, framework="pt")
        names = list(st.keys())
    except Exception as e:      # SafetensorError and OSError name no file
        raise ExportError(path, f"not a safetensors file ({e})") from None
    for name in names:
        try:
            tensor = st.get_tensor(name)
        except Exception as e:
            raise ExportError(path, f"{name}: {e}") from None
        yield name, tensor


def hf_to_interleaved(w, n_heads, head_dim):
    """Permute the rows of an HF q_proj or k_proj weight to Meta's RoPE layout.

    Hugging Face rotates the halves (x[j], x[j + head_dim/2]) of each head,
    Meta the neighbours (x[2j], x[2j+1]). Within each head, HF row j becomes
    row 2j and HF row head_dim/2 + j becomes row 2j + 1. q and k move alike,
    so the scores q.k are unchanged and RoPE pairs the same numbers."""
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def load_hf(directory):
    """Read a Hugging Face LlamaForCausalLM directory (bf16 and f16 become float32).

    Refuses what the reference does not compute: RoPE scaling, biases, other
    activations. Optional config fields take LlamaConfig's defaults."""
    config_path = os.path.join(_directory(directory), "config.json")
    config = _read_json(config_path)

    def field(key, kind, default=REQUIRED):
        return _json_field(config, key, kind, config_path, default)

    if config.get("model_type") != "llama":
        raise ExportError(config_path, f"model_type {config.get('model_type')!r}: only 'llama' is supported")
    scaling = field("rope_scaling", dict, {})
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        raise ExportError(config_path, f"rope_scaling {scaling} is not implemented (plain RoPE only)")
    if field("attention_bias", bool, False) or field("mlp_bias", bool, False):
        raise ExportError(config_path, "attention_bias and mlp_bias are not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ExportError(config_path, f"hidden_act {config['hidden_act']!r}: only 'silu' is supported")
    dim, n_heads = field("hidden_size", int), field("num_attention_heads", int)
    args = _model_args(
        config_path, dim=dim, hidden_dim=field("intermediate_size", int), n_layers=field("num_hidden_layers", int),
        n_heads=n_heads, n_kv_heads=field("num_key_value_heads", int, n_heads),
        head_dim=field("head_dim", int, dim // n_heads), vocab_size=field("vocab_size", int),
        max_seq_len=field("max_position_embeddings", int, 2048), rope_theta=field("rope_theta", float, 10000.0),
        norm_eps=field("rms_norm_eps", float, 1e-6), tied=field("tie_word_embeddings", bool, False))

    shapes, state_dict = dict(checkpoint_tensors(args)), {}
    for path, hf_name, tensor in _hf_tensors(directory):
        try:
            name = _hf_name(hf_name)
        except ValueError as e:
            raise ExportError(path, str(e)) from None
        if name is None or (name == "output.weight" and args.tied):
            continue                # a tied lm_head is the embedding, saved twice
        _check_tensor(path, hf_name, tensor)
        if tuple(tensor.shape) != shapes[name]:
            raise ExportError(path, f"{hf_name}: expected shape {shapes[name]}, got {tuple(tensor.shape)}")
        if name in state_dict:
            raise ExportError(path, f"{hf_name} appears twice")
        tensor = tensor.float()
        if name.endswith("attention.wq.weight"):
            tensor = hf_to_interleaved(tensor, args.n_heads, args.head_dim)
        elif name.endswith("attention.wk.weight"):
            tensor = hf_to_interleaved(tensor, args.n_kv_heads, args.head_dim)
        state_dict[name] = tensor
    check_state_dict(args, state_dict, directory)
    return args, state_dict


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
    size = os.path.getsize(_regular_file(path))
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
    try:
        floats = np.fromfile(path, dtype="<f4", offset=LLAMA2C_HEADER.size)
    except OSError as e:
        raise ExportError(path, e.strerror) from None
    state_dict, at = {}, 0
    for name, shape in tensors:
        n = math.prod(shape)
        if not name.startswith("freq_cis"):
            state_dict[name] = torch.from_numpy(floats[at:at + n].reshape(shape).copy())
        at += n
    return args, state_dict


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
# hf_to_interleaved), so q and k are taken as they are. The quantized types
# are decoded here to float32; each block of 32 weights in row order:
#
#   Q4_0  18 bytes   +--------+--------------------+
#                    | f16 d  | u8 qs[16]          |   w[j]      = ((qs[j] & 15) - 8) * d
#                    +--------+--------------------+   w[j + 16] = ((qs[j] >> 4) - 8) * d
#   Q4_1  20 bytes   +--------+--------+--------------------+
#                    | f16 d  | f16 m  | u8 qs[16]          |   w[j]      = (qs[j] & 15) * d + m
#                    +--------+--------+--------------------+   w[j + 16] = (qs[j] >> 4) * d + m
#   Q8_0  34 bytes   +--------+--------------------------------+
#                    | f16 d  | i8 qs[32]                      |   w[j] = qs[j] * d
#                    +--------+--------------------------------+
#   F32, F16, BF16   one weight per element (BF16: the top half of an f32)
#
# (j = 0..15 for the 4-bit types, 0..31 for Q8_0; d and m are f16, the
# arithmetic float32, as in ggml's dequantize_row_*.)

GGUF_TYPES = {              # ggml type id: (name, weights per block, bytes per block)
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2),
}
GGUF_NAMES = {              # GGUF tensor name -> ours ({i}: the layer)
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
GGUF_LAYER_NAMES = {        # blk.{i}.X.weight -> layers.{i}.Y.weight
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}


def gguf_dequantize(raw, ggml_type):
    """The float32 weights that the raw bytes of a GGUF tensor of ggml_type
    hold, flat, in file order. raw: a uint8 array, a whole number of blocks."""
    if ggml_type not in GGUF_TYPES:
        raise ValueError(f"ggml type {ggml_type} is not one of F32, F16, BF16, Q4_0, Q4_1, Q8_0")
    name, per_block, block_bytes = GGUF_TYPES[ggml_type]
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size % block_bytes:
        raise ValueError(f"{raw.size} bytes are not a whole number of {name} blocks of {block_bytes}")
    if name == "F32":
        return raw.view("<f4").astype(np.float32)
    if name == "F16":
        return raw.view("<f2").astype(np.float32)
    if name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    blocks = raw.reshape(-1, block_bytes)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)                # (blocks, 1)
    if name == "Q8_0":
        return (blocks[:, 2:].copy().view(np.int8).astype(np.float32) * d).reshape(-1)
    qs = blocks[:, block_bytes - 16:]                                      # (blocks, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)    # (blocks, 32)
    if name == "Q4_0":
        return ((q - 8) * d).reshape(-1)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    return (q * d + m).reshape(-1)


def _gguf_reader(source):
    """A gguf.GGUFReader of source (a path, or a reader already open)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    gguf = need("gguf")     # it imports numpy and pyyaml
    _regular_file(source)
    try:
        return gguf.GGUFReader(source)
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
    """Read a GGUF file of the llama architecture (the tensors become float32 numpy arrays).

    source: a path or an open gguf.GGUFReader. Everything comes from the
    file's metadata; refuses what the reference does not compute (RoPE
    scaling, partial rotary, biases, other architectures)."""
    path = source if isinstance(source, (str, os.PathLike)) else source.data.filename
    reader = _gguf_reader(source)

    def meta(key, default=None):
        value = gguf_metadata(reader, key, default)
        if value is None:
            raise ExportError(path, f"metadata {key} is missing")
        return value

    arch = meta("general.architecture")
    if arch != "llama":
        raise ExportError(path, f"general.architecture {arch!r}: only 'llama' is supported")
    scaling = meta("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ExportError(path, f"llama.rope.scaling.type {scaling!r} is not implemented (plain RoPE only)")
    n_heads, dim = meta("llama.attention.head_count"), meta("llama.embedding_length")
    if not all(isinstance(n, int) and n > 0 for n in (n_heads, dim)):
        raise ExportError(path, f"llama.attention.head_count {n_heads!r}, llama.embedding_length {dim!r}: "
                                "expected positive integers")
    head_dim = meta("llama.attention.key_length", meta("llama.rope.dimension_count", dim // n_heads))
    if meta("llama.attention.value_length", head_dim) != head_dim:
        raise ExportError(path, "llama.attention.value_length differs from key_length")
    if meta("llama.rope.dimension_count", head_dim) != head_dim:
        raise ExportError(path, f"llama.rope.dimension_count {meta('llama.rope.dimension_count')}: "
                                f"RoPE over part of a head of {head_dim} is not implemented")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ExportError(path, "tensor token_embd.weight is missing")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])
    args = _model_args(
        path, dim=dim, hidden_dim=meta("llama.feed_forward_length"), n_layers=meta("llama.block_count"),
        n_heads=n_heads, n_kv_heads=meta("llama.attention.head_count_kv", n_heads), head_dim=head_dim,
        vocab_size=vocab_size, max_seq_len=meta("llama.context_length"),
        rope_theta=meta("llama.rope.freq_base", 10000.0), norm_eps=meta("llama.attention.layer_norm_rms_epsilon"),
        tied="output.weight" not in tensors)

    state_dict = {}
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if t.name in GGUF_NAMES:
            name = GGUF_NAMES[t.name]
        elif m and m.group(2) in GGUF_LAYER_NAMES:
            name = f"layers.{m.group(1)}.{GGUF_LAYER_NAMES[m.group(2)]}.weight"
        else:               # rope_freqs (Llama 3.1 scaling), biases, other architectures' tensors
            raise ExportError(path, f"unexpected tensor {t.name}")
        shape = tuple(int(n) for n in reversed(t.shape))     # GGUF lists the fastest axis first
        try:
            weights = gguf_dequantize(t.data.view(np.uint8), int(t.tensor_type))
        except ValueError as e:
            raise ExportError(path, f"{t.name}: {e}") from None
        if weights.size != math.prod(shape):
            raise ExportError(path, f"{t.name}: {weights.size} weights for shape {shape}")
        state_dict[name] = weights.reshape(shape)
    check_state_dict(args, state_dict, path)
    return args, state_dict


# ----------------------------------------------------------------------------
# Tokenizer export
#
# One file format serves both kinds of tokenizer run.c knows: sentencepiece
# BPE (Llama 2, from tokenizer.model) and byte-level BPE (GPT-2 style, from a
# Hugging Face tokenizer.json). tokenizer.c reads it; the drawing is the one
# in docs/FORMATS.md and at the top of tokenizer.c (little-endian):
#
#   offset  size  type     field
#   ------  ----  -------  ------------------------------------------------
#        0     4  char[4]  magic "LTOK"
#        4     4  u32      version = 1
#        8     4  u32      kind            0 sentencepiece BPE, 1 byte-level BPE
#       12     4  i32      vocab_size      number of token records
#       16     4  i32      bos_id          -1: none
#       20     4  i32      eos_id          -1: none
#       24     4  i32      pad_id          -1: none
#       28     4  i32      unk_id          -1: none (sentencepiece needs one)
#       32     4  u32      flags           bit 0  add BOS when encoding a prompt
#                                          bit 1  add dummy prefix ("▁" / " ")
#                                          bit 2  remove extra whitespaces (sp)
#                                          bit 3  byte fallback (sp)
#                                          bit 4  ignore merges: a pre-token that
#                                                 is a token is kept whole (bl)
#       36     4  u32      pretokenizer    0 none, 1 GPT-2 regex,
#                                          2 digits one by one, then GPT-2 regex
#                                          3 Llama 3 regex
#       40     4  u32      chat_template   0 none, 1 llama2 [INST], 2 chatml
#       44     4  u32      n_merges        0 for sentencepiece
#       48     4  u32      max_token_length  bytes in the longest token
#       52     4  u32      system_len      bytes of the default system prompt (0: none)
#       56     8  zero     reserved
#       64        vocab_size token records, id 0 first:
#                   u32   len             1 .. max_token_length
#                   f32   score           sentencepiece merge score (bl: 0)
#                   u8    type            1 normal, 2 unknown, 3 control,
#                                         4 user-defined, 5 unused, 6 byte
#                   u8    bytes[len]      the token's text; sentencepiece
#                                         keeps "▁", byte-level tokens are
#                                         raw bytes (GPT-2's byte-to-unicode
#                                         mapping undone); a byte token is
#                                         the text "<0xXX>"
#                 n_merges merge records, rank = index (byte-level only):
#                   i32   left, right, result    token ids; the bytes of
#                                         result are left's then right's
#                 u8 system[system_len]   the chat template's default system
#                                         prompt (UTF-8, no NUL), for chat
#                                         when the user gives none
#                 the file ends here.
#
# Byte-level: type 3 (control) marks special added tokens, type 4 added tokens
# that are not special; tokenizer.c matches both whole in the input text and
# skips only the special ones when decoding. The llama2.c tokenizer.bin is
# read by tokenizer.c as it is; nothing here writes it.

import json as _json
import os as _os
import struct as _struct

TOKENIZER_MAGIC = b"LTOK"
TOKENIZER_VERSION = 1
TOKENIZER_HEADER = _struct.Struct("<4sIIiiiiiIIIIII8x")   # 64 bytes
TOK_SENTENCEPIECE, TOK_BYTELEVEL = 0, 1
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6
TOKF_ADD_BOS, TOKF_DUMMY_PREFIX, TOKF_REMOVE_EXTRA_WS, TOKF_BYTE_FALLBACK, TOKF_IGNORE_MERGES = 1, 2, 4, 8, 16
PRETOK_NONE, PRETOK_GPT2, PRETOK_DIGITS_GPT2, PRETOK_LLAMA3 = 0, 1, 2, 3
CHAT_NONE, CHAT_LLAMA2, CHAT_CHATML = 0, 1, 2


def write_tokenizer(path, kind, tokens, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=-1, flags=0,
                    pretokenizer=PRETOK_NONE, chat_template=CHAT_NONE, merges=(), system_prompt="", source=None):
    """Writes an LTOK file. tokens: [(bytes, score, type)] in id order;
    merges: [(left, right, result)] in rank order; system_prompt: the chat
    template's default system prompt ("" for none); source: the file they
    come from, which an ExportError names (default: path). Returns the file size."""
    source = path if source is None else source
    n = len(tokens)
    if not n:
        raise ExportError(source, "no tokens")
    for name, v in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id), ("unk_id", unk_id)):
        if not (isinstance(v, int) and -1 <= v < n):
            raise ExportError(source, f"{name} {v!r} is outside -1..{n - 1}")
    for i, (b, _, ty) in enumerate(tokens):
        if not b:
            raise ExportError(source, f"token {i} is empty")
        if not PIECE_NORMAL <= ty <= PIECE_BYTE:
            raise ExportError(source, f"token {i} has unknown type {ty}")
    for r, (a, b, c) in enumerate(merges):
        if not (0 <= a < n and 0 <= b < n and 0 <= c < n) or tokens[c][0] != tokens[a][0] + tokens[b][0]:
            raise ExportError(source, f"merge {r} ({a}, {b}) -> {c} is not a concatenation of tokens")
    system = system_prompt.encode("utf-8")
    if b"\0" in system:
        raise ExportError(source, "the default system prompt contains a NUL character")
    max_len = max(len(b) for b, _, _ in tokens)
    with open(path, "wb") as f:
        f.write(TOKENIZER_HEADER.pack(TOKENIZER_MAGIC, TOKENIZER_VERSION, kind, n, bos_id, eos_id, pad_id,
                                      unk_id, flags, pretokenizer, chat_template, len(merges), max_len,
                                      len(system)))
        for b, score, ty in tokens:
            f.write(_struct.pack("<IfB", len(b), score, ty))
            f.write(b)
        for m in merges:
            f.write(_struct.pack("<iii", *m))
        f.write(system)
        return f.tell()


def read_tokenizer(path):
    """Reads an LTOK file back into a dict (for tests and inspection)."""
    with open(path, "rb") as f:
        data = f.read()
    (magic, version, kind, n, bos, eos, pad, unk, flags, pretok, chat, n_merges,
     max_len, system_len) = TOKENIZER_HEADER.unpack_from(data, 0)
    if magic != TOKENIZER_MAGIC or version != TOKENIZER_VERSION:
        raise ExportError(path, f"not an LTOK version {TOKENIZER_VERSION} file")
    pos, tokens = TOKENIZER_HEADER.size, []
    for _ in range(n):
        length, score, ty = _struct.unpack_from("<IfB", data, pos)
        pos += 9
        tokens.append((data[pos:pos + length], score, ty))
        pos += length
    merges = [_struct.unpack_from("<iii", data, pos + 12 * r) for r in range(n_merges)]
    system = data[pos + 12 * n_merges:pos + 12 * n_merges + system_len].decode("utf-8")
    return dict(kind=kind, tokens=tokens, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk, flags=flags,
                pretokenizer=pretok, chat_template=chat, merges=merges, max_token_length=max_len,
                system_prompt=system)


# sentencepiece's tokenizer.model is a protobuf (sentencepiece_model.proto),
# read with the classes that the sentencepiece package ships (they need protobuf).

def read_sentencepiece_model(path):
    """The parts of a sentencepiece ModelProto that tokenization depends on:
    pieces [(text, score, type)], and the trainer and normalizer settings.
    Parsed with the protobuf classes sentencepiece ships (python3-protobuf)."""
    proto = need("sentencepiece.sentencepiece_model_pb2").ModelProto()
    data = _read_bytes(path)
    try:
        proto.ParseFromString(data)
    except Exception as e:      # protobuf's DecodeError names no file
        raise ExportError(path, f"not a sentencepiece model ({e})") from None
    if not proto.pieces:
        raise ExportError(path, "not a sentencepiece model (no pieces)")
    t, n = proto.trainer_spec, proto.normalizer_spec
    trainer = dict(model_type=t.model_type, byte_fallback=t.byte_fallback,
                   treat_whitespace_as_suffix=t.treat_whitespace_as_suffix,
                   unk_piece=t.unk_piece, bos_piece=t.bos_piece, eos_piece=t.eos_piece,
                   pad_piece=t.pad_piece, unk_surface=t.unk_surface)
    normalizer = dict(name=n.name, precompiled_charsmap=n.precompiled_charsmap,
                      add_dummy_prefix=n.add_dummy_prefix,
                      remove_extra_whitespaces=n.remove_extra_whitespaces,
                      escape_whitespaces=n.escape_whitespaces)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    return dict(pieces=pieces, trainer=trainer, normalizer=normalizer,
                denormalizer_charsmap=proto.denormalizer_spec.precompiled_charsmap)


def write_tokenizer_sentencepiece(model_path, out_path, vocab_size=None):
    """Converts a sentencepiece BPE tokenizer.model (Llama 2's) into an LTOK
    file. Refuses what tokenizer.c would not reproduce exactly: other model
    types, a normalization rule table (NFKC and the like), whitespace as
    suffix, unescaped spaces. vocab_size: the model's, checked if given.
    Returns the file size."""
    m = read_sentencepiece_model(model_path)
    tr, nm = m["trainer"], m["normalizer"]
    if tr["model_type"] != 2:
        kinds = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
        raise ExportError(model_path, f"a {kinds.get(tr['model_type'], '?')} model; "
                                      "only sentencepiece BPE is supported")
    if nm["precompiled_charsmap"] or m["denormalizer_charsmap"]:
        raise ExportError(model_path, f"normalization rule '{nm['name']}' is not supported "
                                      "(train with normalization_rule_name=identity, as Llama does)")
    if tr["treat_whitespace_as_suffix"] or not nm["escape_whitespaces"]:
        raise ExportError(model_path, "treat_whitespace_as_suffix / escape_whitespaces=false are not supported")
    if tr["unk_surface"] != " \u2047 ":
        raise ExportError(model_path, "a custom unk_surface is not supported")
    pieces = m["pieces"]
    if vocab_size is not None and len(pieces) != vocab_size:
        raise ExportError(model_path, f"{len(pieces)} pieces but the model has {vocab_size} tokens")
    tokens = [(p.encode("utf-8"), score, ty) for p, score, ty in pieces]

    # sentencepiece's PieceToId: reserved pieces (control, unknown, byte) first
    reserved, normal = {}, {}
    for i, (p, _, ty) in enumerate(pieces):
        (reserved if ty in (PIECE_CONTROL, PIECE_UNKNOWN, PIECE_BYTE) else normal).setdefault(p, i)

    def special_id(name, want):
        i = reserved.get(name, normal.get(name, -1))
        return i if i >= 0 and pieces[i][2] == want else -1

    unk = [i for i, (_, _, ty) in enumerate(pieces) if ty == PIECE_UNKNOWN]
    if len(unk) != 1:
        raise ExportError(model_path, f"{len(unk)} unknown pieces; sentencepiece needs exactly one")
    bos = special_id(tr["bos_piece"], PIECE_CONTROL)
    flags = TOKF_ADD_BOS if bos >= 0 else 0
    if nm["add_dummy_prefix"]:
        flags |= TOKF_DUMMY_PREFIX
    if nm["remove_extra_whitespaces"]:
        flags |= TOKF_REMOVE_EXTRA_WS
    if tr["byte_fallback"]:
        flags |= TOKF_BYTE_FALLBACK
    return write_tokenizer(out_path, TOK_SENTENCEPIECE, tokens, bos_id=bos,
                           eos_id=special_id(tr["eos_piece"], PIECE_CONTROL),
                           pad_id=special_id(tr["pad_piece"], PIECE_CONTROL), unk_id=unk[0], flags=flags,
                           chat_template=CHAT_LLAMA2, source=model_path)


# Byte-level BPE: GPT-2's tokenizer.json stores each token as text in which
# every byte is a printable character (bytes_to_unicode below); the file
# stores the bytes themselves.

def gpt2_bytes_to_unicode():
    """GPT-2's map from byte value to the character that stands for it."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _hf_token_bytes(text, char_to_byte):
    """The bytes Hugging Face's ByteLevel decoder makes of a token: mapped
    back through the byte alphabet when every character is in it, else the
    token's own UTF-8."""
    if all(c in char_to_byte for c in text):
        return bytes(char_to_byte[c] for c in text)
    return text.encode("utf-8")


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _hf_pretokenizer(pre, path):
    """(pretokenizer kind, add_prefix_space) for the pre_tokenizers run.c knows."""
    def byte_level(p, regex=True):
        return isinstance(p, dict) and p.get("type") == "ByteLevel" and p.get("use_regex", True) == regex

    seq = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else []
    seq = seq if isinstance(seq, list) else []
    if byte_level(pre):
        return PRETOK_GPT2, bool(pre.get("add_prefix_space", False))
    if (len(seq) == 2 and seq[0] == {"type": "Digits", "individual_digits": True} and byte_level(seq[1])):
        return PRETOK_DIGITS_GPT2, bool(seq[1].get("add_prefix_space", False))
    if (len(seq) == 2 and isinstance(seq[0], dict) and seq[0].get("type") == "Split"
            and seq[0].get("pattern") == {"Regex": LLAMA3_PATTERN} and seq[0].get("behavior") == "Isolated"
            and not seq[0].get("invert") and byte_level(seq[1], regex=False)):
        return PRETOK_LLAMA3, bool(seq[1].get("add_prefix_space", False))
    raise ExportError(path, f"pre_tokenizer {_json.dumps(pre)[:200]} is not supported "
                            "(ByteLevel with the GPT-2 regex, optionally after Digits(individual_digits); "
                            "or Llama 3's Split regex, then ByteLevel)")


def _json_type(value):
    """What a tokenizer.json component is, for a message: its "type", else the value."""
    return value.get("type") if isinstance(value, dict) else value


def _is_id(value):
    """Whether a JSON value is a token id: an integer from 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def write_tokenizer_hf_json(json_path, out_path, vocab_size=None, bos_token=None, eos_token=None):
    """Converts a Hugging Face tokenizer.json with a byte-level BPE model
    (GPT-2, SmolLM2) into an LTOK file. BOS and EOS are the tokens named by
    bos_token / eos_token, else by tokenizer_config.json beside the file;
    BOS is added to prompts when the post-processor puts it first. Refuses
    what tokenizer.c would not reproduce exactly. Returns the file size."""
    tj = _read_json(json_path)
    model = _json_field(tj, "model", dict, json_path)
    if model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise ExportError(json_path, f"model type {model.get('type')!r}; only BPE is supported")
    if tj.get("normalizer") is not None:
        raise ExportError(json_path, f"a normalizer ({_json_type(tj['normalizer'])}) is not supported")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ExportError(json_path, f"BPE {key} is not supported")
    if model.get("byte_fallback") or model.get("dropout"):
        raise ExportError(json_path, "BPE byte_fallback / dropout is not supported")
    decoder = tj.get("decoder")
    if _json_type(decoder) != "ByteLevel":
        raise ExportError(json_path, f"decoder {_json_type(decoder)!r}; only ByteLevel is supported")
    pretok, prefix = _hf_pretokenizer(tj.get("pre_tokenizer"), json_path)

    vocab = dict(_json_field(model, "vocab", dict, json_path))
    for text, i in vocab.items():
        if not _is_id(i):
            raise ExportError(json_path, f"token {text!r} has id {i!r}: expected an integer from 0 up")
    added = _json_field(tj, "added_tokens", list, json_path, [])
    for a in added:
        if not (isinstance(a, dict) and isinstance(a.get("content"), str) and a["content"] and _is_id(a.get("id"))):
            raise ExportError(json_path, f"added token {_json.dumps(a)[:80]}: expected its content and id")
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            raise ExportError(json_path, f"added token {a['content']!r} uses lstrip/rstrip/single_word")
        vocab.setdefault(a["content"], a["id"])
    ids = set(vocab.values()) | {a["id"] for a in added}
    if not ids:
        raise ExportError(json_path, "no tokens")
    n = max(ids) + 1
    if n > len(ids):            # found without a list as long as the largest id
        hole = min(set(range(len(ids) + 1)) - ids)
        raise ExportError(json_path, f"no token has id {hole} ({n - len(ids)} ids unused)")
    by_id = [None] * n
    for text, i in vocab.items():
        if by_id[i] is None:
            by_id[i] = text
    if vocab_size is not None and n != vocab_size:
        raise ExportError(json_path, f"{n} tokens but the model has {vocab_size}")

    char_to_byte = {c: b for b, c in gpt2_bytes_to_unicode().items()}
    tokens = [[_hf_token_bytes(text, char_to_byte), 0.0, PIECE_NORMAL] for text in by_id]
    for a in added:
        # matched in the text by their content; special ones decode to nothing
        tokens[a["id"]] = [a["content"].encode("utf-8"), 0.0, PIECE_CONTROL if a.get("special") else PIECE_USER]
    tokens = [tuple(x) for x in tokens]

    merges = []
    for r, m in enumerate(_json_field(model, "merges", list, json_path)):
        pair = m.split(" ", 1) if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ExportError(json_path, f"merge {r} {_json.dumps(m)[:80]} is not a pair of tokens")
        left, right = pair
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise ExportError(json_path, f"merge {r} ({left!r}, {right!r}) names a token not in the vocab")
        merges.append((vocab[left], vocab[right], vocab[left + right]))
    seen = set()
    for r, (a, b, _) in enumerate(merges):
        if (a, b) in seen:
            raise ExportError(json_path, f"merge {r} repeats an earlier pair")
        seen.add((a, b))

    # BOS and EOS: from the arguments, else tokenizer_config.json
    config = {}
    config_path = _os.path.join(_os.path.dirname(_os.path.abspath(json_path)), "tokenizer_config.json")
    if _os.path.isfile(config_path):
        config = _read_json(config_path)

    def token_id(name, given):
        value = given if given is not None else config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            return -1
        if not (isinstance(value, str) and value in vocab):
            raise ExportError(json_path if given is not None else config_path, f"{name} {value!r} is not a token")
        return vocab[value]

    bos, eos = token_id("bos_token", bos_token), token_id("eos_token", eos_token)
    flags = TOKF_DUMMY_PREFIX if prefix else 0
    if model.get("ignore_merges"):
        flags |= TOKF_IGNORE_MERGES
    post = tj.get("post_processor")
    if _json_type(post) == "TemplateProcessing":
        single = post.get("single")
        if not (isinstance(single, list) and all(isinstance(s, dict) for s in single)):
            raise ExportError(json_path, f"post_processor template {_json.dumps(single)[:80]} is not [BOS] $A")
        firsts = [s["SpecialToken"].get("id") for s in single[:1] if isinstance(s.get("SpecialToken"), dict)]
        if len(single) != 1 + len(firsts) or not any("Sequence" in s for s in single):
            raise ExportError(json_path, f"post_processor template {single} is not [BOS] $A")
        if firsts:
            if not (isinstance(firsts[0], str) and firsts[0] in vocab):
                raise ExportError(json_path, f"post_processor's first token {firsts[0]!r} is not a token")
            bos = vocab[firsts[0]]
            flags |= TOKF_ADD_BOS
    elif post is not None and _json_type(post) != "ByteLevel":
        raise ExportError(json_path, f"post_processor {_json_type(post)} is not supported")
    chat = CHAT_CHATML if "<|im_start|>" in vocab and "<|im_end|>" in vocab else CHAT_NONE
    unk = model.get("unk_token")
    unk_id = vocab[unk] if isinstance(unk, str) and unk in vocab else -1
    return write_tokenizer(out_path, TOK_BYTELEVEL, tokens, bos_id=bos, eos_id=eos, unk_id=unk_id,
                           flags=flags, pretokenizer=pretok, chat_template=chat, merges=merges, source=json_path)


# ----------------------------------------------------------------------------
# Tokenizer export from GGUF
#
# A GGUF file carries its tokenizer in its metadata, under llama.cpp's names:
#
#   tokenizer.ggml.model        "gpt2": byte-level BPE, the kind read here
#   tokenizer.ggml.pre          the pre-tokenizer, by llama.cpp's name for it
#   tokenizer.ggml.tokens       each token's text, in id order; normal tokens
#                               in GPT-2's byte alphabet, added ones as they are
#   tokenizer.ggml.token_type   1 normal, 3 control, 4 user-defined, 5 unused:
#                               the LTOK piece types, with the same numbers
#   tokenizer.ggml.merges       "left right", in rank order
#   tokenizer.ggml.{bos,eos,padding,unknown}_token_id
#   tokenizer.ggml.add_bos_token, tokenizer.ggml.add_space_prefix
#   tokenizer.chat_template     Jinja; run.c knows ChatML and Llama 2's [INST]
#
# llama.cpp names a pre-tokenizer after the Hugging Face tokenizers it found
# it in; each name below stands for the pre_tokenizer of tokenizer.json that
# tokenizer.c implements (llama.cpp's regexes for these names agree).

GGUF_PRETOKENIZERS = {      # tokenizer.ggml.pre -> (LTOK pretokenizer, extra flags)
    "gpt-2": (PRETOK_GPT2, 0),                          # ByteLevel
    "smollm": (PRETOK_DIGITS_GPT2, 0),                  # Digits(individual_digits), ByteLevel
    "starcoder": (PRETOK_DIGITS_GPT2, 0),
    "llama-bpe": (PRETOK_LLAMA3, TOKF_IGNORE_MERGES),   # Llama 3: its Split regex, ByteLevel
}


def gguf_chat_template(template):
    """(chat_template kind, default system prompt) for a GGUF's Jinja chat template.

    ChatML when the template writes <|im_start|>, Llama 2 when it writes
    [INST]. The default system prompt is the text of a system turn written
    out literally in the template, the one it puts first when a conversation
    brings none (SmolLM2's does); "" when there is none."""
    if not template:
        return CHAT_NONE, ""
    if "<|im_start|>" in template:
        m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S)
        text = m.group(1) if m else ""
        # a literal, not an expression such as ' + message['content'] + '
        if any(c in text for c in "'\"{}+") or "\\" in text.replace("\\n", ""):
            text = ""
        return CHAT_CHATML, text.replace("\\n", "\n")
    if "[INST]" in template:
        return CHAT_LLAMA2, ""
    return CHAT_NONE, ""


def write_tokenizer_gguf(source, out_path, vocab_size=None):
    """Converts the byte-level BPE tokenizer in a GGUF file's metadata into
    an LTOK file. source: a path or an open gguf.GGUFReader. Refuses what
    tokenizer.c would not reproduce exactly. Returns the file size."""
    path = source if isinstance(source, (str, os.PathLike)) else source.data.filename
    reader = _gguf_reader(source)

    def meta(key, default, kind, item=None):
        """The value of key, checked to be a kind (a list: of items of item)."""
        value = gguf_metadata(reader, key, default)
        if not isinstance(value, kind) or (item and not all(isinstance(x, item) for x in value)):
            raise ExportError(path, f"metadata {key}: expected " +
                              (f"a list of {item.__name__}" if item else kind.__name__))
        return value

    kind = meta("tokenizer.ggml.model", None, (str, type(None)))
    if kind != "gpt2":
        raise ExportError(path, f"tokenizer.ggml.model {kind!r}; only 'gpt2' (byte-level BPE) is read from GGUF")
    pre = meta("tokenizer.ggml.pre", "default", str)
    if pre not in GGUF_PRETOKENIZERS:
        raise ExportError(path, f"tokenizer.ggml.pre {pre!r} is not supported "
                                f"({', '.join(sorted(GGUF_PRETOKENIZERS))})")
    pretok, flags = GGUF_PRETOKENIZERS[pre]
    texts = meta("tokenizer.ggml.tokens", [], list, str)
    types = meta("tokenizer.ggml.token_type", [], list, int)
    if not texts or len(types) != len(texts):
        raise ExportError(path, f"{len(texts)} tokens but {len(types)} token types")
    if vocab_size is not None and len(texts) != vocab_size:
        raise ExportError(path, f"{len(texts)} tokens but the model has {vocab_size}")

    char_to_byte = {c: b for b, c in gpt2_bytes_to_unicode().items()}
    tokens, vocab = [], {}
    for i, (text, ty) in enumerate(zip(texts, types)):
        if ty not in (PIECE_NORMAL, PIECE_CONTROL, PIECE_USER, PIECE_UNUSED):
            raise ExportError(path, f"token {i} {text!r} has type {ty}, "
                                    "not normal, control, user-defined or unused")
        # normal tokens are spelled in GPT-2's byte alphabet, added ones in plain UTF-8
        data = _hf_token_bytes(text, char_to_byte) if ty == PIECE_NORMAL else text.encode("utf-8")
        tokens.append((data, 0.0, ty))
        vocab.setdefault(text, i)
    merges = []
    for r, m in enumerate(meta("tokenizer.ggml.merges", [], list, str)):
        left, _, right = m.partition(" ")
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise ExportError(path, f"merge {r} ({left!r}, {right!r}) names a token not in the vocab")
        merges.append((vocab[left], vocab[right], vocab[left + right]))

    ids = [meta(f"tokenizer.ggml.{name}_token_id", -1, int) for name in ("bos", "eos", "padding", "unknown")]
    if meta("tokenizer.ggml.add_bos_token", pre == "llama-bpe", bool):
        flags |= TOKF_ADD_BOS
    if meta("tokenizer.ggml.add_space_prefix", False, bool):
        flags |= TOKF_DUMMY_PREFIX
    chat, system = gguf_chat_template(meta("tokenizer.chat_template", None, (str, type(None))))
    if chat == CHAT_NONE and "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        chat = CHAT_CHATML
    return write_tokenizer(out_path, TOK_BYTELEVEL, tokens, bos_id=ids[0], eos_id=ids[1], pad_id=ids[2],
                           unk_id=ids[3], flags=flags, pretokenizer=pretok, chat_template=chat, merges=merges,
                           system_prompt=system, source=path)


# ----------------------------------------------------------------------------
# Command line

EXAMPLES = """\
examples:
  export.py model.bin --hf ~/TinyLlama-1.1B      model.bin, and tokenizer.bin beside it
  export.py model.bin --llama2c stories15M.bin --max-seq-len 256
  export.py tokenizer.bin --tokenizer-model tokenizer.model
  export.py model.bin --gguf SmolLM2-135M-Instruct.Q4_1.gguf   dequantized; tokenizer.bin beside it
"""


def _source_tokenizer(opts, gguf_reader):
    """The tokenizer file that comes with --meta, --hf or --gguf, or None.

    Meta ships tokenizer.model. Hugging Face Llama 2 repositories carry both
    files, and the sentencepiece model is the original; Llama 3 ones only
    tokenizer.json. A GGUF file carries its tokenizer in its metadata."""
    if opts.meta:
        candidates = [os.path.join(opts.meta, "tokenizer.model")]
    elif opts.hf:
        candidates = [os.path.join(opts.hf, "tokenizer.model"), os.path.join(opts.hf, "tokenizer.json")]
    elif opts.gguf:
        return opts.gguf if gguf_metadata(gguf_reader, "tokenizer.ggml.model") else None
    else:
        return None
    return next((path for path in candidates if os.path.exists(path)), None)


class Outputs:
    """The files one command writes, all or none. Each is written to a
    temporary file beside its target (.NAME.tmp-XXXXXXXX, in the same
    directory, so that a rename moves it) and renamed over the target only
    when every output has been written. If anything fails first, a
    KeyboardInterrupt included, the temporaries are removed and the targets
    are as they were.

        with Outputs() as outputs:
            with outputs.writing("model.bin") as tmp:
                write_checkpoint(tmp, ...)
    """

    def __init__(self):
        self.pending = {}           # target -> temporary file

    def add(self, target):
        """Claim target as an output (early, so that an output that cannot be
        written fails before a long conversion); returns its temporary file."""
        path = os.path.realpath(target)     # through a symlink, as open() would write
        if path in self.pending:
            raise ExportError(target, "named as two outputs")
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as e:
            raise ExportError(target, e.strerror) from None
        if mode is not None and stat.S_ISDIR(mode):
            raise ExportError(target, "is a directory")
        if mode is not None and not stat.S_ISREG(mode):     # a rename would replace /dev/null itself
            raise ExportError(target, "not a regular file")
        if mode is not None and not os.access(path, os.W_OK):
            raise ExportError(target, "Permission denied")
        directory, name = os.path.split(path)
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name[:200]}.tmp-")   # within NAME_MAX
        except OSError as e:
            raise ExportError(target, e.strerror) from None
        os.close(fd)
        self.pending[path] = tmp
        return tmp

    @contextlib.contextmanager
    def writing(self, target):
        """Write target: yields the temporary file to write; a failure to
        write it (a full disk, say) is an ExportError naming target."""
        tmp = self.pending.get(os.path.realpath(target)) or self.add(target)
        try:
            yield tmp
        except OSError as e:
            if e.filename not in (None, tmp):     # not the output's: an input's
                raise
            raise ExportError(target, e.strerror or str(e)) from None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if kind is None:
                self.commit()
        finally:
            self.discard()
        return False

    def commit(self):
        """Rename every temporary file over its target."""
        path = None
        try:
            for path, tmp in self.pending.items():
                _settle(tmp, path)
            for path in list(self.pending):
                os.replace(self.pending.pop(path), path)
        except OSError as e:
            raise ExportError(path, e.strerror) from None

    def discard(self):
        """Remove the temporary files that are not renamed (all of them, after a failure)."""
        for tmp in self.pending.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.pending.clear()


def _settle(tmp, target):
    """Make a finished temporary file ready to replace target: the target's
    mode, or the one a new file gets (mkstemp's is 0600), and its contents on
    disk before the rename."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _reading(path):
    """While path is read: an error that a malformed file can still raise
    from a library or from the checks' blind spots (a KeyError, a TypeError
    on a value of the wrong type) becomes an ExportError naming path. The
    readers check what they expect; this is the net under them."""
    try:
        yield
    except ExportError:
        raise
    except OSError as e:
        raise ExportError(e.filename or path, e.strerror or str(e)) from None
    except MemoryError:
        raise ExportError(path, "out of memory reading it") from None
    except Exception as e:
        raise ExportError(path, f"cannot be read ({type(e).__name__}: {e})") from None


LOADERS = {"reference": load_reference, "meta": load_meta, "hf": load_hf, "llama2c": load_llama2c,
           "gguf": load_gguf}


def convert(opts):
    """Write what the command line asks, all of it or nothing; returns the
    lines that say what was written."""
    with Outputs() as outputs:
        if opts.tokenizer_model:
            with _reading(opts.tokenizer_model), outputs.writing(opts.output) as tmp:
                size = write_tokenizer_sentencepiece(opts.tokenizer_model, tmp)
            return [f"wrote {opts.output}: tokenizer of {opts.tokenizer_model}, {size} bytes"]

        kind = next(k for k in LOADERS if getattr(opts, k))
        source = getattr(opts, kind)
        outputs.add(opts.output)
        with _reading(source):
            gguf_reader = _gguf_reader(source) if opts.gguf else None   # parsed once, for both
            tokenizer = _source_tokenizer(opts, gguf_reader)
        if opts.tokenizer_out and not tokenizer:
            raise ExportError(source, "no tokenizer here for --tokenizer-out")
        tokenizer_out = opts.tokenizer_out or os.path.join(os.path.dirname(opts.output), "tokenizer.bin")
        if tokenizer:
            outputs.add(tokenizer_out)

        with _reading(source):
            args, state_dict = LOADERS[kind](gguf_reader or source)
            if opts.max_seq_len:
                args = dataclasses.replace(args, max_seq_len=opts.max_seq_len)
            check_dtype(args, opts.dtype, source)
            check_max_seq_len(args, source)
        with outputs.writing(opts.output) as tmp:
            size = write_checkpoint(tmp, args, state_dict, opts.dtype)
        report = [f"wrote {opts.output}: {args.describe()}, {opts.dtype}, {size} bytes"]
        if tokenizer:
            with _reading(tokenizer), outputs.writing(tokenizer_out) as tmp:
                if opts.gguf:
                    size = write_tokenizer_gguf(gguf_reader, tmp, args.vocab_size)
                elif tokenizer.endswith(".json"):
                    size = write_tokenizer_hf_json(tokenizer, tmp)
                else:
                    size = write_tokenizer_sentencepiece(tokenizer, tmp)
            report.append(f"wrote {tokenizer_out}: tokenizer of {tokenizer}, {size} bytes")
        return report


def _integer_up_to(most):
    """An argparse type: an integer from 1 to most."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= most:
            raise argparse.ArgumentTypeError(f"expected an integer from 1 to {most}, got {text!r}")
        return value
    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="export.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Write a run.c checkpoint (version 1) from one model source and, when\n"
                    "the source comes with one, its tokenizer; or write a tokenizer alone.")
    parser.add_argument("output", metavar="OUTPUT",
                        help="the file to write: the checkpoint, or the tokenizer with --tokenizer-model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--reference", metavar="PT", help="a file written by save_reference()")
    source.add_argument("--meta", metavar="DIR",
                        help="Meta's release: params.json, consolidated.*.pth and maybe tokenizer.model")
    source.add_argument("--hf", metavar="DIR",
                        help="a Hugging Face LlamaForCausalLM: config.json, safetensors or pytorch_model.bin "
                             "weights, and maybe tokenizer.model or tokenizer.json")
    source.add_argument("--llama2c", metavar="FILE", help="a llama2.c legacy checkpoint")
    source.add_argument("--gguf", metavar="FILE",
                        help="a llama.cpp GGUF file of the llama architecture (F32, F16, BF16, Q4_0, Q4_1 "
                             "or Q8_0 tensors) with its tokenizer; needs numpy and gguf, not torch")
    source.add_argument("--tokenizer-model", metavar="FILE",
                        help="write only this sentencepiece tokenizer.model, as OUTPUT")
    parser.add_argument("--max-seq-len", metavar="N", type=_integer_up_to(MAX_SEQ_LEN),
                        help=f"context length for the header, at most {MAX_SEQ_LEN} (default: the source's; "
                             f"{META_MAX_SEQ_LEN} for --meta, whose params.json has none)")
    parser.add_argument("--dtype", choices=list(WEIGHT_TYPES), default="f32",
                        help="how the matrices are stored: f32 (default), bf16, q8_0 (int8) or q4_0 "
                             "(4-bit), the last two with a float16 scale per 32 weights; norms stay f32")
    parser.add_argument("--tokenizer-out", metavar="PATH",
                        help="where the tokenizer of --meta, --hf or --gguf goes "
                             "(default: tokenizer.bin beside OUTPUT)")
    opts = parser.parse_args(argv)
    for name, value in vars(opts).items():
        if value == "":
            parser.error(f"{'OUTPUT' if name == 'output' else '--' + name.replace('_', '-')} is an empty path")
    if opts.tokenizer_out and not (opts.meta or opts.hf or opts.gguf):
        parser.error("--tokenizer-out goes with --meta, --hf or --gguf; "
                     "export a tokenizer alone with --tokenizer-model")

    try:
        report = convert(opts)
    except ExportError as e:
        print(f"export.py: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("export.py: out of memory; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    try:                        # > /dev/full, >&-: the files are written, but the user is not told
        if sys.stdout is None:  # closed when Python started
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        print("\n".join(report), flush=True)
    except OSError as e:
        if sys.stdout is not None:      # or the flush at exit fails again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"export.py: stdout: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    for signum in (signal.SIGTERM, signal.SIGHUP):      # end as Ctrl-C does, the temporary files removed
        signal.signal(signum, signal.default_int_handler)
    sys.exit(main())
