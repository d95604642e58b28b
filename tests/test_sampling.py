"""Sampling, --probs, stop strings and perplexity, each against a direct
Python transcription of its definition (the order is run.c's and
docs/COMMAND_LINE.md's: penalties, temperature + softmax, top-k, top-p,
min-p, draw)."""

import json
import math
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export  # noqa: E402

RUN = Path(os.environ.get("RUN_BINARY", ROOT / "run"))
DRIVER_CFLAGS = os.environ.get("TOKENIZER_DRIVER_CFLAGS", "").split()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if "RUN_BINARY" not in os.environ:
        subprocess.run(["make", "-s", "run"], cwd=ROOT, check=True)
    exe = tmp_path_factory.mktemp("driver") / "sampler_driver"
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-function",
                    "-Wno-unknown-pragmas", *DRIVER_CFLAGS, "-o", str(exe),
                    str(ROOT / "tests" / "sampler_driver.c"), "-lm"], check=True)
    return exe


# ----------------------------------------------------------------------------
# The definitions, in plain Python

def reference_distribution(logits, history, t=1.0, top_k=0, top_p=1.0, min_p=0.0,
                           repeat_penalty=1.0, frequency=0.0, presence=0.0, window=64):
    """{token: probability} after steps 1-5."""
    x = np.array(logits, dtype=np.float64)
    recent = history[-window:] if window else []
    for tok in set(recent):
        x[tok] = x[tok] / repeat_penalty if x[tok] > 0 else x[tok] * repeat_penalty
        x[tok] -= recent.count(tok) * frequency + presence
    if t == 0:
        return {int(np.argmax(x)): 1.0}
    p = np.exp(x / t - (x / t).max())
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    if top_k:
        order = order[:top_k]
    if top_p < 1:
        total = 0.0
        for n, i in enumerate(order):
            total += p[i]
            if total >= top_p:
                order = order[:n + 1]
                break
    if min_p > 0:
        order = [i for i in order if p[i] >= min_p * p.max()]
    kept = sum(p[i] for i in order)
    return {i: p[i] / kept for i in order}


def draw_order(dist, sorted_by_prob):
    """The (token, probability) pairs in the order a draw walks them: most
    likely first when top-k or top-p sorted the tokens, else token order."""
    return sorted(dist.items(), key=lambda kv: (-kv[1], kv[0]) if sorted_by_prob else kv[0])


def reference_draw(dist, r, sorted_by_prob):
    """Inverse CDF over the distribution, in draw_order()."""
    cdf = 0.0
    items = draw_order(dist, sorted_by_prob)
    for tok, prob in items:
        cdf += prob
        if r < cdf:
            return tok
    return items[-1][0]


def run_driver(driver, logits, history, draws, t=1.0, top_k=0, top_p=1.0, min_p=0.0,
               repeat_penalty=1.0, frequency=0.0, presence=0.0, window=64):
    text = (f"{len(logits)} {len(history)} {t} {top_k} {top_p} {min_p} {repeat_penalty} "
            f"{frequency} {presence} {window}\n{' '.join(map(str, history))}\n"
            f"{' '.join(f'{v:.9g}' for v in logits)}\n{len(draws)} {' '.join(map(str, draws))}\n")
    out = subprocess.run([str(driver)], input=text, capture_output=True, text=True, check=True).stdout.split("\n")
    m = int(out[0])
    dist = {int(line.split()[0]): float(line.split()[1]) for line in out[1:1 + m]}
    return dist, [int(x) for x in out[1 + m:1 + m + len(draws)]]


CASES = {
    "plain": dict(t=1.0),
    "temperature": dict(t=0.7),
    "greedy": dict(t=0.0),
    "top_k": dict(t=1.0, top_k=5),
    "top_p": dict(t=0.9, top_p=0.8),
    "min_p": dict(t=1.0, min_p=0.1),
    "k_p_min": dict(t=1.3, top_k=20, top_p=0.9, min_p=0.05),
    "repeat": dict(t=1.0, repeat_penalty=1.3, window=8),
    "frequency_presence": dict(t=0.8, frequency=0.5, presence=0.7, window=16),
    "all": dict(t=0.9, top_k=30, top_p=0.95, min_p=0.02, repeat_penalty=1.1, frequency=0.2,
                presence=0.3, window=10),
    "greedy_penalised": dict(t=0.0, repeat_penalty=5.0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sampler_matches_definition(driver, name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # hash() of a str changes from run to run
    for trial in range(5):
        logits = (rng.normal(size=97) * 3).astype(np.float32)
        logits[rng.integers(0, 97)] = 8.0  # a clear favourite, so penalties can change it
        history = rng.integers(0, 97, 24).tolist()
        history += [int(np.argmax(logits))] * 3
        draws = rng.random(20).astype(np.float32).tolist()
        ours, picks = run_driver(driver, logits.tolist(), history, draws, **CASES[name])
        theirs = reference_distribution(logits.astype(np.float64).tolist(), history, **CASES[name])
        assert set(ours) == set(theirs), (trial, sorted(set(ours) ^ set(theirs)))
        for tok in theirs:
            assert abs(ours[tok] - theirs[tok]) < 1e-5, (trial, tok, ours[tok], theirs[tok])
        settings = CASES[name]
        by_prob = settings.get("top_k", 0) > 0 or settings.get("top_p", 1.0) < 1.0
        for r, pick in zip(draws, picks):
            # a draw within float rounding of a step of the CDF may go either way
            steps = np.cumsum([prob for _, prob in draw_order(theirs, by_prob)])
            near_step = any(abs(r - c) < 1e-5 for c in steps)
            assert pick == reference_draw(theirs, r, by_prob) or near_step


@pytest.mark.parametrize("name", ["plain", "greedy", "top_p", "k_p_min", "repeat"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_logits_not_finite_give_no_distribution(driver, name, bad):
    logits = np.random.default_rng(0).normal(size=50).tolist()
    logits[7] = bad
    dist, picks = run_driver(driver, logits, [1, 2, 7], [0.5], **CASES[name])
    assert dist == {} and picks == [-1]


EDGES = {  # settings that scale finite logits past the float range, or cut every token
    "tiny_temperature": (dict(t=1e-37), [3e38, -3e38, 0.0, 1.0, 2e38]),
    "tiny_repeat_penalty": (dict(t=1.0, repeat_penalty=1e-37), [100.0, 1.0, -3e38, 5.0]),
    "huge_penalties": (dict(t=0.5, repeat_penalty=100.0, frequency=-100.0, presence=-100.0), [-3e38, 0.0, 3e38]),
    "top_p_below_uniform": (dict(t=1.0, top_p=0.001), [0.0] * 300),
    "min_p_one": (dict(t=1.0, min_p=1.0), [0.0] * 300),
}


@pytest.mark.parametrize("name", sorted(EDGES))
def test_sampler_at_the_edges(driver, name):
    """Finite logits always give a distribution, the definition's."""
    settings, logits = EDGES[name]
    history = [0, 1, 0]
    ours, picks = run_driver(driver, logits, history, [0.0, 0.5, 0.999], **settings)
    with np.errstate(over="ignore"):
        theirs = reference_distribution(logits, history, **settings)
    assert set(ours) == set(theirs)
    for tok in theirs:
        assert abs(ours[tok] - theirs[tok]) < 1e-5, (tok, ours[tok], theirs[tok])
    assert all(pick in theirs for pick in picks)


# ----------------------------------------------------------------------------
# --probs, perplexity and stop strings through ./run

ARGS = export.ModelArgs(dim=48, hidden_dim=80, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
                        vocab_size=300, max_seq_len=64, rope_theta=10000.0, norm_eps=1e-5, tied=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    net = export.random_model(ARGS, 5).eval()
    with torch.no_grad():  # sharpen the distribution so that sampling has structure
        net.output.weight.mul_(20)
    export.write_checkpoint(d / "model.bin", ARGS, net.state_dict())
    return d / "model.bin", net


def reference_logits(net, ids):
    with torch.no_grad():
        return net(torch.tensor([ids]))[0].double().numpy()


def test_probs_json_shows_the_distribution(model, tmp_path):
    path, net = model
    prompt = [1, 7, 99, 250]
    p = subprocess.run([str(RUN), str(path), "--tokens", " ".join(map(str, prompt)), "-n", "6", "-t", "0",
                        "--probs", "5", "--probs-format", "json"],
                       cwd=tmp_path, capture_output=True, text=True, check=True)
    ids = [int(x) for x in p.stdout.split()]
    lines = [json.loads(line) for line in p.stderr.splitlines() if line.startswith("{")]
    assert len(lines) == 6
    logits = reference_logits(net, ids[:-1])
    for step, row in enumerate(lines):
        probs = np.exp(logits[len(prompt) - 1 + step] - logits[len(prompt) - 1 + step].max())
        probs /= probs.sum()
        assert row["token"] == ids[len(prompt) + step]
        assert abs(row["prob"] - probs[row["token"]]) < 1e-4
        assert [t["token"] for t in row["top"]][0] == row["token"]  # greedy picks the top
        expected_top = sorted(range(len(probs)), key=lambda i: -probs[i])[:5]
        assert [t["token"] for t in row["top"]] == expected_top
        assert all(abs(t["prob"] - probs[t["token"]]) < 1e-4 for t in row["top"])


def test_stride_must_leave_overlap(model, tmp_path):
    p = subprocess.run([str(RUN), str(model[0]), "-m", "score", "--tokens", "1 2 3", "-c", "16",
                        "--stride", "16"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 2 and "--stride" in p.stderr


PROBS_TEXT = re.compile(r'probs: pos (\d+), token (\d+) "#\d+" p=([0-9.]+) \| top:((?: \d+ "#\d+" [0-9.]+)+)$')


def test_probs_text_format(model, tmp_path):
    """--probs in text: each line's position, token, probability and top
    tokens, parsed, against PyTorch's softmax (printed to 4 decimals)."""
    path, net = model
    prompt = [1, 2]
    p = subprocess.run([str(RUN), str(path), "--tokens", "1 2", "-n", "3", "-t", "0", "--probs", "3"],
                       cwd=tmp_path, capture_output=True, text=True, check=True)
    ids = [int(x) for x in p.stdout.split()]
    rows = [PROBS_TEXT.match(line) for line in p.stderr.splitlines() if line.startswith("probs: ")]
    assert len(rows) == 3 and all(rows), p.stderr
    logits = reference_logits(net, ids[:-1])
    for step, row in enumerate(rows):
        probs = softmax(logits[len(prompt) - 1 + step])
        pos, token, prob = int(row[1]), int(row[2]), float(row[3])
        top = row[4].split()
        assert (pos, token) == (len(prompt) + step, ids[len(prompt) + step])
        assert abs(prob - probs[token]) <= 5e-5
        assert [int(t) for t in top[0::3]] == list(np.argsort(-probs, kind="stable")[:3])
        assert np.abs(np.array(top[2::3], dtype=float) - probs[[int(t) for t in top[0::3]]]).max() <= 5e-5


def softmax(x, t=1.0):
    p = np.exp((x - x.max()) / t)
    return p / p.sum()


PENALISED = {  # flags, and the same settings by reference_distribution's names
    "repeat": (["-t", "0.9", "--repeat-penalty", "1.5", "--repeat-window", "8"],
               dict(t=0.9, repeat_penalty=1.5, window=8)),
    "frequency_presence": (["-t", "0.8", "--frequency-penalty", "0.6", "--presence-penalty", "0.9",
                            "--repeat-window", "16"], dict(t=0.8, frequency=0.6, presence=0.9, window=16)),
    "greedy_repeat": (["-t", "0", "--repeat-penalty", "5"], dict(t=0.0, repeat_penalty=5.0)),
    "all": (["-t", "1.2", "-k", "40", "-p", "0.95", "--min-p", "0.01", "--repeat-penalty", "1.2",
             "--frequency-penalty", "0.3", "--presence-penalty", "0.2", "--repeat-window", "10"],
            dict(t=1.2, top_k=40, top_p=0.95, min_p=0.01, repeat_penalty=1.2, frequency=0.3, presence=0.2,
                 window=10)),
}


@pytest.mark.parametrize("name", sorted(PENALISED))
def test_penalised_probs_match_the_definition(model, tmp_path, name):
    """./run's own option parsing and sampler, step by step: --probs (the
    distribution of step 2) against docs/COMMAND_LINE.md's penalties and softmax
    applied here to the raw logits that --logits wrote and to the tokens
    seen so far; each sampled token is one that steps 3-5 keep. Measured:
    5e-7 at most, the rounding to the 6 decimals JSON shows; bound 5e-6.
    The penalties move the distribution by far more, which is checked too."""
    path, _ = model
    flags, settings = PENALISED[name]
    prompt = [1, 7, 99, 7, 250, 7, 99]
    logits_path = tmp_path / "logits.bin"
    p = subprocess.run([str(RUN), str(path), "--tokens", " ".join(map(str, prompt)), "-n", "12", "-s", "5",
                        "--probs", "8", "--probs-format", "json", "--logits", str(logits_path), *flags],
                       cwd=tmp_path, capture_output=True, text=True, check=True)
    ids = [int(x) for x in p.stdout.split()]
    lines = [json.loads(line) for line in p.stderr.splitlines() if line.startswith("{")]
    raw = np.fromfile(logits_path, dtype="<f4").reshape(-1, ARGS.vocab_size).astype(np.float64)
    assert len(lines) == len(ids) - len(prompt) == 12
    moved = 0.0
    for step, row in enumerate(lines):
        history, logits = ids[:len(prompt) + step], raw[len(prompt) - 1 + step]
        step2 = dict(settings, top_k=0, top_p=1.0, min_p=0.0, t=settings["t"] or 1.0)
        dist = reference_distribution(logits, history, **step2)
        probs = np.array([dist[i] for i in range(ARGS.vocab_size)])
        top = [t["token"] for t in row["top"]]
        assert top == list(np.argsort(-probs, kind="stable")[:8]), step
        assert np.abs(np.array([t["prob"] for t in row["top"]]) - probs[top]).max() <= 5e-6, step
        assert row["token"] == ids[len(prompt) + step] and abs(row["prob"] - probs[row["token"]]) <= 5e-6
        assert row["token"] in reference_distribution(logits, history, **settings), step
        moved = max(moved, np.abs(probs - softmax(logits, step2["t"])).max())
    assert moved > 0.01, "the penalties must change the distribution for this test to see them"


def reference_perplexity(net, ids, ctx, stride):
    """The definition: windows of ctx tokens stride apart, each target scored
    once, in the first window holding it and its predecessor."""
    nll, scored, done = 0.0, 0, 1
    begin = 0
    while done < len(ids):
        end = min(begin + ctx, len(ids))
        logits = reference_logits(net, ids[begin:end])
        for i in range(begin, end - 1):
            if i + 1 >= done:
                row = logits[i - begin]
                nll += math.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[i + 1]]
                scored += 1
        done = end
        begin += stride
    return nll / scored, scored


@pytest.mark.parametrize("ctx,stride", [(64, 32), (16, 8), (16, 5), (16, 15), (2, 1)])
def test_perplexity_matches_pytorch(model, tmp_path, ctx, stride):
    path, net = model
    ids = [1] + np.random.default_rng(ctx + stride).integers(3, 300, 60).tolist()
    p = subprocess.run([str(RUN), str(path), "-m", "score", "--tokens", " ".join(map(str, ids)), "-c",
                        str(ctx), "--stride", str(stride)], cwd=tmp_path, capture_output=True, text=True,
                       check=True)
    fields = p.stdout.replace(",", "").split()
    scored, nll, ppl = int(fields[2]), float(fields[5]), float(fields[7])
    expected_nll, expected_scored = reference_perplexity(net, ids, ctx, stride)
    assert scored == expected_scored == len(ids) - 1
    assert abs(nll - expected_nll) <= 1e-5 * expected_nll
    assert abs(ppl - math.exp(expected_nll)) <= 1e-4 * math.exp(expected_nll)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A random model with a sentencepiece tokenizer trained here."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("text")
    corpus = d / "corpus.txt"
    words = "the cat sat on a mat and the dog ran to the park while birds sang".split()
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(400)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "sp"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True,
                                   normalization_rule_name="identity", minloglevel=2)
    export.write_tokenizer_sentencepiece(d / "sp.model", d / "tokenizer.bin")
    export.write_checkpoint(d / "model.bin", ARGS, export.random_model(ARGS, 2).state_dict())
    return d / "model.bin"


def test_stop_string_ends_generation(text_model, tmp_path):
    base = [str(RUN), str(text_model), "-i", "the cat", "-n", "40", "-t", "0"]
    full = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    continuation = full[len("the cat"):].rstrip("\n")
    assert len(continuation) > 8, full
    stop = continuation[4:7]
    cut = subprocess.run(base + ["--stop", stop], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert cut.stdout.rstrip("\n") == "the cat" + continuation[:continuation.index(stop)]
    assert "stop string" in cut.stderr
    never = subprocess.run(base + ["--stop", "\u2603never"], cwd=tmp_path, capture_output=True, text=True,
                           check=True)
    assert never.stdout == full


def test_penalties_reproducible_with_seed(text_model, tmp_path):
    base = [str(RUN), str(text_model), "-i", "the dog", "-n", "30", "--repeat-penalty", "1.3",
            "--frequency-penalty", "0.2", "--presence-penalty", "0.1", "--min-p", "0.05", "-s", "11"]
    a = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    b = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert a == b
