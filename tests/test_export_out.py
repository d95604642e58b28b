"""export.py --to-gguf, --to-hf and --verify, judged by the programs that
read those files.

  GGUF   transformers loads the file (from_pretrained(dir, gguf_file=...),
         dequantizing with the gguf package) and its logits agree with ./run
         on the checkpoint; the gguf package's own dequantizer finds the
         checkpoint's numbers in every tensor; its tokenizer, as transformers
         builds it from the metadata, encodes as sentencepiece / tokenizers
         and ./run do; llama-cpp-python, where installed, loads it and gives
         ./run's greedy tokens (it is not a requirement: the checks above
         always run).
  HF     transformers loads the directory, model and tokenizer; logits within
         1e-5 relative (float32 both sides), greedy tokens equal,
         apply_chat_template equal to ./run -m chat --tokenize.
  Round trips through export.py's readers give the same bytes.
  --verify passes on good conversions and fails, exit 1, on broken ones.

Models: small random ones written here (GQA and untied; MHA, tied, head_dim
not dim / n_heads), and stories260K (../shared, skipped when absent), with
tokenizers trained here by sentencepiece and by tokenizers.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export  # noqa: E402
from test_all import RUN, SHARED, generate_ids, read_logits  # noqa: E402

import gguf  # noqa: E402
import sentencepiece as spm  # noqa: E402
import transformers  # noqa: E402
transformers.logging.set_verbosity_error()

# Float32 on both sides, so only the order of summation differs (see
# test_all.py): measured up to 3e-6 relative on these models.
HF_TOL = 1e-5
N_GREEDY = 24
TEXTS = ["the quick brown fox jumps over the lazy dog", "  two  spaces, and 12345 digits",
         "ünïcödé text 😀 here", "<|im_start|>user\nthe<|im_end|>\n"]
CONFIGS = {
    # dim, hidden, layers, heads, kv heads, head_dim, tied, rope_theta
    "gqa_untied": (64, 160, 2, 4, 2, 16, False, 50000.0),
    "mha_tied": (64, 128, 2, 4, 4, 16, True, 10000.0),
    # head_dim is not dim / n_heads: transformers' GGUF loader (4.47) does
    # not read attention.key_length, so this one is for Hugging Face only
    "wide_heads_tied": (64, 128, 2, 4, 2, 32, True, 10000.0),
}
GGUF_CONFIGS = ["gqa_untied", "mha_tied"]
WORDS = ("the a of and to in is was he she it they we you that for on with as at by from this "
         "story little girl boy day time dog cat sun tree house ran saw said happy big small").split()


@pytest.fixture(scope="module", autouse=True)
def build():
    """./run beside export.py, which --verify runs (make sanitize's RUN_BINARY runs the rest)."""
    subprocess.run(["make", "-s", "run"], cwd=ROOT, check=True)


def corpus(n=3000, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!", "?", ", 42."])
            for _ in range(n)]


def run_ok(args, **kw):
    p = subprocess.run([str(RUN)] + [str(a) for a in args], capture_output=True, text=True, **kw)
    assert p.returncode == 0, p.stderr
    return p.stdout


def export_py(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)],
                          capture_output=True, text=True, env=env)


def worst_relative(ours, theirs):
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float((np.abs(ours - theirs).max(axis=1) / np.abs(theirs).max(axis=1)).max())


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, prompt, n):
    """n greedy tokens, recomputing the whole sequence each step."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(hf_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def load_gguf_model(path):
    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                             torch_dtype=torch.float32).eval()


def check_against_run(model_bin, theirs, vocab_size, tmp_path, tol):
    """./run's logits and greedy tokens on model_bin against a transformers model."""
    prompt = [1] + np.random.default_rng(3).integers(3, vocab_size, 7).tolist()
    generated, logits_path = generate_ids(model_bin, prompt, N_GREEDY, tmp_path)
    ours = read_logits(logits_path, vocab_size)
    assert worst_relative(ours, hf_logits(theirs, prompt + generated[:-1])) <= tol
    assert generated == hf_greedy(theirs, prompt, N_GREEDY)


# ----------------------------------------------------------------------------
# Tokenizers and models

@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """kind -> (path of our tokenizer.bin, encode(text) of the library that made it, without BOS)."""
    d = tmp_path_factory.mktemp("toks")
    model = d / "sp.model"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_prefix=str(d / "sp"), model_type="bpe",
                                   vocab_size=400, byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    export.write_tokenizer_sentencepiece(str(model), str(d / "sp.bin"))

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bl = Tokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bl.decoder = decoders.ByteLevel()
    bl.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (d / "bl").mkdir()
    bl.save(str(d / "bl" / "tokenizer.json"))
    (d / "bl" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>",
                                                                "eos_token": "<|im_end|>"}))
    export.write_tokenizer_hf_json(str(d / "bl" / "tokenizer.json"), str(d / "bl.bin"))
    # the same with a default system prompt, as SmolLM2's tokenizer has
    fields = export.read_tokenizer(d / "bl.bin")
    del fields["max_token_length"]
    fields["system_prompt"] = "You are a test model.\nBe brief."
    export.write_tokenizer(str(d / "bl_system.bin"), **fields)
    return {"sp": (d / "sp.bin", lambda text: sp.encode(text)),
            "bl": (d / "bl.bin", lambda text: bl.encode(text).ids),
            "bl_system": (d / "bl_system.bin", lambda text: bl.encode(text).ids)}


def write_model(directory, config, tok_path, dtype="f32", seed=0):
    """A random checkpoint with tokenizer.bin beside it, in directory; returns its path."""
    dim, hidden, layers, heads, kv, head_dim, tied, theta = CONFIGS[config]
    vocab = len(export.read_tokenizer(tok_path)["tokens"])
    args = export.ModelArgs(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                            head_dim=head_dim, vocab_size=vocab, max_seq_len=64, rope_theta=theta, tied=tied)
    directory.mkdir(parents=True, exist_ok=True)
    export.write_checkpoint(directory / "model.bin", args, export.random_model(args, seed).state_dict(), dtype)
    (directory / "tokenizer.bin").write_bytes(Path(tok_path).read_bytes())
    return directory / "model.bin"


def to(kind, model_bin, out, *extra):
    """export.py MODEL --to-gguf / --to-hf OUT, which must succeed."""
    assert export.main([str(model_bin), f"--to-{kind}", str(out), *map(str, extra)]) == 0


# ----------------------------------------------------------------------------
# GGUF

@pytest.mark.parametrize("config", GGUF_CONFIGS)
@pytest.mark.parametrize("tok", ["sp", "bl"])
def test_gguf_agrees_with_run_in_transformers(toks, config, tok, tmp_path):
    model_bin = write_model(tmp_path, config, toks[tok][0])
    to("gguf", model_bin, tmp_path / "m.gguf")
    vocab = len(export.read_tokenizer(toks[tok][0])["tokens"])
    check_against_run(model_bin, load_gguf_model(tmp_path / "m.gguf"), vocab, tmp_path, HF_TOL)


GGUF_TYPES = {"f32": "F32", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


@pytest.mark.parametrize("dtype", sorted(GGUF_TYPES))
def test_gguf_holds_the_checkpoints_numbers(toks, dtype, tmp_path):
    """Every matrix in its GGUF type, dequantized by the gguf package,
    equals what the checkpoint decodes to; norms F32."""
    model_bin = write_model(tmp_path, "gqa_untied", toks["bl"][0], dtype)
    to("gguf", model_bin, tmp_path / "m.gguf")
    _, state_dict = export.read_checkpoint(model_bin)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    ours = {v: k for k, v in export.GGUF_NAMES.items()}
    for i in range(2):
        ours.update({f"layers.{i}.{o}.weight": f"blk.{i}.{t}.weight" for t, o in export.GGUF_LAYER_NAMES.items()})
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(state_dict)
    for name, weights in state_dict.items():
        t = tensors[ours[name]]
        assert t.tensor_type.name == (GGUF_TYPES[dtype] if weights.dim() == 2 else "F32"), name
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(weights.shape)
        assert np.array_equal(theirs.astype(np.float32), weights.numpy()), name


@pytest.mark.parametrize("dtype", sorted(GGUF_TYPES))
def test_gguf_round_trip_is_byte_identical(toks, dtype, tmp_path):
    """ours -> GGUF -> ours: the same checkpoint and tokenizer, byte for byte
    (bf16, q8_0 and q4_0 too: the GGUF holds the same numbers and
    quantizing them again gives the same blocks)."""
    model_bin = write_model(tmp_path / "a", "gqa_untied", toks["bl_system"][0], dtype)
    to("gguf", model_bin, tmp_path / "m.gguf")
    (tmp_path / "b").mkdir()
    assert export.main([str(tmp_path / "b" / "model.bin"), "--gguf", str(tmp_path / "m.gguf"), "--dtype", dtype]) == 0
    assert (tmp_path / "b" / "model.bin").read_bytes() == model_bin.read_bytes()
    assert (tmp_path / "b" / "tokenizer.bin").read_bytes() == (tmp_path / "a" / "tokenizer.bin").read_bytes()


def test_gguf_round_trip_sentencepiece(toks, tmp_path):
    """The same with a sentencepiece tokenizer (GGUF's llama tokenizer)."""
    model_bin = write_model(tmp_path / "a", "mha_tied", toks["sp"][0])
    to("gguf", model_bin, tmp_path / "m.gguf")
    (tmp_path / "b").mkdir()
    p = export_py(tmp_path / "b" / "model.bin", "--gguf", tmp_path / "m.gguf")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "b" / "model.bin").read_bytes() == model_bin.read_bytes()
    assert (tmp_path / "b" / "tokenizer.bin").read_bytes() == (tmp_path / "a" / "tokenizer.bin").read_bytes()


@pytest.mark.parametrize("tok", ["sp", "bl"])
def test_gguf_tokenizer_in_transformers(toks, tok, tmp_path):
    """transformers builds its tokenizer from the GGUF metadata; it encodes
    as the library that trained the tokenizer does, and as ./run does."""
    path, encode = toks[tok]
    model_bin = write_model(tmp_path, "mha_tied", path)
    to("gguf", model_bin, tmp_path / "m.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    ltok = export.read_tokenizer(path)
    bos = [ltok["bos_id"]] if ltok["flags"] & export.TOKF_ADD_BOS else []
    for text in TEXTS:
        ids = encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text
        assert [int(x) for x in run_ok(["--tokenize", "-z", path, "-i", text]).split()] == bos + ids, text
    metadata = {f.name: f.contents() for f in gguf.GGUFReader(str(tmp_path / "m.gguf")).fields.values()}
    assert metadata["tokenizer.ggml.model"] == {"sp": "llama", "bl": "gpt2"}[tok]
    assert metadata["tokenizer.ggml.bos_token_id"] == ltok["bos_id"]
    assert metadata["tokenizer.ggml.eos_token_id"] == ltok["eos_id"]


def test_gguf_export_needs_no_torch(toks, tmp_path):
    """export.py --to-gguf with torch made unimportable (numpy and gguf only,
    as under make demo): the same file."""
    model_bin = write_model(tmp_path, "gqa_untied", toks["bl"][0])
    to("gguf", model_bin, tmp_path / "with.gguf")
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stub), os.environ.get("PYTHONPATH", "")]))
    p = export_py(model_bin, "--to-gguf", tmp_path / "without.gguf", env=env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "without.gguf").read_bytes() == (tmp_path / "with.gguf").read_bytes()


def test_gguf_in_llama_cpp(toks, tmp_path):
    """llama.cpp itself (llama-cpp-python) loads the file and continues a
    prompt greedily as ./run does."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model_bin = write_model(tmp_path, "gqa_untied", toks["sp"][0])
    to("gguf", model_bin, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, verbose=False)
    prompt = [1, 40, 80, 7, 99, 12, 150, 3]
    generated, _ = generate_ids(model_bin, prompt, 16, tmp_path)
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 16:
            break
    assert theirs == generated


# ----------------------------------------------------------------------------
# Hugging Face

@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("tok", ["sp", "bl_system"])
def test_hf_agrees_with_run_in_transformers(toks, config, tok, tmp_path):
    path, encode = toks[tok]
    model_bin = write_model(tmp_path / "m", config, path)
    to("hf", model_bin, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["hf", "m"], "no temporary directory is left"
    vocab = len(export.read_tokenizer(path)["tokens"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    check_against_run(model_bin, model, vocab, tmp_path, HF_TOL)

    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        ours = [int(x) for x in run_ok(["--tokenize", "-z", path, "-i", text]).split()]
        assert theirs.encode(text) == ours, text
        assert theirs.encode(text, add_special_tokens=False) == encode(text), text
    for user in ["hello there", "what is 2 + 2?"]:
        chat = theirs.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
        ours = [int(x) for x in run_ok(["-m", "chat", "--tokenize", "-z", path, "-i", user]).split()]
        assert chat == ours, user


@pytest.mark.parametrize("dtype", ["f32", "bf16", "q8_0", "q4_0"])
def test_hf_round_trip_is_byte_identical(toks, dtype, tmp_path):
    """ours -> HF -> ours: the same checkpoint (q8_0 and q4_0 go through
    float32 and quantize back to the same blocks) and the same tokenizer."""
    for tok in ("sp", "bl"):
        model_bin = write_model(tmp_path / tok / "a", "gqa_untied", toks[tok][0], dtype)
        to("hf", model_bin, tmp_path / tok / "hf")
        config = json.loads((tmp_path / tok / "hf" / "config.json").read_text())
        assert config["torch_dtype"] == ("bfloat16" if dtype == "bf16" else "float32")
        back = tmp_path / tok / "b" / "model.bin"
        back.parent.mkdir()
        assert export.main([str(back), "--hf", str(tmp_path / tok / "hf"), "--dtype", dtype]) == 0
        assert back.read_bytes() == model_bin.read_bytes(), tok
        assert (back.parent / "tokenizer.bin").read_bytes() == (model_bin.parent / "tokenizer.bin").read_bytes(), tok


@pytest.mark.parametrize("pretokenizer", ["digits", "llama3", "qwen2"])
def test_hf_byte_level_pretokenizers(pretokenizer, tmp_path):
    """SmolLM2's Digits-then-ByteLevel, Llama 3's Split-then-ByteLevel (with
    its BOS and ignore_merges) and Qwen2's (NFC, then its Split) come back
    out as tokenizer.json: the exported tokenizer encodes as the one it was
    converted from; and as GGUF, named as llama.cpp names them."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    original = Tokenizer(models.BPE(ignore_merges=pretokenizer == "llama3"))
    if pretokenizer == "digits":
        original.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                          pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        pattern = export.LLAMA3_PATTERN if pretokenizer == "llama3" else export.QWEN2_PATTERN
        original.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pretokenizer == "qwen2":
        original.normalizer = normalizers.NFC()
    original.decoder = decoders.ByteLevel()
    original.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if pretokenizer == "llama3":
        original.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                                special_tokens=[("<|begin_of_text|>", 0)])
    original.save(str(tmp_path / "tokenizer.json"))
    export.write_tokenizer_hf_json(str(tmp_path / "tokenizer.json"), str(tmp_path / "tok.bin"))
    model_bin = write_model(tmp_path / "m", "mha_tied", tmp_path / "tok.bin")
    to("hf", model_bin, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS + ["x = 1234567 + 89;\n\n  done", "cafe\u0301"]:
        assert theirs.encode(text) == original.encode(text).ids, text
    to("gguf", model_bin, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["tokenizer.ggml.pre"].contents() == \
        {"digits": "smollm", "llama3": "llama-bpe", "qwen2": "qwen2"}[pretokenizer]
    export.write_tokenizer_gguf(str(tmp_path / "m.gguf"), str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == (tmp_path / "tok.bin").read_bytes()


def test_interrupted_hf_export_leaves_nothing(model_dir, monkeypatch, capsys):
    """Ctrl-C after some files are written: no directory, no temporary."""
    import convert.hf_out

    def interrupted(directory, tok, path, max_seq_len):
        raise KeyboardInterrupt
    monkeypatch.setattr(convert.hf_out, "_save_sentencepiece", interrupted)
    before = sorted(os.listdir(model_dir.parent))
    assert export.main([str(model_dir / "model.bin"), "--to-hf", str(model_dir.parent / "out")]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert sorted(os.listdir(model_dir.parent)) == before


def test_interleaved_to_hf_inverts_hf_to_interleaved():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(export.hf_to_interleaved(export.interleaved_to_hf(w, 3, 8), 3, 8), w)
    assert torch.equal(export.interleaved_to_hf(export.hf_to_interleaved(w, 3, 8), 3, 8), w)
    assert not torch.equal(export.interleaved_to_hf(w, 3, 8), w)


# ----------------------------------------------------------------------------
# Version 2 checkpoints: Qwen2's q/k/v biases, Llama 3's and linear RoPE
# scaling (tests/test_families.py converts them in; these write them out)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
FAMILIES = {  # name: (q/k/v biases, rope_scaling, tied)
    "qwen2_untied": (True, None, False),
    "qwen2_tied": (True, None, True),
    "llama3": (False, LLAMA3_SCALING, False),
    "linear": (False, {"rope_type": "linear", "factor": 4.0}, True),
}


def write_family_model(directory, family, tok_path, dtype="f32", seed=0):
    """A random version 2 checkpoint (GQA, head_dim 16) with tokenizer.bin
    beside it. Matrices are 4 times the usual init and biases N(0, 0.5^2),
    so that attention is far from uniform and RoPE and the biases matter
    over the 32 positions compared; original_max_position_embeddings 64
    puts pair 0 in llama3's kept band, 1-2 in the blended one, 3-7 in the
    divided one."""
    biases, scaling, tied = FAMILIES[family]
    vocab = len(export.read_tokenizer(tok_path)["tokens"])
    args = export.ModelArgs(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                            vocab_size=vocab, max_seq_len=64, rope_theta=10000.0, tied=tied,
                            attention_bias=biases, scaled_rope=scaling is not None)
    generator = torch.Generator().manual_seed(seed + 1)
    state_dict = {name: (0.5 * torch.randn(w.shape, generator=generator) if name.endswith(".bias") else
                         w if name.endswith("norm.weight") else 4 * w)
                  for name, w in export.random_model(args, seed).state_dict().items()}
    if scaling is not None:
        state_dict["rope_inv_freq"] = torch.from_numpy(export.rope_inverse_frequencies(16, 10000.0, scaling))
    directory.mkdir(parents=True, exist_ok=True)
    export.write_checkpoint(directory / "model.bin", args, state_dict, dtype)
    (directory / "tokenizer.bin").write_bytes(Path(tok_path).read_bytes())
    return directory / "model.bin"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_hf_agrees_with_run_in_transformers(toks, family, tmp_path):
    """Qwen2ForCausalLM for biases, rope_scaling for scaled RoPE: transformers
    computes what ./run does. It can fail: with plain RoPE (or without the
    biases) the same weights are far off."""
    biases, scaling, _ = FAMILIES[family]
    model_bin = write_family_model(tmp_path / "m", family, toks["bl"][0])
    to("hf", model_bin, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"] == scaling
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert type(model).__name__ == ("Qwen2ForCausalLM" if biases else "LlamaForCausalLM")
    check_against_run(model_bin, model, len(export.read_tokenizer(toks["bl"][0])["tokens"]), tmp_path, HF_TOL)
    if biases:
        plain = {k: torch.zeros_like(v) if k.endswith(".bias") else v for k, v in model.state_dict().items()}
    else:
        plain = model.state_dict()
        config["rope_scaling"] = None
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    without = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    without.load_state_dict(plain)
    ids = list(range(1, 33))
    assert worst_relative(hf_logits(without, ids), hf_logits(model, ids)) > 100 * HF_TOL


@pytest.mark.parametrize("family", ["qwen2_tied", "qwen2_untied"])
def test_family_gguf_agrees_with_run_in_transformers(toks, family, tmp_path):
    """qwen2 GGUF: transformers' GGUF loader (which un-permutes nothing for
    qwen2, as llama.cpp's qwen2 keeps Hugging Face's layout) agrees with ./run."""
    model_bin = write_family_model(tmp_path, family, toks["bl"][0])
    to("gguf", model_bin, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert {t.name for t in reader.tensors} >= {"blk.0.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"}
    model = load_gguf_model(tmp_path / "m.gguf")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    check_against_run(model_bin, model, len(export.read_tokenizer(toks["bl"][0])["tokens"]), tmp_path, HF_TOL)


def test_family_gguf_rope_metadata(toks, tmp_path):
    """llama3: rope_freqs.weight, the divisor of each unscaled frequency
    (1 kept, factor divided, between for the blended pair), as llama.cpp's
    converter writes it; linear: rope.scaling.type and .factor."""
    for family in ("llama3", "linear"):
        model_bin = write_family_model(tmp_path / family, family, toks["bl"][0])
        to("gguf", model_bin, tmp_path / f"{family}.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "llama3.gguf"))
    (freqs,) = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    divisors = np.asarray(freqs.data, dtype=np.float64)
    assert np.allclose(divisors[0], 1, rtol=1e-6) and np.allclose(divisors[3:], 8, rtol=1e-6)
    assert (1 < divisors[1:3]).all() and (divisors[1:3] < 8).all()
    reader = gguf.GGUFReader(str(tmp_path / "linear.gguf"))
    assert reader.fields["llama.rope.scaling.type"].contents() == "linear"
    assert reader.fields["llama.rope.scaling.factor"].contents() == 4.0
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_round_trips_are_byte_identical(toks, family, dtype, tmp_path):
    """ours -> GGUF -> ours and ours -> HF -> ours: the same bytes (q8_0's
    q/k blocks permuted whole for qwen2, and quantized back alike)."""
    model_bin = write_family_model(tmp_path / "a", family, toks["sp"][0], dtype)
    for kind, out, flag in (("gguf", tmp_path / "m.gguf", "--gguf"), ("hf", tmp_path / "hf", "--hf")):
        to(kind, model_bin, out)
        back = tmp_path / f"{kind}_back" / "model.bin"
        back.parent.mkdir()
        assert export.main([str(back), flag, str(out), "--dtype", dtype]) == 0
        assert back.read_bytes() == model_bin.read_bytes(), kind
        assert (back.parent / "tokenizer.bin").read_bytes() == (model_bin.parent / "tokenizer.bin").read_bytes()


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 3.0,
     "original_max_position_embeddings": 512}])
@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (64, 500000.0), (128, 500000.0)])
def test_rope_scaling_recovered_from_frequencies(scaling, head_dim, theta):
    """rope_scaling_of finds a rule that gives the very same float32
    frequencies, and transformers' own llama3/linear rule with it agrees
    with the frequencies to a few float32 ulps, as it computes them in
    float32 (llama3's parameters are found up to their common scale, which
    changes nothing)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    inv_freq = export.rope_inverse_frequencies(head_dim, theta, scaling)
    found = export.rope_scaling_of(inv_freq, head_dim, theta)
    assert found is not None and found["rope_type"] == scaling["rope_type"]
    assert np.array_equal(export.rope_inverse_frequencies(head_dim, theta, found), inv_freq)
    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                      rope_theta=theta, rope_scaling=dict(found))
    np.testing.assert_allclose(ROPE_INIT_FUNCTIONS[found["rope_type"]](config, "cpu")[0].numpy(), inv_freq,
                               rtol=4e-6)


def test_unknown_rope_frequencies_are_refused_for_hf(toks, tmp_path, capsys):
    """Frequencies no rule of transformers gives: --to-hf refuses in one
    line, nothing written; --to-gguf writes them as rope_freqs and they come back."""
    model_bin = write_family_model(tmp_path / "a", "llama3", toks["bl"][0])
    args, state_dict = export.read_checkpoint(model_bin)
    state_dict["rope_inv_freq"] = state_dict["rope_inv_freq"] * torch.linspace(1, 0.5, 8)
    export.write_checkpoint(model_bin, args, state_dict)
    assert export.main([str(model_bin), "--to-hf", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rope_inv_freq" in err and str(model_bin) in err, err
    assert not (tmp_path / "hf").exists()
    to("gguf", model_bin, tmp_path / "m.gguf")
    (tmp_path / "b").mkdir()
    assert export.main([str(tmp_path / "b" / "model.bin"), "--gguf", str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "b" / "model.bin").read_bytes() == model_bin.read_bytes()


# ----------------------------------------------------------------------------
# Llama 3's chat template and add_eos, out to transformers and GGUF

@pytest.fixture(scope="module")
def llama3_tok(tmp_path_factory):
    """A Llama 3 style tokenizer (tests/test_llama3_chat.py's markers and
    template), converted by export.py --tokenizer-from."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from test_llama3_chat import LLAMA3_TEMPLATE, SPECIALS
    d = tmp_path_factory.mktemp("llama3_tok")
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(export.LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=SPECIALS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                         "eos_token": "<|end_of_text|>",
                                                         "chat_template": LLAMA3_TEMPLATE}))
    assert export.main([str(d / "tokenizer.bin"), "--tokenizer-from", str(d)]) == 0
    assert export.read_tokenizer(d / "tokenizer.bin")["chat_template"] == export.CHAT_LLAMA3
    return d / "tokenizer.bin"


LLAMA3_CHATS = [("hello there", None), ("  what is 2 + 2?\n", "Be brief.")]


def test_llama3_chat_template_out(llama3_tok, tmp_path):
    """apply_chat_template of the exported directory gives ./run -m chat
    --tokenize's ids, with and without a system prompt; the GGUF carries a
    template that reads back as Llama 3's, and the tokenizer round trips."""
    model_bin = write_model(tmp_path / "a", "mha_tied", llama3_tok)
    to("hf", model_bin, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for user, system in LLAMA3_CHATS:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        chat = theirs.apply_chat_template(messages, add_generation_prompt=True)
        ours = [int(x) for x in run_ok(["-m", "chat", "--tokenize", "-z", llama3_tok, "-i", user]
                                       + (["-y", system] if system else [])).split()]
        assert chat == ours, (user, system)
    to("gguf", model_bin, tmp_path / "m.gguf")
    template = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.chat_template"].contents()
    assert export.gguf_chat_template(template) == (export.CHAT_LLAMA3, "")
    (tmp_path / "b").mkdir()
    assert export.main([str(tmp_path / "b" / "model.bin"), "--gguf", str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "b" / "tokenizer.bin").read_bytes() == llama3_tok.read_bytes()


@pytest.mark.parametrize("tok", ["sp", "bl"])
def test_add_eos_out(toks, tok, tmp_path):
    """A tokenizer that ends prompts with EOS (LTOK flag bit 5): transformers'
    tokenizer of the exported directory encodes as ./run --tokenize does,
    EOS last; the GGUF says add_eos_token, and reads back the same."""
    fields = export.read_tokenizer(toks[tok][0])
    del fields["max_token_length"]
    fields["flags"] |= export.TOKF_ADD_EOS
    if fields["eos_id"] < 0:
        fields["eos_id"] = 2
    export.write_tokenizer(str(tmp_path / "eos.bin"), **fields)
    model_bin = write_model(tmp_path / "a", "mha_tied", tmp_path / "eos.bin")
    to("hf", model_bin, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        ours = [int(x) for x in run_ok(["--tokenize", "-z", tmp_path / "eos.bin", "-i", text]).split()]
        assert ours[-1] == fields["eos_id"] and theirs.encode(text) == ours, text
    to("gguf", model_bin, tmp_path / "m.gguf")
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.ggml.add_eos_token"].contents() is True
    (tmp_path / "b").mkdir()
    assert export.main([str(tmp_path / "b" / "model.bin"), "--gguf", str(tmp_path / "m.gguf")]) == 0
    assert (tmp_path / "b" / "tokenizer.bin").read_bytes() == (tmp_path / "eos.bin").read_bytes()


# ----------------------------------------------------------------------------
# stories260K, a trained model (llama2.c's), with a stand-in vocabulary of its 512 tokens

@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    path = SHARED / "models" / "stories260K.bin"
    if not path.is_file():
        pytest.skip("../shared/models/stories260K.bin is not here")
    d = tmp_path_factory.mktemp("stories")
    assert export.main([str(d / "model.bin"), "--llama2c", str(path)]) == 0
    pieces = [(b"<unk>", 0.0, 2), (b"<s>", 0.0, 3), (b"</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>".encode(), 0.0, 6) for b in range(256)]
    pieces += [(f"\u2581w{i}".encode(), -float(i), 1) for i in range(512 - len(pieces))]
    export.write_tokenizer(str(d / "tokenizer.bin"), export.TOK_SENTENCEPIECE, pieces, bos_id=1, eos_id=2,
                           unk_id=0, flags=export.TOKF_ADD_BOS | export.TOKF_DUMMY_PREFIX | export.TOKF_BYTE_FALLBACK,
                           chat_template=export.CHAT_LLAMA2)
    return d


def test_stories260k_out(stories, tmp_path):
    to("gguf", stories / "model.bin", tmp_path / "s.gguf")
    check_against_run(stories / "model.bin", load_gguf_model(tmp_path / "s.gguf"), 512, tmp_path, HF_TOL)
    to("hf", stories / "model.bin", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    check_against_run(stories / "model.bin", model, 512, tmp_path, HF_TOL)


# ----------------------------------------------------------------------------
# --verify

def verify_lines(p):
    return [line for line in p.stdout.splitlines() if line.startswith("verify:")]


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    """A random LlamaForCausalLM saved by transformers (GQA, untied)."""
    d = tmp_path_factory.mktemp("hf_source")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      max_position_embeddings=64, rope_theta=30000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(d / "hf")
    return d / "hf"


@pytest.mark.parametrize("dtype", ["f32", "bf16", "q8_0", "q4_0"])
def test_verify_passes_on_a_good_hf_conversion(hf_source, dtype, tmp_path):
    p = export_py(tmp_path / "m.bin", "--hf", hf_source, "--dtype", dtype, "--verify")
    assert p.returncode == 0, p.stderr
    (line,) = verify_lines(p)
    assert "against transformers" in line and f"({dtype} " in line
    if dtype == "f32":
        assert "top token agrees at 100.0%" in line


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_verify_passes_on_family_hf_sources(family, tmp_path):
    """A Qwen2ForCausalLM (biases) and a LlamaForCausalLM with Llama 3's
    RoPE scaling, saved by transformers, checked against transformers."""
    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
    torch.manual_seed(0)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_scaling=LLAMA3_SCALING))
    with torch.no_grad():       # weights that make attention, RoPE and the biases matter
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(0.5 * torch.randn_like(p) if name.endswith(".bias") else 0.08 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    p = export_py(tmp_path / "m.bin", "--hf", tmp_path / "hf", "--verify")
    assert p.returncode == 0, p.stderr
    (line,) = verify_lines(p)
    assert "against transformers" in line and "top token agrees at 100.0%" in line, line


def test_verify_passes_on_llama2c_gguf_and_out(stories, tmp_path):
    p = export_py(tmp_path / "m.bin", "--llama2c", SHARED / "models" / "stories260K.bin", "--verify")
    assert p.returncode == 0, p.stderr
    assert "model.py's reference" in verify_lines(p)[0] and "agrees at 100.0%" in verify_lines(p)[0]
    for flag, out in (("--to-gguf", tmp_path / "s.gguf"), ("--to-hf", tmp_path / "hf")):
        p = export_py(stories / "model.bin", flag, out, "--verify")
        assert p.returncode == 0, p.stderr
        assert "agrees at 100.0%" in verify_lines(p)[0]
    (tmp_path / "back").mkdir()
    p = export_py(tmp_path / "back" / "m.bin", "--gguf", tmp_path / "s.gguf", "--verify")
    assert p.returncode == 0, p.stderr
    assert "agrees at 100.0%" in verify_lines(p)[0]


BROKEN = {
    # a converter that forgets to permute Hugging Face's q/k rows into our RoPE layout
    "import": "import convert.sources as s; s.hf_to_interleaved = lambda w, n, d: w",
    # one that forgets to permute them back for Hugging Face
    "to-hf": "import convert.hf_out as h; h.interleaved_to_hf = lambda w, n, d: w",
}


@pytest.mark.parametrize("break_", sorted(BROKEN))
def test_verify_fails_on_a_broken_conversion(hf_source, stories, break_, tmp_path):
    if break_ == "import":
        out, args = tmp_path / "m.bin", [tmp_path / "m.bin", "--hf", hf_source, "--verify"]
    else:
        out, args = tmp_path / "hf", [stories / "model.bin", "--to-hf", tmp_path / "hf", "--verify"]
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); {BROKEN[break_]}; import export; "
            f"sys.exit(export.main({list(map(str, args))!r}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and "verification failed" in p.stderr, p.stderr
    assert "the files are written" in p.stderr
    assert out.exists()
    assert "mean KL" in p.stderr and verify_lines(p), p.stderr


def test_verify_fails_without_run(hf_source, tmp_path, monkeypatch):
    monkeypatch.setattr("convert.verify.RUN_BINARY", str(tmp_path / "no-run"))
    assert export.main([str(tmp_path / "m.bin"), "--hf", str(hf_source), "--verify"]) == 1
    assert (tmp_path / "m.bin").exists()


# ----------------------------------------------------------------------------
# What a user can get wrong: one line, exit 1, nothing written

@pytest.fixture
def model_dir(toks, tmp_path):
    write_model(tmp_path / "m", "mha_tied", toks["sp"][0])
    return tmp_path / "m"


def garbage(d):
    (d / "garbage.bin").write_bytes(b"LLAM" + bytes(300))
    return [d / "garbage.bin"]


def not_utf8_tokenizer(d):
    pieces = [(b"<unk>", 0.0, 2), (b"<s>", 0.0, 3), (b"</s>", 0.0, 3), (b"\xff\xfe", 0.0, 1)]
    pieces += [(f"p{i}".encode(), 0.0, 1) for i in range(len(pieces), len(export.read_tokenizer(d / "tokenizer.bin")["tokens"]))]
    export.write_tokenizer(str(d / "bad.tok"), export.TOK_SENTENCEPIECE, pieces, bos_id=1, eos_id=2, unk_id=0)
    return [d / "model.bin", "--tokenizer", d / "bad.tok"]


def small_tokenizer(d):
    export.write_tokenizer(str(d / "small.tok"), export.TOK_SENTENCEPIECE, [(b"<unk>", 0.0, 2), (b"a", 0.0, 1)],
                           unk_id=0)
    return [d / "model.bin", "--tokenizer", d / "small.tok"]


HOSTILE = {
    "missing model": (lambda d: [d / "nothing.bin"], "No such file"),
    "garbage model": (garbage, "garbage.bin"),
    "legacy model": (lambda d: [SHARED / "models" / "stories260K.bin", "--tokenizer", d / "tokenizer.bin"],
                     "magic"),
    "no tokenizer": (lambda d: ((d / "tokenizer.bin").unlink(), [d / "model.bin"])[1], "--tokenizer"),
    "tokenizer of another size": (small_tokenizer, "2 tokens but the model has"),
    "tokenizer not LTOK": (lambda d: [d / "model.bin", "--tokenizer", d / "model.bin"], "not a tokenizer.bin"),
    "token not UTF-8": (not_utf8_tokenizer, "not UTF-8"),
}


@pytest.mark.parametrize("kind", ["gguf", "hf"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_inputs(model_dir, kind, case, capsys):
    make, fragment = HOSTILE[case]
    if case == "legacy model" and not (SHARED / "models" / "stories260K.bin").is_file():
        pytest.skip("../shared/models/stories260K.bin is not here")
    args = make(model_dir)
    before = sorted(os.listdir(model_dir))
    out = model_dir / ("out.gguf" if kind == "gguf" else "out")
    assert export.main([str(args[0]), f"--to-{kind}", str(out), *map(str, args[1:])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("export.py: ") and fragment in err, err
    assert sorted(os.listdir(model_dir)) == before, "nothing written, no temporary left"


def test_hf_output_directory_must_be_new_or_empty(model_dir, capsys):
    out = model_dir.parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export.main([str(model_dir / "model.bin"), "--to-hf", str(out)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    (out / "keep.txt").unlink()                       # an empty directory is filled
    to("hf", model_dir / "model.bin", out)
    assert "config.json" in os.listdir(out) and oct(out.stat().st_mode & 0o777) != "0o700"
    (model_dir.parent / "file").write_text("x")
    assert export.main([str(model_dir / "model.bin"), "--to-hf", str(model_dir.parent / "file")]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert export.main([str(model_dir / "model.bin"), "--to-gguf", str(model_dir)]) == 1
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["m.bin", "--to-gguf", "x.gguf", "--dtype", "q8_0"], "--dtype"),
    (["m.bin", "--to-hf", "d", "--max-seq-len", "8"], "--max-seq-len"),
    (["m.bin", "--hf", "d", "--tokenizer", "t.bin"], "--tokenizer goes with"),
    (["t.bin", "--tokenizer-model", "t.model", "--verify"], "--verify"),
    (["m.bin", "--to-gguf", ""], "--to-gguf"),
])
def test_bad_arguments(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    assert e.value.code == 2 and fragment in capsys.readouterr().err
