"""model.py: the plain PyTorch reference Llama that run.c is tested against.

RoPE rotates the interleaved pairs (x[2i], x[2i+1]) of each head by the angle
pos * inv_freq[i], Meta's convention, with inv_freq[i] = rope_theta^(-2i / head_dim)
or, for a model with scaled RoPE (Llama 3's or linear), the model's own
rope_inv_freq; the converters permute Hugging Face's q/k rows (and biases)
into it, so run.c knows one convention only."""

import dataclasses
import math
import numbers
import struct

from convert.errors import F, nn, np, torch

# Shapes below use B = batch, T = time (positions), H = heads, D = head_dim.


F32_MAX = 3.4028234663852886e38
# The largest sizes that run.c loads (its MAX_DIM, MAX_HIDDEN, ...): ModelArgs
# refuses more, so that nothing is written that run.c would refuse. The
# longest context is checked when a checkpoint is written, after
# --max-seq-len has had its say; until then max_seq_len is any i32.
MAX_SIZES = {"dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
             "head_dim": 4096, "vocab_size": 1 << 22}
MAX_SEQ_LEN = 1 << 20


@dataclasses.dataclass
class ModelArgs:
    """The hyperparameters of a model: the fields of the checkpoint header."""

    dim: int                    # width of the residual stream
    hidden_dim: int             # width of the SwiGLU MLP
    n_layers: int
    n_heads: int                # query heads
    n_kv_heads: int             # key/value heads; divides n_heads (MHA, GQA, MQA)
    head_dim: int               # not assumed to be dim / n_heads
    vocab_size: int
    max_seq_len: int            # longest context run.c will allocate for
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tied: bool = False          # the classifier is the token embedding
    attention_bias: bool = False    # q, k and v projections add a bias (Qwen2)
    scaled_rope: bool = False       # RoPE's inverse frequencies are the tensor rope_inv_freq

    def __post_init__(self):
        # Numbers arrive from JSON, numpy, torch and file headers: store plain
        # Python types, and refuse anything else (a string, a bool for a
        # count) and shapes that no forward pass could run.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if f.type is int:        # the header stores i32
                most = MAX_SIZES.get(f.name, 2**31 - 1)
                if not (number and value == int(value) and 0 < value <= most):
                    raise ValueError(f"{f.name} = {value!r}: expected an integer from 1 to {most}")
                value = int(value)
            elif f.type is float:    # the header stores f32: neither 0 nor inf there
                if not (number and 0 < value <= F32_MAX and struct.unpack("<f", struct.pack("<f", value))[0]):
                    raise ValueError(f"{f.name} = {value!r}: expected a positive number that float32 holds")
                value = float(value)
            else:
                if not (isinstance(value, numbers.Integral) and value in (0, 1)):
                    raise ValueError(f"{f.name} = {value!r}: expected true or false")
                value = bool(value)
            setattr(self, f.name, value)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads = {self.n_kv_heads} does not divide n_heads = {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = {self.head_dim}: RoPE rotates pairs, so it must be even")
        if self.n_heads * self.head_dim > MAX_SIZES["dim"]:
            raise ValueError(f"n_heads * head_dim = {self.n_heads * self.head_dim}: expected at most "
                             f"{MAX_SIZES['dim']}")

    def describe(self):
        """One line for people: 'dim 64, hidden 172, 5 layers, ...'."""
        return (f"dim {self.dim}, hidden {self.hidden_dim}, {self.n_layers} layers, "
                f"{self.n_heads} heads ({self.n_kv_heads} kv) of {self.head_dim}, "
                f"vocab {self.vocab_size} ({'tied' if self.tied else 'untied'}), "
                f"seq {self.max_seq_len}, theta {self.rope_theta:g}{' (scaled)' if self.scaled_rope else ''}, "
                f"eps {self.norm_eps:g}{', q/k/v biases' if self.attention_bias else ''}")


# The reference model. It is written for clarity, not speed: float32 all the way,
# every position recomputed on every call, no KV cache. run.c must agree with it.


def rope_cos_sin(seq_len, head_dim, theta, inv_freq=None):
    """cos and sin of the RoPE angles pos * inv_freq[i], each (seq_len, head_dim/2);
    inv_freq (head_dim/2) defaults to theta^(-2i/head_dim).

    Computed in float64 and rounded once to float32 at the end, so the
    reference is as close to the exact angles as float32 allows."""
    pos = torch.arange(seq_len, dtype=torch.float64)
    if inv_freq is None:
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(pos, inv_freq.double())              # (T, D/2)
    return angles.cos().float(), angles.sin().float()


# The scalings of RoPE that run.c computes (any other is refused by the
# converters): each gives new inverse frequencies, stored in the checkpoint.
#   linear  every frequency divided by factor (positions stretched)
#   llama3  Llama 3.1's: with wavelength = 2 pi / inv_freq, pairs that turn
#           fast (wavelength < original_max_position_embeddings /
#           high_freq_factor) are kept, slow ones (> .../ low_freq_factor)
#           divided by factor, and those between blended:
#             s = (original_max_position_embeddings / wavelength - low_freq_factor)
#                 / (high_freq_factor - low_freq_factor)
#             inv_freq' = (1 - s) inv_freq / factor + s inv_freq
ROPE_SCALING_KEYS = {"linear": ["factor"],
                     "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
# Meta's params.json says only use_scaled_rope; Llama 3.1's reference code fixes the rest.
META_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}


def _unscaled_frequencies(head_dim, theta):
    """theta^(-2i/head_dim) for each pair, float64."""
    return float(theta) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def rope_inverse_frequencies(head_dim, theta, scaling=None):
    """RoPE's inverse frequency of each pair, a float32 numpy array (head_dim/2):
    theta^(-2i/head_dim), then scaled as scaling says, a dict in Hugging Face's
    form ({"rope_type": "llama3" or "linear", "factor": ..., ...}) or None.
    Computed in float64, rounded once. A bad scaling raises ValueError naming
    the key at fault, as do frequencies that are not finite and positive in
    float32 (a factor of 1e-300, say)."""
    inv_freq = _unscaled_frequencies(head_dim, theta)
    if scaling is not None:
        inv_freq = _scaled_frequencies(inv_freq, scaling)
    with np.errstate(over="ignore", under="ignore"):
        rounded = inv_freq.astype(np.float32)
    if not np.all(np.isfinite(rounded) & (rounded > 0)):
        what = "rope_theta" if scaling is None else "factor"
        value = theta if scaling is None else scaling.get("factor")
        raise ValueError(f"{what} = {value!r} makes RoPE frequencies that float32 cannot hold "
                         f"(from {rounded.min():g} to {rounded.max():g})")
    return rounded


def _scaled_frequencies(inv_freq, scaling):
    """inv_freq (float64) scaled as rope_inverse_frequencies() says, float64."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_type {kind!r} is not implemented (only {' and '.join(ROPE_SCALING_KEYS)})")
    values = {}
    for key in ROPE_SCALING_KEYS[kind]:
        value = scaling.get(key)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
            raise ValueError(f"{key} = {value!r}: expected a positive number")
        values[key] = float(value)
    factor = values["factor"]
    if kind == "linear":
        return inv_freq / factor
    low, high, original = values["low_freq_factor"], values["high_freq_factor"], \
        values["original_max_position_embeddings"]
    if not low < high:
        raise ValueError(f"low_freq_factor = {low:g} is not below high_freq_factor = {high:g}")
    wavelength = 2 * math.pi / inv_freq
    s = (original / wavelength - low) / (high - low)
    blended = (1 - s) * inv_freq / factor + s * inv_freq
    return np.where(wavelength < original / high, inv_freq,
                    np.where(wavelength > original / low, inv_freq / factor, blended))


# The llama3 parameters tried by rope_scaling_of() when the blended band has
# fewer than two pairs to fit them to: Llama 3.1's first, then nearby ones.
LLAMA3_LOW_FACTORS = (1.0, 2.0, 0.5, 3.0, 4.0)
LLAMA3_HIGH_FACTORS = (4.0, 2.0, 3.0, 8.0, 1.5, 6.0, 16.0, 32.0)
LLAMA3_ORIGINAL_CONTEXTS = tuple(2 ** k for k in range(13, 21)) + tuple(2 ** k for k in range(12, 3, -1))


def _round_numbers(value):
    """value rounded to 1, 2, ... 9 significant digits, then itself: the
    candidates for a scaling parameter measured from float32 frequencies."""
    return dict.fromkeys([float(f"{value:.{digits}g}") for digits in range(1, 10)] + [float(value)])


def rope_scaling_of(inv_freq, head_dim, theta):
    """rope_inverse_frequencies()'s inverse: a scaling dict in Hugging Face's
    form (linear, or llama3) for which rope_inverse_frequencies(head_dim,
    theta, scaling) equals inv_freq (float32) exactly; None when no such
    rule is found. Both rules divide the slowest pair by factor. llama3's
    three other parameters are fixed only up to a common scale (its bands
    and blend depend on original_max_position_embeddings / low_freq_factor
    and / high_freq_factor); low_freq_factor is taken as 1 first."""
    inv_freq = np.asarray(inv_freq, dtype=np.float32)
    base = _unscaled_frequencies(head_dim, theta)
    wanted = inv_freq.astype(np.float64)
    if not (np.isfinite(wanted).all() and (wanted > 0).all()):
        return None
    candidates = []
    for factor in _round_numbers(base[-1] / wanted[-1]):
        candidates.append({"rope_type": "linear", "factor": factor})
        # the blended pairs: s = original / (high - low) / wavelength - low / (high - low)
        kept = inv_freq == base.astype(np.float32)
        divided = inv_freq == (base / factor).astype(np.float32)
        blended = ~kept & ~divided
        contexts = []
        if factor != 1 and blended.sum() >= 2:
            s = (wanted[blended] / base[blended] - 1 / factor) / (1 - 1 / factor)
            slope, intercept = np.polyfit(base[blended] / (2 * math.pi), s, 1)
            if slope > 0 and intercept < 0:
                for low in LLAMA3_LOW_FACTORS:      # slope = original / (high - low), intercept = -low / (...)
                    high = low - low / intercept
                    contexts += [(low, h, round(slope * (h - low))) for h in _round_numbers(high)]
        contexts += [(low, high, original) for low in LLAMA3_LOW_FACTORS for high in LLAMA3_HIGH_FACTORS
                     for original in LLAMA3_ORIGINAL_CONTEXTS if low < high]
        candidates += [{"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                        "original_max_position_embeddings": original} for low, high, original in contexts]
    for scaling in candidates:
        try:
            if np.array_equal(rope_inverse_frequencies(head_dim, theta, scaling), inv_freq):
                return scaling
        except ValueError:
            continue
    return None


def apply_rope(x, cos, sin):
    """Rotate the pairs (x[2i], x[2i+1]) of every head: x (B, T, H, D), cos/sin (T, D/2).

    Each pair is a complex number x[2i] + i x[2i+1], multiplied by
    cos + i sin; this is that product written out in real arithmetic."""
    x0, x1 = x[..., 0::2], x[..., 1::2]                       # (B, T, H, D/2)
    cos, sin = cos[:, None, :], sin[:, None, :]               # broadcast over heads
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2)                                # pairs back to (B, T, H, D)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps), scaled per channel; always in float32
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.attention_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.attention_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.attention_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA/MQA: query head h reads key/value head h // (n_heads / n_kv_heads),
        # so each kv head is repeated for its consecutive group of query heads
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)         # (B, H, T, T)
        future = torch.ones(T, T, dtype=torch.bool).triu(1)               # key after query
        scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(dim=-1) @ v                                  # (B, H, T, D)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)   # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)   # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)   # up

    def forward(self, x):
        # SwiGLU: the silu of the gate, times the up projection, projected down
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """The reference Llama. Its state_dict names are the ones every converter returns:

      tok_embeddings.weight                    (vocab_size, dim)
      layers.{i}.attention_norm.weight         (dim)
      layers.{i}.attention.wq.weight           (n_heads * head_dim, dim)
      layers.{i}.attention.wk.weight           (n_kv_heads * head_dim, dim)
      layers.{i}.attention.wv.weight           (n_kv_heads * head_dim, dim)
      layers.{i}.attention.wq.bias             (n_heads * head_dim), only with attention_bias
      layers.{i}.attention.wk.bias             (n_kv_heads * head_dim), likewise
      layers.{i}.attention.wv.bias             (n_kv_heads * head_dim), likewise
      layers.{i}.attention.wo.weight           (dim, n_heads * head_dim)
      layers.{i}.ffn_norm.weight               (dim)
      layers.{i}.feed_forward.w1.weight        (hidden_dim, dim)
      layers.{i}.feed_forward.w2.weight        (dim, hidden_dim)
      layers.{i}.feed_forward.w3.weight        (hidden_dim, dim)
      norm.weight                              (dim)
      output.weight                            (vocab_size, dim), absent when tied
      rope_inv_freq                            (head_dim / 2), only with scaled_rope

    These are Meta's names, so Meta checkpoints load as they are. The
    q/k biases, like the q/k rows, are in the interleaved RoPE layout."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if not args.tied:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.scaled_rope:    # the converters load the scaled frequencies; unscaled until then
            self.register_buffer("rope_inv_freq", torch.from_numpy(
                rope_inverse_frequencies(args.head_dim, args.rope_theta)))

    def forward(self, tokens):
        """tokens (B, T) int64, at positions 0..T-1 -> logits (B, T, vocab_size) float32."""
        T = tokens.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"{T} tokens is more than max_seq_len = {self.args.max_seq_len}")
        cos, sin = rope_cos_sin(T, self.args.head_dim, self.args.rope_theta,
                                self.rope_inv_freq if self.args.scaled_rope else None)
        h = self.tok_embeddings(tokens)                       # (B, T, dim)
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        classifier = self.tok_embeddings.weight if self.args.tied else self.output.weight
        return F.linear(h, classifier)                        # (B, T, vocab_size)


def generate_greedy(model, prompt_ids, n):
    """The n tokens that follow prompt_ids when each step takes the argmax (a list of ints)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def random_model(args, seed=0):
    """A reference Llama with random weights, the same for the same args and seed.

    The embedding and the matrices are N(0, 0.02^2), the usual Llama init.
    Norm weights are 1 + N(0, 0.1^2) rather than 1, so that an implementation
    which forgets to scale by them gives different logits. The caller's
    global RNG is left as it was."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):     # Llama() draws a default init we overwrite
        model = Llama(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.02 * noise)
    return model.eval()

