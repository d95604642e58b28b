"""Hostile input: malformed checkpoints, tokenizers and command lines.

Each case asserts the exit status (1 for a bad file, 2 for a bad command
line), that stderr is one line naming the file and the problem, and that no
signal ended the process (a negative return code from subprocess).
"""

import math
import os
import signal
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
    (40, -1.0, "rope_theta"), (40, 1e-40, "rope_theta"), (44, -1e-5, "norm_eps"), (44, 1e-40, "norm_eps"),
])
def test_negative_and_denormal_float_fields(good, tmp_path, offset, value, fragment):
    path = write(tmp_path, with_field(good[1], offset, "<f", value))
    assert_clean_error(run([path], tmp_path), 1, str(path), fragment)


@pytest.fixture(scope="module")
def scaled_rope(tmp_path_factory):
    """A version 2 checkpoint whose RoPE frequencies are stored (flags bit 1),
    and the offset of the first of them (they follow the token embedding)."""
    args = export.ModelArgs(**{**ARGS.__dict__, "scaled_rope": True})
    path = tmp_path_factory.mktemp("rope") / "model.bin"
    export.write_checkpoint(path, args, export.random_model(args, 0).state_dict())
    return path.read_bytes(), tensor_starts(ARGS)[0][1]


BAD_FREQUENCIES = {"nan": math.nan, "inf": math.inf, "zero": 0.0, "negative": -0.5, "denormal": 1e-40}
VIEWS = {"generate": [], "lens": ["--lens", 3], "trace": ["--trace"], "attention": ["--attention", 0],
         "score": ["-m", "score"]}


def test_stored_rope_frequencies_run(scaled_rope, tmp_path):
    path = write(tmp_path, scaled_rope[0])
    assert run([path, "--tokens", "1 2", "-n", 2], tmp_path).returncode == 0


@pytest.mark.parametrize("view", sorted(VIEWS))
@pytest.mark.parametrize("value", sorted(BAD_FREQUENCIES))
def test_bad_stored_rope_frequencies(scaled_rope, tmp_path, value, view):
    """Each of the head_dim / 2 frequencies is checked, the last as the first."""
    data, start = scaled_rope
    for i in (0, ARGS.head_dim // 2 - 1):
        path = write(tmp_path, with_field(data, start + 4 * i, "<f", BAD_FREQUENCIES[value]))
        p = run([path, "--tokens", "1 2 3", "-n", 2, *VIEWS[view]], tmp_path)
        assert_clean_error(p, 1, str(path), f"RoPE frequency {i}")


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
    (["--lens", "0"], "--lens"),
    (["--lens", "five"], "--lens"),
    (["--lens", "101"], "--lens"),
    (["--lens", "41"], "vocabulary of 40"),
    (["--attention", "-1"], "--attention"),
    (["--attention", "5-3"], "--attention"),
    (["--attention", "3-"], "--attention"),
    (["--attention", "2-x"], "--attention"),
    (["--attention", "99999999999"], "--attention"),
    (["--attention", "16"], "context of 16"),
    (["--attention", "0-20", "-c", "8"], "context of 8"),
    (["--trace-format", "xml"], "--trace-format"),
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

def small_tokenizer(path, n=ARGS.vocab_size, bos_id=1):
    """A sentencepiece-kind vocabulary of n tokens: controls, 256 bytes if
    they fit, then letters; bos_id -1: without BOS, as Qwen2's."""
    tokens = [(b"<unk>", 0.0, 2), (b"<s>", 0.0, 3), (b"</s>", 0.0, 3)]
    tokens += [(bytes([0xE2, 0x96, 0x81]) + bytes([97 + i % 26]) * (1 + i // 26), -float(i), 1)
               for i in range(n - len(tokens))]
    export.write_tokenizer(path, export.TOK_SENTENCEPIECE, tokens, bos_id=bos_id, eos_id=2, unk_id=0,
                           flags=export.TOKF_ADD_BOS * (bos_id >= 0) | export.TOKF_DUMMY_PREFIX)
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


@pytest.mark.parametrize("prompt", [[], ["-i", ""], ["-m", "score", "-i", ""], ["--tokens", ""],
                                    ["--tokens", ",", "-m", "score"], ["--lens", 2, "--attention", 0]])
def test_empty_prompt_without_bos(good, tmp_path, prompt):
    """No prompt and no BOS to start from: refused, never token -1."""
    tok = tmp_path / "tok.bin"
    small_tokenizer(tok, bos_id=-1)
    p = run([good[0], "-z", tok, "-n", 2, *prompt], tmp_path)
    assert_clean_error(p, 1, str(tok), "no BOS", "give a prompt")


def test_empty_prompt_of_a_one_token_vocabulary(tmp_path):
    """Without a tokenizer an empty prompt starts from llama2.c's BOS, token
    1, which a vocabulary of one token lacks."""
    args = export.ModelArgs(**{**ARGS.__dict__, "vocab_size": 1})
    path = tmp_path / "model.bin"
    export.write_checkpoint(path, args, export.random_model(args, 0).state_dict())
    assert_clean_error(run([path, "--tokens", "", "-n", 2], tmp_path), 1, str(path), "no BOS", "give a prompt")
    assert run([path, "--tokens", "0", "-n", 2], tmp_path).returncode == 0


@pytest.mark.parametrize("prompt", [["-i", "ab"], ["--tokens", "3 4"], ["-m", "chat", "-i", ""],
                                    ["-m", "score", "-i", "ab ab"]])
def test_prompt_without_bos_runs(good, tmp_path, prompt):
    tok = tmp_path / "tok.bin"
    small_tokenizer(tok, bos_id=-1)
    p = run([good[0], "-z", tok, "-n", 2, *prompt], tmp_path)
    assert p.returncode == 0, p.stderr


# ----------------------------------------------------------------------------
# Logits that are not finite, and sampling settings at the edge of overflow

@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """The good model with one classifier weight NaN: token 3's logit is NaN
    at every position."""
    d = tmp_path_factory.mktemp("nan")
    state = export.random_model(ARGS, 0).state_dict()
    state["output.weight"][3, 0] = float("nan")
    export.write_checkpoint(d / "model.bin", ARGS, state)
    small_tokenizer(d / "tokenizer.bin")
    return d / "model.bin"


@pytest.mark.parametrize("flags,position", [
    (["--tokens", "1 2", "-n", 3], 1),
    (["--tokens", "1 2", "-n", 3, "-t", 0], 1),
    (["--tokens", "1 2", "-n", 3, "-t", 0, "--probs", 3], 1),
    (["--tokens", "1 2 5", "-n", 3, "-p", 0.5, "-k", 4, "--min-p", 0.1], 2),
    (["-i", "ab", "-n", 3], 2),
    (["-m", "chat", "-i", "ab", "-n", 3], 3),
    (["-m", "score", "--tokens", "1 2 3 4"], 0),
])
def test_logits_not_finite(nan_model, tmp_path, flags, position):
    p = run([nan_model, *flags], tmp_path)
    assert_clean_error(p, 1, str(nan_model), f"logits at position {position} are not finite")
    assert "perplexity" not in p.stdout


def test_logits_not_finite_leave_no_logits_file(nan_model, tmp_path):
    out = tmp_path / "logits.bin"
    p = run([nan_model, "--tokens", "1 2", "-n", 3, "--logits", out], tmp_path)
    assert_clean_error(p, 1, "not finite")
    assert not out.exists(), "a failed run left its --logits file behind"


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory):
    """Logits in the hundreds, which a tiny temperature or penalty scales
    past the float range."""
    d = tmp_path_factory.mktemp("sharp")
    state = export.random_model(ARGS, 0).state_dict()
    state["output.weight"] *= 1000
    export.write_checkpoint(d / "model.bin", ARGS, state)
    return d / "model.bin"


@pytest.mark.parametrize("flags", [
    ["-t", "1e-37"], ["-t", "1e-37", "--probs", 3], ["--repeat-penalty", "1e-37", "-t", 0],
    ["--repeat-penalty", "1e-37", "--presence-penalty", "-100", "--frequency-penalty", "-100"],
])
def test_sampling_at_the_edges(sharp_model, tmp_path, flags):
    """Tiny temperatures and penalties scale logits past the float range;
    the sampler must still pick a valid token (ASan: no read outside the
    candidates). A temperature of 1e-37 is greedy."""
    p = run([sharp_model, "--tokens", "1 2", "-n", 6, "-s", 1, *flags], tmp_path)
    assert p.returncode == 0, p.stderr
    ids = [int(x) for x in p.stdout.split()]
    assert len(ids) == 8 and all(0 <= i < ARGS.vocab_size for i in ids)
    assert "nan" not in p.stderr
    if flags[:2] == ["-t", "1e-37"]:
        greedy = run([sharp_model, "--tokens", "1 2", "-n", 6, "-t", 0], tmp_path)
        assert p.stdout == greedy.stdout


def test_top_p_below_every_probability(good, tmp_path):
    """A flat distribution (temperature 100) and a top-p below 1 / vocab:
    the nucleus is the most likely token alone, and it must not be lost."""
    p = run([good[0], "--tokens", "1 2", "-n", 6, "-t", 100, "-p", "0.001"], tmp_path)
    greedy = run([good[0], "--tokens", "1 2", "-n", 6, "-t", 0], tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout == greedy.stdout


# ----------------------------------------------------------------------------
# Writes to stdout that fail

@pytest.fixture(scope="module")
def text_model(good, tmp_path_factory):
    """The good model, with the small tokenizer beside it."""
    d = tmp_path_factory.mktemp("text")
    shutil.copy(good[0], d / "model.bin")
    small_tokenizer(d / "tokenizer.bin")
    return d / "model.bin"


OUTPUTS = {
    "text": ["-i", "ab", "-n", 3],
    "token_ids": ["--tokens", "1 2", "-n", 3],
    "tokenize": ["--tokenize", "-i", "ab"],
    "score": ["-m", "score", "-i", "ab ab ab"],
    "chat": ["-m", "chat", "-i", "ab", "-n", 3],
    "help": ["--help"],
}


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_stdout_full(text_model, tmp_path, case):
    with open("/dev/full", "w") as full:
        p = subprocess.run([str(RUN), str(text_model)] + [str(a) for a in OUTPUTS[case]], cwd=tmp_path,
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert_clean_error(p, 1, "writing the output: No space left on device")


@pytest.mark.parametrize("case", sorted(OUTPUTS))
def test_stdout_closed(text_model, tmp_path, case):
    p = subprocess.run([str(RUN), str(text_model)] + [str(a) for a in OUTPUTS[case]], cwd=tmp_path,
                       stderr=subprocess.PIPE, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       preexec_fn=lambda: os.close(1))
    assert_clean_error(p, 1, "writing the output: Bad file descriptor")


def test_stdout_closed_keeps_the_logits_file_clean(text_model, tmp_path):
    """With stdout closed, the --logits file must not become stdout."""
    out = tmp_path / "logits.bin"
    p = subprocess.run([str(RUN), str(text_model), "--tokens", "1 2", "-n", "3", "--logits", str(out)],
                       cwd=tmp_path, stderr=subprocess.PIPE, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(1))
    assert_clean_error(p, 1, "writing the output")
    assert not out.exists() or out.stat().st_size % (4 * ARGS.vocab_size) == 0


def test_stdout_pipe_closed_with_sigpipe_ignored(tmp_path):
    """A reader that leaves, with SIGPIPE ignored: the first failed write
    ends the run, instead of generating to the end of a long context."""
    args = export.ModelArgs(**{**ARGS.__dict__, "max_seq_len": 32768})
    export.write_checkpoint(tmp_path / "long.bin", args, export.random_model(args, 0).state_dict())
    p = subprocess.Popen([str(RUN), str(tmp_path / "long.bin"), "--tokens", "1", "-n", "32000"], cwd=tmp_path,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGPIPE, signal.SIG_IGN))
    p.stdout.read(16)
    p.stdout.close()
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail("generation went on after its reader had left")
    assert p.returncode == 1, err
    assert err.decode() == "run: writing the output: Broken pipe\n"


def test_stdout_pipe_closed_is_an_error_not_a_signal(tmp_path):
    """`./run ... | head`: the reader leaves, SIGPIPE as it comes (default);
    the run ends with one line and status 1, not killed by the signal."""
    args = export.ModelArgs(**{**ARGS.__dict__, "max_seq_len": 32768})
    export.write_checkpoint(tmp_path / "long.bin", args, export.random_model(args, 0).state_dict())
    p = subprocess.Popen([str(RUN), str(tmp_path / "long.bin"), "--tokens", "1", "-n", "32000"], cwd=tmp_path,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(4)
    p.stdout.close()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    assert err.decode() == "run: writing the output: Broken pipe\n"


def test_stderr_full_fails(text_model, tmp_path):
    with open("/dev/full", "w") as full:
        p = subprocess.run([str(RUN), str(text_model), "-i", "ab", "-n", "3", "--probs", "2"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=full, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 1


# ----------------------------------------------------------------------------
# Chat turns that do not fit the context

def test_chat_turn_too_long(text_model, tmp_path):
    p = run([text_model, "-m", "chat", "-i", " ".join(["ab"] * 20), "-c", 16], tmp_path)
    assert_clean_error(p, 1, "this turn needs", "context has 16 left")


def test_chat_system_prompt_too_long(text_model, tmp_path):
    p = run([text_model, "-m", "chat", "-y", " ".join(["ab"] * 20), "-i", "ab"], tmp_path)
    assert_clean_error(p, 1, "this turn needs")


def test_interactive_chat_refuses_a_long_line_and_goes_on(text_model, tmp_path):
    lines = " ".join(["ab"] * 20) + "\nab\n"
    p = subprocess.run([str(RUN), str(text_model), "-m", "chat", "-n", "2", "-t", "0"], cwd=tmp_path, input=lines,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "this turn needs" in p.stderr and "shorter line" in p.stderr
    one = subprocess.run([str(RUN), str(text_model), "-m", "chat", "-n", "2", "-t", "0"], cwd=tmp_path,
                         input="ab\n", capture_output=True, text=True, timeout=60, check=True)
    assert p.stdout == one.stdout and one.stdout.strip(), "the short line, asked first, gets the same answer"


def peak_memory_kib(pid):
    """The peak resident memory of a running process since its exec (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def test_interactive_chat_drops_a_line_too_long_to_hold(text_model, tmp_path):
    """A line of 128 MiB, twice the 64 MiB a prompt may have, is refused
    and dropped as it is read: the run's memory stays far below the line
    (measured: 67 MiB at its peak, 73 MiB under AddressSanitizer), and the
    next line gets its answer."""
    p = subprocess.Popen([str(RUN), str(text_model), "-m", "chat", "-n", "2", "-t", "0"], cwd=tmp_path,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunk = "ab " * (1 << 20)
    for _ in range((128 << 20) // len(chunk) + 1):
        p.stdin.write(chunk)
    p.stdin.write("\n")
    p.stdin.flush()
    refused = p.stderr.readline()
    assert "run: stdin: the line is longer than 64 MiB; try a shorter line" in refused
    peak = peak_memory_kib(p.pid)
    out, err = p.communicate("ab\n", timeout=60)
    assert p.returncode == 0, err
    assert peak < 100 << 10, f"{peak} KiB: the line was held"
    one = subprocess.run([str(RUN), str(text_model), "-m", "chat", "-n", "2", "-t", "0"], cwd=tmp_path,
                         input="ab\n", capture_output=True, text=True, timeout=60, check=True)
    assert out == one.stdout and out.strip(), "the short line gets the answer it gets alone"


# ----------------------------------------------------------------------------
# A vocabulary without "▁": the prompt needs more tokens than bytes

def test_prompt_with_more_tokens_than_bytes(tmp_path):
    """Every space becomes the three byte tokens of "▁" (sentencepiece's byte
    fallback), so "a a a a" needs 16 tokens for 7 bytes."""
    tokens = [(b"<unk>", 0.0, 2), (b"<s>", 0.0, 3), (b"</s>", 0.0, 3)]
    tokens += [(f"<0x{b:02X}>".encode(), 0.0, 6) for b in range(256)]
    tokens += [(bytes([97 + i]), -float(i), 1) for i in range(26)]
    export.write_tokenizer(tmp_path / "tok.bin", export.TOK_SENTENCEPIECE, tokens, bos_id=1, eos_id=2, unk_id=0,
                           flags=export.TOKF_ADD_BOS | export.TOKF_DUMMY_PREFIX | export.TOKF_BYTE_FALLBACK)
    space = [3 + b for b in "\u2581".encode()]
    p = run(["--tokenize", "-z", tmp_path / "tok.bin", "-i", "a a a a"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert [int(x) for x in p.stdout.split()] == [1] + (space + [3 + 256 + 0]) * 4
    args = export.ModelArgs(**{**ARGS.__dict__, "vocab_size": len(tokens), "max_seq_len": 64})
    export.write_checkpoint(tmp_path / "model.bin", args, export.random_model(args, 0).state_dict())
    p = run([tmp_path / "model.bin", "-z", tmp_path / "tok.bin", "-i", "a a a a", "-n", 2], tmp_path)
    assert p.returncode == 0, p.stderr


# ----------------------------------------------------------------------------
# The model file, written over or truncated while mapped

def test_logits_path_is_the_model(good, tmp_path):
    model = tmp_path / "model.bin"
    shutil.copy(good[0], model)
    os.link(model, tmp_path / "hardlink.bin")
    os.symlink(model, tmp_path / "symlink.bin")
    for path in (model, tmp_path / "hardlink.bin", tmp_path / "symlink.bin"):
        p = run([model, "--tokens", "1", "-n", 2, "--logits", path], tmp_path)
        assert_clean_error(p, 1, str(path), "is the model file")
        assert model.read_bytes() == good[1]


def test_logits_path_is_the_tokenizer_or_prompt(text_model, tmp_path):
    tok = text_model.parent / "tokenizer.bin"
    before = tok.read_bytes()
    p = run([text_model, "--tokens", "1", "-n", 2, "--logits", tok], tmp_path)
    assert_clean_error(p, 1, "is the tokenizer file")
    assert tok.read_bytes() == before
    (tmp_path / "prompt.txt").write_text("ab ab")
    p = run([text_model, "-f", tmp_path / "prompt.txt", "-n", 2, "--logits", tmp_path / "prompt.txt"], tmp_path)
    assert_clean_error(p, 1, "is the prompt file")
    assert (tmp_path / "prompt.txt").read_text() == "ab ab"


def test_model_truncated_while_mapped(text_model, tmp_path):
    """Another program truncates the model between two chat turns: the next
    forward pass reads past the file's new end (SIGBUS), which must be a
    one-line error, not a crash."""
    model = tmp_path / "model.bin"
    shutil.copy(text_model, model)
    p = subprocess.Popen([str(RUN), str(model), "-m", "chat", "-z", str(text_model.parent / "tokenizer.bin"),
                          "-n", "2"], cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdin.write(b"ab\n")
    p.stdin.flush()
    assert p.stdout.readline()  # the first answer: the model has been read
    os.truncate(model, 0)
    _, err = p.communicate(b"ab\n", timeout=60)
    assert p.returncode == 1, (p.returncode, err)
    assert err.decode().endswith(f"run: {model}: the file changed while mapped (truncated by another program?)\n")


# ----------------------------------------------------------------------------
# Threads: OMP_NUM_THREADS beyond reason

def test_absurd_thread_count(good, tmp_path):
    p = subprocess.run([str(RUN), str(good[0]), "--tokens", "1 2", "-n", "3"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": "100000"})
    assert p.returncode == 0, p.stderr
    if "RUN_BINARY" not in os.environ:  # the sanitizer build has no OpenMP
        assert "OMP_NUM_THREADS asks for 100000 threads; using" in p.stderr


# ----------------------------------------------------------------------------
# Inputs that are not regular files, or too large

@pytest.mark.parametrize("role", ["model", "tokenizer", "prompt"])
def test_fifo_input(text_model, tmp_path, role):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    args = {"model": [fifo],
            "tokenizer": [text_model, "-z", fifo, "-i", "ab"],
            "prompt": [text_model, "-f", fifo]}[role]
    p = subprocess.run([str(RUN)] + [str(a) for a in args], cwd=tmp_path, capture_output=True, text=True,
                       timeout=20, stdin=subprocess.DEVNULL)
    assert_clean_error(p, 1, str(fifo), "not a regular file")


@pytest.mark.parametrize("role", ["model", "tokenizer", "prompt"])
def test_device_input(text_model, tmp_path, role):
    args = {"model": ["/dev/zero"],
            "tokenizer": [text_model, "-z", "/dev/zero", "-i", "ab"],
            "prompt": [text_model, "-f", "/dev/zero"]}[role]
    assert_clean_error(run(args, tmp_path), 1, "/dev/zero", "not a regular file")


def test_prompt_file_too_large(text_model, tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate((64 << 20) + 1)  # sparse: costs no disk
    assert_clean_error(run([text_model, "-f", big], tmp_path), 1, "big.txt", "too large (at most 64 MiB)")


def test_tokenizer_file_too_large(text_model, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate((1 << 30) + 1)
    assert_clean_error(run([text_model, "-z", big, "-i", "ab"], tmp_path), 1, "big.bin", "at most 1 GiB")


# ----------------------------------------------------------------------------
# -z with --tokens: the named tokenizer turns the output into text

def small_tokenizer_text(ids):
    """The text of small_tokenizer's ids: <unk> (" \u2047 " as sentencepiece
    decodes it), <s>, </s>, then "▁" + letters, the first space dropped."""
    pieces = [" \u2047 ", "", ""] + ["\u2581" + chr(97 + i % 26) * (1 + i // 26) for i in range(ARGS.vocab_size - 3)]
    return "".join(pieces[int(i)] for i in ids).replace("\u2581", " ").lstrip(" ")


def test_tokens_with_tokenizer_give_text(text_model, tmp_path):
    tok = text_model.parent / "tokenizer.bin"
    ids = run([text_model, "--tokens", "1 5 6", "-n", 4, "-t", 0], tmp_path)
    text = run([text_model, "--tokens", "1 5 6", "-n", 4, "-t", 0, "-z", tok], tmp_path)
    assert ids.returncode == 0 and text.returncode == 0, (ids.stderr, text.stderr)
    assert text.stdout == small_tokenizer_text(ids.stdout.split()) + "\n"


def test_tokens_with_missing_tokenizer(good, tmp_path):
    p = run([good[0], "--tokens", "1 2", "-z", tmp_path / "absent.bin"], tmp_path)
    assert_clean_error(p, 1, "absent.bin")


def test_tokens_with_tokenizer_take_stop_strings(text_model, tmp_path):
    """--tokens in, text out, cut by --stop: the text of model.py's greedy
    tokens (up to EOS, token 2), up to where the stop string first appears
    after the prompt."""
    prompt = [1, 5]
    generated = export.generate_greedy(export.random_model(ARGS, 0), prompt, 10)
    generated = generated[:generated.index(2)] if 2 in generated else generated
    shown, full = small_tokenizer_text(prompt), small_tokenizer_text(prompt + generated)
    continuation = full[len(shown):]
    assert len(continuation) > 8, continuation
    stop = continuation[4:7]
    p = run([text_model, "--tokens", "1 5", "-n", 10, "-t", 0, "-z", text_model.parent / "tokenizer.bin",
             "--stop", stop], tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout == shown + continuation[:continuation.index(stop)] + "\n"
    assert "stop string" in p.stderr
