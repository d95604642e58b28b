"""The logit lens (--lens), the attention weights (--attention) and the
JSON lines of --trace, against Hugging Face transformers; then make
explain's page (tools/explain.py) in a real browser.

References, none of them run.c's: the lens is transformers' hidden states
(output_hidden_states=True) through the model's own final norm and lm_head,
then a softmax; the attention weights are its output_attentions (eager
attention); the trace is test_trace.py's reference. Tolerances as there:
run.c and transformers both compute in float32 and their logits agree to
1e-4 relative, so probabilities and weights are held to 1e-4.

The page is rendered by headless Chromium (Debian's chromium, which
tools/setup_tests.sh installs): no console message, one heatmap cell per
(query, key) pair up to the chosen position, one lens cell per (layer,
position), and the numbers drawn equal to the run's JSON lines. With
EXPLAIN_SCREENSHOT=PATH, the SmolLM2 page's screenshot is saved there
(docs/explain.png, for the README)."""

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import export  # noqa: E402
from test_smollm2 import smollm2  # noqa: E402,F401
from test_trace import PROMPT, assert_trace_matches, hf_model, parse_trace, reference_trace  # noqa: E402,F401

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("RUN_BINARY", ROOT / "run"))
PROB_TOL = 1e-4
WEIGHT_TOL = 1e-4
K = 5


@pytest.fixture(scope="module", autouse=True)
def build():
    if "RUN_BINARY" not in os.environ:
        subprocess.run(["make", "-s", "run"], cwd=ROOT, check=True)


def run_views(model, prompt, *flags, env=None):
    """./run over token ids, greedy: (generated ids, stderr lines, logits bytes)."""
    p = subprocess.run([str(RUN), str(model), "--tokens", " ".join(map(str, prompt)), "-t", "0",
                        *map(str, flags)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    return [int(x) for x in p.stdout.split()][len(prompt):], p.stderr.splitlines()


def json_views(lines, view):
    """{(pos, layer): object} of one view's JSON lines."""
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    return {(r["pos"], r["layer"]): r for r in rows if r.get("view") == view}


def reference_lens(hf, ids):
    """{(pos, layer): probabilities (vocab)}: each layer's output through
    the final norm and lm_head. hidden_states[l + 1] is layer l's output,
    except the last, which transformers hands out already normed."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
        n_layers = hf.config.num_hidden_layers
        lens = {}
        for l in range(n_layers):
            logits = out.logits[0] if l == n_layers - 1 else hf.lm_head(hf.model.norm(out.hidden_states[l + 1]))[0]
            probs = torch.softmax(logits.double(), -1).numpy()
            for t in range(len(ids)):
                lens[t, l] = probs[t]
    return lens


def assert_lens_matches(ours, theirs):
    assert set(ours) == set(theirs), "a lens row per position and layer"
    for key, probs in theirs.items():
        top = [t["token"] for t in ours[key]["top"]]
        assert top == list(np.argsort(-probs, kind="stable")[:K]), f"top tokens at (pos, layer) {key}"
        np.testing.assert_allclose([t["prob"] for t in ours[key]["top"]], probs[top], atol=PROB_TOL,
                                   err_msg=f"probabilities at {key}")


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_lens_matches_transformers(hf_model, batch):
    hf, model, _ = hf_model
    generated, lines = run_views(model, PROMPT, "-n", 5, "-b", batch, "--lens", K, "--trace-format", "json")
    sequence = PROMPT + generated[:-1]
    ours = json_views(lines, "lens")
    assert_lens_matches(ours, reference_lens(hf, sequence))
    last = hf.config.num_hidden_layers - 1
    for t, token in enumerate(generated):  # the last layer's lens is the model's own prediction
        assert ours[len(PROMPT) - 1 + t, last]["top"][0]["token"] == token
    assert all(ours[key]["token"] == sequence[key[0]] for key in ours)


def test_lens_text_matches_json(hf_model):
    _, model, _ = hf_model
    _, text = run_views(model, PROMPT, "-n", 2, "--lens", 3)
    _, lines = run_views(model, PROMPT, "-n", 2, "--lens", 3, "--trace-format", "json")
    ours = json_views(lines, "lens")
    rows = [line.split() for line in text if line.startswith("lens ")]
    assert len(rows) == len(ours)
    for row in rows:  # lens pos=P layer=L top: ID "#ID" PROB ID "#ID" PROB ID "#ID" PROB
        key = int(row[1][4:]), int(row[2][6:])
        assert row[3] == "top:" and [int(x) for x in row[4::3]] == [t["token"] for t in ours[key]["top"]]
        np.testing.assert_allclose([float(x) for x in row[6::3]], [t["prob"] for t in ours[key]["top"]], atol=1e-4)


@pytest.mark.parametrize("batch", [1, 5])
def test_trace_json_matches_transformers(hf_model, batch):
    """--trace-format json: the same statistics as the text lines, held to
    transformers by test_trace.py's own check."""
    hf, model, _ = hf_model
    generated, lines = run_views(model, PROMPT, "-n", 4, "-b", batch, "--trace", "--trace-format", "json")
    sequence = PROMPT + generated[:-1]
    rows = {key: dict(rms=[r[k] for k in ("rms_in", "attn", "rms_mid", "mlp", "rms_out")], entropy=r["entropy"],
                      top=[(t["pos"], t["weight"]) for t in r["top"]])
            for key, r in json_views(lines, "trace").items()}
    assert_trace_matches(rows, reference_trace(hf, sequence), len(sequence), hf.config.num_hidden_layers)
    _, text = run_views(model, PROMPT, "-n", 4, "-b", batch, "--trace")
    text_rows, _ = parse_trace("\n".join(text))
    assert text_rows.keys() == rows.keys()
    for key, row in rows.items():
        np.testing.assert_allclose(row["rms"], text_rows[key]["rms"], rtol=1e-5)


def reference_attention(hf, ids):
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True)
    return [a[0].double().numpy() for a in out.attentions]  # per layer (heads, T, T)


@pytest.mark.parametrize("batch,spec", [(1, "3-9"), (5, "3-9"), (64, "0-15"), (5, "7")])
def test_attention_matches_transformers(hf_model, batch, spec):
    """Positions asked for in the prompt and among fed-back tokens, whole
    batches and batches that end mid-range."""
    hf, model, _ = hf_model
    first, _, last = spec.partition("-")
    first, last = int(first), int(last or first)
    generated, lines = run_views(model, PROMPT, "-n", 6, "-b", batch, "--attention", spec, "--trace-format", "json")
    sequence = PROMPT + generated[:-1]
    theirs = reference_attention(hf, sequence)
    ours = json_views(lines, "attention")
    n_layers, n_heads = hf.config.num_hidden_layers, hf.config.num_attention_heads
    assert set(ours) == {(p, l) for p in range(first, min(last, len(sequence) - 1) + 1) for l in range(n_layers)}
    for (p, l), row in ours.items():
        weights = np.array(row["weights"])
        assert weights.shape == (n_heads, p + 1) and row["token"] == sequence[p]
        np.testing.assert_allclose(weights, theirs[l][:, p, :p + 1], atol=WEIGHT_TOL, err_msg=f"(pos, layer) {p, l}")
    _, text = run_views(model, PROMPT, "-n", 6, "-b", batch, "--attention", spec)
    text_rows = [line.split() for line in text if line.startswith("attention ")]
    assert len(text_rows) == len(ours) * n_heads
    for row in text_rows:  # attention pos=P layer=L head=H weights=W0,W1,..
        p, l, h = (int(field.split("=")[1]) for field in row[1:4])
        np.testing.assert_allclose([float(w) for w in row[4][8:].split(",")], ours[p, l]["weights"][h], atol=1e-4)


def test_views_change_nothing_else(hf_model, tmp_path):
    """--lens and --attention only add lines: the text and the logits are
    the same bits, and without the flags no line of theirs appears."""
    _, model, _ = hf_model
    outputs = []
    for flags in [[], ["--lens", 7, "--attention", "2-12", "--trace-format", "json"]]:
        logits = tmp_path / "logits.bin"
        generated, lines = run_views(model, PROMPT, "-n", 6, "--logits", logits, *flags)
        outputs.append((generated, logits.read_bytes(), lines))
    assert outputs[0][:2] == outputs[1][:2]
    assert not any(line.startswith(("lens", "attention", "{")) for line in outputs[0][2])
    assert [line for line in outputs[1][2] if not line.startswith("{")][-1].startswith("run: prompt")


# ----------------------------------------------------------------------------
# The page, in headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (tools/setup_tests.sh installs Debian's)")


def chromium(page, tmp_path, *flags, fragment=""):
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=1",
                        f"--user-data-dir={tmp_path / 'profile'}", *flags, page.as_uri() + fragment],
                       capture_output=True, text=True, errors="replace", timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def console_messages(stderr):
    """The page's console output, which --enable-logging writes as lines
    with INFO:CONSOLE:LINE] (INFO:CONSOLE(LINE)] in older Chromium)."""
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE[:(]\d+\)?\]", line)]


class Elements(HTMLParser):
    """The attributes of every element of the dumped DOM, by class."""

    def __init__(self, html):
        super().__init__()
        self.by_class, self.body = {}, {}
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        for name in (attrs.get("class") or "").split():
            self.by_class.setdefault(name, []).append(attrs)


def render(page, tmp_path, fragment=""):
    p = chromium(page, tmp_path, "--dump-dom", fragment=fragment)
    assert console_messages(p.stderr) == [], "the page logged to the console"
    dom = Elements(p.stdout)
    assert dom.body.get("data-ready") == "1", "the page's script did not run to its end"
    return dom


def explain(model, tmp_path, *prompt, n=3):
    out = tmp_path / "explain.html"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "explain.py"), str(model), *prompt, "-n", str(n),
                        "-o", str(out), "--run", str(RUN)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = out.with_suffix(".jsonl").read_text().splitlines()
    return out, lines


def check_page(page, lines, tmp_path, pos, layer, head, fragment=""):
    """The DOM against the run's JSON lines, at the given selection."""
    dom = render(page, tmp_path, fragment)
    attention, lens = json_views(lines, "attention"), json_views(lines, "lens")
    n_layers = 1 + max(l for _, l in lens)
    n_pos = 1 + max(p for p, _ in lens)
    cells = dom.by_class["cell"]
    assert len(cells) == (pos + 1) * (pos + 2) // 2, "one heatmap cell per (query, key) pair up to the position"
    assert {(int(c["data-q"]), int(c["data-k"])) for c in cells} == {(q, k) for q in range(pos + 1)
                                                                     for k in range(q + 1)}
    for c in cells:
        q, k = int(c["data-q"]), int(c["data-k"])
        assert float(c["data-w"]) == attention[q, layer]["weights"][head][k], (q, k)
    lens_cells = dom.by_class["lens-cell"]
    assert len(lens_cells) == n_layers * n_pos, "one lens cell per (layer, position)"
    for c in lens_cells:
        top = lens[int(c["data-pos"]), int(c["data-layer"])]["top"][0]
        assert (int(c["data-token"]), float(c["data-prob"])) == (top["token"], top["prob"])
    trace = json_views(lines, "trace")
    points = dom.by_class["rms-point"]
    assert len(points) == 3 * n_layers + 1
    field = {"residual": "rms_out", "attention": "attn", "mlp": "mlp"}
    for c in points:  # layer -1: the embedding, the stream entering layer 0
        l, series = int(c["data-layer"]), c["data-series"]
        want = trace[pos, 0]["rms_in"] if l < 0 else trace[pos, l][field[series]]
        assert float(c["data-v"]) == want, (series, l)
    tokens = dom.by_class["tok"]
    assert len(tokens) == n_pos + 1 and [t for t in tokens if "chosen" in t["class"]][0]["data-pos"] == str(pos)
    return dom


@needs_chromium
def test_page_of_a_random_model(hf_model, tmp_path):
    """A random model written by the test (no network, no tokenizer: tokens
    show as #id), at the default selection and at one from the URL."""
    _, model, _ = hf_model
    page, lines = explain(model, tmp_path, "--tokens", " ".join(map(str, PROMPT)))
    data = json.loads(page.read_text().split('<script type="application/json" id="data">')[1].split("</script>")[0])
    check_page(page, lines, tmp_path, len(PROMPT) - 1, data["layer"], data["head"])
    check_page(page, lines, tmp_path, 4, 1, 6, fragment="#pos=4&layer=1&head=6")


@needs_chromium
def test_the_browser_check_sees_a_broken_page(hf_model, tmp_path):
    """The checks above can fail: a page whose script throws is caught."""
    _, model, _ = hf_model
    page, _ = explain(model, tmp_path, "--tokens", "1 2 3", n=1)
    broken = tmp_path / "broken.html"
    script = page.read_text().replace("drawAll();\ndocument.body", "drawAll();\nnoSuchFunction();\ndocument.body")
    broken.write_text(script)
    p = chromium(broken, tmp_path, "--dump-dom")
    assert console_messages(p.stderr) and 'data-ready="1"' not in p.stdout


@needs_chromium
def test_page_of_smollm2(smollm2, tmp_path):
    """make explain's own page, on the demo model as test_smollm2.py fetches
    it (skipped only when PyPI cannot be reached): "Paris" is the last
    layer's guess after the prompt and not the first layer's; with
    EXPLAIN_SCREENSHOT, a screenshot."""
    page, lines = explain(smollm2, tmp_path, "-i", "The capital of France is", n=4)
    data = json.loads(page.read_text().split('<script type="application/json" id="data">')[1].split("</script>")[0])
    chosen = data["chosen"]
    check_page(page, lines, tmp_path, chosen, data["layer"], data["head"])
    lens = json_views(lines, "lens")
    assert "Paris" in lens[chosen, data["n_layers"] - 1]["top"][0]["text"]
    assert "Paris" not in lens[chosen, 0]["top"][0]["text"]
    if os.environ.get("EXPLAIN_SCREENSHOT"):
        shot = Path(os.environ["EXPLAIN_SCREENSHOT"]).resolve()
        chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1150,2350", "--hide-scrollbars")
        assert shot.stat().st_size > 10000


def model_lens(model, ids):
    """{(pos, layer): probabilities (vocab)} of model.py's Llama: each
    layer's output through the final norm and classifier, in float64."""
    outputs = []
    hooks = [layer.register_forward_hook(lambda module, inputs, output: outputs.append(output))
             for layer in model.layers]
    with torch.no_grad():
        model(torch.tensor([ids]))
        classifier = model.tok_embeddings.weight if model.args.tied else model.output.weight
        probs = [torch.softmax(torch.nn.functional.linear(model.norm(h), classifier)[0].double(), -1).numpy()
                 for h in outputs]
    for hook in hooks:
        hook.remove()
    return {(t, l): probs[l][t] for l in range(len(probs)) for t in range(len(ids))}


# relative error of a lens probability, against model.py with the file's
# own weights decoded; measured (RUN_AVX512=0 for bf16, see
# tests/test_weight_types.py): q8_0 1.8e-4, q4_0 8.6e-3, bf16 5.4e-7
LENS_TOL = {"q8_0": 2e-3, "q4_0": 0.08, "bf16": 6e-6}


@pytest.mark.parametrize("avx512", ["as the CPU has it", "0"])
@pytest.mark.parametrize("dtype", sorted(LENS_TOL))
def test_lens_of_other_weight_types(hf_model, tmp_path, dtype, avx512):
    """The lens reads a quantized classifier with the kernels of its type:
    its top K tokens are those of model.py running the checkpoint's decoded
    weights, each probability within LENS_TOL[dtype] relative. Tokens whose
    reference probabilities lie within that bound of each other may trade
    places (q4_0's noise reorders near-ties), no other. RUN_AVX512=0 takes
    the AVX2 kernels on an AVX-512 CPU: their q8_0 input is another form
    (its 16-bit part), which the lens once lacked."""
    _, _, hf_dir = hf_model
    model = tmp_path / f"{dtype}.bin"
    subprocess.run([sys.executable, str(ROOT / "export.py"), str(model), "--hf", str(hf_dir), "--dtype", dtype],
                   check=True, capture_output=True)
    args, state = export.read_checkpoint(model)
    decoded = export.Llama(args)
    decoded.load_state_dict(state)
    env = dict(os.environ, RUN_AVX512=avx512) if avx512 == "0" else None
    _, lines = run_views(model, PROMPT, "-n", 0, "--lens", K, "--trace-format", "json", env=env)
    ours, theirs = json_views(lines, "lens"), model_lens(decoded.eval(), PROMPT)
    assert set(ours) == set(theirs)
    tol = LENS_TOL[dtype]
    for key, probs in theirs.items():
        top = [t["token"] for t in ours[key]["top"]]
        ranked = np.sort(probs)[::-1][:K]
        assert np.all(np.abs(probs[top] - ranked) <= tol * ranked), (key, top, "not the reference's top tokens")
        ours_p = np.array([t["prob"] for t in ours[key]["top"]])
        assert np.all(np.abs(ours_p - probs[top]) <= tol * probs[top]), (key, ours_p, probs[top])


# ----------------------------------------------------------------------------
# tools/explain.py on hostile input: one line on stderr, no traceback, no file

TINY = export.ModelArgs(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=40,
                        max_seq_len=64, rope_theta=10000.0, norm_eps=1e-5, tied=False)
SEPARATORS = ["\u2028", "\u2029", "\x85", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random model with a tokenizer beside it whose tokens hold the
    characters that str.splitlines() splits at besides "\\n"."""
    d = tmp_path_factory.mktemp("tiny")
    export.write_checkpoint(d / "model.bin", TINY, export.random_model(TINY, 0).state_dict())
    pieces = [chr(97 + i) for i in range(26)] + SEPARATORS + ["aa", "ab", "ac"]
    tokens = [(b"<unk>", 0.0, 2), (b"<s>", 0.0, 3), (b"</s>", 0.0, 3)]
    tokens += [(piece.encode(), -float(i), 1) for i, piece in enumerate(pieces)]
    export.write_tokenizer(d / "tokenizer.bin", export.TOK_SENTENCEPIECE, tokens, bos_id=1, eos_id=2, unk_id=0,
                           flags=export.TOKF_ADD_BOS)
    return d / "model.bin"


def run_explain(model, cwd, *flags, umask=None, env=None):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "explain.py"), str(model), *map(str, flags)],
                          cwd=cwd, capture_output=True, text=True, env=env, timeout=120,
                          preexec_fn=None if umask is None else lambda: os.umask(umask))


def assert_explain_refused(p, status, *fragments):
    assert p.returncode == status, f"exit {p.returncode}, expected {status}: {p.stderr}"
    assert p.stderr.startswith("explain: ") and p.stderr.count("\n") == 1, f"expected one line: {p.stderr!r}"
    for fragment in fragments:
        assert fragment in p.stderr, f"{fragment!r} not in {p.stderr!r}"


def fake_engine(path, stderr_lines):
    """An engine that prints these lines where run.c prints its views."""
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.stderr.write({stderr_lines!r})\nprint('3 4 5')\n")
    path.chmod(0o755)
    return path


def test_explain_token_text_with_line_separators(tiny, tmp_path):
    """Each view line stays whole though its token text holds U+2028 and
    the rest: the views file holds every line the run wrote, unsplit."""
    out = tmp_path / "page.html"
    prompt = "".join("x" + c for c in SEPARATORS)
    p = run_explain(tiny, tmp_path, "-i", prompt, "-n", 3, "-o", out, "--run", RUN)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().split("\n")[:-1]]
    assert prompt in "".join(r["text"] for r in rows if r.get("view") == "lens" and r["layer"] == 0)
    assert {r.get("view") for r in rows} == {None, "trace", "lens", "attention"}


def test_explain_outputs_follow_the_umask(tiny, tmp_path):
    out = tmp_path / "page.html"
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        p = run_explain(tiny, tmp_path, "--tokens", "3 4", "-n", 1, "-o", out, "--run", RUN, umask=umask)
        assert p.returncode == 0, p.stderr
        assert [f.stat().st_mode & 0o777 for f in (out, out.with_suffix(".jsonl"))] == [mode, mode]


@pytest.mark.parametrize("case,status,fragment", [
    ("directory", 1, "is a directory"), ("views_a_directory", 1, "is a directory"),
    ("missing_directory", 1, "no such directory"), ("jsonl", 2, "its own views file"),
])
def test_explain_bad_output_paths(tiny, tmp_path, case, status, fragment):
    out = {"directory": tmp_path / "dir", "views_a_directory": tmp_path / "page.html",
           "missing_directory": tmp_path / "absent" / "page.html", "jsonl": tmp_path / "views.jsonl"}[case]
    (tmp_path / "dir").mkdir()
    (tmp_path / "page.jsonl").mkdir()
    before = sorted(tmp_path.rglob("*"))
    p = run_explain(tiny, tmp_path, "--tokens", "3 4", "-n", 1, "-o", out, "--run", RUN)
    assert_explain_refused(p, status, str(out) if case != "views_a_directory" else "page.jsonl", fragment)
    assert sorted(tmp_path.rglob("*")) == before, "no file written"


def test_explain_missing_engine(tiny, tmp_path):
    p = run_explain(tiny, tmp_path, "--tokens", "3 4", "-o", tmp_path / "page.html", "--run", tmp_path / "absent")
    assert_explain_refused(p, 1, str(tmp_path / "absent"), "cannot run the engine")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("views,fragment", [
    ('{"view": "trace", "pos": 0,\n', "JSONDecodeError"),
    ('{"view": "mystery", "pos": 0, "layer": 0, "token": 3, "text": "a"}\n', "unknown view 'mystery'"),
    ('{"view": "lens"}\n', "KeyError"),
    ('{"view": "trace", "pos": 0, "layer": 0, "token": 3, "text": "a", "entropy": 1}\n'
     '{"view": "lens", "pos": 0, "layer": 0, "token": 3, "text": "a", "top": 7}\n', "TypeError"),
], ids=["broken_json", "unknown_view", "missing_keys", "wrong_types"])
def test_explain_engine_with_malformed_views(tiny, tmp_path, views, fragment):
    engine = fake_engine(tmp_path / "engine", views)
    p = run_explain(tiny, tmp_path, "--tokens", "3 4", "-n", 1, "-o", tmp_path / "page.html", "--run", engine)
    assert_explain_refused(p, 1, str(engine), fragment)
    assert list(tmp_path.iterdir()) == [engine], "no file written"


def test_explain_runs_the_engine_as_given(tiny, tmp_path):
    """--run ./run is the run in the working directory, not a program
    called run that comes first on PATH."""
    (tmp_path / "run").symlink_to(RUN)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "run").write_text("#!/bin/sh\necho 'the run on PATH' >&2\nexit 1\n")
    (tmp_path / "bin" / "run").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    p = run_explain(tiny, tmp_path, "--tokens", "3 4", "-n", 1, "-o", tmp_path / "page.html", "--run", "./run",
                    env=env)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "page.html").exists()
