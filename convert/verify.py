"""export.py --verify: a conversion that checks itself. The checkpoint in our
format runs in ./run (the binary beside export.py); the model on the other
side of the conversion runs the way its own ecosystem runs it: transformers
for a Hugging Face directory or a GGUF file, model.py's reference Llama for
Meta, llama2.c and reference files. Both read the same token ids; the
logits are compared row by row, and the greedy continuations token by token."""

import os
import subprocess
import tempfile

from convert.errors import ExportError, need, np, torch
from model import Llama, generate_greedy

# Worst relative logit error allowed, per weight type of the checkpoint:
# max over positions of max|ours - theirs| / max|theirs|. Measured with
# export.py --verify on random models (transformers' LlamaForCausalLM and
# model.py's, dim 64 to 256, 2 to 4 layers) and stories260K:
#   f32   both sides compute in float32 and differ only in the order of
#         summation: 5e-7 to 1e-6 random, 3e-6 stories260K. A layout bug
#         is far above 1e-4: q/k rows left in Hugging Face's RoPE layout
#         measure 0.03 on a random model (its attention is nearly uniform,
#         so RoPE hardly matters) and 1.6 on stories260K.
#   bf16  weights rounded to 8 bits, activations too in run.c's bf16
#         kernels: 0.004 to 0.008 random, 0.044 stories260K.
#   q8_0  0.012 to 0.019 random (stories260K's hidden_dim 172 cannot be q8_0).
#   q4_0  4-bit weights: 0.22 to 0.37 on random Gaussian weights, the worst
#         case (trained models lose less); only gross errors show above it.
#   q4_k, q5_k, q6_k  llama.cpp's K blocks (a checkpoint of several types
#         takes the loosest of its types' bounds): from f32, a random 8-layer
#         model measured 0.23 to 0.31 in q4_k_m (q4_0: 0.34), 0.12 in q5_k_m, 0.078
#         in q6_k (q8_0: 0.027); a GGUF's blocks kept as they are, 0.018
#         to 0.059 (./run's fast kernels round activations to int8).
# Each bound is about twice the largest measured.
TOLERANCE = {"f32": 1e-4, "bf16": 0.1, "q8_0": 0.05, "q4_0": 0.75, "q4_k": 0.75, "q5_k": 0.35, "q6_k": 0.2}
N_PROMPT = 8                    # the prompt: BOS, then fixed ids
N_GREEDY = 16                   # greedy tokens compared
RUN_BINARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run")


class VerificationFailed(ExportError):
    """The files are written, but ./run disagrees with the source model, or
    could not be compared with it. report: the lines to print before the error."""
    report = []


def verify_prompt(vocab_size, bos_id, max_seq_len):
    """The fixed prompt: BOS (id 1 when the tokenizer has none to say), then
    ids drawn once from a seeded generator; at most max_seq_len ids."""
    bos = bos_id if bos_id is not None and bos_id >= 0 else min(1, vocab_size - 1)
    rest = np.random.default_rng(0).integers(min(3, vocab_size - 1), vocab_size, N_PROMPT - 1).tolist()
    return ([bos] + rest)[:max_seq_len]


def run_greedy(checkpoint, prompt, n):
    """./run on checkpoint: the n greedy tokens after prompt, and the logits
    of every position it computed (prompt, then all generated but the last)."""
    if not os.access(RUN_BINARY, os.X_OK):
        raise ExportError(RUN_BINARY, "not built (make run): --verify runs it")
    with tempfile.TemporaryDirectory() as tmp:
        logits_path = os.path.join(tmp, "logits.bin")
        command = [RUN_BINARY, os.path.abspath(checkpoint), "--tokens", " ".join(map(str, prompt)),
                   "-n", str(n), "-t", "0", "--logits", logits_path]
        p = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        if p.returncode != 0:
            lines = p.stderr.strip().splitlines() or [f"exit status {p.returncode}"]
            raise ExportError(RUN_BINARY, f"failed on {checkpoint}: {lines[-1]}")
        ids = [int(x) for x in p.stdout.split()]
        logits = np.fromfile(logits_path, dtype="<f4")
    return ids[len(prompt):], logits


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

    def greedy(self, prompt, n):
        return generate_greedy(self.model, prompt, n)


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

    def greedy(self, prompt, n):
        """With its own KV cache, as generate() does (which needs
        torch.distributed, missing from some torch builds)."""
        ids = []
        with torch.no_grad():
            out = self.model(torch.tensor([prompt]), use_cache=True)
            for _ in range(n):
                ids.append(int(out.logits[0, -1].argmax()))
                out = self.model(torch.tensor([ids[-1:]]), past_key_values=out.past_key_values, use_cache=True)
        return ids


def source_model(kind, source, args, state_dict):
    """The model on the other side of the conversion, run by its own ecosystem."""
    if kind == "hf":
        return Transformers(source)
    if kind == "gguf":
        return Transformers(os.path.dirname(os.path.abspath(source)), os.path.basename(source))
    return Reference(args, state_dict)


def verify(checkpoint, args, dtype, bos_id, theirs, what):
    """Compare ./run on checkpoint (ours, of args and dtype) with theirs
    (a Reference or Transformers) on the fixed prompt; returns the report
    lines, or raises VerificationFailed (with them) above TOLERANCE[dtype].
    what: the files written, for the message."""
    prompt = verify_prompt(args.vocab_size, bos_id, args.max_seq_len)
    n = min(N_GREEDY, args.max_seq_len - len(prompt))
    generated, ours = run_greedy(checkpoint, prompt, n)
    sequence = prompt + generated[:-1]
    ours = ours.reshape(-1, args.vocab_size)
    reference = theirs.logits(sequence)
    if ours.shape != reference.shape:
        raise ExportError(checkpoint, f"./run gave {ours.shape[0]} rows of logits, expected {reference.shape[0]}")
    errors = np.abs(ours - reference).max(axis=1) / np.abs(reference).max(axis=1)
    worst = float(errors.max()) if np.isfinite(errors).all() else float("inf")
    expected = theirs.greedy(prompt, n)
    agree = next((i for i, (a, b) in enumerate(zip(generated, expected)) if a != b), len(expected))
    tolerance = TOLERANCE[dtype]
    line = (f"verify: ./run {checkpoint} against {theirs.name} on {len(sequence)} positions: worst relative "
            f"logit error {worst:.2g} ({dtype} tolerance {tolerance:g}); {agree} of {n} greedy tokens agree")
    if not worst <= tolerance:
        failure = VerificationFailed(None, f"verification failed: worst relative logit error {worst:.2g} is above "
                                           f"the {dtype} tolerance {tolerance:g}; the files are written ({what}) "
                                           "but do not compute what the source does")
        failure.report = [line]
        raise failure
    return [line]
