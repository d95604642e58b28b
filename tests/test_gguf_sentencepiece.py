"""The sentencepiece tokenizer of a `llama`-model GGUF file, against sentencepiece.

A GGUF file is written here with the gguf package's writer, its tokenizer
taken from a sentencepiece model the way llama.cpp's converter takes it
(pieces, scores, piece types, special ids, add_bos/add_eos): a small model
trained here with sentencepiece's trainer (user-defined and control pieces,
byte fallback), and Llama 2's own tokenizer.model when shared/tokenizers/llama2/
is there. It is converted with `export.py --gguf` (model and tokenizer) and
`export.py --tokenizer-from` (tokenizer alone), and tokenizer.c's ids and
text are compared with sentencepiece's over tests/test_tokenizer.py's
strings, and, for the trained model, with transformers' tokenizer read from
the same GGUF file. (transformers rebuilds a sentencepiece GGUF's merges from
its scores, a search that takes minutes for Llama 2's 32000 pieces: Llama 2
is compared with sentencepiece only.)
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import test_tokenizer as tt     # its strings, its driver and its sentencepiece checks

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export  # noqa: E402

import gguf  # noqa: E402
import sentencepiece as spm  # noqa: E402
from sentencepiece import sentencepiece_model_pb2  # noqa: E402

driver = tt.driver              # the fixture, under its name here
RUN = Path(os.environ.get("RUN_BINARY", ROOT / "run"))


@pytest.fixture(scope="module", autouse=True)
def build():
    if "RUN_BINARY" not in os.environ:
        subprocess.run(["make", "-s", "run"], cwd=ROOT, check=True)


def write_sp_gguf(path, model_file, add_bos=True, add_eos=False, template=None, dim=16):
    """A llama GGUF file with a tiny random model and the tokenizer of the
    sentencepiece model_file, as llama.cpp's converter writes it."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = len(proto.pieces)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("sentencepiece")
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_block_count(1)
    w.add_feed_forward_length(2 * dim)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(dim // 2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n)
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([int(p.type) for p in proto.pieces])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    if sp.pad_id() >= 0:
        w.add_pad_token_id(sp.pad_id())
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    if template:
        w.add_chat_template(template)
    rng = np.random.default_rng(0)

    def tensor(name, *shape):
        w.add_tensor(name, (0.05 * rng.standard_normal(shape)).astype(np.float32))

    tensor("token_embd.weight", n, dim)
    for name, shape in [("attn_norm", (dim,)), ("attn_q", (dim, dim)), ("attn_k", (dim, dim)),
                        ("attn_v", (dim, dim)), ("attn_output", (dim, dim)), ("ffn_norm", (dim,)),
                        ("ffn_gate", (2 * dim, dim)), ("ffn_up", (2 * dim, dim)), ("ffn_down", (dim, 2 * dim))]:
        tensor(f"blk.0.{name}.weight", *shape)
    tensor("output_norm.weight", dim)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sp


def export_py(*args):
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trained "mid" model of tests/test_tokenizer.py (user-defined
    <sep>, [INST], "▁▁x", control <ctrl>, byte fallback) in a GGUF file,
    converted both ways: (sentencepiece, directory)."""
    d = tmp_path_factory.mktemp("sp_gguf")
    (d / "sp.model").write_bytes(tt.train_sp("mid"))
    sp = write_sp_gguf(d / "model.gguf", d / "sp.model", template="{{ '[INST] ' + content + ' [/INST]' }}")
    export_py(d / "model.bin", "--gguf", d / "model.gguf")
    export_py(d / "alone.bin", "--tokenizer-from", d / "model.gguf")
    return sp, d


def test_gguf_sentencepiece_matches_sentencepiece(driver, trained):
    sp, d = trained
    assert (d / "alone.bin").read_bytes() == (d / "tokenizer.bin").read_bytes()
    n = tt.check_sp_encode_decode(driver, sp, d / "tokenizer.bin", tt.test_strings(41) + tt.invalid_utf8_strings(41))
    n += tt.check_sp_random_decode(driver, sp, d / "tokenizer.bin", 42)
    assert n > 3000
    info = tt.driver_info(driver, d / "tokenizer.bin")
    assert (info["vocab_size"], info["bos_id"], info["eos_id"], info["unk_id"], info["pad_id"], info["add_bos"],
            info["kind"], info["chat_template"]) == \
        (sp.get_piece_size(), sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id(), 1, 0, export.CHAT_LLAMA2)


def test_gguf_add_bos_and_add_eos_are_followed(trained, tmp_path):
    """./run's prompt ids follow the file's add_bos_token and add_eos_token
    as sentencepiece's encode(add_bos=, add_eos=) does."""
    sp, d = trained
    for add_bos, add_eos in [(False, True), (True, True), (False, False)]:
        write_sp_gguf(tmp_path / "t.gguf", d / "sp.model", add_bos=add_bos, add_eos=add_eos)
        export_py(tmp_path / "t.bin", "--tokenizer-from", tmp_path / "t.gguf")
        for text in ["Hello world", " a <sep> b [INST] c ", "日本語 👍🏽"]:
            p = subprocess.run([str(RUN), "--tokenize", "-z", tmp_path / "t.bin", "-i", text],
                               capture_output=True, text=True)
            assert p.returncode == 0, p.stderr
            assert [int(x) for x in p.stdout.split()] == sp.encode(text, add_bos=add_bos, add_eos=add_eos), text


def hf_tokenizer_from_gguf(directory, name):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(directory), gguf_file=name)


def without_marked_pieces(sp, texts):
    """The texts in which no control or user-defined piece is written. There
    transformers' reading of a GGUF file parts from sentencepiece, which
    tokenizer.c follows: it matches control pieces (<s>) typed in the text, as
    Hugging Face's special tokens are, and does not keep user-defined ones whole."""
    marked = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
              if sp.is_control(i) or sp.is_unknown(i) or sp.id_to_piece(i) in USER_DEFINED]
    marked = [m.replace("\u2581", " ") for m in marked] + marked
    return [t for t in texts if not any(m in t for m in marked)]


USER_DEFINED = tt.SP_CONFIGS["mid"][2]["user_defined_symbols"]


def test_gguf_sentencepiece_matches_transformers(driver, trained):
    """transformers' tokenizer read from the same GGUF file (it rebuilds the
    merges from the scores), on the test strings of valid UTF-8."""
    sp, d = trained
    hf = hf_tokenizer_from_gguf(d, "model.gguf")
    texts = without_marked_pieces(sp, tt.test_strings(43, 500, 500))
    assert len(texts) > 900
    ours = tt.encode_batch(driver, d / "tokenizer.bin", [t.encode() for t in texts])
    tt.report("encodings", [(t, hf(t).input_ids, m) for t, m in zip(texts, ours) if hf(t).input_ids != m],
              len(texts))


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    model = tt.LLAMA2_DIR / "tokenizer.model"
    if not model.is_file():
        pytest.skip(f"Llama 2 tokenizer not found in {tt.LLAMA2_DIR}")
    d = tmp_path_factory.mktemp("llama2_gguf")
    sp = write_sp_gguf(d / "llama2.gguf", model)
    export_py(d / "model.bin", "--gguf", d / "llama2.gguf")
    return sp, d


def test_llama2_gguf_matches_sentencepiece(driver, llama2):
    sp, d = llama2
    info = tt.driver_info(driver, d / "tokenizer.bin")
    assert (info["vocab_size"], info["bos_id"], info["eos_id"], info["add_bos"]) == (32000, 1, 2, 1)
    n = tt.check_sp_encode_decode(driver, sp, d / "tokenizer.bin", tt.test_strings(7) + tt.invalid_utf8_strings(7))
    n += tt.check_sp_random_decode(driver, sp, d / "tokenizer.bin", 8)
    assert n > 3000
    assert tt.encode_batch(driver, d / "tokenizer.bin", [b"Hello world"]) == [[1, 15043, 3186]]


def test_tokenizer_from_each_kind_of_source(trained, tmp_path):
    """--tokenizer-from a tokenizer.model, a directory holding one (beside a
    tokenizer.json, which it must not take), and the older --tokenizer-model:
    the same ids as sentencepiece."""
    sp, d = trained
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.model").write_bytes((d / "sp.model").read_bytes())
    (hf_dir / "tokenizer.json").write_text("{}")
    for flag, source in [("--tokenizer-from", d / "sp.model"), ("--tokenizer-from", hf_dir),
                         ("--tokenizer-model", d / "sp.model")]:
        out = export_py(tmp_path / "t.bin", flag, source)
        assert "tokenizer.model" in out or "sp.model" in out, out
        for text in ["Hello world", " a <sep> b [INST] c ", "日本語 👍🏽"]:
            p = subprocess.run([str(RUN), "--tokenize", "-z", tmp_path / "t.bin", "-i", text],
                               capture_output=True, text=True)
            assert p.returncode == 0, p.stderr
            assert [int(x) for x in p.stdout.split()] == sp.encode(text, add_bos=True), (flag, source, text)
