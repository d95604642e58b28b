"""export.py streams: each tensor is read from its source, converted and
written before the next one is read, so that a 7B model converts on a 16 GB
machine.

  1. The streamed checkpoint is byte for byte the one write_checkpoint()
     writes from the source's tensors held in memory as a plain dict (as the
     converter did before it streamed), for every source type: a reference
     file, Meta's release in two model-parallel shards, Hugging Face
     safetensors (one bf16 file; two f16 shards) and pytorch_model.bin (two
     shards), llama2.c, GGUF (F16 and Q8_0 tensors); in every weight type.
     A matrix encoded a block of rows at a time is encoded as a whole.
  2. Peak resident memory: converting a model of 57M weights (bf16
     safetensors, 115 MB; or Meta's consolidated.00.pth of the same) to q8_0
     stays within STREAM_BOUND of what a process needs to import export.py's
     packages. Holding the model in float32 alone takes 229 MB beyond that.
     The same model as a Q8_0 GGUF file, its blocks kept, within GGUF_BOUND.
  3. torch.save files are read lazily (convert/torch_zip.py), into the
     arrays that torch.load reads: every float type, views of a storage at an
     offset and with strides, storages that tensors share.
"""

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
EXPORT = ROOT / "export.py"
sys.path.insert(0, str(ROOT))
import export  # noqa: E402
from convert import checkpoint  # noqa: E402
from convert.torch_zip import read_torch_zip  # noqa: E402
from tiny_gguf import args_writer, finish, gguf_name, random_group_blocks  # noqa: E402

ARGS = export.ModelArgs(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                        vocab_size=320, max_seq_len=64, rope_theta=10000.0, norm_eps=1e-5, tied=False)
DTYPES = ["f32", "bf16", "q8_0", "q4_0"]


def hf_names():
    """Our tensor names -> Hugging Face's."""
    theirs = {ours: hf for hf, ours in export.HF_NAMES.items()}
    for i in range(ARGS.n_layers):
        theirs.update({f"layers.{i}.{ours}.weight": f"model.layers.{i}.{hf}.weight"
                       for hf, ours in export.HF_LAYER_NAMES.items()})
    return theirs


def as_ours_from_hf(hf_tensors):
    """What export.py makes of Hugging Face tensors: float32, our names, q and k rows interleaved."""
    names = {hf: ours for ours, hf in hf_names().items()}
    ours = {}
    for hf, tensor in hf_tensors.items():
        name, tensor = names[hf], tensor.float()
        if "attention.wq" in name:
            tensor = export.hf_to_interleaved(tensor, ARGS.n_heads, ARGS.head_dim)
        elif "attention.wk" in name:
            tensor = export.hf_to_interleaved(tensor, ARGS.n_kv_heads, ARGS.head_dim)
        ours[name] = tensor
    return ours


def meta_shards(state_dict, n):
    """Our state_dict cut as Meta's model-parallel ranks cut it: output rows
    of column-parallel layers, input columns of row-parallel ones and of
    Llama 2's embedding; norms in every shard."""
    shards = [{} for _ in range(n)]
    for name, tensor in state_dict.items():
        if tensor.dim() == 1:
            parts = [tensor] * n
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")):
            parts = tensor.chunk(n, dim=1)
        else:
            parts = tensor.chunk(n, dim=0)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


def write_sharded(directory, tensors, index_name, save, files):
    """tensors split over files (names sorted, in halves), with the index."""
    names = sorted(tensors)
    weight_map = {}
    for k, file in enumerate(files):
        part = names[k * len(names) // len(files):(k + 1) * len(names) // len(files)]
        save({name: tensors[name] for name in part}, directory / file)
        weight_map.update({name: file for name in part})
    (directory / index_name).write_text(json.dumps({"weight_map": weight_map}))


def make_sources(d):
    """Every source of one random model, in the directory d: {name: (export.py's
    source arguments, the tensors it must read, as a dict)}."""
    state = {k: v.contiguous() for k, v in export.random_model(ARGS, seed=5).state_dict().items()}
    found = {}

    export.save_reference(d / "ref.pt", ARGS, state)
    found["reference"] = (["--reference", d / "ref.pt"], state)
    export.write_llama2c(d / "llama2c.bin", ARGS, state)
    found["llama2c"] = (["--llama2c", d / "llama2c.bin"], state)

    meta = d / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": ARGS.dim, "n_layers": ARGS.n_layers, "n_heads": ARGS.n_heads,
                                                  "n_kv_heads": ARGS.n_kv_heads, "norm_eps": ARGS.norm_eps,
                                                  "vocab_size": -1}))
    for k, shard in enumerate(meta_shards(state, 2)):
        torch.save(shard, meta / f"consolidated.0{k}.pth")
    found["meta"] = (["--meta", meta], state)

    names = hf_names()
    config = {"model_type": "llama", "hidden_size": ARGS.dim, "intermediate_size": ARGS.hidden_dim,
              "num_hidden_layers": ARGS.n_layers, "num_attention_heads": ARGS.n_heads,
              "num_key_value_heads": ARGS.n_kv_heads, "vocab_size": ARGS.vocab_size,
              "max_position_embeddings": ARGS.max_seq_len, "rms_norm_eps": ARGS.norm_eps,
              "rope_theta": ARGS.rope_theta, "tie_word_embeddings": False}
    for kind, dtype in [("hf-bf16", torch.bfloat16), ("hf-f16-sharded", torch.float16), ("hf-bin-sharded", None)]:
        hf = d / kind
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps(config))
        tensors = {names[k]: (v if dtype is None else v.to(dtype)).contiguous() for k, v in state.items()}
        if kind == "hf-bf16":
            save_file(tensors, hf / "model.safetensors")
        elif kind == "hf-f16-sharded":
            write_sharded(hf, tensors, "model.safetensors.index.json", save_file,
                          ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
        else:
            write_sharded(hf, tensors, "pytorch_model.bin.index.json", torch.save,
                          ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"])
        found[kind] = (["--hf", hf], as_ours_from_hf(tensors))

    for ggml_type in ["F16", "Q8_0"]:
        path = d / f"{ggml_type}.gguf"
        found[f"gguf-{ggml_type}"] = (["--gguf", path], write_gguf(path, state, ggml_type))
    return found


def write_gguf(path, state, ggml_type):
    """A llama GGUF file (no tokenizer) of the state_dict, its matrices
    quantized to ggml_type by gguf.quants; returns what they decode to."""
    qtype = gguf.GGMLQuantizationType[ggml_type]
    w = args_writer(path, ARGS)
    decoded = {}
    for name, tensor in state.items():
        ty = qtype if tensor.dim() == 2 else gguf.GGMLQuantizationType.F32
        data = gguf.quants.quantize(tensor.numpy(), ty)
        w.add_tensor(gguf_name(name), data, raw_dtype=ty)
        decoded[name] = gguf.quants.dequantize(data, ty).reshape(tensor.shape)
    finish(w)
    return decoded


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return make_sources(tmp_path_factory.mktemp("sources"))


SOURCES = ["reference", "llama2c", "meta", "hf-bf16", "hf-f16-sharded", "hf-bin-sharded", "gguf-F16", "gguf-Q8_0"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("source", SOURCES)
def test_streamed_checkpoint_is_the_in_memory_one(sources, source, dtype, tmp_path, capsys):
    argv, tensors = sources[source]
    expected = tmp_path / "expected.bin"
    export.write_checkpoint(expected, ARGS, dict(tensors), dtype)
    out = tmp_path / "out" / "model.bin"
    out.parent.mkdir()
    status = export.main([str(out), *map(str, argv), "--dtype", dtype, "--max-seq-len", str(ARGS.max_seq_len)])
    assert status == 0, capsys.readouterr().err
    assert out.read_bytes() == expected.read_bytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_matrix_encoded_by_blocks_of_rows_is_encoded_whole(dtype, tmp_path, monkeypatch):
    """Row blocks of 5 rows (the last one shorter) against the whole matrix at once."""
    state = export.random_model(ARGS, seed=6).state_dict()
    export.write_checkpoint(tmp_path / "whole.bin", ARGS, state, dtype)
    monkeypatch.setattr(checkpoint, "ENCODE_ROWS_BYTES", 5 * 4 * ARGS.hidden_dim)
    export.write_checkpoint(tmp_path / "blocks.bin", ARGS, state, dtype)
    assert (tmp_path / "blocks.bin").read_bytes() == (tmp_path / "whole.bin").read_bytes()
    _, _, arrays = export.read_checkpoint_arrays(tmp_path / "blocks.bin")
    w = state["layers.1.feed_forward.w1.weight"].numpy()
    for got, want in zip(arrays["layers.1.feed_forward.w1.weight"], export.encode_matrix(w, dtype)):
        assert np.array_equal(got, want)


# ----------------------------------------------------------------------------
# 2. Peak memory

# Runs argv[1:] and prints its peak resident memory (KiB) on the last line of
# stderr. This small process forks it: the wait4 of a child forked from a
# big process (pytest, with torch loaded) reports the parent's high-water mark.
PEAK_RSS = """
import resource, subprocess, sys
status = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(status)
"""

MB = 1 << 20
# Above the process that only imports the packages: the largest tensor (the
# 16000 x 512 embedding: 16 MB as read, 33 MB in float32), one block of rows
# being encoded (ENCODE_ROWS_BYTES of float32 and the quantizer's temporaries
# beside it) and the allocator's slack. Measured: 116 MB; the converter that
# held the model in float32 took 325 MB (the model alone is 229 MB).
STREAM_BOUND = 200 * MB
# From Meta's consolidated.00.pth (109 MB of bf16): less than the shard and
# its largest tensor in float32 (31 MB) together, which torch.load's reading
# of the whole shard would need. Measured: 104 MB; the converter that read
# the shard with torch.load took 203 MB.
META_BOUND = 140 * MB
BIG = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
           num_key_value_heads=8, vocab_size=16000)


def big_args():
    """BIG's shape as our ModelArgs (untied, context 2048)."""
    return export.ModelArgs(dim=BIG["hidden_size"], hidden_dim=BIG["intermediate_size"],
                            n_layers=BIG["num_hidden_layers"], n_heads=BIG["num_attention_heads"],
                            n_kv_heads=BIG["num_key_value_heads"],
                            head_dim=BIG["hidden_size"] // BIG["num_attention_heads"],
                            vocab_size=BIG["vocab_size"], max_seq_len=2048, tied=False)


def peak_rss(argv):
    p = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, argv)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    return int(p.stderr.splitlines()[-1]) * 1024


def big_tensors(shapes):
    """bf16 tensors of these shapes by name: random bit patterns of weights
    between 2^-7 and 2^-4 in size."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 16, size=1_000_003, dtype=np.uint16)
    bits = (bits & 0x807F) | ((0x78 | ((bits >> 7) & 3)) << 7).astype(np.uint16)
    return {name: torch.from_numpy(np.resize(bits, int(np.prod(shape))).view(np.int16).reshape(shape))
            .view(torch.bfloat16) for name, shape in shapes.items()}


def write_big_hf(directory):
    """A random LlamaForCausalLM of BIG as one bf16 safetensors file (big_tensors)."""
    d, h, layers = BIG["hidden_size"], BIG["intermediate_size"], BIG["num_hidden_layers"]
    shapes = {"model.embed_tokens.weight": (BIG["vocab_size"], d), "model.norm.weight": (d,),
              "lm_head.weight": (BIG["vocab_size"], d)}
    for i in range(layers):
        for name, shape in [("input_layernorm", (d,)), ("post_attention_layernorm", (d,)),
                            ("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)), ("self_attn.v_proj", (d, d)),
                            ("self_attn.o_proj", (d, d)), ("mlp.gate_proj", (h, d)), ("mlp.up_proj", (h, d)),
                            ("mlp.down_proj", (d, h))]:
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    directory.mkdir()
    save_file(big_tensors(shapes), directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(dict(BIG, model_type="llama", rms_norm_eps=1e-5)))
    return sum(int(np.prod(shape)) for shape in shapes.values())


# q4_k_m (llama.cpp's K types, whose scale search holds some ten temporaries
# the size of the rows it encodes, an eighth as many rows at a time):
# measured 65 MB, and 8 s.
@pytest.mark.parametrize("dtype", ["q8_0", "q4_k_m"])
def test_peak_memory_is_a_few_tensors_not_the_model(tmp_path, dtype):
    weights = write_big_hf(tmp_path / "hf")
    assert 4 * weights > STREAM_BOUND       # the model in float32 alone would not fit
    imports = peak_rss([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                                              "import export, safetensors.torch"])
    converting = peak_rss([sys.executable, EXPORT, tmp_path / "model.bin", "--hf", tmp_path / "hf",
                           "--dtype", dtype])
    assert (tmp_path / "model.bin").stat().st_size > weights / 2
    assert converting - imports < STREAM_BOUND, \
        f"peak RSS {converting / MB:.0f} MB, {(converting - imports) / MB:.0f} MB above the imports"


def write_big_meta(directory):
    """Meta's release of BIG's shape: params.json, and one bf16 consolidated.00.pth (big_tensors)."""
    args = big_args()
    shapes = dict(checkpoint.checkpoint_tensors(args))
    directory.mkdir()
    torch.save(big_tensors(shapes), directory / "consolidated.00.pth")
    (directory / "params.json").write_text(json.dumps({"dim": args.dim, "n_layers": args.n_layers,
                                                       "n_heads": args.n_heads, "norm_eps": 1e-5,
                                                       "vocab_size": -1}))
    return sum(int(np.prod(shape)) for shape in shapes.values())


def test_peak_memory_from_meta_is_a_few_tensors_not_the_shard(tmp_path):
    """torch.load would hold the whole 115 MB shard: read lazily, a tensor at a time."""
    weights = write_big_meta(tmp_path / "meta")
    largest = BIG["vocab_size"] * BIG["hidden_size"]
    assert (tmp_path / "meta" / "consolidated.00.pth").stat().st_size + 4 * largest > META_BOUND
    imports = peak_rss([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import export"])
    converting = peak_rss([sys.executable, EXPORT, tmp_path / "model.bin", "--meta", tmp_path / "meta",
                           "--dtype", "q8_0"])
    assert (tmp_path / "model.bin").stat().st_size > weights
    assert converting - imports < META_BOUND, \
        f"peak RSS {converting / MB:.0f} MB, {(converting - imports) / MB:.0f} MB above the imports"


# A GGUF file of BIG's shape in Q8_0 (61 MB), converted with no --dtype: its
# blocks kept, each matrix read whole and written a block of rows at a time.
# Above the imports of the GGUF path, less than the file, which a converter
# that held every matrix's blocks would need. Measured: 11 MB (requantizing
# them, as export.py did before it kept them: 97 MB).
GGUF_BOUND = 30 * MB


def test_peak_memory_of_kept_gguf_blocks_is_a_few_tensors_not_the_file(tmp_path):
    args = big_args()
    path = tmp_path / "big.gguf"
    w = args_writer(path, args)
    rng = np.random.default_rng(0)
    for name, shape in checkpoint.checkpoint_tensors(args):
        if len(shape) == 2:
            w.add_tensor(gguf_name(name), random_group_blocks(rng, shape, "Q8_0"),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name(name), np.ones(shape, np.float32))
    finish(w)
    assert path.stat().st_size > GGUF_BOUND
    imports = peak_rss([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import export, gguf"])
    converting = peak_rss([sys.executable, EXPORT, tmp_path / "model.bin", "--gguf", path])
    assert (tmp_path / "model.bin").stat().st_size > path.stat().st_size * 0.99
    assert converting - imports < GGUF_BOUND, \
        f"peak RSS {converting / MB:.0f} MB, {(converting - imports) / MB:.0f} MB above the imports"


# ----------------------------------------------------------------------------
# 3. torch.save files read lazily

def test_stored_tensors_read_as_torch_load_reads_them(tmp_path):
    torch.manual_seed(0)
    big = torch.randn(6, 8)
    shared = torch.randn(5, 4).half()
    saved = {
        "f32": torch.randn(3, 4),
        "f64": torch.randn(7).double(),
        "f16": torch.randn(2, 3, 4).half(),
        "bf16": torch.randn(9, 5).bfloat16(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "slice": big[2:5, 1:7:2],           # an offset and strides into big's storage
        "transposed": big.t(),              # big's storage again, other strides
        "shared": shared,
        "shared row": shared[3],            # shared's storage, at an offset
        "parameter": torch.nn.Parameter(torch.randn(4, 2).bfloat16()),
    }
    path = tmp_path / "tensors.pth"
    torch.save(saved, path)
    want, got = torch.load(path), read_torch_zip(path)
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].shape == tuple(tensor.shape), name
        assert got[name].dtype == str(tensor.dtype).removeprefix("torch."), name
        assert got[name].float32().dtype == np.float32, name
        assert np.array_equal(got[name].float32(), tensor.detach().float().numpy()), name
    assert got["slice"].storage is got["transposed"].storage     # one storage, one record

