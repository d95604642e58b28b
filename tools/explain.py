#!/usr/bin/env python3
"""make explain: one run of ./run, drawn as a page a class can look at.

    python3 tools/explain.py .demo/smollm2.bin -i "The capital of France is" -n 4 -o .demo/explain.html

Runs the model once, greedily, with --probs, --trace, --lens and
--attention as JSON lines (docs/VIEWS.md), keeps those lines beside the page
(OUT with .jsonl), and writes one self-contained HTML file: inline SVG, CSS
and a little plain JavaScript, nothing fetched, nothing to install. Its four
views: the tokens (hover: id and the alternatives), attention heatmaps by
layer and head, the residual stream's RMS through the layers, and the logit
lens. The standard library only, so that `make explain` needs no torch.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fail(message, status=1):
    """One line on stderr (a line break that a path or a token brings in
    shows as \\n), then exit: 1 for a bad file or run, 2 for a bad command line."""
    print(f"explain: {message}".replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)
    sys.exit(status)


class Arguments(argparse.ArgumentParser):
    def error(self, message):
        fail(f"{message} (see --help)", 2)


def lines_of(text):
    """The engine's output lines, split at line feeds only: str.splitlines()
    would also split a token's text at U+2028, U+2029, U+0085 or U+001C..E."""
    return text.split("\n")


def run_engine(args, run):
    try:
        p = subprocess.run([run, *map(str, args)], capture_output=True, text=True, errors="replace")
    except OSError as e:
        fail(f"{run}: cannot run the engine: {e.strerror}")
    if p.returncode != 0:
        said = [line for line in lines_of(p.stderr) if line.strip()]
        fail(said[-1] if said else f"{run} exited {p.returncode}")
    return p


def read_views(lines, run, chosen):
    """The page's data from a run's JSON lines, opening on the position
    chosen; lines that are not what run.c writes end the program, naming
    the engine."""
    try:
        page = views_page(lines)
        page["chosen"] = chosen
        page["layer"], page["head"] = sink_head(page, chosen)
        return page
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        fail(f"{run}: its views are not what run.c writes ({type(e).__name__}: {e})")


def views_page(lines):
    """--probs lines (no "view" key) and trace, lens and attention objects,
    by position and layer; ValueError, KeyError or TypeError if malformed."""
    probs, trace, lens, attention, tokens = {}, {}, {}, {}, {}
    views = {"trace": trace, "lens": lens, "attention": attention}
    for line in lines:
        if not line.startswith("{"):
            continue  # the run's statistics and notices
        row = json.loads(line)
        view = row.get("view")
        if view is None:
            probs[row["pos"]] = row
            continue
        if view not in views:
            raise ValueError(f"unknown view {view!r}")
        pos, layer = row["pos"], row["layer"]
        tokens[pos] = (row["token"], row["text"])
        views[view][pos, layer] = row
    if not trace or not lens:
        raise ValueError("the run gave no trace or lens lines")
    n_layers = 1 + max(layer for _, layer in trace)
    fed = sorted(tokens)
    if fed != list(range(len(fed))) or any((p, l) not in lens for p in fed for l in range(n_layers)):
        raise ValueError("the run's trace and lens do not cover every position and layer")
    n_prompt = min(probs) if probs else len(fed)
    for pos, row in probs.items():
        tokens.setdefault(pos, (row["token"], row["text"]))
    n_heads = len(trace[0, 0]["entropy"])
    page = dict(n_layers=n_layers, n_heads=n_heads, n_prompt=n_prompt, tokens=[], trace=[], lens=[], attention=[])
    for pos in sorted(tokens):
        token, text = tokens[pos]
        entry = dict(pos=pos, id=token, text=text, generated=pos >= n_prompt)
        if pos in probs:
            entry["prob"] = probs[pos]["prob"]
            entry["top"] = [[t["token"], t["text"], t["prob"]] for t in probs[pos]["top"]]
        page["tokens"].append(entry)
    for pos in fed:
        page["trace"].append([{k: trace[pos, l][k] for k in ("rms_in", "attn", "rms_mid", "mlp", "rms_out", "entropy")}
                              for l in range(n_layers)])
        page["lens"].append([[[t["token"], t["text"], t["prob"]] for t in lens[pos, l]["top"]]
                             for l in range(n_layers)])
        page["attention"].append([attention[pos, l]["weights"] for l in range(n_layers)]
                                 if (pos, 0) in attention else None)
    return page


def sink_head(page, chosen):
    """The (layer, head) that puts the most weight on position 0, on
    average over the positions 1 .. chosen: the page opens on it."""
    best, where = -1.0, (0, 0)
    rows = [page["attention"][q] for q in range(1, chosen + 1) if page["attention"][q]]
    for layer in range(page["n_layers"]):
        for head in range(page["n_heads"]):
            weight = sum(r[layer][head][0] for r in rows) / max(len(rows), 1)
            if weight > best:
                best, where = weight, (layer, head)
    return where


CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 16px 24px; color: #1d2433;
       background: #fbfbf8; }
h1 { font-size: 26px; margin: 4px 0; }
h2 { font-size: 19px; margin: 26px 0 4px; border-top: 1px solid #ddd; padding-top: 14px; }
.sub { color: #555; margin: 0 0 8px; }
.caption { max-width: 900px; color: #333; margin: 4px 0 10px; }
.strip { display: flex; flex-wrap: wrap; gap: 4px; }
.tok { font-family: ui-monospace, monospace; padding: 3px 6px; border-radius: 5px; background: #e6e6e1;
       border: 2px solid transparent; cursor: default; white-space: pre; }
.tok.gen { background: #cfe1f7; }
.tok.pickable { cursor: pointer; }
.tok.chosen { border-color: #d2691e; }
.controls { margin: 6px 0; }
.controls select { font-size: 14px; margin-right: 12px; }
.scroll { overflow-x: auto; }
svg text { font-family: ui-monospace, monospace; font-size: 11px; fill: #333; }
svg .axis { font-family: system-ui, sans-serif; font-size: 12px; }
.tip { position: fixed; pointer-events: none; background: #1d2433; color: #fff; padding: 6px 9px; border-radius: 5px;
       font: 13px/1.35 ui-monospace, monospace; white-space: pre; display: none; z-index: 9; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 18px; height: 3px; vertical-align: middle; margin-right: 5px; }
"""

SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const NS = "http://www.w3.org/2000/svg";
const $ = id => document.getElementById(id);
const state = {pos: D.chosen, layer: D.layer, head: D.head};
for (const part of location.hash.slice(1).split("&")) {
  const [k, v] = part.split("=");
  if (k in state && /^\d+$/.test(v)) state[k] = Number(v);
}
state.pos = Math.min(state.pos, D.attention.length - 1);
state.layer = Math.min(state.layer, D.n_layers - 1);
state.head = Math.min(state.head, D.n_heads - 1);

function show(text) {  // a token's text with its spaces and line breaks visible
  return text.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
}
function el(name, attrs, parent, text) {
  const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}
function shade(w) { return "hsl(214, 72%, " + (97 - 60 * w).toFixed(1) + "%)"; }
function alternatives(top) {
  return top.map(t => show(t[1]).padEnd(14) + " " + (100 * t[2]).toFixed(1) + "%  (id " + t[0] + ")").join("\n");
}

const tip = $("tip");
document.addEventListener("mousemove", ev => {
  const t = ev.target.closest ? ev.target.closest("[data-tip]") : null;
  if (!t) { tip.style.display = "none"; return; }
  tip.textContent = t.getAttribute("data-tip");
  tip.style.display = "block";
  tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8) + "px";
  tip.style.top = (ev.clientY + 16) + "px";
});

function drawTokens() {
  const strip = $("strip");
  strip.textContent = "";
  for (const t of D.tokens) {
    const span = document.createElement("span");
    span.className = "tok" + (t.generated ? " gen" : "") + (D.attention[t.pos] ? " pickable" : "") +
                     (t.pos === state.pos ? " chosen" : "");
    span.textContent = show(t.text);
    let tipText = "position " + t.pos + ", token id " + t.id + (t.generated ? ", written by the model" : ", prompt");
    if (t.top)
      tipText += "\nits probability " + (100 * t.prob).toFixed(1) + "%; the most likely:\n" + alternatives(t.top);
    span.setAttribute("data-tip", tipText);
    span.setAttribute("data-pos", t.pos);
    if (D.attention[t.pos]) span.addEventListener("click", () => { state.pos = t.pos; drawAll(); });
    strip.appendChild(span);
  }
}

function drawAttention() {
  const svg = $("heatmap"), c = state.pos, n = c + 1;
  svg.textContent = "";
  const cell = Math.max(10, Math.min(48, Math.floor(620 / n))), left = 130, top = 110;
  svg.setAttribute("width", Math.max(left + n * cell + 20, 700));
  svg.setAttribute("height", top + n * cell + 40);
  for (let k = 0; k < n; k++)
    el("text", {x: 0, y: 0,
                transform: "translate(" + (left + k * cell + cell / 2 + 4) + "," + (top - 6) + ") rotate(-60)"},
       svg, show(D.tokens[k].text).slice(0, 14));
  for (let q = 0; q < n; q++) {
    el("text", {x: left - 6, y: top + q * cell + cell / 2 + 4, "text-anchor": "end",
                "font-weight": q === c ? "bold" : "normal"}, svg, show(D.tokens[q].text).slice(0, 14));
    const weights = D.attention[q] ? D.attention[q][state.layer][state.head] : null;
    for (let k = 0; k <= q; k++) {
      const w = weights ? weights[k] : 0;
      el("rect", {class: "cell", x: left + k * cell, y: top + q * cell, width: cell - 1, height: cell - 1,
                  fill: shade(w), "data-q": q, "data-k": k, "data-w": w,
                  "data-tip": show(D.tokens[q].text) + " \u2192 " + show(D.tokens[k].text) + ": " +
                              (100 * w).toFixed(2) + "%"}, svg);
      if (cell >= 36 && w >= 0.005)
        el("text", {x: left + k * cell + cell / 2, y: top + q * cell + cell / 2 + 4, "text-anchor": "middle",
                    style: "pointer-events: none; fill: " + (w > 0.55 ? "#fff" : "#1d2433")},
           svg, Math.round(100 * w) + "%");
    }
  }
  el("rect", {x: left - 2, y: top + c * cell - 1, width: n * cell + 2, height: cell + 1, fill: "none",
              stroke: "#d2691e", "stroke-width": 2}, svg);
  el("text", {class: "axis", x: left, y: top + n * cell + 24}, svg,
     "layer " + state.layer + ", head " + state.head + ": rows look at columns; the outlined row is the chosen token");
}

function drawResidual() {
  const svg = $("rms"), W = 760, H = 320, L = D.n_layers, left = 60, right = 20, top = 14, bottom = 40;
  svg.textContent = "";
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  const series = t => ({
    residual: [t[0].rms_in].concat(t.map(r => r.rms_out)),
    attention: t.map(r => r.attn),
    mlp: t.map(r => r.mlp)});
  let lo = Infinity, hi = 0;
  for (const t of D.trace) for (const s of Object.values(series(t))) for (const v of s)
    if (v > 0) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const l0 = Math.floor(Math.log10(lo)), l1 = Math.ceil(Math.log10(hi));
  const x = i => left + i * (W - left - right) / L;
  const y = v => top + (l1 - Math.log10(Math.max(v, 10 ** l0))) * (H - top - bottom) / Math.max(l1 - l0, 1);
  for (let e = l0; e <= l1; e++) {
    el("line", {x1: left, x2: W - right, y1: y(10 ** e), y2: y(10 ** e), stroke: "#e2e2dc"}, svg);
    el("text", {class: "axis", x: left - 6, y: y(10 ** e) + 4, "text-anchor": "end"},
       svg, e >= 0 ? String(10 ** e) : (10 ** e).toFixed(-e));
  }
  for (let i = 0; i <= L; i += Math.max(1, Math.round(L / 10)))
    el("text", {class: "axis", x: x(i), y: H - bottom + 18, "text-anchor": "middle"}, svg, i === 0 ? "emb" : String(i));
  el("text", {class: "axis", x: (W + left) / 2, y: H - 4, "text-anchor": "middle"},
     svg, "after layer (log scale of RMS)");
  const line = (values, offset, color, width, cls) => el("polyline", {
    points: values.map((v, i) => x(i + offset) + "," + y(v)).join(" "), fill: "none", stroke: color,
    "stroke-width": width, class: cls}, svg);
  D.trace.forEach((t, p) => { if (p !== state.pos) line(series(t).residual, 0, "#c9c9c2", 1, "other"); });
  const s = series(D.trace[state.pos]);
  const colors = {residual: "#1d2433", attention: "#e07b00", mlp: "#2a9d3a"};
  for (const name of ["attention", "mlp", "residual"]) {
    const offset = name === "residual" ? 0 : 1;
    line(s[name], offset, colors[name], name === "residual" ? 2.5 : 1.6, "series");
    s[name].forEach((v, i) => el("circle", {class: "rms-point", cx: x(i + offset), cy: y(v), r: 3.2, fill: colors[name],
      "data-series": name, "data-layer": i + offset - 1, "data-v": v,
      "data-tip": name + (i + offset === 0 ? " (the embedding)" : " after layer " + (i + offset - 1)) +
                  ": RMS " + v.toPrecision(4)}, svg));
  }
}

function drawLens() {
  const svg = $("lens"), P = D.lens.length, L = D.n_layers, cw = 74, ch = 19, left = 56, top = 8;
  svg.textContent = "";
  svg.setAttribute("width", left + P * cw + 10);
  svg.setAttribute("height", top + L * ch + 60);
  for (let l = 0; l < L; l++) {
    const yy = top + (L - 1 - l) * ch;
    el("text", {class: "axis", x: left - 6, y: yy + 14, "text-anchor": "end"}, svg, "layer " + l);
    for (let p = 0; p < P; p++) {
      const top1 = D.lens[p][l][0];
      const g = el("g", {class: "lens-cell", "data-layer": l, "data-pos": p, "data-token": top1[0],
        "data-prob": top1[2],
        "data-tip": "after layer " + l + ", at \u201c" + show(D.tokens[p].text) + "\u201d the next token would be:\n" +
                    alternatives(D.lens[p][l])}, svg);
      el("rect", {x: left + p * cw, y: yy, width: cw - 1, height: ch - 1, fill: shade(top1[2]),
                  stroke: p === state.pos ? "#d2691e" : "none"}, g);
      el("text", {x: left + p * cw + 4, y: yy + 13, style: "fill: " + (top1[2] > 0.55 ? "#fff" : "#1d2433")}, g,
         show(top1[1]).slice(0, 9));
    }
  }
  for (let p = 0; p < P; p++)
    el("text", {x: 0, y: 0, transform: "translate(" + (left + p * cw + 6) + "," + (top + L * ch + 10) + ") rotate(30)"},
       svg, show(D.tokens[p].text).slice(0, 12));
}

function drawAll() {
  drawTokens(); drawAttention(); drawResidual(); drawLens();
  $("where").textContent = "\u201c" + show(D.tokens[state.pos].text) + "\u201d (position " + state.pos + ")";
}

const layerPick = $("layer"), headPick = $("head");
for (let l = 0; l < D.n_layers; l++) layerPick.add(new Option("layer " + l, l));
for (let h = 0; h < D.n_heads; h++) headPick.add(new Option("head " + h, h));
layerPick.value = state.layer;
headPick.value = state.head;
layerPick.addEventListener("change", () => { state.layer = Number(layerPick.value); drawAttention(); });
headPick.addEventListener("change", () => { state.head = Number(headPick.value); drawAttention(); });
drawAll();
document.body.setAttribute("data-ready", "1");
"""

CAPTIONS = {
    "tokens": "The model never sees letters or words, only these pieces (tokens); a space is shown as \u2423. "
              "Grey ones are the prompt, blue ones the model wrote itself, one at a time, each time taking the most "
              "likely next piece. Hover over a piece for its number in the vocabulary and, for the written ones, the "
              "runners-up it chose between. Click a piece to look at it in the views below.",
    "attention": "Attention is how a token gathers information from the tokens before it. Each row is one token "
                 "looking back; each square, how much of that head's attention goes to the token of its column "
                 "(darker: more; every row adds up to 100%). Nothing lies above the diagonal: a decoder cannot look "
                 "ahead. Many heads pour most of their attention onto the very first token, whatever it says: the "
                 "<b>attention sink</b>, a place to park attention when there is nothing useful to look at (the "
                 "page opens on the head that does it most). Switch layers and heads: some look at the previous "
                 "token, some at the token itself, some search further back.",
    "residual": "Each layer reads the <b>residual stream</b>, a vector of numbers per token, and adds something back "
                "to it: attention what it gathered from other tokens, the MLP what it recalls from its own weights. "
                "The black line is the size (RMS) of the stream of the chosen token after each layer; orange is what "
                "attention added in that layer, green what the MLP added; the grey lines are the other tokens' "
                "streams. The scale is logarithmic: the stream grows tenfold and more on its way up, mostly from "
                "the MLPs, and the first token's stream often stands apart, another sign of the sink.",
    "lens": "The <b>logit lens</b> asks: what would the model say if it stopped after this layer? Each cell sends "
            "the residual stream of one position, as it is after one layer, through the model's final norm and "
            "classifier, and shows the most likely next token, darker the surer it is (hover for the top few). "
            "Columns are positions: the column under a token guesses the token after it. Rows are layers, the "
            "first at the bottom; the top row is the model's real prediction. Read a column upwards: the lower "
            "layers offer generic guesses, and the answer appears and firms up only in the upper layers.",
}


def page_html(page, title, subtitle):
    sections = [
        ("tokens", "1. The tokens", '<div class="strip" id="strip"></div>'),
        ("attention", "2. Where each token looks: attention",
         '<div class="controls"><select id="layer"></select><select id="head"></select>'
         'chosen token: <b id="where"></b></div><div class="scroll"><svg id="heatmap"></svg></div>'),
        ("residual", "3. The residual stream, layer by layer",
         '<div class="legend"><span><i style="background:#1d2433"></i>the stream</span>'
         '<span><i style="background:#e07b00"></i>attention adds</span><span><i style="background:#2a9d3a"></i>'
         'the MLP adds</span><span><i style="background:#c9c9c2"></i>the other tokens</span></div>'
         '<svg id="rms"></svg>'),
        ("lens", "4. The logit lens: the answer forming", '<div class="scroll"><svg id="lens"></svg></div>'),
    ]
    body = "".join(f'<section id="{key}-view"><h2>{head}</h2><p class="caption">{CAPTIONS[key]}</p>{inner}</section>\n'
                   for key, head, inner in sections)
    data = json.dumps(page, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f'<style>{CSS}</style></head>\n<body>\n<h1>{escape(title)}</h1>\n<p class="sub">{escape(subtitle)}</p>\n'
            f'{body}<div class="tip" id="tip"></div>\n'
            f'<script type="application/json" id="data">{data}</script>\n<script>{SCRIPT}</script>\n</body></html>\n')


def escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path, text):
    """Writes the whole of text to path, or nothing: a temporary file beside
    it, given the mode a new file gets (0666 less the umask), then renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_output_path(page, views):
    """Ends the program unless the page and the views can be written there,
    before the model runs."""
    if page == views:
        fail(f"{page}: the page would overwrite its own views file ({views}); name it .html", 2)
    for path in (page, views):
        if path.is_dir():
            fail(f"{path}: is a directory; -o names the page's file")
    if not page.parent.is_dir():
        fail(f"{page}: no such directory: {page.parent}")


def write_outputs(files):
    """files: [(path, text)]. All are written or, when one cannot be, none:
    those already written are removed again."""
    written = []
    for path, text in files:
        try:
            write_atomically(path, text)
        except OSError as e:
            for done in written:
                done.unlink()
            fail(f"{path}: cannot write: {e.strerror}")
        written.append(path)


def main():
    ap = Arguments(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    prompt = ap.add_mutually_exclusive_group(required=True)
    prompt.add_argument("-i", dest="text", help="the prompt")
    prompt.add_argument("--tokens", help="the prompt as token ids")
    ap.add_argument("-n", type=int, default=4, help="tokens to generate, greedily (default 4)")
    ap.add_argument("-k", type=int, default=5, help="alternatives shown per token and lens cell (default 5)")
    ap.add_argument("-o", type=Path, default=Path(".demo/explain.html"), help="the page (default .demo/explain.html)")
    ap.add_argument("--run", default=str(ROOT / "run"),
                    help="the engine, run as given (a name without / is looked up on PATH; default ./run)")
    a = ap.parse_args()
    if a.n < 1 or not 1 <= a.k <= 100:
        ap.error("-n must be at least 1 and -k in 1..100")
    views = a.o.with_suffix(".jsonl")
    check_output_path(a.o, views)
    given = ["-i", a.text] if a.text is not None else ["--tokens", a.tokens]
    if a.text is not None:
        n_prompt = len(run_engine([a.model, "--tokenize", "-i", a.text], a.run).stdout.split())
    else:
        n_prompt = len(a.tokens.replace(",", " ").split())
    last = n_prompt + a.n - 2  # the last generated token is never fed back
    p = run_engine([a.model, *given, "-t", 0, "-n", a.n, "--probs", a.k, "--probs-format", "json", "--trace",
                    "--lens", a.k, "--attention", f"0-{max(last, 0)}", "--trace-format", "json"], a.run)
    lines = lines_of(p.stderr)
    page = read_views(lines, a.run, n_prompt - 1)
    subtitle = f"{Path(a.model).name}, greedy: {p.stdout.strip()!r}"
    write_outputs([(views, "".join(line + "\n" for line in lines if line.startswith("{"))),
                   (a.o, page_html(page, "Watching a decoder think", subtitle))])
    print(f"explain: wrote {a.o} (and the run's views, {views}); open it in a browser")


if __name__ == "__main__":
    main()
