"""Weight types (bf16, q8_0, q4_0) and the batched prompt, end to end.

Each checkpoint is compared with two PyTorch references: the model it was
exported from (float32), and the same model with the checkpoint's own
weights, decoded (export.read_checkpoint). Against the decoded weights:

  bf16          the weights widened to float32 multiply float32
                activations, in the prompt's batches as in generation, so
                only the order of summation differs from PyTorch: measured
                5.7e-7 relative rms per row. Bound: 6e-6.
  q4_0          every activation vector that meets these weights is
                quantized to int8 in groups of 32 (step max|x| / 127, about
                0.2% rms error per value) for integer dot products, in the
                prompt's batches as in generation; and keys and values go
                into an f16 cache (half the memory traffic of attention).
                The noise, carried through the layers, measures about 1.3%
                of the logits' rms on these models. Bound: 3% relative rms
                per row.
  q8_0          the same, with each activation vector in two int8 parts
                (about 15 bits; run.c's quantize_remainder()), so that
                mostly the f16 cache is left: measured 3e-4 relative rms.
                Bound: 2e-3.

Against float32 (what the weight type costs): bf16 measures 0.5%, bound 2%.
q8_0 measures 1.8%, all of it its weights' rounding, bound 5%. q4_0's weights are 4-bit: on random Gaussian
matrices each one's rounding error is about 7.5% of its rms, and the logits
of these random models, products of ten or so such matrices, carry about 27%
(trained models, which lean on the residual stream, lose far less). So q4_0
is bounded by what its own decoded weights cost in PyTorch, plus the 3% of
activation rounding above: a kernel bug adds far more than that.
"""

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
from test_all import RUN, RUN_NOOMP, RUN_PLAIN, generate_ids, read_logits, reference_logits, assert_logits_close  # noqa: E402,E501

MIXES = ["q4_k_m", "q5_k_m", "q6_k"]                      # llama.cpp's mixes of K types (convert/kquants.py)
DTYPES = ["bf16", "q8_0", "q4_0"] + MIXES
CONFIGS = {
    # dim, hidden, layers, heads, kv_heads, head_dim, vocab, tied: widths multiples of 32
    "mha_tied": (64, 160, 2, 4, 4, 16, 101, True),
    "gqa4_untied": (128, 352, 2, 8, 2, 16, 256, False),
    "mqa_untied": (96, 224, 3, 6, 1, 16, 300, False),
    # widths multiples of 256, for the K types (hidden_dim 768 too: w2's is)
    "k_untied": (256, 768, 2, 4, 2, 64, 300, False),
    "k_tied": (512, 512, 1, 8, 8, 64, 200, True),
}
K_CONFIGS = {"k_untied", "k_tied"}
ACTIVATION_TOL = 0.03                                     # relative rms, int8 activations
TWO_PART_TOL = 0.002                                      # relative rms, q8_0's two-part activations
BF16_TOL = 6e-6                                           # relative rms, bf16 weights, f32 activations
ROUNDED_TOL = {"bf16": BF16_TOL, "q8_0": TWO_PART_TOL, "q4_0": ACTIVATION_TOL,
               **{mix: ACTIVATION_TOL for mix in MIXES}}
FLOAT_TOL = {"bf16": 0.02, "q8_0": 0.05}                  # relative rms against float32


def model_args(name, max_seq_len=96):
    dim, hidden, layers, heads, kv, head_dim, vocab, tied = CONFIGS[name]
    return export.ModelArgs(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                            head_dim=head_dim, vocab_size=vocab, max_seq_len=max_seq_len, tied=tied)


def relative_rms(ours, theirs):
    """Per row: rms(ours - theirs) / rms(theirs)."""
    return np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(config, dtype): (args, float32 model, path, decoded model)}."""
    out, cache = tmp_path_factory.mktemp("weight_types"), {}

    def get(name, dtype):
        if (name, dtype) not in cache:
            args = model_args(name)
            model = export.random_model(args, seed=1)
            path = out / f"{name}-{dtype}.bin"
            types = export.kquant_mix_types(args, dtype) if dtype in MIXES else dtype
            export.write_checkpoint(path, args, model.state_dict(), types)
            decoded_args, state = export.read_checkpoint(path)
            decoded = export.Llama(decoded_args)
            decoded.load_state_dict(state)
            cache[name, dtype] = args, model, path, decoded.eval()
        return cache[name, dtype]
    return get


def config(name, dtype):
    """The model that tests a weight type: for a K mix, one of K widths."""
    return "k_untied" if dtype in MIXES else name


def prompt_for(vocab, n=12, seed=0):
    return [1] + np.random.default_rng(seed).integers(3, vocab, n - 1).tolist()


# each type on each model it fits: the K mixes on the models of K widths (on others they fall back to q8_0)
PAIRS = [(name, dtype) for name in sorted(CONFIGS) for dtype in DTYPES if (name in K_CONFIGS) == (dtype in MIXES)]


@pytest.mark.parametrize("name,dtype", PAIRS)
def test_matches_its_decoded_weights_and_float32(exported, name, dtype, tmp_path):
    args, model, path, decoded = exported(name, dtype)
    prompt = prompt_for(args.vocab_size)
    generated, logits_path = generate_ids(path, prompt, 24, tmp_path)
    ours = read_logits(logits_path, args.vocab_size)
    sequence = prompt + generated[:-1]
    exact = reference_logits(decoded, sequence)[:len(ours)]
    float32 = reference_logits(model, sequence)[:len(ours)]
    assert relative_rms(ours, exact).max() <= ROUNDED_TOL[dtype]
    err, weights_only = relative_rms(ours, float32).max(), relative_rms(exact, float32).max()
    assert err <= FLOAT_TOL.get(dtype, weights_only + ACTIVATION_TOL), (err, weights_only)


@pytest.mark.parametrize("avx512", ["1", "0"])
@pytest.mark.parametrize("dtype", ["f32"] + DTYPES)
def test_batched_prompt_equals_one_token_at_a_time(exported, dtype, avx512, tmp_path, monkeypatch):
    """The prompt as matrices (batches of 16 here, so that one is partial)
    gives the logits of feeding it token by token (-b 1), bit for bit, for
    every weight type: each token's input is the same either way (quantized
    alike for q8_0 and q4_0) and the kernels sum it in the same order, so
    that neither the logits nor greedy text change with -b. (Before the
    kernels agreed, a float order that differed let an activation cross a
    rounding boundary of the next quantization, which the layers after it
    carried on: up to 2e-2 of a row's largest logit for q4_0, 7e-7 for
    f32.) With RUN_AVX512=0 too: the AVX2 kernels, on a CPU with AVX-512."""
    monkeypatch.setenv("RUN_AVX512", avx512)
    args, _, path, _ = exported(config("gqa4_untied", dtype), dtype)
    prompt = prompt_for(args.vocab_size, n=40)
    rows = {}
    for batch in ("1", "16", "64"):
        _, logits_path = generate_ids(path, prompt, 4, tmp_path, extra=("-b", batch))
        rows[batch] = read_logits(logits_path, args.vocab_size)
    assert rows["1"].shape == rows["16"].shape == (len(prompt) + 3, args.vocab_size)
    for batch in ("16", "64"):
        assert np.array_equal(rows[batch], rows["1"]), (batch, np.abs(rows[batch] - rows["1"]).max())


@pytest.mark.parametrize("dtype", ["f32"] + DTYPES)
def test_without_openmp_gives_identical_logits(exported, dtype, tmp_path):
    args, _, path, _ = exported(config("mqa_untied", dtype), dtype)
    prompt = prompt_for(args.vocab_size, n=20)
    runs = [generate_ids(path, prompt, 12, tmp_path, binary=b, extra=("-b", "8")) for b in (RUN, RUN_NOOMP)]
    assert runs[0][0] == runs[1][0]
    # the second call overwrote the logits file: compare its rows with a fresh OpenMP run
    serial = read_logits(runs[1][1], args.vocab_size)
    ids, logits_path = generate_ids(path, prompt, 12, tmp_path, extra=("-b", "8"))
    assert np.array_equal(read_logits(logits_path, args.vocab_size), serial)


@pytest.mark.parametrize("dtype", ["f32"] + DTYPES)
def test_thread_count_changes_no_bit(exported, dtype, tmp_path):
    """OMP_NUM_THREADS=1, 2 and 3 (more threads than this machine may have
    cores): the same logits, bit for bit, prompt and generation."""
    args, _, path, _ = exported(config("gqa4_untied", dtype), dtype)
    prompt = prompt_for(args.vocab_size, n=30)
    cmd = [str(RUN), str(path), "--tokens", " ".join(map(str, prompt)), "-n", "8", "-t", "0", "-b", "8", "--logits"]
    rows = []
    for threads in ("1", "2", "3"):
        out = tmp_path / f"threads{threads}.bin"
        subprocess.run(cmd + [str(out)], check=True, capture_output=True,
                       env=dict(os.environ, OMP_NUM_THREADS=threads))
        rows.append(read_logits(out, args.vocab_size))
    assert rows[0].shape == (len(prompt) + 7, args.vocab_size)
    for other in rows[1:]:
        assert np.array_equal(other, rows[0]), np.abs(other - rows[0]).max()


@pytest.mark.parametrize("dtype", ["f32"] + DTYPES)
def test_portable_kernels_agree(exported, dtype, tmp_path):
    """RUN_AVX512=0 (the AVX2 and portable kernels) against the default."""
    args, _, path, _ = exported(config("gqa4_untied", dtype), dtype)
    prompt = prompt_for(args.vocab_size, n=20)
    cmd = [str(RUN), str(path), "--tokens", " ".join(map(str, prompt)), "-n", "8", "-t", "0", "--logits"]
    rows = []
    for flag in ("1", "0"):
        out = tmp_path / f"l{flag}.bin"
        subprocess.run(cmd + [str(out)], check=True, capture_output=True, env=dict(os.environ, RUN_AVX512=flag))
        rows.append(read_logits(out, args.vocab_size))
    assert rows[0].shape == rows[1].shape
    if dtype == "f32":
        assert_logits_close(rows[1], rows[0])
    else:                                        # see the bounds above
        assert relative_rms(rows[1], rows[0]).max() <= ROUNDED_TOL[dtype]


PLAIN_TOL = 1e-5                                          # f32: max |diff| / max |logit| of the row


@pytest.mark.parametrize("dtype", ["f32"] + DTYPES)
def test_plain_kernels_agree(exported, dtype, tmp_path):
    """run-plain (-DPLAIN: the plain kernels of run.c alone, no appendix)
    against ./run, teacher-forced over a prompt, in batches of 8 and token
    by token. f32: the same products summed in another order, within 1e-5
    of the row's largest logit. bf16: the same, within BF16_TOL. q8_0 and
    q4_0: int8 sums in another float order move an activation across a
    rounding boundary of the next quantization now and then, as in
    test_portable_kernels_agree: within the same bounds."""
    args, _, path, _ = exported(config("gqa4_untied", dtype), dtype)
    prompt = prompt_for(args.vocab_size, n=24)
    for batch in ("8", "1"):
        rows = []
        for binary in (RUN, RUN_PLAIN):
            out = tmp_path / f"logits-{binary.name}-{batch}.bin"
            subprocess.run([str(binary), str(path), "--tokens", " ".join(map(str, prompt)), "-n", "1", "-t", "0",
                            "-b", batch, "--logits", str(out)], check=True, capture_output=True)
            rows.append(read_logits(out, args.vocab_size))
        fast, plain = rows
        assert fast.shape == plain.shape == (len(prompt), args.vocab_size)
        if dtype == "f32":
            err = np.abs(plain - fast).max(axis=1) / np.abs(fast).max(axis=1)
            assert err.max() <= PLAIN_TOL, (batch, err.max())
        else:
            assert relative_rms(plain, fast).max() <= ROUNDED_TOL[dtype], batch


# ----------------------------------------------------------------------------
# The encodings themselves

def test_encodings_round_trip():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 96)) * 0.02).astype(np.float32)
    w[3, :32] = 0                                                  # an all-zero group
    q8 = export.decode_matrix(export.encode_matrix(w, "q8_0"), "q8_0")
    d8 = np.abs(w).reshape(16, 3, 32).max(-1, keepdims=True) / 127
    assert np.all(np.abs(q8 - w).reshape(16, 3, 32) <= d8 * 0.5 + 1e-9)
    assert np.all(q8[3, :32] == 0)
    q4 = export.decode_matrix(export.encode_matrix(w, "q4_0"), "q4_0")
    groups, errors = w.reshape(16, 3, 32), np.abs(q4 - w).reshape(16, 3, 32)
    d4 = np.abs(groups).max(-1, keepdims=True) / 8                  # q - 8 spans -8..7: the side
    assert np.all(errors <= d4 * 1.001)                             # opposite the largest clips at 7d
    biggest = np.abs(groups).argmax(-1)                             # stored exactly, up to float16
    assert np.allclose(np.take_along_axis(q4.reshape(16, 3, 32), biggest[..., None], -1),
                       np.take_along_axis(groups, biggest[..., None], -1), rtol=1e-3, atol=0)
    bf = export.decode_matrix(export.encode_matrix(w, "bf16"), "bf16")
    assert np.all(np.abs(bf - w) <= np.abs(w) * 2**-8)


def test_q4_byte_order():
    """Byte j of a group holds weight j in its low nibble and weight j + 16 in its high one."""
    w = np.zeros((1, 32), dtype=np.float32)
    w[0, 0], w[0, 16], w[0, 5] = -8.0, 7.0, 1.0                    # d = 1
    values, scales = export.encode_matrix(w, "q4_0")
    assert scales[0, 0] == 1.0
    assert values[0, 0] == (15 << 4 | 0)                           # q(16) = 15, q(0) = 0
    assert values[0, 5] == (8 << 4 | 9)                            # q(21) = 8 (zero), q(5) = 9


@pytest.mark.parametrize("dtype", ["bf16", "q8_0", "q4_0"])
def test_widths_must_be_multiples_of_32(dtype, tmp_path):
    args = export.ModelArgs(dim=48, hidden_dim=96, n_layers=1, n_heads=3, n_kv_heads=3, head_dim=16,
                            vocab_size=50, max_seq_len=16)
    state = export.random_model(args).state_dict()
    if dtype == "bf16":
        export.write_checkpoint(tmp_path / "m.bin", args, state, dtype)  # any width
        return
    with pytest.raises(export.ExportError, match="multiples of 32"):
        export.write_checkpoint(tmp_path / "m.bin", args, state, dtype)
    assert not (tmp_path / "m.bin").exists()


def test_export_cli_dtype(tmp_path):
    args = model_args("mha_tied")
    saved = tmp_path / "ref.pt"
    export.save_reference(saved, args, export.random_model(args).state_dict())
    for dtype in ("q4_0", "bf16"):
        code = export.WEIGHT_TYPES[dtype]
        out = tmp_path / f"{dtype}.bin"
        subprocess.run([sys.executable, str(ROOT / "export.py"), str(out), "--reference", str(saved),
                        "--dtype", dtype], check=True, capture_output=True)
        weight_type, group_size = struct.unpack_from("<2I", out.read_bytes(), 52)
        assert (weight_type, group_size) == (code, 32 if dtype in ("q8_0", "q4_0") else 0)


@pytest.mark.parametrize("dtype,field,value,fragment", [
    ("q8_0", 56, 0, "group_size = 0, expected 32"),
    ("q4_0", 56, 64, "group_size = 64, expected 32"),
    ("bf16", 56, 32, "group_size = 32, expected 0"),
    ("q8_0", 8, 48, "multiples of 32"),
    ("q4_0", 52, 1, "header needs"),                               # q4_0 data read as q8_0
])
def test_loader_refuses_inconsistent_headers(exported, dtype, field, value, fragment, tmp_path):
    _, _, path, _ = exported("mha_tied", dtype)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, field, value)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(data))
    p = subprocess.run([str(RUN), str(bad)], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert fragment in p.stderr, p.stderr


@pytest.mark.parametrize("dtype", ["f32"] + DTYPES)
def test_gguf_holds_the_same_weights(exported, dtype, tmp_path):
    """export.write_gguf() (llama.cpp's file, for make bench) stores exactly
    the weights the checkpoint does: read back with the GGUF importer's own
    decoder, every tensor equals export.decode_matrix()'s."""
    import gguf
    _, _, path, _ = exported(config("mqa_untied", dtype), dtype)
    args, types, arrays = export.read_checkpoint_arrays(path)
    export.write_gguf(tmp_path / "m.gguf", path)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    names = {v: k for k, v in export.GGUF_NAMES.items()}
    for i in range(args.n_layers):
        names.update({f"layers.{i}.{ours}.weight": f"blk.{i}.{theirs}.weight"
                      for theirs, ours in export.GGUF_LAYER_NAMES.items()})
    stored = {t.name: t for t in reader.tensors}
    assert len(stored) == len(arrays)
    for name, parts in arrays.items():
        t = stored[names[name]]
        got = export.gguf_dequantize(np.asarray(t.data).view(np.uint8), int(t.tensor_type))
        kind = types[name] if isinstance(types, dict) and name in types else types
        want = export.decode_matrix(parts, kind) if parts[0].ndim == 2 else parts[0]
        assert np.array_equal(got, want.reshape(-1)), name
