"""Tokenizer writers (tokenizer.bin, docs/FORMATS.md) from sentencepiece,
tokenizer.json and GGUF metadata."""

import json
import os
import re
import struct

from convert.errors import ExportError, need
from convert.files import json_field, read_bytes, read_json, regular_file
from convert.sources import _gguf_reader, gguf_metadata

# One file format serves both kinds of tokenizer run.c knows: sentencepiece
# BPE (Llama 2, from tokenizer.model) and byte-level BPE (GPT-2 style, from a
# Hugging Face tokenizer.json). tokenizer.c reads it; it is drawn in
# docs/FORMATS.md and at the top of tokenizer.c.
#
# Byte-level: type 3 (control) marks special added tokens, type 4 added tokens
# that are not special; tokenizer.c matches both whole in the input text and
# skips only the special ones when decoding. The llama2.c tokenizer.bin is
# read by tokenizer.c as it is; nothing here writes it.


TOKENIZER_MAGIC = b"LTOK"
TOKENIZER_VERSION = 1
TOKENIZER_HEADER = struct.Struct("<4sIIiiiiiIIIIII8x")   # 64 bytes
TOK_SENTENCEPIECE, TOK_BYTELEVEL = 0, 1
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6
TOKF_ADD_BOS, TOKF_DUMMY_PREFIX, TOKF_REMOVE_EXTRA_WS, TOKF_BYTE_FALLBACK, TOKF_IGNORE_MERGES = 1, 2, 4, 8, 16
TOKF_ADD_EOS, TOKF_NFC = 32, 64
PRETOK_NONE, PRETOK_GPT2, PRETOK_DIGITS_GPT2, PRETOK_LLAMA3, PRETOK_QWEN2 = 0, 1, 2, 3, 4
CHAT_NONE, CHAT_LLAMA2, CHAT_CHATML, CHAT_LLAMA3, CHAT_LLAMA31, CHAT_LLAMA32 = 0, 1, 2, 3, 4, 5
LLAMA3_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


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
            f.write(struct.pack("<IfB", len(b), score, ty))
            f.write(b)
        for m in merges:
            f.write(struct.pack("<iii", *m))
        f.write(system)
        return f.tell()


# tokenizer.c's bounds on a file it loads
TOK_MAX_VOCAB, TOK_MAX_TOKEN_LENGTH, TOK_MAX_FILE = 1 << 24, 1 << 16, 1 << 30
TOKF_ALL = (1 << 7) - 1
TOKEN_RECORD, MERGE_RECORD = struct.Struct("<IfB"), struct.Struct("<iii")


def read_tokenizer(path):
    """Reads an LTOK file into a dict, checked as tokenizer.c's loader checks
    it (tok_load_ltok and tok_build), so that what ./run refuses export.py
    refuses too, with tokenizer.c's words: ExportError naming path. Also
    refused: a default system prompt that is not UTF-8, which GGUF and
    tokenizer.json cannot hold (./run takes its bytes as they are)."""
    regular_file(path)
    if os.path.getsize(path) > TOK_MAX_FILE:
        raise ExportError(path, f"a tokenizer file of more than {TOK_MAX_FILE} bytes")
    data = read_bytes(path)
    if len(data) < TOKENIZER_HEADER.size or data[:4] != TOKENIZER_MAGIC:
        raise ExportError(path, "not a tokenizer.bin of export.py (LTOK version 1); "
                                "write one with export.py --tokenizer-from or beside a conversion")
    (_, version, kind, n, bos, eos, pad, unk, flags, pretok, chat, n_merges,
     max_len, system_len) = TOKENIZER_HEADER.unpack_from(data, 0)
    _check_tokenizer_header(path, version, kind, n, (bos, eos, pad, unk), flags, pretok, chat, max_len)
    tokens, pos = _token_records(path, data, n, max_len)
    left = len(data) - pos
    if n_merges > left // MERGE_RECORD.size:
        raise ExportError(path, f"{n_merges} merges do not fit in the {left} bytes left")
    if left - n_merges * MERGE_RECORD.size != system_len:
        raise ExportError(path, f"{left - n_merges * MERGE_RECORD.size} bytes after the last merge, "
                                f"expected system_len = {system_len}")
    system = data[len(data) - system_len:]
    if b"\0" in system:
        raise ExportError(path, "the default system prompt contains a NUL byte")
    if kind == TOK_SENTENCEPIECE and n_merges:
        raise ExportError(path, f"a sentencepiece tokenizer has no merge records ({n_merges})")
    _check_vocabulary(path, kind, tokens, unk, max_len)
    merges = [MERGE_RECORD.unpack_from(data, pos + MERGE_RECORD.size * r) for r in range(n_merges)]
    _check_merges(path, tokens, merges)
    try:
        system = system.decode("utf-8")
    except UnicodeDecodeError:
        raise ExportError(path, "the default system prompt is not UTF-8 text") from None
    return dict(kind=kind, tokens=tokens, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk, flags=flags,
                pretokenizer=pretok, chat_template=chat, merges=merges, max_token_length=max_len,
                system_prompt=system)


def _token_records(path, data, n, max_len):
    """The n token records of an LTOK file's data, [(bytes, score, type)],
    checked as tokenizer.c checks them, and the offset after them."""
    pos, tokens = TOKENIZER_HEADER.size, []
    for i in range(n):
        if len(data) - pos < TOKEN_RECORD.size:
            raise ExportError(path, f"token {i}: record cut short at byte {pos}")
        length, score, ty = TOKEN_RECORD.unpack_from(data, pos)
        if not 1 <= length <= max_len:
            raise ExportError(path, f"token {i} has length {length}, outside 1..max_token_length")
        if length > len(data) - pos - TOKEN_RECORD.size:
            raise ExportError(path, f"token {i}: record cut short at byte {pos}")
        if not PIECE_NORMAL <= ty <= PIECE_BYTE:
            raise ExportError(path, f"token {i} has unknown type {ty}")
        pos += TOKEN_RECORD.size
        tokens.append((data[pos:pos + length], score, ty))
        pos += length
    return tokens, pos


def _check_merges(path, tokens, merges):
    """Each merge (left, right, result), checked as tokenizer.c checks it."""
    for r, (left, right, result) in enumerate(merges):
        if not all(0 <= i < len(tokens) for i in (left, right, result)):
            raise ExportError(path, f"merge {r} has a token id outside the vocabulary")
        if tokens[result][0] != tokens[left][0] + tokens[right][0]:
            raise ExportError(path, f"merge {r}: result is not left followed by right")


def _check_tokenizer_header(path, version, kind, n, ids, flags, pretok, chat, max_len):
    """The fields of an LTOK header, checked as tokenizer.c checks them."""
    if version != TOKENIZER_VERSION:
        raise ExportError(path, f"tokenizer version {version}, this build reads version {TOKENIZER_VERSION} "
                                "(re-export with export.py)")
    if kind > TOK_BYTELEVEL:
        raise ExportError(path, f"unknown tokenizer kind {kind}")
    if not 1 <= n <= TOK_MAX_VOCAB:
        raise ExportError(path, f"vocab_size {n} is not sane")
    for name, value in zip(("bos_id", "eos_id", "pad_id", "unk_id"), ids):
        if not -1 <= value < n:
            raise ExportError(path, f"{name} {value} is outside -1..{n - 1}")
    if flags & ~TOKF_ALL:
        raise ExportError(path, f"unknown tokenizer flags {flags:#x}")
    if pretok > PRETOK_QWEN2 or (kind == TOK_SENTENCEPIECE and pretok != PRETOK_NONE):
        raise ExportError(path, f"unknown pretokenizer {pretok}")
    if chat > CHAT_LLAMA32:
        raise ExportError(path, f"unknown chat_template {chat}")
    if not 1 <= max_len <= TOK_MAX_TOKEN_LENGTH:
        raise ExportError(path, f"max_token_length {max_len} is not sane")


def _check_vocabulary(path, kind, tokens, unk_id, max_len):
    """The tokens as tokenizer.c's tok_build checks them: sentencepiece's
    reserved pieces (control, unknown, byte) distinct, and its other pieces
    too; its byte pieces <0xXX>; its unk_id an unknown piece; max_len the
    longest token's length."""
    if kind == TOK_SENTENCEPIECE:
        seen = ({}, {})     # reserved pieces, the others
        for i, (data, _, ty) in enumerate(tokens):
            reserved = ty in (PIECE_CONTROL, PIECE_UNKNOWN, PIECE_BYTE)
            if seen[reserved].setdefault(data, i) != i:
                raise ExportError(path, f"token {i} is a duplicate")
            if ty == PIECE_BYTE and not re.fullmatch(rb"<0x[0-9A-F]{2}>", data):
                raise ExportError(path, f"byte token {i} is not of the form <0xXX>")
        if unk_id < 0 or tokens[unk_id][2] != PIECE_UNKNOWN:
            raise ExportError(path, f"unk_id {unk_id} is not an unknown-type token")
    longest = max(len(data) for data, _, _ in tokens)
    if longest != max_len:
        raise ExportError(path, f"max_token_length is {max_len} but the longest token has {longest} bytes")


# sentencepiece's tokenizer.model is a protobuf (sentencepiece_model.proto),
# read with the classes that the sentencepiece package ships (they need protobuf).

def read_sentencepiece_model(path):
    """The parts of a sentencepiece ModelProto that tokenization depends on:
    pieces [(text, score, type)], and the trainer and normalizer settings.
    Parsed with the protobuf classes sentencepiece ships (python3-protobuf)."""
    proto = need("sentencepiece.sentencepiece_model_pb2").ModelProto()
    data = read_bytes(path)
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
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")     # digits one by one


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
    for kind, pattern in ((PRETOK_LLAMA3, LLAMA3_PATTERN), (PRETOK_QWEN2, QWEN2_PATTERN)):
        if (len(seq) == 2 and isinstance(seq[0], dict) and seq[0].get("type") == "Split"
                and seq[0].get("pattern") == {"Regex": pattern} and seq[0].get("behavior") == "Isolated"
                and not seq[0].get("invert") and byte_level(seq[1], regex=False)):
            return kind, bool(seq[1].get("add_prefix_space", False))
    raise ExportError(path, f"pre_tokenizer {json.dumps(pre)[:200]} is not supported "
                            "(ByteLevel with the GPT-2 regex, optionally after Digits(individual_digits); "
                            "or Llama 3's or Qwen2's Split regex, then ByteLevel)")


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
    tj = read_json(json_path)
    model = json_field(tj, "model", dict, json_path)
    if model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise ExportError(json_path, f"model type {model.get('type')!r}; only BPE is supported")
    # NFC is recorded in flag bit 6, and tokenizer.c applies it
    normalizer = tj.get("normalizer")
    if normalizer is not None and normalizer != {"type": "NFC"}:
        raise ExportError(json_path, f"a normalizer ({_json_type(normalizer)}) is not supported (only NFC)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ExportError(json_path, f"BPE {key} is not supported")
    if model.get("byte_fallback") or model.get("dropout"):
        raise ExportError(json_path, "BPE byte_fallback / dropout is not supported")
    decoder = tj.get("decoder")
    if _json_type(decoder) != "ByteLevel":
        raise ExportError(json_path, f"decoder {_json_type(decoder)!r}; only ByteLevel is supported")
    pretok, prefix = _hf_pretokenizer(tj.get("pre_tokenizer"), json_path)

    vocab = dict(json_field(model, "vocab", dict, json_path))
    for text, i in vocab.items():
        if not _is_id(i):
            raise ExportError(json_path, f"token {text!r} has id {i!r}: expected an integer from 0 up")
    added = json_field(tj, "added_tokens", list, json_path, [])
    for a in added:
        if not (isinstance(a, dict) and isinstance(a.get("content"), str) and a["content"] and _is_id(a.get("id"))):
            raise ExportError(json_path, f"added token {json.dumps(a)[:80]}: expected its content and id")
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
    for r, m in enumerate(json_field(model, "merges", list, json_path)):
        pair = m.split(" ", 1) if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ExportError(json_path, f"merge {r} {json.dumps(m)[:80]} is not a pair of tokens")
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
    config_path = os.path.join(os.path.dirname(os.path.abspath(json_path)), "tokenizer_config.json")
    if os.path.isfile(config_path):
        config = read_json(config_path)

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
    flags = (TOKF_DUMMY_PREFIX if prefix else 0) | (TOKF_NFC if normalizer is not None else 0)
    if model.get("ignore_merges"):
        flags |= TOKF_IGNORE_MERGES
    post = tj.get("post_processor")
    if _json_type(post) == "TemplateProcessing":
        single = post.get("single")
        if not (isinstance(single, list) and all(isinstance(s, dict) for s in single)):
            raise ExportError(json_path, f"post_processor template {json.dumps(single)[:80]} is not [BOS] $A")
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
    chat, system = hf_chat_template(config, config_path, vocab)
    unk = model.get("unk_token")
    unk_id = vocab[unk] if isinstance(unk, str) and unk in vocab else -1
    return write_tokenizer(out_path, TOK_BYTELEVEL, tokens, bos_id=bos, eos_id=eos, unk_id=unk_id,
                           flags=flags, pretokenizer=pretok, chat_template=chat, merges=merges,
                           system_prompt=system, source=json_path)


def hf_chat_template(config, config_path, vocab):
    """(chat_template kind, default system prompt) of a Hugging Face tokenizer:
    from the chat_template of its tokenizer_config.json (a text, or a list of
    named ones of which "default" is used), else from chat_template.jinja
    beside it, else from the marker tokens its vocabulary holds."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    jinja = os.path.join(os.path.dirname(config_path), "chat_template.jinja")
    if template is None and os.path.isfile(jinja):
        template = read_bytes(jinja).decode("utf-8", "replace")
    if template is not None and not isinstance(template, str):
        raise ExportError(config_path, "chat_template: expected a string or a list of named templates")
    chat, system = gguf_chat_template(template)
    return (chat, system) if chat != CHAT_NONE else (chat_from_vocab(vocab), "")


def chat_from_vocab(vocab):
    """The chat template that a tokenizer's marker tokens imply, for one that
    carries no template text: ChatML's <|im_start|>, or Llama 3's headers."""
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return CHAT_CHATML
    if all(marker in vocab for marker in LLAMA3_MARKERS):
        return CHAT_LLAMA3
    return CHAT_NONE


# ----------------------------------------------------------------------------
# Tokenizer export from GGUF
#
# A GGUF file carries its tokenizer in its metadata, under llama.cpp's names:
#
#   tokenizer.ggml.model        "llama": sentencepiece BPE (Llama 2, TinyLlama);
#                               "gpt2": byte-level BPE (SmolLM2, Llama 3)
#   tokenizer.ggml.pre          the byte-level pre-tokenizer, by llama.cpp's name
#   tokenizer.ggml.tokens       each token's text, in id order: sentencepiece
#                               pieces as they are ("▁", "<0x0A>"); byte-level
#                               normal tokens in GPT-2's byte alphabet, added
#                               ones as they are
#   tokenizer.ggml.scores       sentencepiece: each piece's merge score
#   tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control, 4 user-defined,
#                               5 unused, 6 byte: the LTOK piece types, with
#                               the same numbers (sentencepiece's)
#   tokenizer.ggml.merges       byte-level: "left right", in rank order
#   tokenizer.ggml.{bos,eos,padding,unknown}_token_id
#   tokenizer.ggml.add_bos_token, add_eos_token, add_space_prefix,
#   tokenizer.ggml.remove_extra_whitespaces
#   tokenizer.chat_template     Jinja; run.c knows ChatML, Llama 2's [INST]
#                               and Llama 3's headers
#
# A sentencepiece model's normalizer is not in the file: llama.cpp's
# converter, like Llama's own models, assumes the identity normalization.
#
# llama.cpp names a pre-tokenizer after the Hugging Face tokenizers it found
# it in; each name below stands for the pre_tokenizer of tokenizer.json that
# tokenizer.c implements (llama.cpp's regexes for these names agree).

GGUF_PRETOKENIZERS = {      # tokenizer.ggml.pre -> (LTOK pretokenizer, extra flags)
    "gpt-2": (PRETOK_GPT2, 0),                          # ByteLevel
    "smollm": (PRETOK_DIGITS_GPT2, 0),                  # Digits(individual_digits), ByteLevel
    "starcoder": (PRETOK_DIGITS_GPT2, 0),
    "llama-bpe": (PRETOK_LLAMA3, TOKF_IGNORE_MERGES),   # Llama 3: its Split regex, ByteLevel
    "qwen2": (PRETOK_QWEN2, TOKF_NFC),                  # Qwen2: NFC, its Split regex, ByteLevel
}


NOT_LITERAL = re.compile(r"['\"{}+]")     # what a template's expressions have and its literal text not


def _literal_system_turn(template):
    """The text of the first ChatML system turn that the template writes as a
    literal, not built of expressions such as ' + message['content'] + '
    (Qwen2.5's has those and a tools branch first): what the regex
    <\\|im_start\\|>system(?:\\n|\\\\n)([^'"{}+]*?)<\\|im_end\\|> finds first, "" where
    it finds nothing. Found in time linear in the template (a regex search
    takes quadratic time on a template of repeated "<|im_start|>system\\n"):
    the next <|im_end|> and the next non-literal character after a turn's
    start are looked up only when the turn starts beyond those found last."""
    start_of_turn, end_of_turn = "<|im_start|>system", "<|im_end|>"
    end = stop = -1
    start = template.find(start_of_turn)
    while start >= 0:
        body = start + len(start_of_turn)
        newline = next((len(n) for n in ("\n", "\\n") if template.startswith(n, body)), 0)
        if newline:
            body += newline
            if end < body:
                end = template.find(end_of_turn, body)
                if end < 0:         # no turn ends after this one's start, nor after any later one's
                    return ""
            if stop < body:
                found = NOT_LITERAL.search(template, body)
                stop = found.start() if found else len(template)
            if stop >= end:
                return template[body:end]
        start = template.find(start_of_turn, start + 1)
    return ""


def gguf_chat_template(template):
    """(chat_template kind, default system prompt) for a Jinja chat template:
    a GGUF's tokenizer.chat_template, or tokenizer_config.json's chat_template.

    ChatML when the template writes <|im_start|>, Llama 3 when it writes
    <|start_header_id|> and <|end_header_id|>, Llama 2 when it writes [INST].
    Llama 3.1 / 3.2 when the Llama 3 template also writes the dated system
    preamble ("Cutting Knowledge Date"): 3.2 when it dates it by strftime_now.
    The default system prompt is the text of a ChatML system turn written out
    literally in the template, the one it puts first when a conversation
    brings none (SmolLM2's and Qwen2.5's do); "" when there is none."""
    if not template:
        return CHAT_NONE, ""
    if "<|im_start|>" in template:
        text = _literal_system_turn(template)
        if "\\" in text.replace("\\n", ""):
            text = ""
        return CHAT_CHATML, text.replace("\\n", "\n")
    if "<|start_header_id|>" in template and "<|end_header_id|>" in template:
        if "Cutting Knowledge Date" in template:
            return (CHAT_LLAMA32 if "strftime_now" in template else CHAT_LLAMA31), ""
        return CHAT_LLAMA3, ""
    if "[INST]" in template:
        return CHAT_LLAMA2, ""
    return CHAT_NONE, ""


def write_tokenizer_gguf(source, out_path, vocab_size=None):
    """Converts the tokenizer in a GGUF file's metadata, sentencepiece BPE
    ("llama") or byte-level BPE ("gpt2"), into an LTOK file. source: a path
    or an open gguf.GGUFReader. Refuses what tokenizer.c would not reproduce
    exactly. Returns the file size."""
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
    if kind is None:
        raise ExportError(path, "holds no tokenizer (no tokenizer.ggml.model in its metadata)")
    if kind not in ("llama", "gpt2"):
        raise ExportError(path, f"tokenizer.ggml.model {kind!r}; only 'llama' (sentencepiece BPE) "
                                "and 'gpt2' (byte-level BPE) are read from GGUF")
    texts = meta("tokenizer.ggml.tokens", [], list, str)
    types = meta("tokenizer.ggml.token_type", [], list, int)
    if not texts or len(types) != len(texts):
        raise ExportError(path, f"{len(texts)} tokens but {len(types)} token types")
    if vocab_size is not None and len(texts) != vocab_size:
        raise ExportError(path, f"{len(texts)} tokens but the model has {vocab_size}")
    ids = [meta(f"tokenizer.ggml.{name}_token_id", -1, int) for name in ("bos", "eos", "padding", "unknown")]
    chat, system = gguf_chat_template(meta("tokenizer.chat_template", None, (str, type(None))))
    if chat == CHAT_NONE:
        chat = chat_from_vocab(set(texts))
    flags = TOKF_ADD_EOS if meta("tokenizer.ggml.add_eos_token", False, bool) else 0

    if kind == "llama":
        scores = meta("tokenizer.ggml.scores", None, list, float)
        if len(scores) != len(texts):
            raise ExportError(path, f"{len(texts)} tokens but {len(scores)} scores")
        tokens = []
        for i, (text, score, ty) in enumerate(zip(texts, scores, types)):
            if not PIECE_NORMAL <= ty <= PIECE_BYTE:
                raise ExportError(path, f"token {i} {text!r} has unknown type {ty}")
            tokens.append((text.encode("utf-8"), score, ty))
        unknown = [i for i, ty in enumerate(types) if ty == PIECE_UNKNOWN]
        if len(unknown) != 1 or ids[3] not in (-1, unknown[0]):
            raise ExportError(path, f"{len(unknown)} unknown tokens and unknown_token_id {ids[3]}; "
                                    "sentencepiece needs exactly one, that one")
        ids[3] = unknown[0]
        if meta("tokenizer.ggml.add_bos_token", True, bool):
            flags |= TOKF_ADD_BOS
        if meta("tokenizer.ggml.add_space_prefix", True, bool):
            flags |= TOKF_DUMMY_PREFIX
        if meta("tokenizer.ggml.remove_extra_whitespaces", False, bool):
            flags |= TOKF_REMOVE_EXTRA_WS
        if PIECE_BYTE in types:
            flags |= TOKF_BYTE_FALLBACK
        return write_tokenizer(out_path, TOK_SENTENCEPIECE, tokens, bos_id=ids[0], eos_id=ids[1],
                               pad_id=ids[2], unk_id=ids[3], flags=flags, chat_template=chat,
                               system_prompt=system, source=path)

    pre = meta("tokenizer.ggml.pre", "default", str)
    if pre not in GGUF_PRETOKENIZERS:
        raise ExportError(path, f"tokenizer.ggml.pre {pre!r} is not supported "
                                f"({', '.join(sorted(GGUF_PRETOKENIZERS))})")
    pretok, pre_flags = GGUF_PRETOKENIZERS[pre]
    flags |= pre_flags
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
    if meta("tokenizer.ggml.add_bos_token", pre == "llama-bpe", bool):
        flags |= TOKF_ADD_BOS
    if meta("tokenizer.ggml.add_space_prefix", False, bool):
        flags |= TOKF_DUMMY_PREFIX
    return write_tokenizer(out_path, TOK_BYTELEVEL, tokens, bos_id=ids[0], eos_id=ids[1], pad_id=ids[2],
                           unk_id=ids[3], flags=flags, pretokenizer=pretok, chat_template=chat, merges=merges,
                           system_prompt=system, source=path)


def write_tokenizer_from(source, out_path, vocab_size=None):
    """Writes the tokenizer of source as an LTOK file: a GGUF file (by its
    magic), a Hugging Face tokenizer.json (by its name or its opening "{"), a sentencepiece
    tokenizer.model (anything else), or a directory holding tokenizer.model
    or tokenizer.json (the first when both are there: in Llama 2 repositories
    it is the original). Returns (the file read, the size written)."""
    if os.path.isdir(source):
        candidates = [os.path.join(source, name) for name in ("tokenizer.model", "tokenizer.json")]
        found = next((path for path in candidates if os.path.exists(path)), None)
        if found is None:
            raise ExportError(source, "holds neither tokenizer.model nor tokenizer.json")
        source = found
    regular_file(source)
    try:
        with open(source, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ExportError(source, e.strerror) from None
    if magic == b"GGUF":
        return source, write_tokenizer_gguf(source, out_path, vocab_size)
    if str(source).endswith(".json") or magic[:1] == b"{":
        return source, write_tokenizer_hf_json(source, out_path, vocab_size)
    return source, write_tokenizer_sentencepiece(source, out_path, vocab_size)
