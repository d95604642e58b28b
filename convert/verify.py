"""export.py --verify: a conversion that checks itself. The checkpoint in our
format runs in ./run (the binary beside export.py); the model on the other
side of the conversion runs the way its own ecosystem runs it: transformers
for a Hugging Face directory or a GGUF file, model.py's reference Llama for
Meta, llama2.c and reference files. Both read the same token ids, a fixed
English text of a few hundred tokens (random ids when there is no tokenizer),
teacher-forced: each position predicts the next token from the text itself,
so one early flip cannot derail the rest as it does in free-running greedy
generation. What is compared is what users compare quantizations by: the KL
divergence of the next-token distributions, KL(source || ours), and the share
of positions whose most likely token agrees."""

import os
import subprocess
import tempfile

from convert.errors import ExportError, need, np, torch
from model import Llama

# The text both sides read, tokenized by the converted tokenizer (./run
# --tokenize): plain English of about 280 tokens in a 49k or 32k vocabulary.
TEXT = ("The library opened at nine, but the line of readers had formed long before. An old man with a cane "
        "read the notices on the board while two students argued about a problem in geometry. When the doors "
        "swung open, the smell of paper and floor polish drifted out into the cold morning. Inside, the tall "
        "windows let in a pale light that fell across the long tables. A librarian pushed a cart of returned "
        "books between the shelves, stopping now and then to slide a volume into its place. Most days were "
        "quiet. People came to read the newspapers, to write letters, to search for a recipe or a map of a "
        "town they had left as children. Some came only to be warm. In the afternoon a class of young "
        "children arrived with their teacher, and for an hour the reading room was full of whispers and small "
        "laughter. They sat on the carpet while she read them a story about a fox who wanted to learn how to "
        "count the stars. Every time the fox reached one hundred, a cloud covered the sky and he had to begin "
        "again. The children thought this was very funny. When the story ended, each of them chose a book to "
        "take home, and the teacher wrote their names in a notebook. By evening the tables were empty again. "
        "The librarian turned off the lamps one by one, locked the heavy door, and walked home along the "
        "river, where the lights of the bridge were already shining on the water.")
N_RANDOM = 256                  # positions when there is no tokenizer: BOS, then seeded random ids

# What a conversion may lose, per weight type of the checkpoint: the mean
# and the 99th percentile over positions of KL(source || ours) in nats, and
# the least share of positions whose top token agrees. Measured with
# export.py --verify (mean, 99th percentile, top token share) on
#   SmolLM2-135M-Instruct, make demo's Q4_1 GGUF, on TEXT (288 tokens),
#   stories260K on random ids (hidden_dim 172 cannot be q8_0 or q4_0), and
#   tests/test_verify.py's random model on random ids:
#          SmolLM2                  stories260K              random model
#   f32    2.7e-11 9.6e-11 100%     3.9e-11 2.9e-10 100%     5.7e-12 1.7e-11 100%
#   bf16   4.7e-5  1.6e-4  99.0%    5.0e-3  3.2e-2  91.4%    1.5e-4  4.7e-4  98.8%
#   q8_0   1.0e-3  3.8e-3  97.6%                             1.6e-3  6.0e-3  96.9%
#   q4_0   0.41    1.29    54.9%                             0.39    1.16    58.2%
# f32 is a lossless copy of every source (f32, f16, bf16, GGUF blocks decoded
# exactly): the two sides differ only in the order of float32 summation, and
# the bounds are about 1000 times the largest measured (about 30 times in
# logit error, as KL grows with its square). The others round the weights
# again, a second quantization of a GGUF's blocks: bf16 and q8_0 (about 8
# bits each) share bounds 4 to 6 times stories260K's, whose random-id
# positions are full of near-ties; q4_0 costs a 135M model dearly (0 of 16
# free-running greedy tokens agree on SmolLM2, 55% of teacher-forced ones),
# and its bounds are 2.5 to 3 times that. The faults tests/test_verify.py
# makes (q/k rows in the wrong RoPE layout, a wrong rope_theta, w1 and w3
# swapped, wo transposed) measure at least 1.5, 3.7 and at most 34% on its
# random model in every type. On SmolLM2 (f32): the RoPE layout 1.9, 5.1,
# 31%; w1 and w3 swapped 18, 33, 2%; wo transposed 8.0, 15, 0%; but rope_theta
# 10000 for 100000 only 0.097, 0.41, 81% (TEXT's short distances barely feel it):
# above the f32, bf16 and q8_0 bounds, within q4_0's (0.50, 1.6, 52% in q4_0).
# The K types, measured on branch kq-export (--dtype q6_k, q5_k_m, q4_k_m;
# a checkpoint of several types takes the bounds of its loosest):
#          SmolLM2 (width 576: only w2 in K types, the rest q8_0)   random model
#   q6_k   5.5e-3  2.2e-2  95.8%                                    1.9e-2 6.2e-2 88.3%
#   q5_k   5.5e-3  2.0e-2  94.8%                                    6.5e-2 0.19   80.5%
#   q4_k   5.2e-3  1.8e-2  95.5%                                    0.25   0.94   62.1%
# bounds 4 to 5 times the random model's; the faults stay above them. A
# GGUF's Q4_K, Q5_K and Q6_K blocks kept as they are lose only what ./run's
# int8 activations do: 1.4e-3, 4.6e-3, 96.9% on the random model, as q8_0;
# so do its Q4_0 blocks, kept too (1.2e-3, 4.4e-3, 98.2% on the random
# model as a Q4_0 GGUF), held to q8_0's bounds as well.
THRESHOLDS = {
    "f32": (1e-7, 1e-6, 0.98),
    "bf16": (0.02, 0.2, 0.85),
    "q8_0": (0.02, 0.2, 0.85),
    "q6_k": (0.1, 0.5, 0.75),
    "q5_k": (0.3, 1.5, 0.6),
    "q4_k": (1.0, 3.5, 0.4),
    "q4_0": (1.0, 3.5, 0.4),
}
RUN_BINARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run")


class VerificationFailed(ExportError):
    """The files are written, but ./run disagrees with the source model, or
    could not be compared with it. report: the lines to print before the error."""
    report = []


def _run(args, what):
    """./run with args; its stdout, or an ExportError with its last line of stderr."""
    if not os.access(RUN_BINARY, os.X_OK):
        raise ExportError(RUN_BINARY, "not built (make run): --verify runs it")
    p = subprocess.run([RUN_BINARY, *args], capture_output=True, text=True)
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines() or [f"exit status {p.returncode}"]
        raise ExportError(RUN_BINARY, f"failed on {what}: {lines[-1]}")
    return p.stdout


def verify_tokens(tokenizer, vocab_size, max_seq_len):
    """The ids both sides read, at most max_seq_len of them, and what they are:
    TEXT as ./run tokenizes it with tokenizer (BOS first if the tokenizer
    adds one); without a tokenizer, BOS (id 1) and seeded random ids."""
    if tokenizer:
        ids = [int(x) for x in _run(["--tokenize", "-z", os.path.abspath(tokenizer), "-i", TEXT], tokenizer).split()]
        what = "a fixed English text"
    else:
        rest = np.random.default_rng(0).integers(min(3, vocab_size - 1), vocab_size, N_RANDOM - 1).tolist()
        ids, what = [min(1, vocab_size - 1)] + rest, "fixed random ids"
    return ids[:max_seq_len], what


def run_logits(checkpoint, ids, args):
    """./run on checkpoint (of args) over ids: the logits of every position,
    (len(ids), vocab_size). Its KV cache holds those positions, not the
    model's whole context (128k positions in Llama 3 take gigabytes)."""
    context = min(len(ids) + 1, args.max_seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        logits_path = os.path.join(tmp, "logits.bin")
        _run([os.path.abspath(checkpoint), "--tokens", " ".join(map(str, ids)), "-n", "1", "-t", "0",
              "-c", str(context), "--logits", logits_path], checkpoint)
        logits = np.fromfile(logits_path, dtype="<f4")
    if logits.size != len(ids) * args.vocab_size:
        raise ExportError(checkpoint, f"./run gave {logits.size / args.vocab_size:g} rows of logits, "
                                      f"expected {len(ids)}")
    return logits.reshape(len(ids), args.vocab_size)


class Reference:
    """model.py's Llama with the source's own float32 weights."""

    def __init__(self, args, state_dict):
        self.model = Llama(args)
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()})
        self.model.eval()
        self.name = "model.py's reference"

    def logits(self, ids):
        with torch.no_grad():
            return self.model(torch.tensor([ids]))[0].numpy()


class Transformers:
    """A transformers causal LM from a Hugging Face directory or a GGUF file, in float32."""

    def __init__(self, path, gguf_file=None):
        transformers = need("transformers")
        transformers.logging.set_verbosity_error()
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        config = transformers.AutoConfig.from_pretrained(path, **kw)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path, config=config, torch_dtype=torch.float32, **kw).eval()
        self.name = "transformers"

    def logits(self, ids):
        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0].float().numpy()


def source_model(kind, source, args, state_dict):
    """The model on the other side of the conversion, run by its own ecosystem."""
    if kind == "hf":
        return Transformers(source)
    if kind == "gguf":
        return Transformers(os.path.dirname(os.path.abspath(source)), os.path.basename(source))
    return Reference(args, state_dict)


def log_softmax(logits):
    """Row-wise log-probabilities in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def compare(ours, theirs):
    """Per position: KL(theirs || ours) in nats, and whether the top tokens
    agree; and the worst relative logit error, max|ours - theirs| / max|theirs|.
    Logits that are not finite give an infinite KL."""
    if not np.isfinite(ours).all():
        return np.full(len(ours), np.inf), np.zeros(len(ours), bool), float("inf")
    log_p, log_q = log_softmax(theirs), log_softmax(ours)
    kl = np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=1), 0.0)
    agree = ours.argmax(axis=1) == theirs.argmax(axis=1)
    worst = float((np.abs(ours - theirs).max(axis=1) / np.abs(theirs).max(axis=1)).max())
    return kl, agree, worst


def verify(checkpoint, args, dtype, tokenizer, theirs, what):
    """Compare ./run on checkpoint (ours, of args and dtype) with theirs
    (a Reference or Transformers), teacher-forced on the same ids (TEXT by
    tokenizer, or random ids when it is None); returns the report lines, or
    raises VerificationFailed (with them) when a metric is past THRESHOLDS[dtype].
    what: the files written, for the message."""
    ids, text = verify_tokens(tokenizer, args.vocab_size, args.max_seq_len)
    kl, agree, worst = compare(run_logits(checkpoint, ids, args), theirs.logits(ids))
    mean_kl, p99_kl, top1 = float(kl.mean()), float(np.percentile(kl, 99)), float(agree.mean())
    most_mean, most_p99, least_top1 = THRESHOLDS[dtype]
    kept = "keeps the weights" if dtype == "f32" else "rounds the weights"
    line = (f"verify: ./run {checkpoint} against {theirs.name}, teacher-forced on {len(ids)} positions of {text}: "
            f"KL(source || ours) mean {mean_kl:.2g}, 99th percentile {p99_kl:.2g}, top token agrees at "
            f"{top1:.1%} ({dtype} {kept}; it allows {most_mean:g}, {most_p99:g}, {least_top1:.0%}); "
            f"worst relative logit error {worst:.2g}")
    checks = [(mean_kl <= most_mean, f"mean KL {mean_kl:.2g} is above {most_mean:g}"),
              (p99_kl <= most_p99, f"99th percentile KL {p99_kl:.2g} is above {most_p99:g}"),
              (top1 >= least_top1, f"the top token agrees at {top1:.1%} of positions, under {least_top1:.0%}")]
    failed = [problem for ok, problem in checks if not ok]
    if failed:
        failure = VerificationFailed(None, f"verification failed: {'; '.join(failed)} ({dtype}); the files are "
                                           f"written ({what}) but do not compute what the source does")
        failure.report = [line]
        raise failure
    return [line]
