"""The model families beyond Llama 2: Llama 3's RoPE scaling, linear RoPE
scaling, and Qwen2's q/k/v biases, end to end against transformers.

Each family is a small random transformers model with GQA (4 heads, 2 kv
heads of 16), saved with save_pretrained and, separately, written as a GGUF
file with llama.cpp's tensor names and metadata. export.py converts each;
./run's logits over a prompt and 64 generated tokens must match
transformers' within test_all.REL_TOL (1.5e-5 of the row's largest logit), and
its greedy tokens equal transformers'. Each family is also checked to be a
test that can fail: the same weights without the scaling (or without the
biases) give logits that differ by far more than the tolerance.

The scalings only change the slow pairs of a head: head_dim 16 and
original_max_position_embeddings 64 put pair 0 in the kept band, pairs 1-2
in the blended one and pairs 3-7 in the divided one, and 72 positions turn
the slow pairs far enough for the difference to show.

Also here: Meta's params.json with use_scaled_rope (against the reference
model, its frequencies taken from transformers), the scaled frequencies
against transformers' own ROPE_INIT_FUNCTIONS, version 1 files byte for byte
as before version 2 existed, the refused configurations, and run.c refusing
a version 2 header with an unknown flag.
"""

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export  # noqa: E402
from convert.checkpoint import checkpoint_tensors  # noqa: E402
from model import ModelArgs, rope_inverse_frequencies  # noqa: E402
from test_all import (N_GREEDY, REL_TOL, RUN, RUN_PLAIN, assert_logits_close,  # noqa: E402
                      check_against_reference, generate_ids, read_logits)

PROMPT = [1, 17, 42, 99, 150, 7, 3, 200]
HEAD_DIM = 16
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
LINEAR = {"type": "linear", "factor": 4.0}         # the older key, "type", as many configs still say
FAMILIES = {  # name: (model_type, rope_scaling, tied)
    "llama3": ("llama", LLAMA3, False),
    "linear": ("llama", LINEAR, True),
    "qwen2_untied": ("qwen2", None, False),
    "qwen2_tied": ("qwen2", None, True),
}


@pytest.fixture(scope="module", autouse=True)
def build():
    if "RUN_BINARY" not in os.environ:
        subprocess.run(["make", "-s", "run", "run-plain"], cwd=ROOT, check=True)


def hf_config(model_type, scaling, tied):
    from transformers import LlamaConfig, Qwen2Config
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied)
    if model_type == "qwen2":
        return Qwen2Config(**common, rope_theta=1e6)
    return LlamaConfig(**common, rope_theta=10000.0, rope_scaling=scaling)


def hf_model(config, seed=0):
    """A random transformers model whose every weight matters: matrices
    N(0, 0.08^2), norms 1 + N(0, 0.1^2), and biases N(0, 0.5^2) (transformers
    starts them at zero)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else
                    0.5 * noise if name.endswith(".bias") else 0.08 * noise)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, prompt, n):
    """n greedy tokens, with transformers' own KV cache (generate() needs
    torch.distributed, which Debian's torch 1.13 lacks)."""
    ids = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            ids.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([ids[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return ids


def worst_relative(a, b):
    return max(np.abs(x - y).max() / np.abs(y).max() for x, y in zip(a, b))


def header_version_and_flags(path):
    data = Path(path).read_bytes()[:64]
    return struct.unpack_from("<I", data, 4)[0], struct.unpack_from("<I", data, 60)[0]


def export_cli(*argv):
    p = subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, argv)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{name: (transformers model, its save_pretrained directory)}, built once."""
    cache = {}

    def get(name):
        if name not in cache:
            model = hf_model(hf_config(*FAMILIES[name]))
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory, safe_serialization=True)
            cache[name] = model, directory
        return cache[name]
    return get


def check_against_transformers(ours_path, theirs, tmp_path, binary=RUN):
    generated, logits_path = generate_ids(ours_path, PROMPT, N_GREEDY, tmp_path, binary=binary)
    ours = read_logits(logits_path, theirs.config.vocab_size)
    assert_logits_close(ours, hf_logits(theirs, PROMPT + generated[:-1]))
    assert generated == hf_greedy(theirs, PROMPT, N_GREEDY)
    return generated


def without_the_feature(name, model):
    """The same weights, without the scaling (llama) or the biases (qwen2)."""
    model_type, _, tied = FAMILIES[name]
    plain = hf_model(hf_config(model_type, None, tied))
    plain.load_state_dict({k: torch.zeros_like(v) if k.endswith(".bias") else v
                           for k, v in model.state_dict().items()})
    return plain


# ----------------------------------------------------------------------------
# Hugging Face directories

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hf_matches_transformers(families, name, tmp_path):
    model, directory = families(name)
    out = tmp_path / "model.bin"
    export_cli(out, "--hf", directory)
    scaled, biased = FAMILIES[name][1] is not None, FAMILIES[name][0] == "qwen2"
    assert header_version_and_flags(out) == (2, biased | 2 * scaled)
    generated = check_against_transformers(out, model, tmp_path)
    # the test can fail: without the feature the logits move by far more than the tolerance
    sequence = PROMPT + generated[:-1]
    assert worst_relative(hf_logits(without_the_feature(name, model), sequence),
                          hf_logits(model, sequence)) > 100 * REL_TOL


def test_llama3_scaling_changes_some_frequencies_only(families):
    """The llama3 case exercises all three bands of the rule."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = families("llama3")[0].config
    scaled = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0].numpy()
    plain = ROPE_INIT_FUNCTIONS["default"](config, "cpu")[0].numpy()
    same = np.isclose(scaled, plain, rtol=1e-6)
    divided = np.isclose(scaled, plain / LLAMA3["factor"], rtol=1e-6)
    assert same.sum() >= 1 and divided.sum() >= 1 and (~same & ~divided).sum() >= 1


@pytest.mark.parametrize("name", ["llama3", "qwen2_untied"])
def test_plain_build_matches_transformers(families, name, tmp_path):
    model, directory = families(name)
    out = tmp_path / "model.bin"
    export_cli(out, "--hf", directory)
    check_against_transformers(out, model, tmp_path, binary=RUN_PLAIN)


def test_q8_0_with_biases_matches_its_decoded_weights(families, tmp_path):
    """The biases stay f32 beside quantized matrices: ./run with q8_0 weights
    against the reference model with the same weights decoded (bound as in
    tests/test_weight_types.py: 2e-3 relative rms per row)."""
    _, directory = families("qwen2_untied")
    out = tmp_path / "model.bin"
    export_cli(out, "--hf", directory, "--dtype", "q8_0")
    args, state_dict = export.read_checkpoint(out)
    reference = export.Llama(args)
    reference.load_state_dict(state_dict)
    generated, logits_path = generate_ids(out, PROMPT, 16, tmp_path)
    ours = read_logits(logits_path, args.vocab_size)
    with torch.no_grad():
        theirs = reference.eval()(torch.tensor([PROMPT + generated[:-1]]))[0].numpy()
    rms = np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)
    assert rms.max() <= 2e-3


# ----------------------------------------------------------------------------
# GGUF files, written as llama.cpp's converter writes them

GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w, n_head):
    """llama.cpp's converter turns Hugging Face's q/k rows of the llama
    architecture into interleaved RoPE pairs: within each head, row j and
    row head_dim/2 + j become rows 2j and 2j + 1."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_family_gguf(path, model, name):
    import gguf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    model_type, scaling, tied = FAMILIES[name]
    config = model.config
    w = gguf.GGUFWriter(str(path), model_type)
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    if scaling is LINEAR:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(LINEAR["factor"])
    if scaling is LLAMA3:       # llama.cpp's rope_freqs: what each frequency is divided by
        plain = ROPE_INIT_FUNCTIONS["default"](config, "cpu")[0].double()
        scaled = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0].double()
        w.add_tensor("rope_freqs.weight", (plain / scaled).float().numpy())
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if hf_name in names:
            gguf_name = names[hf_name]
        else:
            _, _, i, rest = hf_name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{i}.{GGUF_LAYER[module]}.{kind}"
        array = tensor.float().numpy()
        if model_type == "llama" and module_is(hf_name, "q_proj"):
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif model_type == "llama" and module_is(hf_name, "k_proj"):
            array = llama_cpp_permute(array, config.num_key_value_heads)
        w.add_tensor(gguf_name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def module_is(hf_name, module):
    return f".self_attn.{module}." in hf_name


def load_hf_gguf(directory, name):
    """transformers' model from a GGUF file (the config read first and passed
    in: transformers 4.47's from_pretrained does not hand gguf_file to it)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, config=config,
                                                torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gguf_matches_transformers(families, name, tmp_path):
    model, _ = families(name)
    gguf_path = tmp_path / f"{name}.gguf"
    write_family_gguf(gguf_path, model, name)
    out = tmp_path / "model.bin"
    export_cli(out, "--gguf", gguf_path)
    if FAMILIES[name][0] == "qwen2":
        theirs = load_hf_gguf(tmp_path, gguf_path.name)
        assert theirs.config.model_type == "qwen2" and theirs.config.tie_word_embeddings == FAMILIES[name][2]
    else:
        # transformers 4.47 reads neither rope_freqs.weight nor rope.scaling.* from a GGUF
        # (it would run plain RoPE), so the reference is the model the GGUF was written from.
        theirs = model
    check_against_transformers(out, theirs, tmp_path)


def test_gguf_yarn_is_refused(tmp_path, capsys):
    import gguf
    path = tmp_path / "yarn.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_tensor("token_embd.weight", np.zeros((320, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    status = export.main([str(tmp_path / "model.bin"), "--gguf", str(path)])
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and "llama.rope.scaling.type" in err and "yarn" in err, err
    assert str(path) in err and not (tmp_path / "model.bin").exists()


# ----------------------------------------------------------------------------
# Meta's params.json with use_scaled_rope

def test_meta_use_scaled_rope_matches_the_reference(tmp_path):
    """Meta's release says only use_scaled_rope; Llama 3.1's reference code
    fixes factor 8, low 1, high 4, original context 8192. The reference model
    takes its frequencies from transformers' llama3 rule with those values.
    With an original context of 8192 only the slowest pairs change, so the
    weights are 5 times the usual init (attention that is not near uniform)
    for the scaling to show in 72 positions."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    meta_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
    args = ModelArgs(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=HEAD_DIM,
                     vocab_size=300, max_seq_len=2048, rope_theta=500000.0, norm_eps=1e-5)
    state_dict = {name: w if name.endswith("norm.weight") else 5 * w
                  for name, w in export.random_model(args, seed=2).state_dict().items()}
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 300, "multiple_of": 32,
        "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}))
    torch.save(state_dict, meta / "consolidated.00.pth")
    out = tmp_path / "model.bin"
    export_cli(out, "--meta", meta)
    assert header_version_and_flags(out) == (2, 2)

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=HEAD_DIM, rope_theta=500000.0,
                         rope_scaling=meta_scaling)
    inv_freq = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0].float()
    assert not torch.allclose(inv_freq, ROPE_INIT_FUNCTIONS["default"](config, "cpu")[0].float())
    reference = export.Llama(ModelArgs(**{**vars(args), "scaled_rope": True}))
    reference.load_state_dict({**state_dict, "rope_inv_freq": inv_freq})
    prompt, ours = check_against_reference(out, reference.eval(), args.vocab_size, tmp_path)
    # the test can fail: plain RoPE moves these logits by far more than the tolerance
    plain = export.Llama(args)
    plain.load_state_dict(state_dict)
    sequence = torch.tensor([prompt + [int(t) for t in ours[len(prompt) - 1:-1].argmax(axis=1)]])
    with torch.no_grad():
        assert worst_relative(plain.eval()(sequence)[0].numpy(), reference(sequence)[0].numpy()) > 30 * REL_TOL


# ----------------------------------------------------------------------------
# The frequencies themselves, against transformers' ROPE_INIT_FUNCTIONS

@pytest.mark.parametrize("scaling", [
    LLAMA3, LINEAR, {"rope_type": "linear", "factor": 0.5},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 3.0,
     "original_max_position_embeddings": 512}])
@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (64, 500000.0), (128, 1e6)])
def test_scaled_frequencies_match_transformers(scaling, head_dim, theta):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, rope_theta=theta,
                         rope_scaling=dict(scaling))
    kind = scaling.get("rope_type", scaling.get("type"))
    theirs = ROPE_INIT_FUNCTIONS[kind](config, "cpu")[0].numpy()
    ours = rope_inverse_frequencies(head_dim, theta, scaling)
    assert ours.dtype == np.float32 and ours.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, theirs, rtol=2e-6)


# ----------------------------------------------------------------------------
# The format: version 1 as it always was, version 2 read back and checked

# SHA-256 of the files that write_checkpoint() wrote for deterministic_model()
# before version 2 existed (commit b1bed2d): a model without biases or
# scaled RoPE must still give exactly these bytes.
V1_SHA256 = {
    "bf16": "a82273df9df704c74c626f7bad4963bf26d9f20dbeeee3d2cc1c3d783b15816f",
    "f32": "7530890d0388c9dc74b07226d90e59f9ef54aa5ce580bb0b501e3a5b151f1f0f",
    "q4_0": "9e5015c2a747d0d53d56d63698789320203a6fcf32974dcec739188d79b7f79d",
    "q8_0": "1dd5107c5c8e73f6065de93b1477e5a9ad11e381112137ca9ffb16add4b52847",
}


def deterministic_model(tied):
    """A model whose weights are sines of their index: the same bytes on any machine."""
    args = ModelArgs(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=70,
                     max_seq_len=128, rope_theta=500000.0, norm_eps=1e-5, tied=tied)
    state_dict = {}
    for k, (name, shape) in enumerate(checkpoint_tensors(args)):
        state_dict[name] = (0.1 * np.sin(np.arange(np.prod(shape)) * 0.37 + k)).reshape(shape).astype(np.float32)
    return args, state_dict


@pytest.mark.parametrize("dtype", sorted(V1_SHA256))
def test_version_1_files_are_byte_for_byte_as_before(dtype, tmp_path):
    digest = hashlib.sha256()
    for tied in (False, True):
        args, state_dict = deterministic_model(tied)
        path = tmp_path / f"{dtype}-{tied}.bin"
        export.write_checkpoint(path, args, state_dict, dtype)
        assert header_version_and_flags(path) == (1, 0)
        digest.update(path.read_bytes())
    assert digest.hexdigest() == V1_SHA256[dtype]


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_version_2_reads_back(dtype, tmp_path):
    args = ModelArgs(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=70,
                     max_seq_len=128, attention_bias=True, scaled_rope=True)
    state_dict = export.random_model(args, seed=4).state_dict()
    state_dict["rope_inv_freq"] = torch.from_numpy(rope_inverse_frequencies(16, 10000.0, LLAMA3))
    path = tmp_path / "model.bin"
    export.write_checkpoint(path, args, state_dict, dtype)
    read_args, read_state = export.read_checkpoint(path)
    assert (read_args.attention_bias, read_args.scaled_rope, read_args.describe()) == \
        (True, True, args.describe())
    for name in ["rope_inv_freq", "layers.1.attention.wq.bias", "layers.1.attention.wk.bias",
                 "layers.0.attention.wv.bias"]:
        assert torch.equal(read_state[name], state_dict[name].float()), name


# ----------------------------------------------------------------------------
# Refusals: one line naming the field, nothing written

HF_REFUSED = [
    ("yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
     "rope_scaling", "yarn"),
    ("dynamic", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling", "dynamic"),
    ("longrope", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1], "long_factor": [1]}},
     "rope_scaling", "longrope"),
    ("llama3 without its factors", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling",
     "low_freq_factor"),
    ("sliding window", {"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window", "sliding"),
    ("partial rotary", {"partial_rotary_factor": 0.5}, "partial_rotary_factor", "part of a head"),
    ("gelu", {"hidden_act": "gelu"}, "hidden_act", "silu"),
    ("mlp_bias", {"mlp_bias": True}, "mlp_bias", "MLP"),
    ("llama attention_bias", {"attention_bias": True}, "attention_bias", "o_proj"),
    ("mistral", {"model_type": "mistral"}, "model_type", "mistral"),
]


@pytest.mark.parametrize("change,field,what", [c[1:] for c in HF_REFUSED], ids=[c[0] for c in HF_REFUSED])
def test_refused_config_is_one_line_naming_the_field(change, field, what, tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "hidden_act": "silu"}
    (hf / "config.json").write_text(json.dumps({**config, **change}))
    status = export.main([str(tmp_path / "model.bin"), "--hf", str(hf)])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("export.py: ") and err.count("\n") == 1, err
    assert str(hf / "config.json") in err and field in err and what in err, err
    assert not (tmp_path / "model.bin").exists()


def test_run_refuses_unknown_flags(tmp_path):
    args = ModelArgs(dim=32, hidden_dim=48, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=40,
                     max_seq_len=16, attention_bias=True)
    path = tmp_path / "model.bin"
    export.write_checkpoint(path, args, export.random_model(args, 0).state_dict())
    good = path.read_bytes()
    run_stderr(path, tmp_path)
    for flags, fragment in ((1 | 4, "flags = 0x5"), (1 << 31, "flags = 0x80000000"),
                            (3, "but the header needs")):       # bit 1 set, but no frequencies stored
        bad = bytearray(good)
        struct.pack_into("<I", bad, 60, flags)
        path.write_bytes(bytes(bad))
        err = run_stderr(path, tmp_path, status=1)
        assert fragment in err and str(path) in err, err


def run_stderr(path, cwd, status=0):
    p = subprocess.run([str(RUN), str(path), "--tokens", "1 2", "-n", "2", "-t", "0"], cwd=cwd,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == status, p.stderr
    if status:
        assert p.stderr.startswith("run: ") and p.stderr.count("\n") == 1, p.stderr
    return p.stderr
