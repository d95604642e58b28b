#!/usr/bin/env python3
"""export.py: the PyTorch reference Llama, and writers into run.c's file formats.

(skeleton: the model section is being written; the tokenizer section too)
"""

# ----------------------------------------------------------------------------
# Model export (owner: model section)

# ----------------------------------------------------------------------------
# Tokenizer export (owner: tokenizer section)
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
#       40     4  u32      chat_template   0 none, 1 llama2 [INST], 2 chatml
#       44     4  u32      n_merges        0 for sentencepiece
#       48     4  u32      max_token_length  bytes in the longest token
#       52    12  zero     reserved
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
#                 the file ends here.
#
# Byte-level: type 3 (control) marks special added tokens, type 4 added tokens
# that are not special; tokenizer.c matches both whole in the input text and
# skips only the special ones when decoding. The llama2.c tokenizer.bin is
# read by tokenizer.c as it is; nothing here writes it.

import json as _json
import struct as _struct

TOKENIZER_MAGIC = b"LTOK"
TOKENIZER_VERSION = 1
TOKENIZER_HEADER = _struct.Struct("<4sIIiiiiiIIIII12x")   # 64 bytes
TOK_SENTENCEPIECE, TOK_BYTELEVEL = 0, 1
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6
TOKF_ADD_BOS, TOKF_DUMMY_PREFIX, TOKF_REMOVE_EXTRA_WS, TOKF_BYTE_FALLBACK, TOKF_IGNORE_MERGES = 1, 2, 4, 8, 16
PRETOK_NONE, PRETOK_GPT2, PRETOK_DIGITS_GPT2 = 0, 1, 2
CHAT_NONE, CHAT_LLAMA2, CHAT_CHATML = 0, 1, 2


class TokenizerExportError(ValueError):
    """A tokenizer run.c cannot reproduce exactly; the message says why."""


def write_tokenizer(path, kind, tokens, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=-1, flags=0,
                    pretokenizer=PRETOK_NONE, chat_template=CHAT_NONE, merges=()):
    """Writes an LTOK file. tokens: [(bytes, score, type)] in id order;
    merges: [(left, right, result)] in rank order. Returns the file size."""
    n = len(tokens)
    for name, v in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id), ("unk_id", unk_id)):
        if not -1 <= v < n:
            raise TokenizerExportError(f"{name} {v} is outside -1..{n - 1}")
    for i, (b, _, ty) in enumerate(tokens):
        if not b:
            raise TokenizerExportError(f"token {i} is empty")
        if not PIECE_NORMAL <= ty <= PIECE_BYTE:
            raise TokenizerExportError(f"token {i} has unknown type {ty}")
    for r, (a, b, c) in enumerate(merges):
        if not (0 <= a < n and 0 <= b < n and 0 <= c < n) or tokens[c][0] != tokens[a][0] + tokens[b][0]:
            raise TokenizerExportError(f"merge {r} ({a}, {b}) -> {c} is not a concatenation of tokens")
    max_len = max(len(b) for b, _, _ in tokens)
    with open(path, "wb") as f:
        f.write(TOKENIZER_HEADER.pack(TOKENIZER_MAGIC, TOKENIZER_VERSION, kind, n, bos_id, eos_id, pad_id,
                                      unk_id, flags, pretokenizer, chat_template, len(merges), max_len))
        for b, score, ty in tokens:
            f.write(_struct.pack("<IfB", len(b), score, ty))
            f.write(b)
        for m in merges:
            f.write(_struct.pack("<iii", *m))
        return f.tell()


def read_tokenizer(path):
    """Reads an LTOK file back into a dict (for tests and inspection)."""
    with open(path, "rb") as f:
        data = f.read()
    (magic, version, kind, n, bos, eos, pad, unk, flags, pretok, chat, n_merges,
     max_len) = TOKENIZER_HEADER.unpack_from(data, 0)
    if magic != TOKENIZER_MAGIC or version != TOKENIZER_VERSION:
        raise TokenizerExportError(f"{path}: not an LTOK version {TOKENIZER_VERSION} file")
    pos, tokens = TOKENIZER_HEADER.size, []
    for _ in range(n):
        length, score, ty = _struct.unpack_from("<IfB", data, pos)
        pos += 9
        tokens.append((data[pos:pos + length], score, ty))
        pos += length
    merges = [_struct.unpack_from("<iii", data, pos + 12 * r) for r in range(n_merges)]
    return dict(kind=kind, tokens=tokens, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk, flags=flags,
                pretokenizer=pretok, chat_template=chat, merges=merges, max_token_length=max_len)


# sentencepiece's tokenizer.model is a protobuf (sentencepiece_model.proto).
# The few fields needed are read straight from the wire format, so that
# neither protobuf nor sentencepiece has to be installed.

def _pb_fields(buf):
    """Yields (field_number, value) of a protobuf message: int for varints,
    bytes for length-delimited and fixed-width fields."""
    i, n = 0, len(buf)

    def varint():
        nonlocal i
        shift = result = 0
        while True:
            if i >= n:
                raise TokenizerExportError("tokenizer.model: truncated protobuf")
            c = buf[i]
            i += 1
            result |= (c & 0x7F) << shift
            shift += 7
            if c < 0x80:
                return result

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        elif wire == 2:
            size = varint()
            value, i = buf[i:i + size], i + size
        else:
            raise TokenizerExportError(f"tokenizer.model: unsupported protobuf wire type {wire}")
        if i > n:
            raise TokenizerExportError("tokenizer.model: truncated protobuf")
        yield field, value


def _pb_int32(v):
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def read_sentencepiece_model(path):
    """The parts of a sentencepiece ModelProto that tokenization depends on:
    pieces [(text, score, type)], and the trainer and normalizer settings
    (with the proto's defaults filled in)."""
    with open(path, "rb") as f:
        buf = f.read()
    pieces = []
    trainer = dict(model_type=1, byte_fallback=False, treat_whitespace_as_suffix=False,
                   unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
                   unk_surface=" \u2047 ")
    normalizer = dict(name="", precompiled_charsmap=b"", add_dummy_prefix=True,
                      remove_extra_whitespaces=True, escape_whitespaces=True)
    denormalizer_charsmap = b""
    for field, value in _pb_fields(buf):
        if field == 1:
            piece, score, ty = None, 0.0, PIECE_NORMAL
            for f2, v2 in _pb_fields(value):
                if f2 == 1:
                    piece = bytes(v2).decode("utf-8")
                elif f2 == 2:
                    score = _struct.unpack("<f", v2)[0]
                elif f2 == 3:
                    ty = v2
            if piece is None:
                raise TokenizerExportError(f"{path}: piece {len(pieces)} has no text")
            pieces.append((piece, score, ty))
        elif field == 2:
            ints = {3: "model_type", 35: "byte_fallback", 24: "treat_whitespace_as_suffix"}
            strs = {45: "unk_piece", 46: "bos_piece", 47: "eos_piece", 48: "pad_piece", 44: "unk_surface"}
            for f2, v2 in _pb_fields(value):
                if f2 in ints:
                    trainer[ints[f2]] = _pb_int32(v2)
                elif f2 in strs:
                    trainer[strs[f2]] = bytes(v2).decode("utf-8")
        elif field == 3:
            for f2, v2 in _pb_fields(value):
                if f2 == 1:
                    normalizer["name"] = bytes(v2).decode("utf-8")
                elif f2 == 2:
                    normalizer["precompiled_charsmap"] = bytes(v2)
                elif f2 == 3:
                    normalizer["add_dummy_prefix"] = bool(v2)
                elif f2 == 4:
                    normalizer["remove_extra_whitespaces"] = bool(v2)
                elif f2 == 5:
                    normalizer["escape_whitespaces"] = bool(v2)
        elif field == 5:
            for f2, v2 in _pb_fields(value):
                if f2 == 2:
                    denormalizer_charsmap = bytes(v2)
    return dict(pieces=pieces, trainer=trainer, normalizer=normalizer,
                denormalizer_charsmap=denormalizer_charsmap)


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
        raise TokenizerExportError(f"{model_path}: a {kinds.get(tr['model_type'], '?')} model; "
                                   "only sentencepiece BPE is supported")
    if nm["precompiled_charsmap"] or m["denormalizer_charsmap"]:
        raise TokenizerExportError(f"{model_path}: normalization rule '{nm['name']}' is not supported "
                                   "(train with normalization_rule_name=identity, as Llama does)")
    if tr["treat_whitespace_as_suffix"] or not nm["escape_whitespaces"]:
        raise TokenizerExportError(f"{model_path}: treat_whitespace_as_suffix / escape_whitespaces=false "
                                   "are not supported")
    if tr["unk_surface"] != " \u2047 ":
        raise TokenizerExportError(f"{model_path}: a custom unk_surface is not supported")
    pieces = m["pieces"]
    if vocab_size is not None and len(pieces) != vocab_size:
        raise TokenizerExportError(f"{model_path}: {len(pieces)} pieces but the model has {vocab_size} tokens")
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
        raise TokenizerExportError(f"{model_path}: {len(unk)} unknown pieces; sentencepiece needs exactly one")
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
                           chat_template=CHAT_LLAMA2)

# ----------------------------------------------------------------------------
# Command line
