"""--trace against Hugging Face transformers: per position and layer, the
residual stream's RMS before and after attention and the MLP, each head's
attention entropy, and the positions attended most.

The reference is transformers' LlamaForCausalLM with eager attention, whose
attention weights come out with output_attentions=True and whose blocks'
inputs and outputs are caught with forward hooks: nothing of run.c's.
Tolerances: run.c and transformers both compute in float32, and their
logits agree to 1e-4 relative (test_all.py), so the statistics on the way
are held to the same: RMS to 1e-4 relative; attention weights to 1e-4 and
entropies, sums of -w log2 w over at most a few dozen positions, to 1e-3
bits."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("RUN_BINARY", ROOT / "run"))
RMS_TOL = 1e-4
WEIGHT_TOL = 1e-4
ENTROPY_TOL = 1e-3
PROMPT = [1, 17, 42, 99, 150, 7, 3, 200, 5, 64, 128, 77]

HEAD = re.compile(r"^trace pos=(\d+) token=(\d+) text=(.*)$")
LAYER = re.compile(r"^trace pos=(\d+) layer=(\d+) rms_in=(\S+) attn=(\S+) rms_mid=(\S+) mlp=(\S+) rms_out=(\S+) "
                   r"entropy=(\S+) top=(\S+)$")


@pytest.fixture(scope="module", autouse=True)
def build():
    if "RUN_BINARY" not in os.environ:
        subprocess.run(["make", "-s", "run"], cwd=ROOT, check=True)


def parse_trace(stderr):
    """{(pos, layer): dict of the line's statistics}, and {pos: token}."""
    rows, tokens = {}, {}
    for line in stderr.splitlines():
        if not line.startswith("trace "):
            continue
        head = HEAD.match(line)
        if head:
            tokens[int(head.group(1))] = int(head.group(2))
            continue
        m = LAYER.match(line)
        assert m, f"malformed trace line: {line}"
        rms = [float(v) for v in m.group(3, 4, 5, 6, 7)]
        top = [(int(p), float(w)) for p, w in (item.split(":") for item in m.group(9).split(","))]
        rows[int(m.group(1)), int(m.group(2))] = dict(
            rms=rms, entropy=[float(v) for v in m.group(8).split(",")], top=top)
    return rows, tokens


def traced(model, prompt, tmp_path, *flags):
    """./run --trace over token ids, greedy: (generated ids, trace rows, tokens, logits file)."""
    logits = tmp_path / "logits.bin"
    p = subprocess.run([str(RUN), str(model), "--tokens", " ".join(map(str, prompt)), "-t", "0",
                        "--logits", str(logits), "--trace", *map(str, flags)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    ids = [int(x) for x in p.stdout.split()]
    rows, tokens = parse_trace(p.stderr)
    return ids[len(prompt):], rows, tokens, logits.read_bytes()


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A small random GQA Llama in transformers (8 query heads, 2 kv heads),
    and the same weights in our format."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=211, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    config._attn_implementation = "eager"  # the only one that returns attention weights
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init leaves norms at 1 and attention flat; sharpen both
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    tmp = tmp_path_factory.mktemp("trace")
    hf.save_pretrained(tmp / "hf")
    out = tmp / "model.bin"
    subprocess.run([sys.executable, str(ROOT / "export.py"), str(out), "--hf", str(tmp / "hf")],
                   check=True, capture_output=True)
    return hf, out, tmp / "hf"


def reference_trace(hf, ids):
    """The same statistics from transformers: {(pos, layer): dict}."""
    caught = {}

    def catch(name):
        def hook(module, inputs, output):
            caught[name] = (inputs[0] if inputs else None, output[0] if isinstance(output, tuple) else output)
        return hook

    handles = []
    for l, layer in enumerate(hf.model.layers):
        handles.append(layer.register_forward_hook(catch(("layer", l))))
        handles.append(layer.self_attn.register_forward_hook(catch(("attn", l))))
        handles.append(layer.mlp.register_forward_hook(catch(("mlp", l))))
    try:
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_attentions=True)
    finally:
        for h in handles:
            h.remove()

    def rms(x):
        return x.double().pow(2).mean(-1).sqrt()[0].numpy()  # (T)

    rows = {}
    for l in range(len(hf.model.layers)):
        layer_in = caught["layer", l][0]
        attn_out, mlp_out = caught["attn", l][1], caught["mlp", l][1]
        stats = [rms(layer_in), rms(attn_out), rms(layer_in + attn_out), rms(mlp_out), rms(caught["layer", l][1])]
        weights = out.attentions[l][0].double().numpy()  # (heads, T, T)
        for t in range(len(ids)):
            w = weights[:, t, :t + 1]
            with np.errstate(divide="ignore", invalid="ignore"):
                entropy = -np.where(w > 0, w * np.log2(w), 0.0).sum(-1)
            rows[t, l] = dict(rms=[s[t] for s in stats], entropy=entropy, mean=w.mean(0))
    return rows


def assert_trace_matches(ours, theirs, n_pos, n_layers):
    assert set(ours) == {(t, l) for t in range(n_pos) for l in range(n_layers)}, "a line per position and layer"
    for key, ref in theirs.items():
        row = ours[key]
        np.testing.assert_allclose(row["rms"], ref["rms"], rtol=RMS_TOL, err_msg=f"RMS at (pos, layer) {key}")
        np.testing.assert_allclose(row["entropy"], ref["entropy"], atol=ENTROPY_TOL, err_msg=f"entropy at {key}")
        mean = ref["mean"]
        want = np.sort(mean)[::-1][:3]
        positions, weights = zip(*row["top"])
        assert len(positions) == min(3, key[0] + 1) and len(set(positions)) == len(positions)
        np.testing.assert_allclose(weights, want, atol=WEIGHT_TOL, err_msg=f"top weights at {key}")
        np.testing.assert_allclose(mean[list(positions)], want, atol=WEIGHT_TOL, err_msg=f"top positions at {key}")


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_trace_matches_transformers(hf_model, batch, tmp_path):
    """The prompt in batches of 1, 5 (batches that end mid-prompt) and 64,
    then generated tokens fed back one at a time."""
    hf, model, _ = hf_model
    generated, rows, tokens, _ = traced(model, PROMPT, tmp_path, "-n", 6, "-b", batch)
    sequence = PROMPT + generated[:-1]
    assert tokens == dict(enumerate(sequence)), "a header line per position, with its token"
    assert_trace_matches(rows, reference_trace(hf, sequence), len(sequence), hf.config.num_hidden_layers)


def test_trace_changes_nothing_else(hf_model, tmp_path):
    """--trace only adds lines: the text and the logits are the same bits."""
    _, model, _ = hf_model
    with_trace = traced(model, PROMPT, tmp_path, "-n", 8)
    logits = tmp_path / "plain.bin"
    p = subprocess.run([str(RUN), str(model), "--tokens", " ".join(map(str, PROMPT)), "-t", "0", "-n", "8",
                        "--logits", str(logits)], capture_output=True, text=True, check=True)
    assert "trace" not in p.stderr
    assert [int(x) for x in p.stdout.split()][len(PROMPT):] == with_trace[0]
    assert logits.read_bytes() == with_trace[3]


def test_trace_of_an_f16_cache(hf_model, tmp_path):
    """q8_0 weights keep an f16 KV cache, which the trace widens itself: its
    statistics stay near the f32 model's (q8_0 moves activations by about
    1%; a misread cache would not be near)."""
    _, model, hf_dir = hf_model
    q8 = tmp_path / "q8.bin"
    subprocess.run([sys.executable, str(ROOT / "export.py"), str(q8), "--hf", str(hf_dir), "--dtype", "q8_0"],
                   check=True, capture_output=True)
    _, rows_f32, _, _ = traced(model, PROMPT, tmp_path, "-n", 0)
    _, rows_q8, _, _ = traced(q8, PROMPT, tmp_path, "-n", 0)
    assert rows_q8.keys() == rows_f32.keys()
    for key, row in rows_f32.items():
        np.testing.assert_allclose(rows_q8[key]["rms"], row["rms"], rtol=0.05, err_msg=f"RMS at {key}")
        np.testing.assert_allclose(rows_q8[key]["entropy"], row["entropy"], atol=0.1, err_msg=f"entropy at {key}")
