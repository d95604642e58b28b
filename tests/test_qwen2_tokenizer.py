"""Qwen2 / Qwen2.5's tokenizer and chat template, against the tokenizers
library and transformers' apply_chat_template.

No Qwen2 tokenizer file is at hand, so one is built here with the
`tokenizers` library the way Qwen2's is made: normalizer NFC, Llama 3's
Split regex with digits one by one (\\p{N} for \\p{N}{1,3}), ByteLevel without
its own regex, byte-level BPE, no BOS, and the added tokens <|endoftext|>,
<|im_start|> and <|im_end|>. Its tokenizer_config.json carries a ChatML
template written here with the structure of Qwen2.5 Instruct's: a tools
branch first, then a system turn that is the conversation's system message
or, when there is none, the literal default "You are Qwen, created by
Alibaba Cloud. You are a helpful assistant." export.py --tokenizer-from
converts the directory, and:

  - tokenizer.c's ids equal the tokenizers library's on the tokenizer
    tests' strings, as they are and in NFC, on strings that NFC changes
    (composition, reordering of marks, Hangul jamo, singletons, exclusions)
    and on runs of digits;
  - tokenizer.c's NFC equals the tokenizers library's NFC normalizer on
    every code point, alone and before marks, and on random runs of letters,
    combining marks and invalid UTF-8 bytes (which pass through);
  - ./run -m chat --tokenize's ids equal apply_chat_template(...,
    add_generation_prompt=True)'s, with and without a system message;
  - a GGUF tokenizer with tokenizer.ggml.pre "qwen2" converts to the same.
"""

import json
import os
import random
import struct
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

import test_tokenizer as tt     # its corpus, strings and driver

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export  # noqa: E402

import transformers  # noqa: E402
driver = tt.driver

RUN = Path(os.environ.get("RUN_BINARY", ROOT / "run"))
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# The structure of Qwen2.5 Instruct's template, written for this test: with
# tools, a system turn that lists them; else the system message, or the
# default one; then each message; then the assistant's header.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}\n"
    "    {%- else %}{{- '" + DEFAULT_SYSTEM + "' }}{%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n<tools>\" }}\n"
    "    {%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}\n"
    "    {{- \"\\n</tools><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) or "
    "message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DIGITS = ["12345", "3.14159", "2024-11-26", "x1234567y", " 1 22 333 4444", "٣٤٥ ١٢", "ⅫⅣ 123abc", "1\n2\n\n33"]


@pytest.fixture(scope="module", autouse=True)
def build():
    if "RUN_BINARY" not in os.environ:
        subprocess.run(["make", "-s", "run"], cwd=ROOT, check=True)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """(tokenizers.Tokenizer, transformers tokenizer, directory holding them and tokenizer.bin)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    d = tmp_path_factory.mktemp("qwen2")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, show_progress=False, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tt.corpus(3000, seed=4) + [DEFAULT_SYSTEM] * 20, trainer=trainer)
    tok.save(str(d / "tokenizer.json"))
    # runs of digits as tokens, which Qwen2's pre-tokenizer never lets the
    # merges reach (its BPE never learns them), so that splitting is seen
    j = json.loads((d / "tokenizer.json").read_text())
    for left, right in (("1", "2"), ("12", "3"), ("4", "5")):
        j["model"]["vocab"][left + right] = len(j["model"]["vocab"])
        j["model"]["merges"].append([left, right] if isinstance(j["model"]["merges"][0], list) else f"{left} {right}")
    (d / "tokenizer.json").write_text(json.dumps(j))
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert j["normalizer"] == {"type": "NFC"} and j["pre_tokenizer"]["pretokenizers"][0]["pattern"] == \
        {"Regex": QWEN2_PATTERN}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": QWEN25_TEMPLATE, "tokenizer_class": "Qwen2Tokenizer",
        "clean_up_tokenization_spaces": False}))
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), d / "tokenizer.bin", "--tokenizer-from", d],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return tok, transformers.AutoTokenizer.from_pretrained(str(d)), d


# Strings NFC changes: composed, marks reordered, jamo to a syllable, the
# singleton Angstrom sign, an exclusion kept decomposed, Tibetan, and these
# among ASCII, emoji and added tokens (NFC applies between them, not across).
NOT_NFC = ["cafe\u0301", "A\u030a", "\u1100\u1161\u11a8", "\u212b", "e\u0323\u0302", "e\u0302\u0323",
           "\u0958", "\u0f73", "Cafe\u0301 \u212b 42 \U0001F600\u0301 x\u0308y \u0f73!",
           "a\u0301\u0301\u0316b \u1100\u1161 \uac00\u11a8 \u0344\u0301 \u01d5",
           "<|im_start|>e\u0301<|im_end|>\u0338 >\u0338 \u2126\u0301",
           "\u03b1\u0313\u0300\u0345 \u1f00\u0300 \U0001d15e\U0001d165 \U00011935\U00011930"]


def nfc_strings():
    texts = tt.test_strings(13) + tt.class_probe_strings(13) + DIGITS
    return [unicodedata.normalize("NFC", t) for t in texts]


def test_header(qwen2):
    t = export.read_tokenizer(qwen2[2] / "tokenizer.bin")
    assert (t["pretokenizer"], t["chat_template"], t["system_prompt"]) == \
        (export.PRETOK_QWEN2, export.CHAT_CHATML, DEFAULT_SYSTEM)
    assert t["flags"] & export.TOKF_NFC and not t["flags"] & export.TOKF_ADD_BOS


def test_encodes_as_tokenizers(driver, qwen2):
    tok, _, d = qwen2
    texts = nfc_strings()
    mine = tt.encode_batch(driver, d / "tokenizer.bin", [t.encode() for t in texts], bos=0)
    bad = [(t, tok.encode(t).ids, m) for t, m in zip(texts, mine) if tok.encode(t).ids != m]
    tt.report("encodings", bad, len(texts))
    for text in DIGITS[:3]:      # digits one by one, as Qwen2's \p{N}
        ids = tok.encode(text).ids
        assert [tok.id_to_token(i) for i in ids if tok.id_to_token(i).isdigit()] == \
            [c for c in text if c.isdigit()], text


def test_encodes_text_not_in_nfc_as_tokenizers(driver, qwen2):
    """tokenizers applies NFC first; tokenizer.c too, between added tokens."""
    tok, _, d = qwen2
    texts = NOT_NFC + tt.test_strings(14) + tt.class_probe_strings(14)
    assert all(unicodedata.normalize("NFC", t) != t for t in NOT_NFC)
    mine = tt.encode_batch(driver, d / "tokenizer.bin", [t.encode() for t in texts], bos=0)
    bad = [(t, tok.encode(t).ids, m) for t, m in zip(texts, mine) if tok.encode(t).ids != m]
    tt.report("encodings", bad, len(texts))


def test_invalid_utf8_passes_through_nfc(driver, qwen2):
    """Bytes that are not UTF-8 stay as they are, and stop composition across
    them: the text encodes as the NFC of the valid stretches between them,
    and decodes to that as tokenizers decodes (a U+FFFD for bad bytes)."""
    _, _, d = qwen2
    parts = [["cafe\u0301", b"\xff", "\u0301x"], [b"\xcc", "\u0301", b"\x80\xe1\x84", "\u1161"],
             ["\u212b", b"\xf0\x9f", "e\u0302\u0323", b"\xc3"]]
    texts = [b"".join(p if isinstance(p, bytes) else p.encode() for p in ps) for ps in parts]
    nfc = [b"".join(p if isinstance(p, bytes) else unicodedata.normalize("NFC", p).encode() for p in ps)
           for ps in parts]
    ids = tt.encode_batch(driver, d / "tokenizer.bin", texts, bos=0)
    assert ids == tt.encode_batch(driver, d / "tokenizer.bin", nfc, bos=0)
    assert tt.decode_batch(driver, d / "tokenizer.bin", ids) == \
        [t.decode("utf-8", "replace").encode() for t in nfc]


def driver_nfc(driver, texts):
    """tokenizer.c's NFC of each of texts (bytes), through the driver."""
    data = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    p = subprocess.run([driver, "nfc"], input=data, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    res = tt.framed_replies(p.stdout)
    assert len(res) == len(texts)
    return res


def test_nfc_of_every_code_point(driver):
    """Each code point alone and before marks of two classes, as tokenizers'
    NFC. Where Python's unicodedata disagrees with it, tokenizers is
    followed: the Rust crate inside it does not decompose U+11938 and counts
    98 marks newer than its tables (U+0898, say) as starters."""
    from tokenizers import normalizers
    ref = normalizers.NFC().normalize_str
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    for after in ("", "\u0323\u0302"):
        texts = [c + after for c in chars]
        mine = driver_nfc(driver, [t.encode() for t in texts])
        bad = [(t, ref(t), m.decode()) for t, m in zip(texts, mine) if m != ref(t).encode()]
        tt.report("NFCs", bad, len(texts))
    nfd = normalizers.NFD().normalize_str
    assert [c for c in chars if nfd(c) != unicodedata.normalize("NFD", c)] == ["\U00011938"]


def test_nfc_of_random_marks(driver):
    """Random runs of starters, combining marks of many classes, jamo and
    bad bytes, against tokenizers' NFC (and unicodedata's) of the stretches
    between the bad bytes."""
    from tokenizers import normalizers
    ref = normalizers.NFC().normalize_str
    rng = random.Random(7)
    marks = [chr(c) for c in range(0x300, 0x370)] + [chr(c) for c in (
        0x5B0, 0x5B4, 0x5C2, 0x64B, 0x650, 0x670, 0x93C, 0x94D, 0x9BE, 0x9D7, 0xB3E, 0xB56, 0xBBE, 0xCD5,
        0xD3E, 0xDCA, 0xDCF, 0xF71, 0xF72, 0xF74, 0xF80, 0x102E, 0x1B35, 0x302A, 0x3099, 0x309A,
        0x1D165, 0x1D16E, 0x110BA, 0x11127, 0x1133E)]
    starters = list("aeiouAEOUcnsyzwx ") + [chr(c) for c in (
        0x391, 0x3B1, 0x3C9, 0x1F00, 0x415, 0x627, 0x648, 0x915, 0x9C7, 0xB47, 0xBC6, 0xCC6, 0xD46,
        0xDD9, 0x1025, 0x1B05, 0x304B, 0x30CF, 0x1100, 0x1112, 0x1161, 0x1175, 0x11A8, 0x11C2, 0xAC00,
        0xAC01, 0xD7A3, 0x212B, 0x2126, 0x958, 0xF73, 0x344, 0x1D15E, 0x11099, 0x11131, 0x11347, 0x1F600)]
    bad_bytes = [b"\xff", b"\xcc", b"\xc0\x80", b"\xe1\x84", b"\xf0\x9f\x98"]   # never valid joined
    runs = []
    for _ in range(20000):
        runs.append([rng.choice(bad_bytes) if rng.random() < .05 else
                     rng.choice(marks if rng.random() < .6 else starters) for _ in range(rng.randrange(1, 9))])
    texts = [b"".join(p if isinstance(p, bytes) else p.encode() for p in r) for r in runs]
    mine = driver_nfc(driver, texts)
    bad = []
    for r, m in zip(runs, mine):
        pieces, text = [], ""
        for p in r + [b""]:
            if isinstance(p, bytes):
                assert ref(text) == unicodedata.normalize("NFC", text)
                pieces += [ref(text).encode(), p]
                text = ""
            else:
                text += p
        if m != b"".join(pieces):
            bad.append((r, b"".join(pieces), m))
    tt.report("NFCs", bad, len(runs))


def test_llama3_pattern_differs_on_digits(driver, qwen2, tmp_path):
    """The same file with Llama 3's regex groups digits by three: the
    pretokenizer field is what splits them."""
    _, _, d = qwen2
    j = json.loads((d / "tokenizer.json").read_text())
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = export.LLAMA3_PATTERN
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    export.write_tokenizer_hf_json(str(tmp_path / "tokenizer.json"), str(tmp_path / "t.bin"))
    ours = tt.encode_batch(driver, d / "tokenizer.bin", [b"12345"], bos=0)
    llama3 = tt.encode_batch(driver, tmp_path / "t.bin", [b"12345"], bos=0)
    assert len(ours[0]) == 5 and len(llama3[0]) == 2     # "123" "45"


def chat_ids(tokenizer_bin, question, system=None):
    p = subprocess.run([str(RUN), "--tokenize", "-m", "chat", "-z", str(tokenizer_bin), "-i", question]
                       + (["-y", system] if system is not None else []), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return [int(x) for x in p.stdout.split()]


@pytest.mark.parametrize("question,system", [("What is 12345 + 3.14159?", None),
                                             ("What is the date? 2024-11-26", "You are brief."),
                                             ("  naïve café\n\n", None),
                                             ("cafe\u0301 \u212b \u1100\u1161", "e\u0302\u0323")])
def test_chat_matches_apply_chat_template(qwen2, question, system):
    _, hf, d = qwen2
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": question}]
    expected = hf.apply_chat_template(msgs, add_generation_prompt=True)
    assert chat_ids(d / "tokenizer.bin", question, system) == expected


def test_qwen2_gguf_tokenizer_converts(qwen2, tmp_path):
    """A GGUF tokenizer as llama.cpp writes Qwen2's: pre "qwen2"."""
    import gguf
    tok, _, d = qwen2
    t = export.read_tokenizer(d / "tokenizer.bin")
    vocab = tok.get_vocab()
    texts = [None] * len(vocab)
    for text, i in vocab.items():
        texts[i] = text
    model = json.loads((d / "tokenizer.json").read_text())["model"]
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(texts)
    w.add_token_types([3 if text in SPECIALS else 1 for text in texts])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(QWEN25_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    export.write_tokenizer_gguf(str(tmp_path / "t.gguf"), str(tmp_path / "t.bin"))
    g = export.read_tokenizer(tmp_path / "t.bin")
    for key in ("tokens", "merges", "pretokenizer", "flags", "chat_template", "system_prompt", "eos_id"):
        assert g[key] == t[key], key
