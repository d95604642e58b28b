"""tokenizer.c against the references it reimplements.

sentencepiece: small BPE models are trained here, on a generated corpus in
several scripts with emoji, exported with export.py, and thousands of strings
are encoded and decoded by both; Llama 2's own tokenizer too when
shared/tokenizers/llama2/ is there (its tokenizer.model exported, and
llama2.c's tokenizer.bin read as it is). Byte-level BPE: a GPT-2 style
tokenizer is trained with the `tokenizers` library and compared the same way.

tokenizer.c is driven through tests/tokenizer_driver.c, which takes whole
batches on stdin, so that thousands of strings cost one process.
"""

import io
import json
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export  # noqa: E402

LLAMA2_DIR = ROOT.parent / "shared" / "tokenizers" / "llama2"
if not LLAMA2_DIR.is_dir():
    LLAMA2_DIR = Path("/work/shared/tokenizers/llama2")


# ----------------------------------------------------------------------------
# The driver

@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    # TOKENIZER_DRIVER_BINARY: a driver built elsewhere (make test-arm: the
    # aarch64 build under qemu)
    if "TOKENIZER_DRIVER_BINARY" in os.environ:
        return os.environ["TOKENIZER_DRIVER_BINARY"]
    out = tmp_path_factory.mktemp("driver") / "tokenizer_driver"
    cc = os.environ.get("CC", "cc")
    # TOKENIZER_DRIVER_CFLAGS adds flags, e.g. "-fsanitize=address,undefined"
    extra = os.environ.get("TOKENIZER_DRIVER_CFLAGS", "").split()
    cmd = [cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", *extra, "-o", str(out),
           str(ROOT / "tests" / "tokenizer_driver.c")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stderr}"
    return str(out)


def encode_batch(driver, tok, texts, bos=1):
    """tokenizer_encode over texts (bytes); a list of id lists."""
    data = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    p = subprocess.run([driver, str(tok), "encode", str(bos)], input=data, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    lines = p.stdout.decode().split("\n")[:-1]
    assert len(lines) == len(texts)
    return [[int(x) for x in line.split()] for line in lines]


def decode_batch(driver, tok, id_lists):
    """Streamed tokenizer_decode + flush over each id list; a list of bytes.
    The driver itself fails if a chunk splits a UTF-8 character."""
    data = b"".join(struct.pack("<I", len(ids)) + struct.pack(f"<{len(ids)}i", *ids) for ids in id_lists)
    p = subprocess.run([driver, str(tok), "decode"], input=data, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    res = framed_replies(p.stdout)
    assert len(res) == len(id_lists)
    return res


def framed_replies(out):
    """The driver's replies: each a u32 length, then that many bytes."""
    res, i = [], 0
    while i < len(out):
        (n,) = struct.unpack_from("<I", out, i)
        res.append(out[i + 4:i + 4 + n])
        i += 4 + n
    return res


def driver_info(driver, tok):
    p = subprocess.run([driver, str(tok), "info"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return {k: int(v) for k, v in (line.split() for line in p.stdout.splitlines())}


def report(kind, mismatches, total):
    """Fails listing the first few mismatches."""
    if mismatches:
        lines = [f"{len(mismatches)} of {total} {kind} differ; first ones:"]
        for m in mismatches[:8]:
            lines.append("  " + " | ".join(repr(x)[:300] for x in m))
        pytest.fail("\n".join(lines))


# ----------------------------------------------------------------------------
# Text to test with

SCRIPTS = {
    "latin": "abcdefghijklmnopqrstuvwxyzàéèêîïôõüçñßø",
    "greek": "αβγδεζηθικλμνξοπρστυφχψω",
    "cyrillic": "абвгдежзийклмнопрстуфхцчшщъыьэюя",
    "hebrew": "אבגדהוזחטיכלמנסעפצקרשת",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "devanagari": "कखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसह",
    "thai": "กขคงจฉชซญดตถทธนบปผพฟมยรลวสหอฮ",
    "hangul": "".join(chr(0xAC00 + 37 * i) for i in range(60)),
    "cjk": "".join(chr(0x4E00 + 7 * i) for i in range(80)),
    "kana": "あいうえおかきくけこさしすせそたちつてとなにぬねのアイウエオカキクケコ",
}
EMOJI = ["😀", "👍", "👍🏽", "❤️", "🎉", "👨\u200d👩\u200d👧", "🇫🇷", "🇯🇵", "🔥", "✨"]
PUNCT = ",.;:!?()\"'-"


def _word(rng, script):
    a = SCRIPTS[script]
    w = "".join(rng.choice(a[:len(a) // 2] if rng.random() < .7 else a) for _ in range(rng.randint(1, 8)))
    return w.capitalize() if script == "latin" and rng.random() < .2 else w


def sentence(rng, scripts=tuple(SCRIPTS)):
    script = rng.choice(scripts)
    out = []
    for _ in range(rng.randint(3, 15)):
        r = rng.random()
        if r < .08:
            out.append(str(rng.randint(0, 99999)))
        elif r < .12:
            out.append(rng.choice(EMOJI))
        elif r < .18:
            out.append(rng.choice(PUNCT))
        else:
            out.append(_word(rng, script if rng.random() < .9 else rng.choice(scripts)))
    return " ".join(out)


def corpus(n, seed=0, scripts=tuple(SCRIPTS)):
    rng = random.Random(seed)
    return [sentence(rng, scripts) for _ in range(n)]


# Characters that make tokenizers differ: whitespace of every kind, invisible
# joiners, combining marks, emoji sequences, the pieces' own syntax.
TRICKY = [
    "", " ", "  ", "   ", "\t", "\n", "\r\n", " \n ", "\n\n\n", "\t \t", " \r", "a  b", "a   b ",
    "  leading", "trailing  ", "\u00a0", "a\u00a0b", "\u200b", "a\u200bb", "\u200d", "\u3000x\u3000",
    "\u2581", "\u2581\u2581x", "x\u2581", "<s>", "</s>", "<unk>", "<s>[INST] hi [/INST]", "[INST]",
    "<0x41>", "<sep>", "<<sep>>", "[INST][INST]", "\ufffd", "e\u0301", "a\u0308\u0301\u0323",
    "\u0915\u094d\u0937", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "🇺🇸🇫🇷🇯🇵", "👍🏿", "\U000e0067",
    "\x00", "a\x00b", "\x7f\x01\x1b[0m", "ﬁ ǅ Ⅻ ①", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0010ffff", "\ue000",
    "Hello, World!", "don't you'll I'm", "12345 6.78 9,000", "x" * 200, " " * 50, "ab" * 100,
    "\u2581 \u2581", "\n<s>\n", "\u0000\u0001", "tab\tsep\tvalues", "CRLF\r\nline\r\n",
]


def random_unicode(rng, n):
    """n random code points, mostly from assigned blocks, some anywhere
    (unassigned, private use, astral), never surrogates."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < .3:
            c = rng.randrange(0x20, 0x7f)
        elif r < .4:
            c = rng.choice([0x20, 0x20, 0x09, 0x0a, 0x0d, 0xa0, 0x200b, 0x2581, 0x3000])
        elif r < .7:
            c = ord(rng.choice(rng.choice(list(SCRIPTS.values()))))
        elif r < .8:
            c = rng.randrange(0x80, 0x800)
        elif r < .9:
            c = rng.randrange(0x800, 0x10000)
        else:
            c = rng.randrange(0x10000, 0x110000)
        if 0xD800 <= c < 0xE000:
            c = 0xFFFD
        out.append(chr(c))
    return "".join(out)


def test_strings(seed, n_corpus=1500, n_random=1500):
    """The strings every tokenizer is compared on (str)."""
    rng = random.Random(seed)
    out = list(TRICKY)
    for s in corpus(n_corpus, seed + 1000):
        r = rng.random()
        if r < .2:
            s = s.replace(" ", rng.choice(["  ", "\t", "\n", " \n", "\u00a0", "   "]))
        elif r < .3:
            s = " " + s + " "
        elif r < .4:
            k = rng.randrange(len(s) + 1)
            s = s[:k] + rng.choice(TRICKY) + s[k:]
        out.append(s)
    for _ in range(n_random):
        out.append(random_unicode(rng, rng.randint(1, 40)))
    return out


test_strings.__test__ = False   # a helper, not a test


def invalid_utf8_strings(seed, n=300):
    """Byte strings that are not valid UTF-8: stray continuation bytes,
    truncated and overlong sequences, surrogates, bytes that never occur."""
    rng = random.Random(seed)
    bad = [b"\x80", b"\xff", b"\xfe", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80",
           b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xe2\x82", b"\xf0\x9f\x98", b"\xc3", b"\xe2",
           b"\xf0\x9f", b"\xf8\x88\x80\x80\x80", b"\xe2\x96", b"\xe2\x96\x81\x81"]
    out = list(bad)
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 6)):
            r = rng.random()
            if r < .4:
                parts.append(rng.choice(bad))
            elif r < .7:
                parts.append(random_unicode(rng, rng.randint(1, 5)).encode())
            else:
                parts.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 4))))
        out.append(b"".join(parts))
    return out


# ----------------------------------------------------------------------------
# sentencepiece models

import sentencepiece as spm  # noqa: E402

LLAMA_LIKE = dict(model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                  remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
                  num_threads=2, minloglevel=2)

SP_CONFIGS = {
    # name: (corpus lines, scripts, trainer options)
    "small": (2000, ("latin", "greek"), dict(LLAMA_LIKE, vocab_size=400, character_coverage=0.98)),
    "mid": (5000, tuple(SCRIPTS), dict(LLAMA_LIKE, vocab_size=1000, character_coverage=0.98,
                                       user_defined_symbols=["<sep>", "[INST]", "\u2581\u2581x"],
                                       control_symbols=["<ctrl>"])),
    "big": (8000, tuple(SCRIPTS), dict(LLAMA_LIKE, vocab_size=4000, character_coverage=0.9995)),
    "nofallback": (3000, tuple(SCRIPTS), dict(LLAMA_LIKE, vocab_size=800, character_coverage=0.98,
                                              byte_fallback=False)),
    "rmws": (3000, tuple(SCRIPTS), dict(LLAMA_LIKE, vocab_size=800, character_coverage=0.98,
                                        remove_extra_whitespaces=True, add_dummy_prefix=False)),
}


def train_sp(name):
    n, scripts, opts = SP_CONFIGS[name]
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(n, seed=len(name), scripts=scripts)),
                                   model_writer=f, **opts)
    return f.getvalue()


# A protobuf writer just good enough to change piece types in a model.
def _pb_raw_fields(buf):
    i = 0

    def varint():
        nonlocal i
        shift = result = 0
        while True:
            c = buf[i]
            i += 1
            result |= (c & 0x7F) << shift
            shift += 7
            if c < 0x80:
                return result

    while i < len(buf):
        start = i
        key = varint()
        wire = key & 7
        if wire == 0:
            varint()
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            i += varint()
        yield key >> 3, buf[start:i]


def _pb_varint(v):
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def with_piece_types(model, new_types):
    """The serialized model with piece i's type set to new_types[i]."""
    out, index = bytearray(), 0
    for field, raw in _pb_raw_fields(model):
        if field != 1:
            out += raw
            continue
        if index in new_types:
            # raw is the key 0x0A, the body's length, the body (a SentencePiece)
            j, n, shift = 1, 0, 0
            while True:
                c = raw[j]
                j += 1
                n |= (c & 0x7F) << shift
                shift += 7
                if c < 0x80:
                    break
            body = b"".join(r for f, r in _pb_raw_fields(raw[j:j + n]) if f != 3)
            body += _pb_varint(3 << 3) + _pb_varint(new_types[index])
            raw = _pb_varint(1 << 3 | 2) + _pb_varint(len(body)) + body
        out += raw
        index += 1
    return bytes(out)


@pytest.fixture(scope="session")
def sp_models(tmp_path_factory):
    """name -> (SentencePieceProcessor, path of the exported LTOK file)."""
    d = tmp_path_factory.mktemp("sp")
    models = {}
    for name in SP_CONFIGS:
        models[name] = train_sp(name)
    # "unused": mid with some merged pieces marked UNUSED, which sentencepiece
    # then splits back into the pieces they came from
    rng = random.Random(5)
    mid = spm.SentencePieceProcessor(model_proto=models["mid"])
    normal = [i for i in range(mid.get_piece_size())
              if not (mid.is_control(i) or mid.is_unknown(i) or mid.is_byte(i)) and len(mid.id_to_piece(i)) > 1
              and mid.id_to_piece(i) not in SP_CONFIGS["mid"][2]["user_defined_symbols"]]
    models["unused"] = with_piece_types(models["mid"], {i: 5 for i in rng.sample(normal, len(normal) // 4)})
    out = {}
    for name, proto in models.items():
        mp = d / f"{name}.model"
        mp.write_bytes(proto)
        tok = d / f"{name}.tok"
        export.write_tokenizer_sentencepiece(str(mp), str(tok))
        out[name] = (spm.SentencePieceProcessor(model_file=str(mp)), tok)
    return out


def sp_reference_encode(sp, text, bos=True):
    ids = sp.encode(text)
    return ([sp.bos_id()] if bos and sp.bos_id() >= 0 else []) + ids


def check_sp_encode_decode(driver, sp, tok, texts):
    """Encodes texts (str or bytes) with both; decodes the ids with both.
    Returns the number of strings compared."""
    raw = [t.encode() if isinstance(t, str) else t for t in texts]
    mine = encode_batch(driver, tok, raw, bos=1)
    bad = []
    refs = []
    for t, m in zip(raw, mine):
        ref = sp_reference_encode(sp, t)
        refs.append(ref)
        if ref != m:
            bad.append((t, ref, m, [sp.id_to_piece(i) for i in ref]))
    report("encodings", bad, len(raw))
    dec = decode_batch(driver, tok, refs)
    bad = [(ids, sp.decode(ids), m.decode("utf-8", "replace")) for ids, m in zip(refs, dec)
           if sp.decode(ids).encode() != m]
    report("decodings", bad, len(refs))
    return len(raw)


def random_id_lists(sp, seed, n=1500):
    """Random id sequences: any id, byte tokens in runs, control and unknown."""
    rng = random.Random(seed)
    v = sp.get_piece_size()
    bytes_ = [i for i in range(v) if sp.is_byte(i)]
    special = [i for i in range(v) if sp.is_control(i) or sp.is_unknown(i)]
    out = [[], [sp.bos_id()], [0]]
    for _ in range(n):
        ids = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < .4 and bytes_:
                ids.append(rng.choice(bytes_))
            elif r < .5 and special:
                ids.append(rng.choice(special))
            elif r < .6 and bytes_:
                # a whole valid character as byte tokens
                ch = random_unicode(rng, 1).encode()
                ids += [bytes_[0] + b for b in ch] if len(bytes_) == 256 else []
            else:
                ids.append(rng.randrange(v))
        out.append(ids)
    return out


def check_sp_random_decode(driver, sp, tok, seed):
    lists = random_id_lists(sp, seed)
    dec = decode_batch(driver, tok, lists)
    bad = [(ids, sp.decode(ids), m.decode("utf-8", "replace")) for ids, m in zip(lists, dec)
           if sp.decode(ids).encode() != m]
    report("random decodings", bad, len(lists))
    return len(lists)


@pytest.mark.parametrize("name", list(SP_CONFIGS) + ["unused"])
def test_sentencepiece_trained(driver, sp_models, name):
    sp, tok = sp_models[name]
    seed = sum(map(ord, name))
    n = check_sp_encode_decode(driver, sp, tok, test_strings(seed) + invalid_utf8_strings(seed))
    n += check_sp_random_decode(driver, sp, tok, seed)
    assert n > 3000


def test_sentencepiece_header(driver, sp_models):
    sp, tok = sp_models["mid"]
    info = driver_info(driver, tok)
    assert info["vocab_size"] == sp.get_piece_size()
    assert (info["bos_id"], info["eos_id"], info["unk_id"], info["pad_id"]) == \
        (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())
    assert info["add_bos"] == 1 and info["legacy"] == 0 and info["kind"] == 0
    assert info["chat_template"] == 1
    d = export.read_tokenizer(tok)
    for i, (b, score, ty) in enumerate(d["tokens"]):
        assert b.decode() == sp.id_to_piece(i)
        assert score == pytest.approx(sp.get_score(i), abs=0)
        assert (ty == export.PIECE_BYTE) == sp.is_byte(i)
        assert (ty == export.PIECE_CONTROL) == sp.is_control(i)
        assert (ty == export.PIECE_UNKNOWN) == sp.is_unknown(i)


@pytest.fixture(scope="session")
def find_exe(tmp_path_factory):
    """A program printing tokenizer_find(TOK, word) for each word argument."""
    d = tmp_path_factory.mktemp("find")
    src = d / "find.c"
    src.write_text(f'#include "{ROOT}/tokenizer.c"\n' + r'''
int main(int argc, char **argv) {
    Tokenizer t; char err[200];
    if (tokenizer_load(&t, argv[1], -1, err, sizeof err)) { puts(err); return 1; }
    for (int i = 2; i < argc; i++) printf("%d\n", tokenizer_find(&t, argv[i], strlen(argv[i])));
    tokenizer_free(&t);
    return 0;
}
''')
    exe = d / "find"
    subprocess.run([os.environ.get("CC", "cc"), "-std=c11", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(src)],
                   check=True)
    return exe


def find_ids(find_exe, tok, words):
    out = subprocess.run([str(find_exe), str(tok)] + words, capture_output=True, text=True, check=True).stdout
    return [int(x) for x in out.split()]


def test_sentencepiece_find(sp_models, find_exe):
    # tokenizer_find sees every token, control and user-defined ones included
    sp, tok = sp_models["mid"]
    words = ["<s>", "</s>", "<unk>", "<ctrl>", "<sep>", "[INST]", "<0x41>", "\u2581", "no such piece"]
    want = [sp.piece_to_id(w) if w != "no such piece" else -1 for w in words]
    assert find_ids(find_exe, tok, words) == want


def test_export_refuses_what_it_cannot_reproduce(tmp_path):
    lines = corpus(1000, seed=3, scripts=("latin",))
    for opts, message in ((dict(model_type="bpe"), "normalization"),
                          (dict(model_type="unigram", normalization_rule_name="identity"), "unigram")):
        f = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, vocab_size=200,
                                       minloglevel=2, **opts)
        mp = tmp_path / "m.model"
        mp.write_bytes(f.getvalue())
        with pytest.raises(export.ExportError, match=message):
            export.write_tokenizer_sentencepiece(str(mp), str(tmp_path / "m.tok"))


# ----------------------------------------------------------------------------
# Llama 2's tokenizer

needs_llama2 = pytest.mark.skipif(not (LLAMA2_DIR / "tokenizer.model").is_file(),
                                  reason=f"Llama 2 tokenizer not found in {LLAMA2_DIR}")


@pytest.fixture(scope="session")
def llama2(tmp_path_factory):
    if not (LLAMA2_DIR / "tokenizer.model").is_file():
        pytest.skip(f"Llama 2 tokenizer not found in {LLAMA2_DIR}")
    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_DIR / "tokenizer.model"))
    tok = tmp_path_factory.mktemp("llama2") / "tokenizer.tok"
    export.write_tokenizer_sentencepiece(str(LLAMA2_DIR / "tokenizer.model"), str(tok), vocab_size=32000)
    return sp, tok


@needs_llama2
@pytest.mark.parametrize("which", ["exported", "legacy"])
def test_llama2(driver, llama2, which):
    sp, tok = llama2
    if which == "legacy":
        legacy = LLAMA2_DIR / "tokenizer.bin"
        if not legacy.is_file():
            pytest.skip(f"{legacy} not found")
        tok = f"{legacy}:32000"
    info = driver_info(driver, tok)
    assert (info["vocab_size"], info["bos_id"], info["eos_id"], info["add_bos"]) == (32000, 1, 2, 1)
    assert info["legacy"] == (which == "legacy")
    n = check_sp_encode_decode(driver, sp, tok, test_strings(7, 2500, 2500) + invalid_utf8_strings(7, 1000))
    n += check_sp_random_decode(driver, sp, tok, 8)
    assert n > 7000


@needs_llama2
def test_llama2_known_ids(driver, llama2):
    # ids printed by Meta's reference for these prompts
    sp, tok = llama2
    assert encode_batch(driver, tok, [b"Hello world", b"[INST] hi [/INST]"]) == \
        [[1, 15043, 3186], [1, 518, 25580, 29962, 7251, 518, 29914, 25580, 29962]]


def mixed_text(nbytes, seed=11):
    rng = random.Random(seed)
    parts, size = [], 0
    while size < nbytes:
        s = sentence(rng) + rng.choice([" ", "\n", "  ", ". ", "\n\n"])
        if rng.random() < .05:
            s += random_unicode(rng, 20)
        parts.append(s)
        size += len(s.encode())
    return "".join(parts).encode()[:nbytes]


def test_speed_1mb(driver, sp_models):
    # Llama 2's vocabulary when present, else the largest trained one
    if (LLAMA2_DIR / "tokenizer.model").is_file():
        sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_DIR / "tokenizer.model"))
        tok = LLAMA2_DIR / "tokenizer.bin"
        if not tok.is_file():
            tok = sp_models["big"][1]
            sp = sp_models["big"][0]
    else:
        sp, tok = sp_models["big"]
    text = mixed_text(1 << 20)
    text = text.decode("utf-8", "ignore").encode()
    p = subprocess.run([driver, str(tok), "bench"], input=text, capture_output=True, text=False)
    assert p.returncode == 0, p.stderr.decode()
    n, seconds = p.stdout.split()
    print(f"1 MiB: {int(n)} tokens in {float(seconds):.3f} s")
    assert float(seconds) < 1.0
    # and the long text tokenizes exactly as well
    assert encode_batch(driver, tok, [text])[0] == sp_reference_encode(sp, text)


# ----------------------------------------------------------------------------
# Loading bad files: errors, never crashes

def run_info(driver, path, vocab=None):
    arg = f"{path}:{vocab}" if vocab is not None else str(path)
    return subprocess.run([driver, arg, "info"], capture_output=True, text=True)


def test_vocab_mismatch_message(driver, sp_models):
    sp, tok = sp_models["small"]
    p = run_info(driver, tok, 512)
    assert p.returncode == 2
    assert f"tokenizer has {sp.get_piece_size()} tokens but the model has 512" in p.stderr
    assert run_info(driver, tok, sp.get_piece_size()).returncode == 0


@pytest.mark.parametrize("which", ["sentencepiece", "byte-level"])
def test_bad_files_do_not_crash(driver, sp_models, bl_models, tmp_path, which):
    tok = sp_models["small"][1] if which == "sentencepiece" else bl_models["small"][1]
    good = Path(tok).read_bytes()
    rng = random.Random(1)
    cases = [b"", b"LTOK", good[:63], good[:64], good[:-1], good + b"\0", b"\x10\0\0\0" + b"\0" * 3,
             b"\xff\xff\xff\x7f", b"\x05\0\0\0" + struct.pack("<fi", 0, 1 << 30)]
    for cut in range(0, len(good), max(1, len(good) // 200)):
        cases.append(good[:cut])
    for _ in range(300):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            i = rng.randrange(min(len(b), 200)) if r < .5 else rng.randrange(len(b)) if r < .8 else \
                rng.randrange(max(0, len(b) - 400), len(b))
            b[i] = rng.randrange(256)
        cases.append(bytes(b))
    # header fields one by one set to awkward values
    for off in range(4, 64, 4):
        for v in (0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 300):
            b = bytearray(good)
            b[off:off + 4] = struct.pack("<I", v)
            cases.append(bytes(b))
    path = tmp_path / "bad.tok"
    accepted = 0
    for data in cases:
        path.write_bytes(data)
        p = run_info(driver, path)
        assert p.returncode in (0, 2), (data[:80], p.returncode, p.stderr)
        if p.returncode == 2:
            assert p.stderr.strip(), data[:80]
        else:
            accepted += 1
            # whatever loads must encode and decode without trouble
            encode_batch(driver, path, [b"hello world \xff", "日本 👍 12 <|im_start|>".encode()])
            decode_batch(driver, path, [list(range(20)), [-5, 1 << 30, 3, 4]])
    assert accepted < len(cases)


# ----------------------------------------------------------------------------
# The engine's --tokenize

def test_run_tokenize(sp_models):
    run = ROOT / "run"
    if not run.is_file():
        pytest.skip("./run is not built (make run)")
    help_text = subprocess.run([str(run), "--help"], capture_output=True, text=True)
    if "--tokenize" not in help_text.stdout + help_text.stderr:
        pytest.skip("./run has no --tokenize yet")
    sp, tok = sp_models["mid"]
    for text in ["Hello world", "  two  spaces", "<s>[INST] 日本語 👍🏽 [/INST]", "\u00a0\t\n x"]:
        p = subprocess.run([str(run), "--tokenize", "-z", str(tok), "-i", text], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert [int(x) for x in p.stdout.split()] == sp_reference_encode(sp, text), text


# ----------------------------------------------------------------------------
# Byte-level BPE (GPT-2, SmolLM2) against Hugging Face tokenizers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BL_CONFIGS = {
    # name: (vocab size, Digits first, add_prefix_space, extra settings)
    "gpt2": (3000, False, False, {}),
    "smollm2": (3000, True, False, {}),   # Digits(individual_digits) then ByteLevel
    "small": (400, False, False, {}),
    "prefix": (1500, False, True, {}),
    "bos": (1500, True, False, {"bos": True}),
    "ignore_merges": (1500, False, False, {"ignore_merges": True}),
    "added": (1500, False, False, {"added": ["foo bar", "ünï", "\u00e9t\u00e9"]}),
    # Split by Llama 3's regex, ByteLevel without its own; BOS; ignore_merges
    "llama3": (3000, False, False, {"llama3": True, "bos": True, "ignore_merges": True}),
}


def train_bl(name, directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    vocab, digits, prefix, extra = BL_CONFIGS[name]
    tok = Tokenizer(models.BPE())
    bl = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bl]) if digits else bl
    if extra.get("llama3"):
        from tokenizers import Regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(export.LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(4000, seed=len(name)), trainer=trainer)
    if extra.get("bos"):
        tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", 0)])
    if extra.get("added"):
        tok.add_tokens(extra["added"])
    path = directory / f"{name}.json"
    tok.save(str(path))
    if extra.get("ignore_merges"):
        j = json.loads(path.read_text())
        j["model"]["ignore_merges"] = True
        path.write_text(json.dumps(j))
        tok = Tokenizer.from_file(str(path))
    return tok, path


@pytest.fixture(scope="session")
def bl_models(tmp_path_factory):
    """name -> (tokenizers.Tokenizer, path of the exported LTOK file)."""
    d = tmp_path_factory.mktemp("bl")
    out = {}
    for name in BL_CONFIGS:
        tok, path = train_bl(name, d)
        ltok = d / f"{name}.tok"
        export.write_tokenizer_hf_json(str(path), str(ltok))
        out[name] = (tok, ltok)
    return out


def class_probe_strings(seed, n=1500):
    """Strings that put random code points next to letters, digits, spaces
    and apostrophes, where the pre-tokenizer's classes decide the split."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c = random_unicode(rng, 1)
        d = random_unicode(rng, 1)
        out.append(rng.choice([f"x{c}y {c}{c}1 '{c}s", f"{c} {d}\t{c}{d}", f"1{c}2 {c}'ll", f" {c}{c} ",
                               f"{c}\n{d} ", f"ab{c}cd{d}"]))
    return out


@pytest.mark.parametrize("name", list(BL_CONFIGS))
def test_byte_level_trained(driver, bl_models, name):
    tok, ltok = bl_models[name]
    info = driver_info(driver, ltok)
    texts = test_strings(len(name) * 7) + class_probe_strings(len(name)) + [
        "<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b", "<|im_start|><|im_start|>", "<|im_sta",
        "<|im_end|", "12345 678", " 1 2 3", "x\uff11\uff12\uff13", "foo bar foo  bar", "ünïünï", "'s'S 'RE're",
        "don't 'll've'd'm", "  \n\n  x", "\n\n\n", "x \n", "\u3000\u3000a", "\u0085\u00a0 x",
        "I'M YOU'LL 'Ll 'ſ 'ſx", "(word) \tword \nword 1234567 a1b22c333", "x !!\n\n\ny ?\r\n", " \r\n \n ",
        "\t\n\t", "a \n\t b"]
    raw = [t.encode() for t in texts]
    mine = encode_batch(driver, ltok, raw, bos=info["add_bos"])
    bad = [(t, tok.encode(t).ids, m) for t, m in zip(texts, mine) if tok.encode(t).ids != m]
    report("encodings", bad, len(texts))
    refs = [tok.encode(t).ids for t in texts]
    dec = decode_batch(driver, ltok, refs)
    bad = [(ids, tok.decode(ids), m) for ids, m in zip(refs, dec) if tok.decode(ids).encode() != m]
    report("decodings", bad, len(refs))
    # random ids: any token, runs of single-byte tokens, special tokens between
    rng = random.Random(len(name))
    n = tok.get_vocab_size()
    byte_ids = [i for i in range(n) if len(tok.id_to_token(i)) == 1]
    lists = [[rng.randrange(n) for _ in range(rng.randint(0, 10))] for _ in range(1500)]
    lists += [[rng.choice(byte_ids + [0, 1, 2]) for _ in range(rng.randint(1, 10))] for _ in range(1500)]
    dec = decode_batch(driver, ltok, lists)
    bad = [(ids, tok.decode(ids), m) for ids, m in zip(lists, dec) if tok.decode(ids).encode() != m]
    report("random decodings", bad, len(lists))
    # invalid UTF-8 (which the reference cannot take): bytes survive the
    # round trip, and decoding replaces bad sequences as Python does
    if not info["add_bos"] and not (info["flags"] & export.TOKF_DUMMY_PREFIX):
        inv = invalid_utf8_strings(len(name))
        dec = decode_batch(driver, ltok, encode_batch(driver, ltok, inv, bos=0))
        bad = [(b, m) for b, m in zip(inv, dec) if b.decode("utf-8", "replace").encode() != m]
        report("invalid UTF-8 round trips", bad, len(inv))
    assert len(texts) + len(lists) > 5000


def test_byte_level_header(driver, bl_models, tmp_path):
    tok, ltok = bl_models["gpt2"]
    info = driver_info(driver, ltok)
    assert (info["kind"], info["chat_template"], info["add_bos"], info["bos_id"]) == (1, 2, 0, -1)
    assert info["pretokenizer"] == export.PRETOK_GPT2
    assert driver_info(driver, bl_models["smollm2"][1])["pretokenizer"] == export.PRETOK_DIGITS_GPT2
    info = driver_info(driver, bl_models["bos"][1])
    assert (info["add_bos"], info["bos_id"]) == (1, 0)
    info = driver_info(driver, bl_models["llama3"][1])
    assert (info["pretokenizer"], info["add_bos"], info["flags"] & export.TOKF_IGNORE_MERGES) == \
        (export.PRETOK_LLAMA3, 1, export.TOKF_IGNORE_MERGES)
    # BOS and EOS named by tokenizer_config.json beside tokenizer.json
    d = tmp_path / "smol"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}))
    export.write_tokenizer_hf_json(str(d / "tokenizer.json"), str(d / "t.tok"), vocab_size=tok.get_vocab_size())
    info = driver_info(driver, d / "t.tok")
    assert (info["bos_id"], info["eos_id"], info["add_bos"]) == (1, 2, 0)
    # tokens are stored as raw bytes: "Ġ" is the space
    t = export.read_tokenizer(ltok)
    assert t["tokens"][tok.token_to_id("\u0120")][0] == b" "


def test_byte_level_find(bl_models, find_exe):
    tok, ltok = bl_models["gpt2"]
    # tokens are found by their bytes: " ab", not "Ġab"
    word = next(w for w in sorted(tok.get_vocab()) if w.startswith("\u0120") and len(w) > 2 and w[1:].isascii())
    words = SPECIALS + ["a", " ", word.replace("\u0120", " "), word, "<|im_start"]
    want = [tok.token_to_id(w) for w in SPECIALS + ["a", "\u0120", word]] + [-1, -1]
    assert find_ids(find_exe, ltok, words) == want


def test_byte_level_export_refuses(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    base = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders
    base.decoder = decoders.ByteLevel()
    path = tmp_path / "t.json"
    base.save(str(path))
    export.write_tokenizer_hf_json(str(path), str(tmp_path / "ok.tok"))   # fine as it is
    cases = [
        ("normalizer", lambda j: j.update(normalizer={"type": "NFKC"})),
        ("pre_tokenizer", lambda j: j.update(pre_tokenizer={"type": "Whitespace"})),
        ("only BPE", lambda j: j["model"].update(type="WordPiece")),
        ("decoder", lambda j: j.update(decoder=None)),
        ("continuing_subword_prefix", lambda j: j["model"].update(continuing_subword_prefix="##")),
    ]
    for message, change in cases:
        j = json.loads(path.read_text())
        change(j)
        path.write_text(json.dumps(j))
        with pytest.raises(export.ExportError, match=message):
            export.write_tokenizer_hf_json(str(path), str(tmp_path / "bad.tok"))
        base.save(str(path))


def test_byte_level_speed(driver, bl_models):
    tok, ltok = bl_models["smollm2"]
    text = mixed_text(1 << 20, seed=12).decode("utf-8", "ignore").encode()
    p = subprocess.run([driver, str(ltok), "bench"], input=text, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    n, seconds = p.stdout.split()
    print(f"byte-level 1 MiB: {int(n)} tokens in {float(seconds):.3f} s")
    assert float(seconds) < 1.0
    assert encode_batch(driver, ltok, [text], bos=0)[0] == tok.encode(text.decode()).ids


def test_unicode_tables_are_current():
    # the committed tables are what tools/gen_unicode_tables.py measures now
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_unicode_tables.py")], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout == (ROOT / "unicode_tables.h").read_text(), \
        "unicode_tables.h is stale: run python3 tools/gen_unicode_tables.py --write"
