"""Hostile input: malformed checkpoints, tokenizers and command lines.

Each case asserts the exit status (1 for a bad file, 2 for a bad command
line), that stderr is one line naming the file and the problem, and that no
signal ended the process (a negative return code from subprocess).
"""

import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export  # noqa: E402

RUN = Path(os.environ.get("RUN_BINARY", ROOT / "run"))
HEADER_FIELDS = ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "vocab_size", "max_seq_len"]


@pytest.fixture(scope="module", autouse=True)
def build():
    if "RUN_BINARY" not in os.environ:
        subprocess.run(["make", "-s", "run"], cwd=ROOT, check=True)


def run(args, cwd, stdin=None):
    return subprocess.run([str(RUN)] + [str(a) for a in args], cwd=cwd, capture_output=True,
                          text=True, errors="replace", timeout=60, stdin=subprocess.DEVNULL)


def assert_clean_error(p, status, *fragments):
    assert p.returncode >= 0, f"killed by signal {-p.returncode}: {p.stderr}"
    assert p.returncode == status, f"exit {p.returncode}, expected {status}: {p.stderr}"
    assert p.stderr.startswith("run: "), p.stderr
    assert p.stderr.count("\n") == 1, f"expected one line: {p.stderr!r}"
    for fragment in fragments:
        assert fragment in p.stderr, f"{fragment!r} not in {p.stderr!r}"


ARGS = export.ModelArgs(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        vocab_size=40, max_seq_len=16, rope_theta=10000.0, norm_eps=1e-5, tied=False)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid checkpoint, and the offset where each tensor starts."""
    d = tmp_path_factory.mktemp("good")
    path = d / "model.bin"
    export.write_checkpoint(path, ARGS, export.random_model(ARGS, 0).state_dict())
    return path, path.read_bytes()


def tensor_starts(args):
    """Where each tensor begins in our format: the 'section boundaries'."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    sizes = [args.vocab_size * args.dim]
    for _ in range(args.n_layers):
        sizes += [args.dim, q * args.dim, kv * args.dim, kv * args.dim, args.dim * q, args.dim,
                  args.hidden_dim * args.dim, args.dim * args.hidden_dim, args.hidden_dim * args.dim]
    sizes += [args.dim, args.vocab_size * args.dim]
    offset, starts = 256, []
    for n in sizes:
        offset += -offset % 64
        starts.append(offset)
        offset += 4 * n
    return starts, offset


def with_field(data, offset, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def field_offset(name):
    return 8 + 4 * HEADER_FIELDS.index(name)


def test_layout_is_as_drawn(good):
    _, data = good
    assert tensor_starts(ARGS)[1] == len(data)


def test_the_good_model_runs(good, tmp_path):
    p = run([good[0], "--tokens", "1 2", "-n", 3], tmp_path)
    assert p.returncode == 0, p.stderr


# ----------------------------------------------------------------------------
# Checkpoints

def write(tmp_path, data, name="bad.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("length", [3, 4, 8, 60, 255, 256])
def test_truncated_header(good, tmp_path, length):
    path = write(tmp_path, good[1][:length])
    assert_clean_error(run([path], tmp_path), 1, str(path))


def test_truncated_at_each_tensor_start(good, tmp_path):
    _, data = good
    starts, size = tensor_starts(ARGS)
    for start in starts[1:]:
        path = write(tmp_path, data[:start])
        assert_clean_error(run([path], tmp_path), 1, f"file is {start} bytes but the header needs {size}")


def test_trailing_bytes(good, tmp_path):
    _, data = good
    path = write(tmp_path, data + b"\0" * 64)
    assert_clean_error(run([path], tmp_path), 1, "but the header needs")


def test_empty_file(tmp_path):
    assert_clean_error(run([write(tmp_path, b"")], tmp_path), 1, "bad.bin", "empty")


def test_directory(tmp_path):
    assert_clean_error(run([tmp_path], tmp_path), 1, "not a regular file")


def test_missing_file(tmp_path):
    assert_clean_error(run([tmp_path / "absent.bin"], tmp_path), 1, "absent.bin", "cannot open")


def test_wrong_version(good, tmp_path):
    path = write(tmp_path, with_field(good[1], 4, "<I", 7))
    assert_clean_error(run([path], tmp_path), 1, "version 7")


def test_garbage_short_file(tmp_path):
    assert_clean_error(run([write(tmp_path, b"hello")], tmp_path), 1, "too short")


def test_llama2c_v1_magic(tmp_path):
    assert_clean_error(run([write(tmp_path, b"ak42" + b"\0" * 300)], tmp_path), 1, "llama2.c version")


@pytest.mark.parametrize("field", range(len(HEADER_FIELDS)))
@pytest.mark.parametrize("value", [0, -1, 2**31 - 1])
def test_header_field_out_of_range(good, tmp_path, field, value):
    path = write(tmp_path, with_field(good[1], field_offset(HEADER_FIELDS[field]), "<i", value))
    assert_clean_error(run([path], tmp_path), 1, HEADER_FIELDS[field])


def test_kv_heads_must_divide_heads(good, tmp_path):
    path = write(tmp_path, with_field(good[1], field_offset("n_kv_heads"), "<i", 3))
    assert_clean_error(run([path], tmp_path), 1, "does not divide")


def test_odd_head_dim(good, tmp_path):
    path = write(tmp_path, with_field(good[1], field_offset("head_dim"), "<i", 7))
    assert_clean_error(run([path], tmp_path), 1, "head_dim = 7")


@pytest.mark.parametrize("offset,value,fragment", [
    (40, 0.0, "rope_theta"), (40, math.nan, "rope_theta"), (40, math.inf, "rope_theta"),
    (44, 0.0, "norm_eps"), (44, 1.0, "norm_eps"), (44, math.nan, "norm_eps"),
])
def test_bad_float_fields(good, tmp_path, offset, value, fragment):
    path = write(tmp_path, with_field(good[1], offset, "<f", value))
    assert_clean_error(run([path], tmp_path), 1, fragment)


@pytest.mark.parametrize("offset,value,fragment", [
    (48, 2, "tied_classifier"), (52, 9, "weight type 9"), (56, 32, "group_size"),
])
def test_bad_flag_fields(good, tmp_path, offset, value, fragment):
    path = write(tmp_path, with_field(good[1], offset, "<I", value))
    assert_clean_error(run([path], tmp_path), 1, fragment)


def test_sizes_that_overflow(good, tmp_path):
    data = good[1]
    for name, value in (("dim", 65536), ("vocab_size", 4_000_000), ("n_layers", 1024)):
        data = with_field(data, field_offset(name), "<i", value)
    assert_clean_error(run([write(tmp_path, data)], tmp_path), 1, "but the header needs")


# ----------------------------------------------------------------------------
# llama2.c legacy checkpoints

def legacy(header, n_floats=0):
    return struct.pack("<7i", *header) + b"\0" * (4 * n_floats)


@pytest.mark.parametrize("header,fragment", [
    ((64, 172, 5, 0, 4, 512, 512), "n_heads"),            # llama2.c divides by zero here
    ((64, 172, 5, 8, 0, 512, 512), "n_kv_heads"),
    ((64, 172, 5, 7, 7, 512, 512), "multiple of n_heads"),
    ((64, 172, 5, 8, 3, 512, 512), "does not divide"),
    ((64, 172, 5, 8, 4, -2**31, 512), "vocab_size"),
    ((64, 172, -5, 8, 4, 512, 512), "n_layers"),
    ((64, 172, 5, 8, 4, 512, 0), "max_seq_len"),
    ((64, 172, 5, 8, 4, 512, 512), "llama2.c header needs"),  # header alone, no weights
    ((64, 172, 5, 8, 4, -512, 512), "llama2.c header needs"),
])
def test_bad_legacy_headers(tmp_path, header, fragment):
    assert_clean_error(run([write(tmp_path, legacy(header, 1000))], tmp_path), 1, fragment)


# ----------------------------------------------------------------------------
# Command lines

@pytest.mark.parametrize("flags,fragment", [
    (["-c", "0"], "-c"),
    (["-c", "17"], "max_seq_len"),
    (["-s", "-1"], "-s"),
    (["-n", "99999999999"], "-n"),
    (["-t", "nan"], "-t"),
    (["-i", "a", "-f", "b"], "once"),
    (["--tokens", "1 40"], "--tokens"),
    (["--tokens", "1 x"], "--tokens"),
    (["--template", "alpaca"], "--template"),
    (["extra"], "unexpected"),
])
def test_bad_command_lines(good, tmp_path, flags, fragment):
    assert_clean_error(run([good[0], *flags], tmp_path), 2, fragment)


def test_no_model(tmp_path):
    assert_clean_error(run(["-n", "3"], tmp_path), 2, "no model")


def test_prompt_longer_than_context(good, tmp_path):
    p = run([good[0], "--tokens", " ".join(["5"] * 20)], tmp_path)
    assert_clean_error(p, 1, "20 tokens", "16")


def test_missing_prompt_file(good, tmp_path):
    assert_clean_error(run([good[0], "-f", tmp_path / "none.txt", "-z", tmp_path / "t"], tmp_path),
                       1, "none.txt")


def test_missing_tokenizer(good, tmp_path):
    assert_clean_error(run([good[0], "-z", tmp_path / "tok.bin", "-i", "hi"], tmp_path), 1, "tok.bin")


def test_text_prompt_without_tokenizer(good, tmp_path):
    assert_clean_error(run([good[0], "-i", "hi"], tmp_path), 1, "no tokenizer")


def test_unwritable_logits_path(good, tmp_path):
    p = run([good[0], "--tokens", "1", "--logits", tmp_path / "no" / "dir" / "l.bin"], tmp_path)
    assert_clean_error(p, 1, "l.bin")


def test_random_bytes_never_crash(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(30):
        data = rng.integers(0, 256, int(rng.integers(0, 600)), dtype=np.uint8).tobytes()
        if i % 3 == 0:
            data = b"LLAM" + data
        p = run([write(tmp_path, data)], tmp_path)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, (i, p.returncode, p.stderr)


# ----------------------------------------------------------------------------
# Under valgrind: the default build must run there, errors and all

@pytest.mark.parametrize("case", ["good", "truncated", "bad_field", "legacy_zero_heads", "bad_flag"])
def test_clean_under_valgrind(good, tmp_path, case):
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (make setup installs it)")
    if "RUN_BINARY" in os.environ:
        pytest.skip("valgrind and AddressSanitizer do not mix")
    args = {
        "good": [good[0], "--tokens", "1 2", "-n", 2],
        "truncated": [write(tmp_path, good[1][:1000])],
        "bad_field": [write(tmp_path, with_field(good[1], field_offset("n_heads"), "<i", 0))],
        "legacy_zero_heads": [write(tmp_path, legacy((64, 172, 5, 0, 4, 512, 512), 100))],
        "bad_flag": [good[0], "-p", "2"],
    }[case]
    p = subprocess.run(["valgrind", "-q", "--error-exitcode=99", str(RUN)] + [str(a) for a in args],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert "Illegal" not in p.stderr and "SIGILL" not in p.stderr, \
        "valgrind cannot run AVX-512: keep it out of the default build (see the Makefile)"
    assert p.returncode == {"good": 0, "bad_flag": 2}.get(case, 1), p.stderr


# ----------------------------------------------------------------------------
# Tokenizers through ./run (tests/test_tokenizer.py goes deeper)

def small_tokenizer(path, n=ARGS.vocab_size):
    """A sentencepiece-kind vocabulary of n tokens: controls, 256 bytes if
    they fit, then letters."""
    tokens = [(b"<unk>", 0.0, 2), (b"<s>", 0.0, 3), (b"</s>", 0.0, 3)]
    tokens += [(bytes([0xE2, 0x96, 0x81]) + bytes([97 + i % 26]) * (1 + i // 26), -float(i), 1)
               for i in range(n - len(tokens))]
    export.write_tokenizer(path, export.TOK_SENTENCEPIECE, tokens, bos_id=1, eos_id=2, unk_id=0,
                           flags=export.TOKF_ADD_BOS | export.TOKF_DUMMY_PREFIX)
    return path.read_bytes()


def test_small_tokenizer_works(good, tmp_path):
    small_tokenizer(tmp_path / "tok.bin")
    p = run([good[0], "-z", tmp_path / "tok.bin", "-i", "ab", "-n", 2], tmp_path)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("case,fragment", [
    ("vocab_mismatch", "tokens but the model has"),
    ("truncated_header", "tok.bin"),
    ("truncated_tokens", "tok.bin"),
    ("empty", "tok.bin"),
    ("directory", "tok"),
    ("bad_magic_version", "tok.bin"),
])
def test_bad_tokenizers(good, tmp_path, case, fragment):
    path = tmp_path / "tok.bin"
    data = small_tokenizer(path, ARGS.vocab_size + (5 if case == "vocab_mismatch" else 0))
    if case == "truncated_header":
        path.write_bytes(data[:30])
    elif case == "truncated_tokens":
        path.write_bytes(data[:len(data) - 7])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "directory":
        path.unlink()
        path = tmp_path / "tokdir"
        path.mkdir()
    elif case == "bad_magic_version":
        path.write_bytes(data[:4] + struct.pack("<I", 99) + data[8:])
    assert_clean_error(run([good[0], "-z", path, "-i", "ab"], tmp_path), 1, fragment)
