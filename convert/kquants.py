"""The K types q4_k, q5_k and q6_k (docs/FORMATS.md, "K types"): llama.cpp's
Q4_K, Q5_K and Q6_K blocks of 256 weights, encoded from float32 and decoded
here in numpy, whole tensors at a time (every block of a block of rows at
once); and the choice of a type for each matrix that llama.cpp's quantizer
makes for its Q4_K_M, Q5_K_M and Q6_K files."""

from convert.errors import np

BLOCK = 256                     # weights per block, in every K type
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}
K_TYPES = tuple(BLOCK_BYTES)
GGML_TYPES = {"q4_k": 12, "q5_k": 13, "q6_k": 14}   # ggml's numbers of the same blocks


# ----------------------------------------------------------------------------
# Encoding. Each matrix row is cut in blocks of 256; a block in sub-blocks
# (8 of 32 weights in q4_k and q5_k, 16 of 16 in q6_k), each with its own
# scale (and, in q4_k and q5_k, its own min), and those scales are quantized
# again against one float16 scale per block. The search for each sub-block's
# scale is llama.cpp's idea, in our code: try a few candidate scales around
# the one that maps the sub-block's range onto the integer range, refit
# scale (and min) to the rounded integers by weighted least squares, keep the
# fit with the least weighted squared error.

def _dot(a, b):
    """sum(a * b) over the last axis, without the product's temporary."""
    return np.einsum("...i,...i->...", a, b)


def _fit_error(scale, low, sums, level_sums):
    """sum w (scale l + low - x)^2 of each sub-block, from the sums alone
    (NaN for a fit that failed, which no comparison then picks)."""
    sw, sx, sx2 = sums
    sl, sl2, sxl = level_sums
    with np.errstate(invalid="ignore", over="ignore"):
        return scale * scale * sl2 + 2 * scale * (low * sl - sxl) + low * low * sw - 2 * low * sx + sx2


def _least_squares(sums, level_sums):
    """The weighted least-squares (scale, min) with x ~ scale * l + min, min
    held to at most 0 (the formats store -min unsigned), and whether there
    is one (False where the levels are all one)."""
    sw, sx, _ = sums
    sl, sl2, sxl = level_sums
    det = sw * sl2 - sl * sl
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (sw * sxl - sx * sl) / det
        low = (sl2 * sx - sl * sxl) / det
        clamped = low > 0                               # a positive min: fit the scale alone, min 0
        scale = np.where(clamped, sxl / sl2, scale)
    return scale, np.where(clamped, 0, low), det > 0


def _scale_min_search(x, nmax, rmin, rdelta, nstep):
    """Each sub-block of x (..., n)'s best (scale >= 0, min <= 0) for levels
    0..nmax, as x ~ scale * l + min, searched as llama.cpp's q4_k/q5_k
    quantizer does: weights the sub-block's rms plus |x| (large weights
    count more); first the scale that maps the range [min(x, 0), max(x)]
    onto 0..nmax, then nstep + 1 candidates (nmax + rmin + rdelta k) /
    range, each refitted, each range from the best min found so far."""
    rms = np.sqrt((x * x).mean(axis=-1, keepdims=True))
    w = rms + np.abs(x)
    wx = w * x
    sums = w.sum(-1), wx.sum(-1), _dot(wx, x)
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)
    flat = hi == lo                                     # all weights equal: min alone holds them
    levels = np.empty_like(x)

    def level_sums(top, low):
        span = hi - low
        with np.errstate(divide="ignore", invalid="ignore"):
            inverse = np.where(span > 0, top / span, 0)
        np.multiply(x - low[..., None], inverse[..., None], out=levels)
        np.clip(np.rint(levels, out=levels), 0, nmax, out=levels)
        wl = w * levels
        return wl.sum(-1), _dot(wl, levels), _dot(wx, levels)

    best_scale, best_low = (hi - lo) / nmax, lo
    best_error = _fit_error(best_scale, best_low, sums, level_sums(nmax, lo))
    for step in range(nstep + 1):
        candidate = level_sums(nmax + rmin + rdelta * step, best_low)
        scale, low, fitted = _least_squares(sums, candidate)
        error = _fit_error(scale, low, sums, candidate)
        better = fitted & (error < best_error)
        best_scale, best_low = np.where(better, scale, best_scale), np.where(better, low, best_low)
        best_error = np.where(better, error, best_error)
    return np.where(flat, 0, np.maximum(best_scale, 0)), np.where(flat, lo, best_low)


def _six_bits(values, top):
    """Non-negative per-sub-block values (..., 8) as 6-bit integers against one
    float16 scale per block, top / 63 (top: the block's largest value)."""
    d = (top / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(top[..., None] > 0, np.rint(values * (63 / top)[..., None]), 0)
    return np.clip(q, 0, 63).astype(np.uint8), d


def _quantize_affine(w, nmax, rmin, rdelta, nstep):
    """w (rows, cols) -> (levels (blocks, 8, 32) uint8, 6-bit scales and mins
    (blocks, 8), d and dmin (blocks,) float16): q4_k's and q5_k's numbers."""
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, 8, 32)
    scale, low = _scale_min_search(x, nmax, rmin, rdelta, nstep)
    ls, d = _six_bits(scale, scale.max(-1))
    lm, dmin = _six_bits(-low, (-low).max(-1))
    step = d.astype(np.float32)[:, None] * ls                    # each sub-block's scale, as decoded
    offset = dmin.astype(np.float32)[:, None] * lm
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(step[..., None] > 0, np.rint((x + offset[..., None]) / step[..., None]), 0)
    return np.clip(levels, 0, nmax).astype(np.uint8), ls, lm, d, dmin


def _pack_scales(ls, lm):
    """The 12 bytes that hold 8 six-bit scales and 8 six-bit mins (FORMATS.md's get_scale_min)."""
    s = np.empty(ls.shape[:-1] + (12,), np.uint8)
    s[..., 0:4] = ls[..., :4] | (ls[..., 4:] >> 4) << 6
    s[..., 4:8] = lm[..., :4] | (lm[..., 4:] >> 4) << 6
    s[..., 8:12] = (ls[..., 4:] & 15) | (lm[..., 4:] & 15) << 4
    return s


def _low_nibbles(levels):
    """qs: sub-blocks 2p and 2p + 1's levels (their low 4 bits) in the low and high nibbles of 32 bytes."""
    pairs = (levels & 15).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(-1, 128)


def _f16_bytes(d):
    return d.astype("<f2").view(np.uint8).reshape(-1, 2)


def encode_q4_k(w):
    """(rows, cols) float32, cols a multiple of 256 -> (rows, cols / 256 * 144) uint8 q4_k blocks."""
    rows = w.shape[0]
    levels, ls, lm, d, dmin = _quantize_affine(w, 15, -1.0, 0.1, 20)
    blocks = np.concatenate((_f16_bytes(d), _f16_bytes(dmin), _pack_scales(ls, lm), _low_nibbles(levels)), 1)
    return blocks.reshape(rows, -1)


def encode_q5_k(w):
    """(rows, cols) float32, cols a multiple of 256 -> (rows, cols / 256 * 176) uint8 q5_k blocks."""
    rows = w.shape[0]
    levels, ls, lm, d, dmin = _quantize_affine(w, 31, -0.5, 0.1, 15)
    high = (levels >> 4).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]   # bit j: sub-block j
    qh = np.bitwise_or.reduce(high, axis=1)
    blocks = np.concatenate((_f16_bytes(d), _f16_bytes(dmin), _pack_scales(ls, lm), qh, _low_nibbles(levels)), 1)
    return blocks.reshape(rows, -1)


def _symmetric_search(x):
    """Each sub-block of x (..., 16)'s best scale for levels -32..31, as x ~
    scale * l; weights x^2, as llama.cpp's q6_k gives them. The candidates map
    the sub-block's largest magnitude to about -32 (its sign kept: the level
    range has one more negative number)."""
    w = x * x
    wx = w * x
    biggest = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    safe = np.where(biggest != 0, biggest, 1)
    best_scale, best_fit = np.zeros_like(biggest), np.full_like(biggest, -1)
    levels = np.empty_like(x)
    for step in range(-9, 10):
        np.multiply(x, (-(32 + 0.1 * step) / safe)[..., None], out=levels)
        np.clip(np.rint(levels, out=levels), -32, 31, out=levels)
        sxl, sl2 = _dot(wx, levels), _dot(w * levels, levels)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(sl2 > 0, sxl / sl2, 0)
            fit = np.where(sl2 > 0, sxl * sxl / sl2, 0)   # the squared error saved: the more, the better
        better = fit > best_fit
        best_scale, best_fit = np.where(better, scale, best_scale), np.where(better, fit, best_fit)
    return np.where(biggest != 0, best_scale, 0)


def encode_q6_k(w):
    """(rows, cols) float32, cols a multiple of 256 -> (rows, cols / 256 * 210) uint8 q6_k blocks."""
    rows = w.shape[0]
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, 16, 16)
    scale = _symmetric_search(x)
    top = np.take_along_axis(scale, np.abs(scale).argmax(-1)[:, None], -1)[:, 0]   # signed, largest magnitude
    d = (top / -128).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(top[:, None] != 0, np.rint(scale * (-128 / top)[:, None]), 0)
    sc = np.clip(sc, -128, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(step[..., None] != 0, np.rint(x / step[..., None]), 0)
    q = (np.clip(levels, -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)     # (block, half, quarter, i)
    ql = (q[:, :, :2] & 15) | (q[:, :, 2:] & 15) << 4                              # (block, half, k % 2, i)
    qh = np.bitwise_or.reduce((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2)
    blocks = np.concatenate((ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _f16_bytes(d)), 1)
    return blocks.reshape(rows, -1)


ENCODERS = {"q4_k": encode_q4_k, "q5_k": encode_q5_k, "q6_k": encode_q6_k}


# ----------------------------------------------------------------------------
# Decoding, as docs/FORMATS.md draws the blocks (the tests hold it to gguf.quants).

def _unpack_scales(s):
    """FORMATS.md's get_scale_min for j = 0..7: (scales, mins), each (blocks, 8) float32."""
    s = s.astype(np.uint8)
    scale = np.concatenate((s[:, 0:4] & 63, (s[:, 8:12] & 15) | (s[:, 0:4] >> 6) << 4), 1)
    low = np.concatenate((s[:, 4:8] & 63, (s[:, 8:12] >> 4) | (s[:, 4:8] >> 6) << 4), 1)
    return scale.astype(np.float32), low.astype(np.float32)


def _f16(raw):
    return raw.copy().view("<f2").astype(np.float32)[:, 0]


def decode_kquant(raw, dtype):
    """(rows, bytes) uint8 blocks of a K type -> (rows, cols) float32 weights."""
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, BLOCK_BYTES[dtype])
    if dtype == "q6_k":
        ql, qh, sc, d = b[:, :128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32), b[:, 192:208], \
            _f16(b[:, 208:210])
        low = np.concatenate((ql & 15, ql >> 4), 2)                          # (block, half, quarter, i)
        high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
        q = (low | high << 4).astype(np.float32).reshape(-1, 16, 16) - 32
        w = d[:, None, None] * sc.view(np.int8).astype(np.float32)[..., None] * q
        return w.reshape(rows, -1)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    scale, low = _unpack_scales(b[:, 4:16])
    qs = b[:, -128:].reshape(-1, 4, 1, 32)
    q = np.concatenate((qs & 15, qs >> 4), 2).reshape(-1, 8, 32)
    if dtype == "q5_k":
        bits = (b[:, 16:48][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
        q = q | bits << 4
    w = (d[:, None] * scale)[..., None] * q - (dmin[:, None] * low)[..., None]
    return w.astype(np.float32).reshape(rows, -1)


def kquant_scales_finite(raw, dtype):
    """Whether every block's float16 scales (d, and dmin) are finite, which
    makes every weight finite: the levels and 6-bit scales are small integers."""
    b = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, BLOCK_BYTES[dtype])
    fields = b[:, 208:210] if dtype == "q6_k" else b[:, 0:4]
    return bool(np.isfinite(fields.copy().view("<f2")).all())


# ----------------------------------------------------------------------------
# The mixes: which type each matrix gets.

MIXES = ("q4_k_m", "q5_k_m", "q6_k")


def kquant_mix_types(args, mix):
    """{matrix name: weight type} for llama.cpp's file type mix (q4_k_m,
    q5_k_m or q6_k) on a model of args' shape, following what
    llama_tensor_get_type (src/llama-quant.cpp) does for a llama model
    without experts:
      - base type: Q4_K for Q4_K_M, Q5_K for Q5_K_M, Q6_K for Q6_K;
      - the classifier (output.weight), or for a tied model the token
        embedding that serves as it, is Q6_K (Q8_0 when its width is not a
        multiple of 256); an untied token embedding keeps the base type;
      - attn_v (our wv) and ffn_down (our w2) become Q6_K, for Q4_K_M and
        Q5_K_M, in the layers use_more_bits(i, n) picks: i < n/8, or
        i >= 7n/8, or (i - n/8) % 3 == 2 (integer division);
      - in a 70B model (llama.cpp: 80 layers with grouped-query attention)
        an attn_v still at Q4_K becomes Q5_K;
      - a K type on a matrix whose width is not a multiple of 256 falls
        back: llama.cpp's Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; we run
        neither Q5_0 nor Q5_1, so all three become q8_0 here (and f32 when
        the width is not a multiple of 32 either, where llama.cpp writes F16).
    wq, wk, wo, w1 (ffn_gate) and w3 (ffn_up) keep the base type."""
    base = {"q4_k_m": "q4_k", "q5_k_m": "q5_k", "q6_k": "q6_k"}[mix]
    n = args.n_layers

    def more_bits(i):
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    types = {"tok_embeddings.weight": "q6_k" if args.tied else base}
    if not args.tied:
        types["output.weight"] = "q6_k"
    for i in range(n):
        for part in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            types[f"layers.{i}.{part}.weight"] = base
        if mix != "q6_k" and more_bits(i):
            types[f"layers.{i}.attention.wv.weight"] = "q6_k"
            types[f"layers.{i}.feed_forward.w2.weight"] = "q6_k"
        if n == 80 and args.n_kv_heads < args.n_heads and types[f"layers.{i}.attention.wv.weight"] == "q4_k":
            types[f"layers.{i}.attention.wv.weight"] = "q5_k"
    widths = {"feed_forward.w2": args.hidden_dim, "attention.wo": args.n_heads * args.head_dim}
    for name in types:
        cols = next((w for part, w in widths.items() if f".{part}." in name), args.dim)
        if cols % BLOCK:
            types[name] = "q8_0" if cols % 32 == 0 else "f32"
    return types
