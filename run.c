/* run.c: inference for Llama-2-style decoder models, in one file of C.

   ./run model.bin -i "Once upon a time"

   The file reads from top to bottom like a book: the structs that hold a
   model (Config, Weights, RunState), the kernels as the plain loops that
   define them (for f32 weights), forward_tokens(); then the checkpoint
   format, loading and allocation; the other weight types (bf16, f16, q8_0,
   q4_0, the K types); sampling, generation, chat, the trace and the command
   line. The tokenizer lives in tokenizer.c and is included below as part
   of this one translation unit.

   After main() come the readers of llama2.c's legacy checkpoints and of
   llama.cpp's GGUF files, and an appendix that holds the fast kernels:
   SIMD (AVX2, AVX-512), tiles, packing and prefetching. They compute what
   the plain kernels do, only faster, and are chosen once at startup; a
   reader may skip them.
   Built with -DPLAIN (make run-plain), the engine runs on the plain
   kernels alone, and the appendix may be deleted.

   Rules of the file: C11 with POSIX (mmap, sigaction, getline) and GNU's
   memmem, libc and libm only. OpenMP pragmas are optional:
   without -fopenmp they are ignored and everything still runs, on one core.

   Legend for sizes, as in the comments on every tensor pointer:
     dim        width of the residual stream
     hidden     width of the SwiGLU MLP (hidden_dim)
     head_dim   width of one attention head
     q_dim      n_heads * head_dim, kv_dim = n_kv_heads * head_dim
     vocab      vocab_size
     ctx        positions the KV cache holds (<= max_seq_len)
     n          tokens in a forward pass: a prompt goes through in batches
                of up to RunState.batch tokens, each generated token alone
     rows, cols a weight matrix, (out, in): y = W x
*/

#define _GNU_SOURCE // memmem, getline
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef MAP_POPULATE
#define MAP_POPULATE 0 // Linux's read-ahead of a whole mapping; elsewhere (macOS) pages load as touched
#endif
#include "tokenizer.c"

/* ----------------------------------------------------------------------------
   The model: one struct per concern. */

/* The weight types: our checkpoints' codes 0 .. 6, then f16, which only a
   GGUF file's F16 matrices have, mapped in place (rows x cols IEEE halves). */
enum { WEIGHT_F32, WEIGHT_Q8_0, WEIGHT_Q4_0, WEIGHT_BF16, WEIGHT_Q4_K, WEIGHT_Q5_K, WEIGHT_Q6_K, WEIGHT_F16,
       WEIGHT_TYPES };
#define CHECKPOINT_TYPES WEIGHT_F16 // the types a checkpoint's table may name
static const char *const WEIGHT_NAMES[] = {"f32", "q8_0", "q4_0", "bf16", "q4_k", "q5_k", "q6_k", "f16"};
#define GROUP_SIZE 32   // weights per scale in q8_0 and q4_0, per input scale of every integer product
#define SUPER_BLOCK 256 // weights per block of the K types
static const int K_BLOCK_BYTES[WEIGHT_TYPES] = {[WEIGHT_Q4_K] = 144, [WEIGHT_Q5_K] = 176, [WEIGHT_Q6_K] = 210};
/* Bit masks of WEIGHT_* over the types a product or a model uses. */
#define TYPE_BIT(type) (1u << (type))
#define K_TYPES (TYPE_BIT(WEIGHT_Q4_K) | TYPE_BIT(WEIGHT_Q5_K) | TYPE_BIT(WEIGHT_Q6_K))
#define INTEGER_TYPES (TYPE_BIT(WEIGHT_Q8_0) | TYPE_BIT(WEIGHT_Q4_0) | K_TYPES) // products on int8 inputs
#define FLOAT_TYPES (TYPE_BIT(WEIGHT_F32) | TYPE_BIT(WEIGHT_BF16) | TYPE_BIT(WEIGHT_F16)) // products on f32 inputs
static int is_k_type(int type) { return (TYPE_BIT(type) & K_TYPES) != 0; }
#define ROW_BLOCK 32  // weight rows the threads take at a time (a multiple of every kernel's tile)
#define DEFAULT_BATCH 256 // prompt tokens per forward pass (-b)
#define MAX_BATCH 4096

typedef struct {
    int dim;             // width of the residual stream
    int hidden_dim;      // width of the MLP
    int n_layers;
    int n_heads;         // query heads
    int n_kv_heads;      // key/value heads, n_heads % n_kv_heads == 0
    int head_dim;
    int vocab_size;
    int max_seq_len;     // positions the model was trained for
    float rope_theta;
    float norm_eps;
    int tied_classifier; // 1: the classifier is the token embedding
    int weight_type;     // WEIGHT_*: how the matrices are stored, if all alike
    const uint8_t *matrix_types; // version 3: each matrix's WEIGHT_*, in file order; else NULL
    unsigned types_used; // TYPE_BIT()s of the matrices' types
    unsigned flags;      // FLAG_*: the optional tensors the file holds
    int legacy;          // 1: a llama2.c checkpoint (generation stops at BOS)
} Config;

/* A weight matrix (rows, cols) = (out, in), stored as its weight type says
   (see the checkpoint format, after forward_tokens()); w[r] is the row
   that makes output r. */
typedef struct {
    const void *values;      // f32, bf16, f16, q8_0: (rows, cols); q4_0: (rows, cols / 2) bytes;
                             // K types: (rows, cols / SUPER_BLOCK) blocks
    const uint8_t *scales;   // (rows, cols / GROUP_SIZE) f16; q8_0 and q4_0 only
    int rows, cols;
    int type;                // WEIGHT_*
    int interleaved;         // q8_0, q4_0: 1 when each group's scale sits just before its values,
                             // as in GGUF's blocks (see group_values()); 0 in our files
} Matrix;

typedef struct {
    const float *attn_norm; // (dim)
    Matrix wq;              // (q_dim, dim)
    Matrix wk;              // (kv_dim, dim)
    Matrix wv;              // (kv_dim, dim)
    Matrix wo;              // (dim, q_dim)
    const float *ffn_norm;  // (dim)
    Matrix w1;              // (hidden, dim) gate
    Matrix w2;              // (dim, hidden) down
    Matrix w3;              // (hidden, dim) up
    const float *bq, *bk, *bv; // (q_dim), (kv_dim), (kv_dim) biases; NULL without FLAG_QKV_BIAS
} LayerWeights;

typedef struct {
    Matrix token_embedding;   // (vocab, dim)
    LayerWeights *layers;     // (n_layers)
    const float *final_norm;  // (dim)
    Matrix classifier;        // (vocab, dim), the embedding when tied
    double *rope_inv_freq;    // (head_dim / 2) pair i turns by pos * rope_inv_freq[i]
} Weights;

/* Vectors quantized to int8 in groups of GROUP_SIZE, as the integer dot
   products of q8_0 and q4_0 weights take them: x[i] ~ d[i / 32] * q[i].
   One vector of n values, or a batch of them, one after another. */
typedef struct {
    int8_t *q;           // (n) values in -127..127
    float *d;            // (n / GROUP_SIZE) scale of each group
    int32_t *half_sums;  // (n / 16) the sum of each 16 values of q, and
    int32_t *group_sums; // (n / GROUP_SIZE) of each group, for the fast kernels
    float *scaled_sums;  // (n / GROUP_SIZE) d times the group's sum: AVX2's K kernels (quantize_input_k_avx2())
} QuantizedVector;

/* The input x (n, cols) of the matrix products under way, in the forms the
   kernels take (prepare_input()), and room for them to work (the fast ones
   may repack each thread's block of weights there).
   widest = max(dim, q_dim, hidden), the widest input of a product. */
typedef struct {
    const float *x;       // (n, cols)
    int n;
    QuantizedVector q;    // (batch, widest)
    QuantizedVector rest; // (batch, widest) q8_0 only: what q leaves, x - d q, quantized in turn
    int16_t *wide;        // (batch, widest) q8_0 only, as the AVX2 kernels take it: x / wide_d, rounded
    float *wide_d;        // (batch, widest / GROUP_SIZE) its scale per group
    float *triples;       // (batch, widest + 16) f32, bf16 and f16 on AVX2: x packed by token triples
    void *room;           // (threads, room_size) bytes the products may work in (Kernels.product_room)
    size_t room_size;
    float *up;            // (threads, batch, ROW_BLOCK) gate_up()'s up projection, a block at a time
    int batch;
} ProductScratch;

/* One layer's KV cache: keys and values (n_kv_heads, ctx, head_dim), f32,
   or f16 when f16 is set, each head's positions one after another. Query
   head h reads kv head h / (n_heads / n_kv_heads). */
typedef struct {
    void *keys, *values;
    int f16;
    int ctx, n_heads, n_kv_heads, head_dim;
} KVCache;

typedef struct Trace Trace; // --trace's statistics: see the trace, after forward_tokens()
enum { TRACE_ATTENTION, TRACE_MLP }; // a layer's two blocks

typedef struct {
    float *x;           // (batch, dim) residual stream, one row per token
    float *xb;          // (batch, dim) normed input of a block, then its output
    float *q;           // (batch, q_dim) queries, then attention's output in their place
    float *k;           // (batch, kv_dim) keys, before they go into the cache
    float *v;           // (batch, kv_dim) values, likewise
    float *hb;          // (batch, hidden) gate, then the SwiGLU product
    float *scratch;     // (kernels.attention_scratch()) the attention kernel's
    float *rope_cos;    // (batch, head_dim / 2) rotation of each position
    float *rope_sin;    // (batch, head_dim / 2)
    float *logits;      // (logit_rows, vocab)
    ProductScratch products; // the input of each product in other forms, the products' room
    void *key_cache;    // (n_layers, n_kv_heads, ctx, head_dim) f32, or f16 if kv_f16
    void *value_cache;  // (n_layers, n_kv_heads, ctx, head_dim) likewise
    int kv_f16;         // 1: the cache holds f16 (for quantized weights)
    int ctx;            // positions the cache holds
    int batch;          // tokens one forward pass takes, at most
    int logit_rows;     // rows the logits buffer holds
    int threads;        // OpenMP threads (1 without OpenMP)
    Trace *trace;       // --trace statistics of the last pass; NULL when off
} RunState;

typedef struct {
    Config config;
    Weights weights;
    RunState state;
    const char *path;
    void *data;         // the memory-mapped file; weights point into it
    void *converted;    // a GGUF file's tensors converted at load (the GGUF reader); else NULL
    size_t file_size;
    dev_t device;       // the file's identity, so that no output overwrites it
    ino_t inode;
} Transformer;

static void *xcalloc(size_t count, size_t size, const char *what); // zeroed memory, or exit: see Errors

/* ----------------------------------------------------------------------------
   Kernels, as the plain loops that define them: outputs first, sizes
   explicit (see the legend at the top); forward_tokens() is a list of calls
   to them. The fast kernels of the appendix compute the same, faster, and
   the tests hold them to these. */

/* This thread's number: 0 outside a parallel region or without OpenMP. */
static int thread_num(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* ---- Elementwise kernels, on n rows at a time */

/* One row's out = x / sqrt(sum_sq / dim + eps) * weight, sum_sq that of x^2. */
static void rms_scale(float *out, const float *x, const float *weight, int dim, double sum_sq, float eps) {
    float scale = (float)(1.0 / sqrt(sum_sq / dim + eps));
    for (int i = 0; i < dim; i++) out[i] = x[i] * scale * weight[i];
}

/* out = x / rms(x) * weight for each of the n rows of x (n, dim), with
   rms(x) = sqrt(mean(x^2) + eps). The sum runs in double so that long rows
   lose no precision. out may alias x. */
static void rmsnorm(float *out, const float *x, const float *weight, int n, int dim, float eps) {
    #pragma omp parallel for if (n > 1)
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * dim;
        float *ot = out + (size_t)t * dim;
        double sum_sq = 0.0;
        for (int i = 0; i < dim; i++) sum_sq += (double)xt[i] * xt[i];
        rms_scale(ot, xt, weight, dim, sum_sq, eps);
    }
}

/* The rotations RoPE applies at positions pos .. pos + n - 1: at position p,
   pair i of every head turns by p * inv_freq[i]. cos_out and sin_out are
   (n, half). Angles are computed in double, once per token, and shared by
   all layers. */
static void rope_angles(float *cos_out, float *sin_out, int pos, int n, int half, const double *inv_freq) {
    for (int t = 0; t < n; t++)
        for (int i = 0; i < half; i++) {
            double angle = (double)(pos + t) * inv_freq[i];
            cos_out[(size_t)t * half + i] = (float)cos(angle);
            sin_out[(size_t)t * half + i] = (float)sin(angle);
        }
}

/* Rotates the interleaved pairs (x[2i], x[2i+1]) of each of n_heads heads,
   in each of the n rows of x (n, n_heads * head_dim), row t by row t of the
   tables (n, head_dim / 2). */
static void rope(float *x, int n, int n_heads, int head_dim, const float *cos_t, const float *sin_t) {
    int half = head_dim / 2;
    #pragma omp parallel for if (n > 1)
    for (int t = 0; t < n; t++)
        for (int h = 0; h < n_heads; h++) {
            float *head = x + ((size_t)t * n_heads + h) * head_dim;
            const float *c = cos_t + (size_t)t * half, *s = sin_t + (size_t)t * half;
            for (int i = 0; i < half; i++) {
                float a = head[2 * i], b = head[2 * i + 1];
                head[2 * i] = a * c[i] - b * s[i];
                head[2 * i + 1] = a * s[i] + b * c[i];
            }
        }
}

/* x = exp(x - max) / sum, in place. */
static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++) if (x[i] > max) max = x[i];
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; i++) x[i] *= inv;
}

/* gate = silu(gate) * up, elementwise: the SwiGLU of the MLP. */
static void swiglu(float *gate, const float *up, int n) {
    for (int i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

/* x += y: the residual connection. */
static void add(float *x, const float *y, int n) {
    for (int i = 0; i < n; i++) x[i] += y[i];
}

/* x (n, cols) += bias (cols), row by row. */
static void add_bias(float *x, const float *bias, int n, int cols) {
    for (int t = 0; t < n; t++) add(x + (size_t)t * cols, bias, cols);
}

/* ---- Matrix products

   out (n, rows) = x (n, cols) @ W^T: for each row r of W and each token t,
   the dot product of row r with x[t]. A kernel computes the rows r0 ..
   r1 - 1, into out (n, r1 - r0; row stride ldo), from the input that
   prepare_input() put into in; linear() below shares the rows out among
   the threads. One kernel per weight type.

   The float kernels add each product by fmaf(), one rounding per term,
   written out: left to itself, a compiler may fuse some multiply-adds and
   not others (GCC vectorises f32's products, rounding each, and fuses the
   tail's), so that f32, bf16 and f16 weights of the same values would not
   give the same bits. */

static void dequantize_f32(float *out, const Matrix *w, int row, int k0, int kn) {
    memcpy(out, (const float *)w->values + (size_t)row * w->cols + k0, (size_t)kn * sizeof(float));
}

static void matmul_f32(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    int cols = w->cols;
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < in->n; t++) {
            const float *row = (const float *)w->values + (size_t)r * cols;
            const float *x = in->x + (size_t)t * cols;
            float sum = 0.0f;
            for (int i = 0; i < cols; i++) sum = fmaf(row[i], x[i], sum);
            out[(size_t)t * ldo + r - r0] = sum;
        }
}

/* ---- Halves: f16, which the KV cache may hold (and the scales of q8_0 and q4_0) */

/* An IEEE half (the scales of q8_0 and q4_0, f16 weights) as a float, exactly. */
static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = h >> 10 & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) { // zero or subnormal: man x 2^-24
        float f = (float)man * 0x1p-24f;
        return sign ? -f : f;
    }
    bits = exp == 0x1f ? sign | 0x7f800000u | man << 13      // inf, nan
                       : sign | (exp + 112) << 23 | man << 13; // rebias 15 -> 127
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* An IEEE half from a float, rounded to nearest even (the f16 KV cache). */
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = x >> 16 & 0x8000, abs = x & 0x7fffffff;
    if (abs > 0x7f800000) return (uint16_t)(sign | 0x7e00);      // nan
    if (abs >= 0x477ff000) return (uint16_t)(sign | 0x7c00);     // 65520 and up round to inf
    if (abs < 0x38800000) {                                        // below 2^-14: subnormal, in 2^-24 steps
        float a;
        memcpy(&a, &abs, sizeof a);
        return (uint16_t)(sign | (uint32_t)nearbyintf(a * 0x1p24f));
    }
    return (uint16_t)(sign | (abs + 0xfff + (abs >> 13 & 1) - 0x38000000) >> 13); // rebias 127 -> 15
}

/* out (n) = x as halves: the f16 cache's stores. */
static void to_halves(uint16_t *out, const float *x, int n) {
    for (int i = 0; i < n; i++) out[i] = f32_to_f16(x[i]);
}

/* ---- Attention */

/* Element i of a cache's keys or values, as a float. */
static float cache_at(const void *cache, size_t i, int f16) {
    return f16 ? f16_to_f32(((const uint16_t *)cache)[i]) : ((const float *)cache)[i];
}

/* scores (n_pos) = q . k / sqrt(head_dim) for the keys k of positions 0 ..
   n_pos - 1 of kv head h, q (head_dim). */
static void attention_scores(float *scores, const float *q, const KVCache *kv, int h, int n_pos) {
    size_t head = (size_t)h * kv->ctx * kv->head_dim;
    float scale = 1.0f / sqrtf((float)kv->head_dim);
    for (int p = 0; p < n_pos; p++) {
        float sum = 0.0f;
        for (int i = 0; i < kv->head_dim; i++)
            sum += q[i] * cache_at(kv->keys, head + (size_t)p * kv->head_dim + i, kv->f16);
        scores[p] = sum * scale;
    }
}

/* out (head_dim) = the sum over positions p < n_pos of weights[p] times
   the value of position p of kv head h. */
static void attention_mix(float *out, const float *weights, const KVCache *kv, int h, int n_pos) {
    size_t head = (size_t)h * kv->ctx * kv->head_dim;
    for (int i = 0; i < kv->head_dim; i++) out[i] = 0.0f;
    for (int p = 0; p < n_pos; p++)
        for (int i = 0; i < kv->head_dim; i++)
            out[i] += weights[p] * cache_at(kv->values, head + (size_t)p * kv->head_dim + i, kv->f16);
}

/* Causal attention for n queries q (n, q_dim) at positions pos .. pos + n - 1,
   whose keys and values are already in the cache: query t sees positions
   0 .. pos + t. out (n, q_dim) = softmax(q k^T / sqrt(head_dim)) v, per
   head; with n_kv_heads == n_heads that is MHA, with fewer GQA, with one
   MQA. out may be q: each head's output replaces its query. scratch is
   attention_plain_scratch() floats: one query's weights per thread. */
static size_t attention_plain_scratch(int ctx, int n_heads, int head_dim, int threads) {
    (void)n_heads, (void)head_dim;
    return (size_t)threads * ctx;
}

static void attention_plain(float *out, const float *q, const KVCache *kv, int pos, int n, float *scratch) {
    int group = kv->n_heads / kv->n_kv_heads, q_dim = kv->n_heads * kv->head_dim;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int t = 0; t < n; t++)
        for (int h = 0; h < kv->n_heads; h++) {
            float *weights = scratch + (size_t)thread_num() * kv->ctx; // (ctx)
            size_t at = (size_t)t * q_dim + (size_t)h * kv->head_dim;
            attention_scores(weights, q + at, kv, h / group, pos + t + 1);
            softmax(weights, pos + t + 1);
            attention_mix(out + at, weights, kv, h / group, pos + t + 1);
        }
}

/* ---- The kernel table: what each weight type needs (its input's form, its
   product, its row decoder), attention, the SwiGLU, RMSNorm and the f16
   cache's stores, called through it. It starts at
   the plain kernels (f32's above, the other types' after loading); in a
   build with the appendix, choose_fast_kernels() points it at the fastest
   ones this CPU has, once, before the first forward pass (attention:
   attention_fast(), on every CPU, ARM included; attention_plain() only in
   make run-plain). */
typedef void InputKernel(ProductScratch *in, const float *x, int n, int cols);
typedef void MatmulKernel(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in);
typedef void DequantizeKernel(float *out, const Matrix *w, int row, int k0, int kn);
typedef void AttentionKernel(float *out, const float *q, const KVCache *kv, int pos, int n, float *scratch);
typedef size_t AttentionScratch(int ctx, int n_heads, int head_dim, int threads);
typedef void SwigluKernel(float *gate, const float *up, int n);
typedef void RmsnormKernel(float *out, const float *x, const float *weight, int n, int dim, float eps);
typedef void HalvesKernel(uint16_t *out, const float *x, int n);
typedef size_t ProductRoom(const Config *c, int batch);
/* The other weight types' kernels, after loading ("Other weight types"). */
static InputKernel quantize_input, quantize_input_q8_0;
static MatmulKernel matmul_q8_0, matmul_q4_0, matmul_halves, matmul_k;
static DequantizeKernel dequantize_q8_0, dequantize_q4_0, dequantize_halves, dequantize_k;

typedef struct {                             // by weight type, WEIGHT_*:
    InputKernel *prepare[WEIGHT_TYPES];      //   puts x in the form the products take (NULL: as it is)
    MatmulKernel *matmul[WEIGHT_TYPES];      //   the products
    DequantizeKernel *dequantize[WEIGHT_TYPES]; // a row of weights as floats
    AttentionKernel *attention;
    AttentionScratch *attention_scratch;     // the floats of scratch the attention kernel needs
    SwigluKernel *swiglu;                    // the MLP's silu(gate) * up
    RmsnormKernel *rmsnorm;
    HalvesKernel *to_halves;                 // floats into an f16 cache
    ProductRoom *product_room;               // the bytes each thread's products may work in (NULL: none)
} Kernels;

static Kernels kernels = {
    {NULL, quantize_input_q8_0, quantize_input, NULL, NULL, NULL, NULL, NULL},
    {matmul_f32, matmul_q8_0, matmul_q4_0, matmul_halves, matmul_k, matmul_k, matmul_k, matmul_halves},
    {dequantize_f32, dequantize_q8_0, dequantize_q4_0, dequantize_halves, dequantize_k, dequantize_k, dequantize_k,
     dequantize_halves},
    attention_plain, attention_plain_scratch, swiglu, rmsnorm, to_halves, NULL};
#ifndef PLAIN
static void choose_fast_kernels(void); // the appendix
#endif

/* ---- The KV cache's stores */

/* Keys and values of n new tokens, k and v (n, kv_dim), into the cache at
   positions pos .. pos + n - 1. */
static void cache_store(const KVCache *kv, const float *k, const float *v, int pos, int n) {
    int head_dim = kv->head_dim;
    #pragma omp parallel for if (n > 1)
    for (int t = 0; t < n; t++)
        for (int h = 0; h < kv->n_kv_heads; h++) {
            size_t from = ((size_t)t * kv->n_kv_heads + h) * head_dim, to = ((size_t)h * kv->ctx + pos + t) * head_dim;
            if (kv->f16) {
                kernels.to_halves((uint16_t *)kv->keys + to, k + from, head_dim);
                kernels.to_halves((uint16_t *)kv->values + to, v + from, head_dim);
            } else {
                memcpy((float *)kv->keys + to, k + from, (size_t)head_dim * sizeof(float));
                memcpy((float *)kv->values + to, v + from, (size_t)head_dim * sizeof(float));
            }
        }
}

/* Puts the input x (n, cols) of products with weights of the given types
   (TYPE_BIT()s) into in, in the forms their kernels take: each type's
   prepare kernel, once. */
static void prepare_input(ProductScratch *in, unsigned types, const float *x, int n, int cols) {
    InputKernel *done[WEIGHT_TYPES];
    in->x = x, in->n = n;
    for (int type = 0; type < WEIGHT_TYPES; type++) {
        done[type] = types & TYPE_BIT(type) ? kernels.prepare[type] : NULL;
        int again = 0;
        for (int earlier = 0; earlier < type; earlier++) again |= done[earlier] == done[type];
        if (done[type] && !again) done[type](in, x, n, cols);
    }
}

/* out (kn) = columns k0 .. k0 + kn - 1 of row `row` of w, as floats. */
static void dequantize_row(float *out, const Matrix *w, int row, int k0, int kn) {
    kernels.dequantize[w->type](out, w, row, k0, kn);
}

/* x (n, dim) = the embedding rows of n tokens. */
static void embed(float *x, const Matrix *embedding, const int *tokens, int n) {
    for (int t = 0; t < n; t++)
        dequantize_row(x + (size_t)t * embedding->cols, embedding, tokens[t], 0, embedding->cols);
}


/* ---- Matrix products with the threads around them */

/* One product of linear(): out (n, w->rows) = x (n, cols) @ W^T, as
   torch.nn.functional.linear(x, W). */
typedef struct {
    float *out;
    const Matrix *w;
} Product;

static int row_blocks(const Matrix *w) { return (w->rows + ROW_BLOCK - 1) / ROW_BLOCK; }

/* The count products p, which read the same input x (n, cols), in one
   pass: the rows of all of them, in blocks of ROW_BLOCK, are shared out
   among the threads, one fork and one join for all (q, k and v are one
   pass). The guided schedule hands out long runs of blocks first, which
   the prefetchers stream at full speed, then shorter ones to even out the
   end. A row comes out the same whichever thread computes it. */
static void linear(const Product *p, int count, const float *x, int n, ProductScratch *ps) {
    unsigned types = 0;
    int blocks = 0;
    for (int i = 0; i < count; i++) blocks += row_blocks(p[i].w), types |= TYPE_BIT(p[i].w->type);
    prepare_input(ps, types, x, n, p[0].w->cols);
    #pragma omp parallel for schedule(guided)
    for (int u = 0; u < blocks; u++) {
        int i = 0, block = u;
        while (block >= row_blocks(p[i].w)) block -= row_blocks(p[i++].w);
        const Matrix *w = p[i].w;
        int r0 = block * ROW_BLOCK, r1 = r0 + ROW_BLOCK < w->rows ? r0 + ROW_BLOCK : w->rows;
        kernels.matmul[w->type](p[i].out + r0, w->rows, w, r0, r1, ps);
    }
}

/* h (n, hidden) = silu(x @ W1^T) * (x @ W3^T): the gate and up projections
   of the MLP and its SwiGLU in one pass, each block of rows of W1 taken
   with the same rows of W3, whose products wait in the thread's block of
   ps->up. */
static void gate_up(float *h, const Matrix *w1, const Matrix *w3, const float *x, int n, ProductScratch *ps) {
    prepare_input(ps, TYPE_BIT(w1->type) | TYPE_BIT(w3->type), x, n, w1->cols);
    int hidden = w1->rows;
    #pragma omp parallel for schedule(guided)
    for (int u = 0; u < row_blocks(w1); u++) {
        int r0 = u * ROW_BLOCK, r1 = r0 + ROW_BLOCK < hidden ? r0 + ROW_BLOCK : hidden;
        float *up = ps->up + (size_t)thread_num() * ps->batch * ROW_BLOCK; // (n, ROW_BLOCK)
        kernels.matmul[w1->type](h + r0, hidden, w1, r0, r1, ps);
        kernels.matmul[w3->type](up, ROW_BLOCK, w3, r0, r1, ps);
        for (int t = 0; t < n; t++) kernels.swiglu(h + (size_t)t * hidden + r0, up + (size_t)t * ROW_BLOCK, r1 - r0);
    }
}

/* ----------------------------------------------------------------------------
   The forward pass: n tokens at positions pos .. pos + n - 1 in, logits out.
   Keys and values of these positions go into the cache, so each token
   attends to every earlier position without recomputing it. The n tokens
   go through every layer together, as a matrix (n, dim); n = 1 is a
   generated token. Returns the logits of the last logit_rows tokens,
   (logit_rows, vocab); with logit_rows = 0 (a prompt's batch before the
   last) the classifier is skipped and it returns NULL. */

static void trace_attention(Trace *tr, int layer, const float *q, const KVCache *kv, int pos, int n);
static void trace_residual(Trace *tr, int layer, int block, const float *x, const float *output, int n);

static float *forward_tokens(Transformer *t, const int *tokens, int n, int pos, int logit_rows) {
    const Config *c = &t->config;
    const Weights *w = &t->weights;
    RunState *s = &t->state;
    int dim = c->dim, head_dim = c->head_dim, q_dim = c->n_heads * head_dim, kv_dim = c->n_kv_heads * head_dim;
    if (logit_rows > s->logit_rows) {
        free(s->logits);
        s->logits = xcalloc((size_t)logit_rows * c->vocab_size, sizeof(float), "logits");
        s->logit_rows = logit_rows;
    }

    embed(s->x, &w->token_embedding, tokens, n);                            // token embedding
    rope_angles(s->rope_cos, s->rope_sin, pos, n, head_dim / 2, w->rope_inv_freq); // rotations of these positions

    for (int l = 0; l < c->n_layers; l++) {
        const LayerWeights *lw = &w->layers[l];
        size_t layer = (size_t)l * s->ctx * kv_dim * (s->kv_f16 ? 2 : sizeof(float));
        KVCache kv = {(char *)s->key_cache + layer, (char *)s->value_cache + layer, s->kv_f16, s->ctx,
                      c->n_heads, c->n_kv_heads, head_dim};                 // this layer's keys and values
        Product qkv[3] = {{s->q, &lw->wq}, {s->k, &lw->wk}, {s->v, &lw->wv}};
        Product attention_out = {s->xb, &lw->wo}, down = {s->xb, &lw->w2};

        kernels.rmsnorm(s->xb, s->x, lw->attn_norm, n, dim, c->norm_eps);  // attention norm
        linear(qkv, 3, s->xb, n, &s->products);                             // q, k, v in one pass
        if (lw->bq) add_bias(s->q, lw->bq, n, q_dim);                       // their biases (Qwen2), if stored
        if (lw->bk) add_bias(s->k, lw->bk, n, kv_dim);
        if (lw->bv) add_bias(s->v, lw->bv, n, kv_dim);
        rope(s->q, n, c->n_heads, head_dim, s->rope_cos, s->rope_sin);      // rotate queries
        rope(s->k, n, c->n_kv_heads, head_dim, s->rope_cos, s->rope_sin);   // rotate keys
        cache_store(&kv, s->k, s->v, pos, n);                               // into the cache
        if (s->trace) trace_attention(s->trace, l, s->q, &kv, pos, n);      // --trace: weights
        kernels.attention(s->q, s->q, &kv, pos, n, s->scratch);             // softmax(q k^T / sqrt(head_dim)) v
        linear(&attention_out, 1, s->q, n, &s->products);                   // output projection
        add(s->x, s->xb, n * dim);                                          // residual
        if (s->trace) trace_residual(s->trace, l, TRACE_ATTENTION, s->x, s->xb, n); // --trace

        kernels.rmsnorm(s->xb, s->x, lw->ffn_norm, n, dim, c->norm_eps);    // MLP norm
        gate_up(s->hb, &lw->w1, &lw->w3, s->xb, n, &s->products);           // silu(w1 x) * (w3 x)
        linear(&down, 1, s->hb, n, &s->products);                           // down = w2 h
        add(s->x, s->xb, n * dim);                                          // residual
        if (s->trace) trace_residual(s->trace, l, TRACE_MLP, s->x, s->xb, n); // --trace
    }

    if (logit_rows == 0) return NULL;
    float *last = s->x + (size_t)(n - logit_rows) * dim;                    // (logit_rows, dim)
    Product classifier = {s->logits, &w->classifier};
    kernels.rmsnorm(last, last, w->final_norm, logit_rows, dim, c->norm_eps); // final norm
    linear(&classifier, 1, last, logit_rows, &s->products);                 // classifier
    return s->logits;
}

/* One token at position pos: its logits (vocab). */
static float *forward(Transformer *t, int token, int pos) {
    return forward_tokens(t, &token, 1, pos, 1);
}

/* ----------------------------------------------------------------------------
   The checkpoint format (version 2; version 1 is the same without flags;
   version 3 gives each matrix its own type, below). Little-endian throughout.

   offset  size  type     field
        0     4  char[4]  magic "LLAM"
        4     4  u32      version         1, or 2 when flags is not 0
        8     4  i32      dim
       12     4  i32      hidden_dim
       16     4  i32      n_layers
       20     4  i32      n_heads
       24     4  i32      n_kv_heads      divides n_heads: MHA, GQA, MQA
       28     4  i32      head_dim        even; not assumed to be dim / n_heads
       32     4  i32      vocab_size
       36     4  i32      max_seq_len
       40     4  f32      rope_theta
       44     4  f32      norm_eps
       48     4  u32      tied_classifier 1: logits reuse token_embedding
       52     4  u32      weight_type     of the matrices: 0 f32, 1 q8_0, 2 q4_0, 3 bf16
                                          (version 3: 0xFFFFFFFF)
       56     4  u32      group_size      32 for q8_0 and q4_0, 0 for f32 and bf16 (and v3)
       60     4  u32      flags           version 2: bit 0 q/k/v biases, bit 1 RoPE
                                          frequencies stored; version 1: zero
       64   192  zero                     the header is 256 bytes
      256     M  u8[M]    version 3 only: the type of each matrix, in file
                                          order (M = 1 + 7 n_layers, + 1 untied);
                                          adds 4 q4_k, 5 q5_k, 6 q6_k
    256+M        tensors, each at an offset that is a multiple of 64:

      +-----------------------------------------------+
      | token_embedding  (vocab, dim)                 |
      | rope_inv_freq (head_dim / 2) f32   if bit 1   |
      +-----------------------------------------------+  \
      | attn_norm (dim)                               |   |
      | wq (q_dim, dim)   wk (kv_dim, dim)            |   |
      | wv (kv_dim, dim)                              |   |
      | bq (q_dim)  bk, bv (kv_dim) f32    if bit 0   |   |  once per layer
      | wo (dim, q_dim)                               |   |
      | ffn_norm (dim)                                |   |
      | w1 (hidden, dim)  w2 (dim, hidden)            |   |
      | w3 (hidden, dim)                              |   |
      +-----------------------------------------------+  /
      | final_norm (dim)                              |
      | classifier (vocab, dim)  if tied_classifier=0 |
      +-----------------------------------------------+  end of file

   Matrices are row-major (out, in), as nn.Linear stores them: y = W x.
   RoPE rotates the interleaved pairs (x[2i], x[2i+1]) of each head (Meta's
   convention) by pos * rope_inv_freq[i]: stored (Llama 3's or linear
   scaling), else theta^(-2i / head_dim). export.py permutes Hugging Face's
   q/k rows (and biases) into it. The biases are added after the products.

   Norms are f32. Every matrix, the token embedding and the classifier
   included, is stored in the weight type; a (rows, cols) matrix is
     f32   rows x cols float32
     bf16  rows x cols bfloat16: the top 16 bits of a float32 rounded to
           nearest even (export.py rounds; run.c widens exactly)
     q8_0  values: rows x cols int8, then from the next multiple of 64
           scales: rows x cols/32 float16, one per group of 32 weights of a row
             group g of row r:  | q[0] | q[1] | ... | q[31] |
             w[r][32g + i] = d[r][g] * q[i],   q in -127..127
     q4_0  values: rows x cols/2 bytes, 16 per group; then the scales as q8_0
             byte j of a group: | q[j + 16] (high nibble) | q[j] (low nibble) |
             w[r][32g + i] = d[r][g] * (q[i] - 8),   q in 0..15
   so q8_0 and q4_0 need dim, hidden_dim and q_dim to be multiples of 32.
   They are llama.cpp's Q8_0 and Q4_0 blocks, scales gathered apart.
     q4_k, q5_k, q6_k  rows x cols/256 blocks of llama.cpp's Q4_K, Q5_K, Q6_K,
           byte for byte (144, 176, 210 bytes): 256 weights of a row each, in
           sub-blocks of 32 (q4_k, q5_k: w = d scale q - dmin min, 6-bit scale
           and min, q of 4 or 5 bits) or 16 (q6_k: w = d scale (q - 32), an
           int8 scale, q of 6 bits); dequantize_block() reads them, and
           docs/FORMATS.md draws them.

   llama2.c's legacy checkpoints are read as they are: a header of seven
   int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
   max_seq_len; a negative vocab_size means an untied classifier follows),
   then packed f32 tensors stored tensor by tensor across layers, with two
   RoPE tables (max_seq_len, head_dim / 2) before the classifier that we skip.

   llama.cpp's GGUF files are read too, by the reader after main(): their
   matrices mapped in place where they are in a type of ours, else converted
   once at load (docs/FORMATS.md).
   ------------------------------------------------------------------------- */

#define CHECKPOINT_MAGIC "LLAM"
#define CHECKPOINT_VERSION 3 // 2 has one weight type for all matrices, 1 no flags either
#define MIXED_TYPES 0xFFFFFFFFu // version 3's weight_type: the types follow the header
#define FLAG_QKV_BIAS 1u       // bq, bk, bv follow each layer's wv
#define FLAG_ROPE_FREQS 2u     // rope_inv_freq follows token_embedding
#define HEADER_SIZE 256
#define TENSOR_ALIGN 64
#define LEGACY_HEADER_SIZE 28

/* Limits that keep every size computation far from overflow and reject
   headers no real model has; a file beyond them is damaged or hostile. */
#define MAX_DIM (1 << 16)
#define MAX_HIDDEN (1 << 18)
#define MAX_LAYERS 1024
#define MAX_HEADS 1024
#define MAX_HEAD_DIM 4096
#define MAX_VOCAB (1 << 22)
#define MAX_SEQ_LEN (1 << 20)

/* ----------------------------------------------------------------------------
   Errors. Every failure is one line on stderr, then a non-zero exit:
   status 1 for a bad file or a failed run, 2 for a bad command line. */

static void make_one_line(char *text) {
    for (; *text; text++)
        if ((unsigned char)*text < 0x20 || *text == 0x7f) *text = '?';
}

/* Prints "run: [path: ]message[suffix]" as one line: a control character
   that a path or value from the user brings in (a newline above all) is
   shown as '?'. */
static void report(const char *path, const char *suffix, const char *fmt, va_list ap) {
    char line[8192];
    int n = path ? snprintf(line, sizeof line, "%s: ", path) : 0;
    if (n < 0 || (size_t)n >= sizeof line) n = 0;
    vsnprintf(line + n, sizeof line - n, fmt, ap);
    make_one_line(line);
    fprintf(stderr, "run: %s%s\n", line, suffix);
}

static void die(const char *path, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    report(path, "", fmt, ap);
    va_end(ap);
    exit(1);
}

static void usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    report(NULL, " (see ./run --help)", fmt, ap);
    va_end(ap);
    exit(2);
}

/* Loader errors go into a buffer instead of ending the process, so that a
   fuzzer can feed the loader any bytes; main() prints them with die(). */
#define ERROR_SIZE 256

static int fail(char *err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, ERROR_SIZE, fmt, ap);
    va_end(ap);
    return -1;
}

/* Zeroed memory for count items of size bytes, or exit with a message
   that says what it was for. lazy: calloc's, whose fresh pages stay
   untouched until used (for the KV cache, attention's scratch, which grows
   with it, and the chat line: a context or a line that is never filled
   costs no memory); else starting on a cache line (64 bytes), so that a
   vector load from the start of a row never straddles two lines. */
static void *zeroed(size_t count, size_t size, const char *what, int lazy) {
    if (size != 0 && count > (SIZE_MAX - 64) / size) {
        fprintf(stderr, "run: %s is too large to allocate\n", what);
        exit(1);
    }
    size_t bytes = (count * size + 63) / 64 * 64 + 64 * (count * size == 0);
    void *p = lazy ? calloc(bytes, 1) : aligned_alloc(64, bytes);
    if (!p) {
        fprintf(stderr, "run: out of memory allocating %s (%zu MiB)\n", what, count * size >> 20);
        exit(1);
    }
    return lazy ? p : memset(p, 0, bytes);
}

static void *xcalloc(size_t count, size_t size, const char *what) { return zeroed(count, size, what, 0); }

/* ----------------------------------------------------------------------------
   Loading. The whole header is validated, and the file size must equal what
   the header implies, before any weight is touched; all sizes are computed
   in size_t with overflow checks. The fields are read with tokenizer.c's
   read_u32(), read_i32() and read_f32(), little-endian. */

/* a * b, or SIZE_MAX when it overflows (SIZE_MAX then fails every size check) */
static size_t mul_size(size_t a, size_t b) {
    return (b != 0 && a > SIZE_MAX / b) ? SIZE_MAX : a * b;
}
static size_t add_size(size_t a, size_t b) {
    return (a > SIZE_MAX - b) ? SIZE_MAX : a + b;
}

/* Whether x is a float fit to scale or divide by: not NaN, infinite, zero,
   negative or denormal (whose reciprocal overflows). */
static int is_positive_normal(float x) {
    return x >= FLT_MIN && x <= FLT_MAX;
}

/* Checks the fields both formats share; names the first one that is wrong. */
static int validate_config(const Config *c, char *err) {
    struct { const char *name; int value, max; } fields[] = {
        {"dim", c->dim, MAX_DIM},           {"hidden_dim", c->hidden_dim, MAX_HIDDEN},
        {"n_layers", c->n_layers, MAX_LAYERS}, {"n_heads", c->n_heads, MAX_HEADS},
        {"n_kv_heads", c->n_kv_heads, MAX_HEADS}, {"head_dim", c->head_dim, MAX_HEAD_DIM},
        {"vocab_size", c->vocab_size, MAX_VOCAB}, {"max_seq_len", c->max_seq_len, MAX_SEQ_LEN},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (fields[i].value <= 0 || fields[i].value > fields[i].max)
            return fail(err, "header field %s = %d is out of range (1..%d)", fields[i].name,
                        fields[i].value, fields[i].max);
    if (c->n_heads % c->n_kv_heads != 0)
        return fail(err, "n_kv_heads = %d does not divide n_heads = %d", c->n_kv_heads, c->n_heads);
    if (c->head_dim % 2 != 0)
        return fail(err, "head_dim = %d is odd; RoPE rotates pairs", c->head_dim);
    if ((size_t)c->n_heads * c->head_dim > MAX_DIM)
        return fail(err, "n_heads x head_dim = %lld is out of range (1..%d)",
                    (long long)c->n_heads * c->head_dim, MAX_DIM);
    if (!is_positive_normal(c->rope_theta))
        return fail(err, "rope_theta = %g is not a positive normal number", c->rope_theta);
    if (!is_positive_normal(c->norm_eps) || !(c->norm_eps < 1.0f))
        return fail(err, "norm_eps = %g is not a normal number in (0, 1)", c->norm_eps);
    return 0;
}

/* Reserves n bytes at *offset (first rounded up to `align`) and returns their
   address in data (NULL while only measuring); *offset moves past them.
   Overflow saturates to SIZE_MAX, which no file size can equal. */
static const void *place_bytes(const unsigned char *data, size_t *offset, size_t n, size_t align) {
    size_t start = add_size(*offset, (align - *offset % align) % align);
    *offset = add_size(start, n);
    return data && *offset != SIZE_MAX ? data + start : NULL;
}

static const float *place_floats(const unsigned char *data, size_t *offset, size_t n, size_t align) {
    return place_bytes(data, offset, mul_size(n, sizeof(float)), align);
}

/* Reserves a (rows, cols) matrix of the given weight type: its values, then
   for q8_0 and q4_0 its scales, each array aligned. */
static Matrix place_matrix(const unsigned char *data, size_t *offset, size_t rows, size_t cols, int type,
                           size_t align) {
    Matrix m = {.rows = (int)rows, .cols = (int)cols, .type = type};
    size_t n = mul_size(rows, cols), blocks = mul_size(rows, cols / SUPER_BLOCK);
    size_t value_bytes[] = {mul_size(n, 4), n, n / 2, mul_size(n, 2), mul_size(blocks, K_BLOCK_BYTES[WEIGHT_Q4_K]),
                            mul_size(blocks, K_BLOCK_BYTES[WEIGHT_Q5_K]), mul_size(blocks, K_BLOCK_BYTES[WEIGHT_Q6_K])};
    m.values = place_bytes(data, offset, value_bytes[type], align);
    if (type == WEIGHT_Q8_0 || type == WEIGHT_Q4_0)
        m.scales = place_bytes(data, offset, mul_size(n / GROUP_SIZE, 2), align);
    return m;
}

/* The number of matrices in the file, and the type and the width (cols) of
   matrix i in file order: token_embedding, per layer wq, wk, wv, wo, w1,
   w2, w3, then the classifier if untied. */
static int matrix_count(const Config *c) { return 1 + 7 * c->n_layers + !c->tied_classifier; }
static int matrix_type(const Config *c, int i) { return c->matrix_types ? c->matrix_types[i] : c->weight_type; }
static int matrix_cols(const Config *c, int i) {
    int in_layer = (i - 1) % 7; // 3: wo, 5: w2
    if (i == 0 || i > 7 * c->n_layers) return c->dim;
    return in_layer == 3 ? c->n_heads * c->head_dim : in_layer == 5 ? c->hidden_dim : c->dim;
}

/* Walks our own layout: with data NULL it only measures the file the header
   implies; with data it also points w into it (and copies the RoPE
   frequencies, when stored, into w->rope_inv_freq). Returns the end offset. */
static size_t layout_checkpoint(const Config *c, const unsigned char *data, Weights *w) {
    size_t dim = c->dim, hidden = c->hidden_dim, vocab = c->vocab_size;
    size_t q_dim = (size_t)c->n_heads * c->head_dim, kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    int biased = c->flags & FLAG_QKV_BIAS, half = c->head_dim / 2, m = 0; // m: the next matrix
    size_t off = HEADER_SIZE + (c->matrix_types ? matrix_count(c) : 0);
    w->token_embedding = place_matrix(data, &off, vocab, dim, matrix_type(c, m++), TENSOR_ALIGN);
    const float *inv_freq = c->flags & FLAG_ROPE_FREQS ? place_floats(data, &off, half, TENSOR_ALIGN) : NULL;
    for (int i = 0; data && inv_freq && i < half; i++) w->rope_inv_freq[i] = inv_freq[i];
    for (int l = 0; l < c->n_layers; l++) {
        LayerWeights lw;
        lw.attn_norm = place_floats(data, &off, dim, TENSOR_ALIGN);
        lw.wq = place_matrix(data, &off, q_dim, dim, matrix_type(c, m++), TENSOR_ALIGN);
        lw.wk = place_matrix(data, &off, kv_dim, dim, matrix_type(c, m++), TENSOR_ALIGN);
        lw.wv = place_matrix(data, &off, kv_dim, dim, matrix_type(c, m++), TENSOR_ALIGN);
        lw.bq = biased ? place_floats(data, &off, q_dim, TENSOR_ALIGN) : NULL;
        lw.bk = biased ? place_floats(data, &off, kv_dim, TENSOR_ALIGN) : NULL;
        lw.bv = biased ? place_floats(data, &off, kv_dim, TENSOR_ALIGN) : NULL;
        lw.wo = place_matrix(data, &off, dim, q_dim, matrix_type(c, m++), TENSOR_ALIGN);
        lw.ffn_norm = place_floats(data, &off, dim, TENSOR_ALIGN);
        lw.w1 = place_matrix(data, &off, hidden, dim, matrix_type(c, m++), TENSOR_ALIGN);
        lw.w2 = place_matrix(data, &off, dim, hidden, matrix_type(c, m++), TENSOR_ALIGN);
        lw.w3 = place_matrix(data, &off, hidden, dim, matrix_type(c, m++), TENSOR_ALIGN);
        if (data) w->layers[l] = lw;
    }
    w->final_norm = place_floats(data, &off, dim, TENSOR_ALIGN);
    w->classifier = c->tied_classifier ? w->token_embedding
                                       : place_matrix(data, &off, vocab, dim, matrix_type(c, m++), TENSOR_ALIGN);
    return off;
}

/* Checks each matrix's type (version 3's table, or the header's one type):
   known, and a width the type's blocks divide. */
static int check_matrix_types(Config *c, char *err) {
    for (int i = 0; i < matrix_count(c); i++) {
        int type = matrix_type(c, i), cols = matrix_cols(c, i);
        int block = is_k_type(type) ? SUPER_BLOCK : type == WEIGHT_Q8_0 || type == WEIGHT_Q4_0 ? GROUP_SIZE : 1;
        if (cols % block != 0)
            return fail(err, "%s weights need dim, hidden_dim and n_heads x head_dim to be multiples of %d, "
                             "but matrix %d has %d columns", WEIGHT_NAMES[type], block, i, cols);
        c->types_used |= TYPE_BIT(type);
    }
    return 0;
}

/* Reads our header, and version 3's table of matrix types; size is at least
   HEADER_SIZE. */
static int read_header(Config *c, const unsigned char *data, size_t size, char *err) {
    uint32_t version = read_u32(data + 4), flags = version > 1 ? read_u32(data + 60) : 0;
    if (version < 1 || version > CHECKPOINT_VERSION)
        return fail(err, "checkpoint version %u, but this build reads versions 1 to %d (re-export with export.py)",
                    version, CHECKPOINT_VERSION);
    if (flags & ~(FLAG_QKV_BIAS | FLAG_ROPE_FREQS))
        return fail(err, "flags = 0x%x has bits this build does not know (1: q/k/v biases, 2: RoPE frequencies)",
                    flags);
    c->flags = flags;
    c->dim = read_i32(data + 8);
    c->hidden_dim = read_i32(data + 12);
    c->n_layers = read_i32(data + 16);
    c->n_heads = read_i32(data + 20);
    c->n_kv_heads = read_i32(data + 24);
    c->head_dim = read_i32(data + 28);
    c->vocab_size = read_i32(data + 32);
    c->max_seq_len = read_i32(data + 36);
    c->rope_theta = read_f32(data + 40);
    c->norm_eps = read_f32(data + 44);
    uint32_t tied = read_u32(data + 48), weight_type = read_u32(data + 52), group_size = read_u32(data + 56);
    if (tied > 1) return fail(err, "tied_classifier = %u, expected 0 or 1", tied);
    c->tied_classifier = (int)tied;
    if (version == 3 && (weight_type != MIXED_TYPES || group_size != 0))
        return fail(err, "version 3 needs weight_type = 0x%x and group_size = 0 (here 0x%x and %u)", MIXED_TYPES,
                    weight_type, group_size);
    if (version < 3 && weight_type > WEIGHT_BF16)
        return fail(err, "weight type %u is unknown (0 f32, 1 q8_0, 2 q4_0, 3 bf16)", weight_type);
    int grouped = weight_type == WEIGHT_Q8_0 || weight_type == WEIGHT_Q4_0;
    if (version < 3 && group_size != (grouped ? GROUP_SIZE : 0))
        return fail(err, "group_size = %u, expected %d for %s weights", group_size, grouped ? GROUP_SIZE : 0,
                    WEIGHT_NAMES[weight_type]);
    if (validate_config(c, err) != 0) return -1;
    c->weight_type = version < 3 ? (int)weight_type : -1;
    if (version == 3) {
        if (size < HEADER_SIZE + (size_t)matrix_count(c))
            return fail(err, "file is %zu bytes, too short for the %d matrix types after the header", size,
                        matrix_count(c));
        c->matrix_types = data + HEADER_SIZE;
        for (int i = 0; i < matrix_count(c); i++)
            if (c->matrix_types[i] >= CHECKPOINT_TYPES)
                return fail(err, "matrix %d has weight type %u, which is unknown (0 f32, 1 q8_0, 2 q4_0, 3 bf16, "
                                 "4 q4_k, 5 q5_k, 6 q6_k)", i, c->matrix_types[i]);
    }
    return check_matrix_types(c, err);
}

/* Stored frequencies are held to what rope_theta must be: a NaN, zero or
   denormal one would run, and give wrong logits without a word. */
static int check_rope_frequencies(const double *inv_freq, int n, char *err) {
    for (int i = 0; i < n; i++)
        if (!is_positive_normal((float)inv_freq[i]))
            return fail(err, "stored RoPE frequency %d = %g is not a positive normal number", i, inv_freq[i]);
    return 0;
}

/* llama2.c's legacy checkpoints: their header and layout, read by the
   functions at the end of the file (a format of the past, not the model). */
static int read_legacy_header(Config *c, const unsigned char *data, char *err);
static size_t layout_legacy_checkpoint(const Config *c, const unsigned char *data, Weights *w);
static int parse_gguf(Transformer *t, const unsigned char *data, size_t size, char *err); // llama.cpp's files
static int gguf_load_tokenizer(Tokenizer *tok, const char *path, int vocab_size, char *err); // and their tokenizers

/* Validates a checkpoint held in memory and points t's weights into it:
   the whole header is checked, and the size must equal what the header
   implies, before any weight is touched. Returns 0, or -1 with err set. */
static int parse_checkpoint(Transformer *t, const unsigned char *data, size_t size, char *err) {
    Config *c = &t->config;
    memset(c, 0, sizeof *c);
    t->file_size = size;
    if (size >= 4 && memcmp(data, "GGUF", 4) == 0) return parse_gguf(t, data, size, err);
    int own = size >= 4 && memcmp(data, CHECKPOINT_MAGIC, 4) == 0;
    if (own && size < HEADER_SIZE)
        return fail(err, "file is %zu bytes, shorter than the %d-byte header", size, HEADER_SIZE);
    if (!own && size >= 4 && memcmp(data, "ak42", 4) == 0)
        return fail(err, "a llama2.c version 1/2 export; convert it with export.py --llama2c, or export it in llama2.c's legacy format");
    if (!own && size < LEGACY_HEADER_SIZE)
        return fail(err, "file is %zu bytes, too short to be a checkpoint", size);
    if ((own ? read_header(c, data, size, err) : read_legacy_header(c, data, err)) != 0) return -1;

    size_t (*layout)(const Config *, const unsigned char *, Weights *) =
        own ? layout_checkpoint : layout_legacy_checkpoint;
    Weights measured;
    size_t needed = layout(c, NULL, &measured);
    if (needed == SIZE_MAX) return fail(err, "the header describes a model too large to address");
    if (needed != size)
        return fail(err, "file is %zu bytes but the %sheader needs %zu", size, own ? "" : "llama2.c ", needed);
    t->weights.layers = xcalloc(c->n_layers, sizeof(LayerWeights), "the layer table");
    t->weights.rope_inv_freq = xcalloc(c->head_dim / 2, sizeof(double), "the RoPE frequencies");
    for (int i = 0; !(c->flags & FLAG_ROPE_FREQS) && i < c->head_dim / 2; i++) // unless stored: theta^(-2i/head_dim)
        t->weights.rope_inv_freq[i] = pow(c->rope_theta, -2.0 * i / c->head_dim);
    layout(c, data, &t->weights);
    if (c->flags & FLAG_ROPE_FREQS && check_rope_frequencies(t->weights.rope_inv_freq, c->head_dim / 2, err)) {
        free(t->weights.layers);
        free(t->weights.rope_inv_freq);
        return -1;
    }
    return 0;
}

/* ----------------------------------------------------------------------------
   Opening a checkpoint: the file, checked and mapped, then parse_checkpoint(). */

/* Opens an input file for reading, refusing anything but a regular file of
   at most max_size bytes: a FIFO would block open() (O_NONBLOCK keeps it
   from waiting) and a device such as /dev/zero never ends. */
static int open_input(const char *path, long long max_size, const char *what, struct stat *st) {
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) die(path, "cannot open: %s", strerror(errno));
    if (fstat(fd, st) != 0) die(path, "cannot stat: %s", strerror(errno));
    if (!S_ISREG(st->st_mode)) die(path, "not a regular file");
    if (st->st_size > max_size)
        die(path, "%s of %lld bytes is too large (at most %lld MiB)", what, (long long)st->st_size, max_size >> 20);
    return fd;
}

/* Opens and maps a checkpoint. The mapping is read-only and private: weights
   are never copied, and pages load from the file as the kernels touch them. */
static void load_transformer(Transformer *t, const char *path) {
    memset(t, 0, sizeof *t);
    t->path = path;
    struct stat st;
    int fd = open_input(path, INT64_MAX, "a checkpoint", &st);
    if (st.st_size == 0) die(path, "file is empty");
    t->device = st.st_dev, t->inode = st.st_ino;
    t->data = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    close(fd);
    if (t->data == MAP_FAILED) die(path, "cannot map: %s", strerror(errno));
    char err[ERROR_SIZE];
    if (parse_checkpoint(t, t->data, (size_t)st.st_size, err) != 0) die(path, "%s", err);
}

/* ----------------------------------------------------------------------------
   The run state's memory: the activations, the KV cache, and the room the
   kernels work in. */

/* OMP_NUM_THREADS can ask for any number of threads, and the thread
   runtime crashes trying to start 100000 of them; more than a few per core
   only adds switching, so more than 4 per core are cut to that, once, with
   a notice. */
static void limit_threads(void) {
#ifdef _OPENMP
    int asked = omp_get_max_threads(), most = 4 * omp_get_num_procs();
    if (asked > most) {
        fprintf(stderr, "run: OMP_NUM_THREADS asks for %d threads; using %d (4 per core)\n", asked, most);
        omp_set_num_threads(most);
    }
#endif
}

/* Room for n activations quantized by quantize_vector() (and one byte more,
   so that n = 0 still allocates). */
static void alloc_quantized(QuantizedVector *v, size_t n, const char *what) {
    v->q = xcalloc(n + 1, 1, what);
    v->d = xcalloc(n / GROUP_SIZE + 1, sizeof(float), what);
    v->half_sums = xcalloc(n / 16 + 1, sizeof(int32_t), what);
    v->group_sums = xcalloc(n / GROUP_SIZE + 1, sizeof(int32_t), what);
    v->scaled_sums = xcalloc(n / GROUP_SIZE + 1, sizeof(float), what);
}

static void free_quantized(QuantizedVector *v) {
    free(v->q), free(v->d), free(v->half_sums), free(v->group_sums), free(v->scaled_sums);
}

/* Allocates the activations for batches of up to `batch` tokens and a KV
   cache of ctx positions. calloc maps zero pages lazily, so a long cache
   costs memory only as it fills, and room that a kernel does not use costs
   none. */
static void alloc_run_state(RunState *s, const Config *c, int ctx, int batch) {
    size_t q_dim = (size_t)c->n_heads * c->head_dim, kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    size_t cache = mul_size(mul_size(c->n_layers, ctx), kv_dim);
    size_t widest = c->hidden_dim > c->dim ? c->hidden_dim : c->dim; // an input the matvecs quantize
    if (q_dim > widest) widest = q_dim;
    s->ctx = ctx;
    s->batch = batch < 1 ? 1 : batch > ctx ? ctx : batch;
    s->threads = 1;
#ifdef _OPENMP
    s->threads = omp_get_max_threads();
#endif
    size_t b = s->batch;
    s->x = xcalloc(b * c->dim, sizeof(float), "activations");
    s->xb = xcalloc(b * c->dim, sizeof(float), "activations");
    s->q = xcalloc(b * q_dim, sizeof(float), "activations");
    s->hb = xcalloc(b * c->hidden_dim, sizeof(float), "activations");
    s->kv_f16 = (c->types_used & INTEGER_TYPES) != 0;
    s->k = xcalloc(b * kv_dim, sizeof(float), "activations");
    s->v = xcalloc(b * kv_dim, sizeof(float), "activations");
    s->scratch = zeroed(kernels.attention_scratch(ctx, c->n_heads, c->head_dim, s->threads), sizeof(float),
                        "attention scratch", 1);
    s->rope_cos = xcalloc(b * (c->head_dim / 2), sizeof(float), "RoPE table");
    s->rope_sin = xcalloc(b * (c->head_dim / 2), sizeof(float), "RoPE table");
    s->logit_rows = 1;
    s->logits = xcalloc(c->vocab_size, sizeof(float), "logits");
    ProductScratch *ps = &s->products;
    size_t qn = c->types_used & INTEGER_TYPES ? b * widest : 0; // quantized inputs, for the integer products
    alloc_quantized(&ps->q, qn, "activations");
    size_t rn = c->types_used & TYPE_BIT(WEIGHT_Q8_0) ? qn : 0; // the second part, for q8_0 only
    alloc_quantized(&ps->rest, rn, "activations");
    ps->wide = xcalloc(rn + 1, sizeof(int16_t), "activations");
    ps->wide_d = xcalloc(rn / GROUP_SIZE + 1, sizeof(float), "activations");
    size_t fn = (c->types_used & FLOAT_TYPES) && b > 1 ? b * (widest + 16) : 0; // packed inputs, for float batches
    ps->triples = xcalloc(fn + 1, sizeof(float), "activations");
    ps->room_size = kernels.product_room ? kernels.product_room(c, (int)b) : 0;
    ps->room = xcalloc(mul_size(s->threads, ps->room_size) + 1, 1, "the products' room");
    ps->batch = (int)b;
    ps->up = xcalloc(s->threads * b * ROW_BLOCK, sizeof(float), "activations");
    s->key_cache = zeroed(cache, s->kv_f16 ? 2 : sizeof(float), "the key cache", 1);
    s->value_cache = zeroed(cache, s->kv_f16 ? 2 : sizeof(float), "the value cache", 1);
}

static void free_trace(Trace *tr); // the views' memory: see the trace

static void free_run_state(RunState *s) {
    void *buffers[] = {s->x, s->xb, s->q, s->k, s->v, s->hb, s->scratch, s->rope_cos,
                       s->rope_sin, s->logits, s->products.room, s->products.up, s->products.wide,
                       s->products.wide_d, s->products.triples, s->key_cache,
                       s->value_cache};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) free(buffers[i]);
    free_quantized(&s->products.q);
    free_quantized(&s->products.rest);
    free_trace(s->trace);
}

static void free_transformer(Transformer *t) {
    free_run_state(&t->state);
    free(t->weights.layers);
    free(t->weights.rope_inv_freq);
    free(t->converted);
    munmap(t->data, t->file_size);
}


/* ----------------------------------------------------------------------------
   Other weight types: their number formats, how the integer products take
   their input, and their plain kernels, each listed in the kernel table.
   bf16 and f16 weights are widened to f32 exactly; q8_0, q4_0 and the K
   types meet an input quantized to int8 (q8_0 in two parts), one exact
   integer dot product per group of 32, scaled. */

/* A bfloat16 is the top half of a float. */
static float bf16_to_f32(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* A little-endian 16-bit number, as the files store f16 and bf16. */
static uint16_t read_u16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* Where group g of a q8_0 or q4_0 matrix (counted row after row, so row r's
   first group is r x cols / GROUP_SIZE) keeps its 32 values and its f16
   scale. Our files hold a matrix's values, then its scales, each array
   dense; a GGUF file's blocks (mapped in place) hold each group's scale,
   then its values. group_step(): the bytes from one group's values to the
   next's; scale_step(): from one group's scale to the next's. */
static size_t group_step(const Matrix *w) {
    return (w->type == WEIGHT_Q4_0 ? GROUP_SIZE / 2 : GROUP_SIZE) + (w->interleaved ? 2 : 0);
}
static size_t scale_step(const Matrix *w) { return w->interleaved ? group_step(w) : 2; }
static const uint8_t *group_values(const Matrix *w, size_t g) {
    return (const uint8_t *)w->values + g * group_step(w);
}
static float group_scale(const Matrix *w, size_t g) { return f16_to_f32(read_u16(w->scales + g * scale_step(w))); }

/* The 6-bit scale and min of sub-block j (0..7) of a q4_k or q5_k block,
   from its 12 bytes s: the low 6 bits of bytes 0..7 hold those of
   sub-blocks 0..3, bytes 8..11 the low 4 bits of the others, whose top 2
   bits sit in the spare top bits of bytes 0..7. */
static void scale_min(int *scale, int *min, const uint8_t s[12], int j) {
    if (j < 4) {
        *scale = s[j] & 63, *min = s[j + 4] & 63;
    } else {
        *scale = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4;
        *min = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
    }
}

/* out (256) = the weights of one block of a K type (docs/FORMATS.md). */
static void dequantize_block(float out[SUPER_BLOCK], const uint8_t *block, int type) {
    if (type == WEIGHT_Q6_K) { // ql (128) | qh (64) | scales (16) | d
        const uint8_t *ql = block, *qh = block + 128;
        const int8_t *scales = (const int8_t *)(block + 192);
        float d = f16_to_f32(read_u16(block + 208));
        for (int i = 0; i < SUPER_BLOCK; i++) {
            int half = i / 128, quarter = i % 128 / 32, k = i % 32;
            int low = ql[64 * half + 32 * (quarter % 2) + k] >> (quarter < 2 ? 0 : 4) & 15;
            int high = qh[32 * half + k] >> 2 * quarter & 3;
            out[i] = d * scales[8 * half + 2 * quarter + k / 16] * ((low | high << 4) - 32);
        }
        return;
    } // q4_k, q5_k: d | dmin | scales (12) | q5_k: qh (32) | qs (128)
    float d = f16_to_f32(read_u16(block)), dmin = f16_to_f32(read_u16(block + 2));
    const uint8_t *s = block + 4, *qh = block + 16, *qs = block + (type == WEIGHT_Q5_K ? 48 : 16);
    for (int j = 0; j < 8; j++) { // sub-block j: nibbles of qs[32 (j / 2) ..], low for even j
        int scale, min;
        scale_min(&scale, &min, s, j);
        for (int k = 0; k < 32; k++) {
            int q = qs[32 * (j / 2) + k] >> 4 * (j % 2) & 15;
            if (type == WEIGHT_Q5_K) q += 16 * (qh[k] >> j & 1);
            out[32 * j + k] = d * scale * q - dmin * min;
        }
    }
}

/* out (kn) = columns k0 .. k0 + kn - 1 of row `row` of w, as floats, one
   function per weight type (kernels.dequantize). For q8_0 and q4_0, k0 and
   kn are multiples of GROUP_SIZE; for the K types, of SUPER_BLOCK. */
/* A bf16 or f16 weight as a float, exactly. */
static float widen_half(uint16_t h, int type) { return type == WEIGHT_BF16 ? bf16_to_f32(h) : f16_to_f32(h); }

static void dequantize_halves(float *out, const Matrix *w, int row, int k0, int kn) {
    const uint16_t *h = (const uint16_t *)w->values + (size_t)row * w->cols + k0;
    for (int i = 0; i < kn; i++) out[i] = widen_half(h[i], w->type);
}

static void dequantize_q8_0(float *out, const Matrix *w, int row, int k0, int kn) {
    size_t first = ((size_t)row * w->cols + k0) / GROUP_SIZE;
    for (int g = 0; g < kn / GROUP_SIZE; g++) {
        const int8_t *q = (const int8_t *)group_values(w, first + g);
        float d = group_scale(w, first + g);
        for (int i = 0; i < GROUP_SIZE; i++) out[g * GROUP_SIZE + i] = d * q[i];
    }
}

/* q4_0: byte j of a group holds weight j (low nibble) and j + 16 (high). */
static void dequantize_q4_0(float *out, const Matrix *w, int row, int k0, int kn) {
    size_t first = ((size_t)row * w->cols + k0) / GROUP_SIZE;
    for (int g = 0; g < kn / GROUP_SIZE; g++) {
        float d = group_scale(w, first + g);
        const uint8_t *b = group_values(w, first + g);
        for (int j = 0; j < GROUP_SIZE / 2; j++) {
            out[g * GROUP_SIZE + j] = d * ((b[j] & 15) - 8);
            out[g * GROUP_SIZE + j + GROUP_SIZE / 2] = d * ((b[j] >> 4) - 8);
        }
    }
}

static void dequantize_k(float *out, const Matrix *w, int row, int k0, int kn) {
    size_t bytes = K_BLOCK_BYTES[w->type];
    const uint8_t *block = (const uint8_t *)w->values + ((size_t)row * w->cols + k0) / SUPER_BLOCK * bytes;
    for (int b = 0; b < kn / SUPER_BLOCK; b++) dequantize_block(out + b * SUPER_BLOCK, block + b * bytes, w->type);
}

/* ---- Quantized inputs, for the integer dot products of q8_0 and q4_0 */

/* max |x| of a group of 32, on the bits (which order floats >= 0, a NaN's
   above all), in 8 lanes (vector code), then of those. */
static float group_max(const float x[GROUP_SIZE]) {
    uint32_t lane[8] = {0}, top = 0;
    for (int i = 0; i < GROUP_SIZE; i += 8)
        for (int j = 0; j < 8; j++) {
            uint32_t bits;
            memcpy(&bits, &x[i + j], sizeof bits);
            lane[j] = (bits & 0x7fffffff) > lane[j] ? bits & 0x7fffffff : lane[j];
        }
    for (int j = 0; j < 8; j++) top = lane[j] > top ? lane[j] : top;
    float amax;
    memcpy(&amax, &top, sizeof amax);
    return amax;
}

/* A group's scale, *d = max|x| / top, and the factor 1 / *d (0 for a group
   of zeros) that takes x to -top..top. */
static float input_scale(float *d, const float x[GROUP_SIZE], float top) {
    *d = group_max(x) / top;
    return *d > 0.0f ? 1.0f / *d : 0.0f;
}

/* v clamped to -top..top, then rounded to the nearest integer; a NaN becomes
   top, so that the caller's cast to an integer is defined. */
static float round_clamped(float v, float top) {
    v = v < top ? v : top;
    v = v > -top ? v : -top;
    return nearbyintf(v);
}

/* One group of 32: d = max|x| / 127 and q = round(x / d), so x ~ d q with
   q in -127..127. A value that is not finite makes d NaN or infinite (so
   that a damaged model's NaN reaches the logits, which end the run,
   instead of passing on as a number) and comes out clamped in q, never
   undefined. */
static void quantize_group(int8_t q[GROUP_SIZE], float *d, const float x[GROUP_SIZE]) {
    float inv = input_scale(d, x, 127.0f);
    for (int i = 0; i < GROUP_SIZE; i++) q[i] = (int8_t)round_clamped(x[i] * inv, 127.0f);
}

/* The sums of out->q (n values) by halves of groups and by groups. */
static void sum_halves(QuantizedVector *out, int n) {
    for (int h = 0; h < n / 16; h++) {
        int32_t sum = 0;
        for (int i = 0; i < 16; i++) sum += out->q[16 * h + i];
        out->half_sums[h] = sum;
    }
    for (int g = 0; g < n / GROUP_SIZE; g++) out->group_sums[g] = out->half_sums[2 * g] + out->half_sums[2 * g + 1];
}

/* Quantizes x (n, a multiple of GROUP_SIZE) group by group. */
static void quantize_vector(QuantizedVector *out, const float *x, int n) {
    for (int g = 0; g < n / GROUP_SIZE; g++)
        quantize_group(out->q + g * GROUP_SIZE, &out->d[g], x + (size_t)g * GROUP_SIZE);
    sum_halves(out, n);
}

/* The input of q8_0 products in two int8 parts, x ~ d q + d' q': what
   quantize_vector() leaves, x - d q (at most d / 2 per value), quantized
   in turn into rest. One part (llama.cpp's Q8_0) leaves a group with one
   large value a bit or two for the other 31, and SmolLM2-135M's greedy
   text strays from its f32 model's; two carry about 15 bits. */
static void quantize_remainder(QuantizedVector *rest, const float *x, const QuantizedVector *q, int n) {
    for (int g = 0; g < n / GROUP_SIZE; g++) {
        float left[GROUP_SIZE];
        for (int i = 0; i < GROUP_SIZE; i++) left[i] = x[g * GROUP_SIZE + i] - q->d[g] * q->q[g * GROUP_SIZE + i];
        quantize_group(rest->q + g * GROUP_SIZE, &rest->d[g], left);
    }
    sum_halves(rest, n);
}

/* Row t of a batch of quantized vectors of n values each. */
static QuantizedVector quantized_row(const QuantizedVector *x, int t, int n) {
    return (QuantizedVector){x->q + (size_t)t * n, x->d + (size_t)t * (n / GROUP_SIZE),
                             x->half_sums + (size_t)t * (n / 16), x->group_sums + (size_t)t * (n / GROUP_SIZE),
                             x->scaled_sums + (size_t)t * (n / GROUP_SIZE)};
}

/* The input x (n, cols) quantized into in->q, as the integer products
   take it (kernels.prepare), the rows of a batch in parallel; and for q8_0
   in two parts, in->q and in->rest. */
static void quantize_input(ProductScratch *in, const float *x, int n, int cols) {
    #pragma omp parallel for if (n > 1)
    for (int t = 0; t < n; t++) {
        QuantizedVector row = quantized_row(&in->q, t, cols);
        quantize_vector(&row, x + (size_t)t * cols, cols);
    }
}

static void quantize_input_q8_0(ProductScratch *in, const float *x, int n, int cols) {
    #pragma omp parallel for if (n > 1)
    for (int t = 0; t < n; t++) {
        QuantizedVector row = quantized_row(&in->q, t, cols), rest = quantized_row(&in->rest, t, cols);
        quantize_vector(&row, x + (size_t)t * cols, cols);
        quantize_remainder(&rest, x + (size_t)t * cols, &row, cols);
    }
}

/* bf16 and f16: each weight widened to float, exactly; the sums of
   matmul_f32() on the widened weights, bit for bit. */
static void matmul_halves(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    int cols = w->cols;
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < in->n; t++) {
            const uint16_t *row = (const uint16_t *)w->values + (size_t)r * cols;
            const float *x = in->x + (size_t)t * cols;
            float sum = 0.0f;
            for (int i = 0; i < cols; i++) sum = fmaf(widen_half(row[i], w->type), x[i], sum);
            out[(size_t)t * ldo + r - r0] = sum;
        }
}

/* w . x for row r of q8_0 weights and a quantized x: per group, an exact
   integer dot product, scaled by the weights' and the input's scales. */
static float dot_q8_0(const Matrix *w, int r, const QuantizedVector *x) {
    size_t first = (size_t)r * (w->cols / GROUP_SIZE);
    float sum = 0.0f;
    for (int g = 0; g < w->cols / GROUP_SIZE; g++) {
        const int8_t *q = (const int8_t *)group_values(w, first + g);
        int32_t dot = 0;
        for (int i = 0; i < GROUP_SIZE; i++) dot += q[i] * x->q[g * GROUP_SIZE + i];
        sum += group_scale(w, first + g) * x->d[g] * (float)dot;
    }
    return sum;
}

/* The same for q4_0: weights q - 8, q in 0..15, two to a byte. */
static float dot_q4_0(const Matrix *w, int r, const QuantizedVector *x) {
    size_t first = (size_t)r * (w->cols / GROUP_SIZE);
    float sum = 0.0f;
    for (int g = 0; g < w->cols / GROUP_SIZE; g++) {
        const uint8_t *b = group_values(w, first + g);
        const int8_t *xg = x->q + g * GROUP_SIZE;
        int32_t dot = 0;
        for (int j = 0; j < GROUP_SIZE / 2; j++)
            dot += ((b[j] & 15) - 8) * xg[j] + ((b[j] >> 4) - 8) * xg[j + GROUP_SIZE / 2];
        sum += group_scale(w, first + g) * x->d[g] * (float)dot;
    }
    return sum;
}

/* Each token's input in its two parts (quantize_remainder()), a product with each. */
static void matmul_q8_0(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < in->n; t++) {
            QuantizedVector x = quantized_row(&in->q, t, w->cols), rest = quantized_row(&in->rest, t, w->cols);
            out[(size_t)t * ldo + r - r0] = dot_q8_0(w, r, &x) + dot_q8_0(w, r, &rest);
        }
}

static void matmul_q4_0(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < in->n; t++) {
            QuantizedVector x = quantized_row(&in->q, t, w->cols);
            out[(size_t)t * ldo + r - r0] = dot_q4_0(w, r, &x);
        }
}

/* K types: each block of 256 weights dequantized to floats, then its
   product with each token's floats, added to the token's sum. */
static void matmul_k(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    int cols = w->cols, bytes = K_BLOCK_BYTES[w->type];
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->values + (size_t)r * (cols / SUPER_BLOCK) * bytes;
        for (int t = 0; t < in->n; t++) out[(size_t)t * ldo + r - r0] = 0.0f;
        for (int b = 0; b < cols / SUPER_BLOCK; b++) {
            float weights[SUPER_BLOCK];
            dequantize_block(weights, row + (size_t)b * bytes, w->type);
            for (int t = 0; t < in->n; t++) {
                const float *x = in->x + (size_t)t * cols + b * SUPER_BLOCK;
                float sum = 0.0f;
                for (int i = 0; i < SUPER_BLOCK; i++) sum += weights[i] * x[i];
                out[(size_t)t * ldo + r - r0] += sum;
            }
        }
    }
}

/* ----------------------------------------------------------------------------
   Sampling: turn logits into the next token. The steps, in this order:
     1. penalties on the raw logits, over the last repeat_window tokens seen
        (prompt included): repetition (a seen token's logit is divided by the
        penalty if positive, multiplied if negative), then frequency (minus
        count x penalty) and presence (minus the penalty once);
     2. temperature: logits / T, then softmax (T = 0 is greedy: the argmax of
        the penalised logits, ties to the lowest id, and steps 3-5 are moot);
     3. top-k: keep the k most likely tokens;
     4. top-p: keep the smallest prefix, by probability, whose sum reaches p;
     5. min-p: drop tokens less likely than min_p x the most likely one;
     6. draw one token from what is left, renormalised: the first whose
        cumulative probability exceeds a uniform r, taking the tokens most
        likely first when top-k or top-p sorted them, else in id order.
   sampler_distribution() does steps 1-5 and sampler_draw() step 6, so the
   tests can check each against a direct Python transcription; next_token()
   in the generation section calls both. Logits that are not all finite
   (NaN or inf: a damaged model) give no distribution, and the run ends;
   finite ones always give one, however large they are and however small
   the temperature or the penalties: no step can overflow. */

typedef struct {
    float prob;
    int index;
} Candidate;

typedef struct {
    int vocab_size;
    float temperature;      // 0 = greedy
    float top_p;            // 1 = off
    int top_k;              // 0 = off
    float min_p;            // 0 = off
    float repeat_penalty;   // 1 = off
    float frequency_penalty, presence_penalty; // 0 = off
    int repeat_window;      // how many recent tokens the penalties look at
    uint64_t rng_state;     // xorshift64*; the same seed gives the same text
    Candidate *candidates;  // (vocab) what survives steps 3-5
    int *counts;            // (vocab) scratch: occurrences in the window
} Sampler;

typedef struct {
    float temperature, top_p, min_p, repeat_penalty, frequency_penalty, presence_penalty;
    int top_k, repeat_window;
} SamplerSettings;

static void init_sampler(Sampler *s, int vocab_size, const SamplerSettings *o, uint64_t seed) {
    *s = (Sampler){.vocab_size = vocab_size, .temperature = o->temperature, .top_p = o->top_p,
                   .top_k = o->top_k, .min_p = o->min_p, .repeat_penalty = o->repeat_penalty,
                   .frequency_penalty = o->frequency_penalty, .presence_penalty = o->presence_penalty,
                   .repeat_window = o->repeat_window};
    s->rng_state = seed ? seed : 0x9E3779B97F4A7C15ull; // xorshift must not start at 0
    s->candidates = xcalloc(vocab_size, sizeof(Candidate), "the sampler");
    s->counts = xcalloc(vocab_size, sizeof(int), "the sampler");
}

static void free_sampler(Sampler *s) {
    free(s->candidates);
    free(s->counts);
}

/* A uniform float in [0, 1) from xorshift64*. */
static float random_f32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (float)((*state * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

static int all_finite(const float *x, int n) {
    for (int i = 0; i < n; i++) if (!isfinite(x[i])) return 0;
    return 1;
}

static int by_prob_descending(const void *a, const void *b) {
    float pa = ((const Candidate *)a)->prob, pb = ((const Candidate *)b)->prob;
    if (pa != pb) return pa < pb ? 1 : -1;
    return ((const Candidate *)a)->index - ((const Candidate *)b)->index;
}

/* Step 1, in place on logits (vocab). history holds the n_history tokens
   seen so far; only the last repeat_window of them count. */
static void apply_penalties(Sampler *s, float *logits, const int *history, int n_history) {
    if (s->repeat_penalty == 1.0f && s->frequency_penalty == 0.0f && s->presence_penalty == 0.0f) return;
    int start = n_history > s->repeat_window ? n_history - s->repeat_window : 0;
    for (int i = start; i < n_history; i++) s->counts[history[i]]++;
    for (int i = start; i < n_history; i++) {
        int t = history[i], count = s->counts[t];
        if (count == 0) continue; // already penalised
        double x = logits[t]; // in double, then clamped: a huge logit saturates instead of becoming inf
        x = x > 0 ? x / s->repeat_penalty : x * s->repeat_penalty;
        x -= count * (double)s->frequency_penalty + s->presence_penalty;
        logits[t] = (float)fmin(fmax(x, -FLT_MAX), FLT_MAX);
        s->counts[t] = 0;
    }
}

/* Step 2: x = softmax(x / temperature), in place, temperature > 0. Each
   logit's distance below the largest is divided in double, where nothing
   finite overflows: the largest gets exp(0) = 1, so the sum is at least 1
   and every probability is finite. */
static void tempered_softmax(float *x, int n, float temperature) {
    double max = x[argmax(x, n)], sum = 0.0;
    for (int i = 0; i < n; i++) {
        x[i] = (float)exp((x[i] - max) / temperature);
        sum += x[i];
    }
    float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; i++) x[i] *= inv;
}

/* Steps 1-5: fills s->candidates with the surviving tokens (most likely
   first when top-k or top-p sorted them), probabilities renormalised to sum
   to 1, and returns how many: at least one, or 0 when a logit is not
   finite. logits (vocab) are overwritten. Greedy leaves one candidate. */
static int sampler_distribution(Sampler *s, float *logits, const int *history, int n_history) {
    int n = s->vocab_size;
    if (!all_finite(logits, n)) return 0;
    apply_penalties(s, logits, history, n_history);
    if (s->temperature == 0.0f) {
        s->candidates[0] = (Candidate){1.0f, argmax(logits, n)};
        return 1;
    }
    tempered_softmax(logits, n, s->temperature);
    /* Tokens that cannot survive are dropped before sorting: those below
       min_p x the top probability, and with top-p alone, those below
       (1 - p) / (n - 1), which no nucleus can reach. That leaves a few
       hundred tokens to sort instead of the vocabulary. Dropping them first
       gives the same set as steps 3-5 in order, since each keeps a prefix
       of the sorted tokens. The most likely token always survives (a nucleus
       starts with it), so the cutoff never exceeds its probability. */
    float top = logits[argmax(logits, n)], cutoff = 0.0f;
    if (s->top_k == 0 && s->top_p < 1.0f && n > 1) cutoff = (1.0f - s->top_p) / (n - 1);
    if (s->min_p > 0.0f) cutoff = fmaxf(cutoff, s->min_p * top);
    cutoff = fminf(cutoff, top);
    int m = 0;
    for (int i = 0; i < n; i++)
        if (logits[i] >= cutoff) s->candidates[m++] = (Candidate){logits[i], i};
    if (s->top_k > 0 || s->top_p < 1.0f) {
        qsort(s->candidates, m, sizeof(Candidate), by_prob_descending);
        if (s->top_k > 0 && s->top_k < m) m = s->top_k;                   // top-k
        float sum = 0.0f;
        for (int i = 0; i < m && s->top_p < 1.0f; i++) {                 // top-p
            sum += s->candidates[i].prob;
            if (sum >= s->top_p) m = i + 1;
        }
    }
    float kept = 0.0f;
    for (int i = 0; i < m; i++) kept += s->candidates[i].prob;
    for (int i = 0; i < m; i++) s->candidates[i].prob /= kept;
    return m;
}

/* Step 6: the candidate where the cumulative probability first exceeds r,
   for r uniform in [0, 1); m >= 1. */
static int sampler_draw(const Sampler *s, int m, float r) {
    float cdf = 0.0f;
    for (int i = 0; i < m; i++) {
        cdf += s->candidates[i].prob;
        if (r < cdf) return s->candidates[i].index;
    }
    return s->candidates[m - 1].index; // rounding left r above the last sum
}

/* ----------------------------------------------------------------------------
   Generation. A Session bundles what a run needs beyond the model: the
   tokenizer (may be absent: then text is shown as token ids), the sampler,
   the streaming decoder, what the user asked to see (logits file, token
   probabilities), the tokens fed so far and the counters for statistics. */

typedef struct {
    int *ids;
    int n, cap;
} TokenList;

static void push_token(TokenList *list, int id) {
    if (list->n == list->cap) {
        list->cap = list->cap ? 2 * list->cap : 256;
        list->ids = realloc(list->ids, (size_t)list->cap * sizeof(int));
        if (!list->ids) { fprintf(stderr, "run: out of memory for the token list\n"); exit(1); }
    }
    list->ids[list->n++] = id;
}

typedef struct {
    char *text;
    size_t len, cap;
} TextBuffer;

enum { PROBS_TEXT, PROBS_JSON };
#define MAX_STOP_STRINGS 16

/* Generation on a shared machine. OpenMP's threads wait for each other by
   spinning, so while another program keeps one of the cores busy, a token
   on every core can take many times as long as on one. Every WINDOW tokens
   on every core, the share of their cores' time that the threads got (the
   process's CPU time over their wall time) says whether the machine is
   busy: below SHARE_MIN, one thread generates, and now and then WINDOW
   tokens on every core (a probe) show whether the cores are free again: if
   the threads got their cores and the tokens were faster, every core
   generates again; else the next probe waits twice as long (from
   PROBE_FIRST up to PROBE_LAST tokens), since a probe on a busy machine
   costs dear. The logits do not depend on the thread count. */
#define WINDOW 8
#define SHARE_MIN 0.8
#define PROBE_FIRST 32
#define PROBE_LAST 1024
typedef struct {
    int most;           // threads when the cores are free: OMP_NUM_THREADS or all
    int one;            // 1 while generating on one thread
    int probing;        // 1 while the window under way is a probe
    int window;         // tokens on every core since the last verdict
    double wall, cpu;   // their wall time and the process's CPU time
    double one_seconds; // the last token's time on one thread (0: none yet)
    long tokens, next_probe, interval;
} ThreadChoice;

typedef struct {
    Transformer *transformer;
    Tokenizer *tokenizer;       // NULL when running on token ids alone
    Sampler *sampler;
    TokenDecoder decoder;
    FILE *logits_file;          // --logits: one row of vocab floats per forward
    const char *logits_path;
    int probs_k, probs_format;  // --probs: show the top k after each token
    int stop_tokens[4];         // generation ends when one of these is sampled
    int n_stop_tokens;
    const char *stop_strings[MAX_STOP_STRINGS]; // ... or when the text contains one
    int n_stop_strings;
    TextBuffer held;            // generated text not yet printed: it may begin a stop string
    TokenList history;          // every token fed so far, for the penalties
    int pos;                    // next position in the KV cache
    int context_full;           // 1 once the cache has no room left
    int stopped;                // 1 once a stop token or stop string ended a turn
    int generating;             // 1 while sampling: only then do stop strings count
    long n_prompt_tokens, n_generated_tokens;
    double prompt_seconds, generate_seconds, first_token_seconds;
    double load_seconds;        // from the start of main() to the first prompt
    ThreadChoice threads;       // how many threads generate, chosen as it goes
} Session;

static double process_start_seconds; // set first thing in main()

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void append_text(TextBuffer *b, const char *text, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = 2 * (b->len + n + 1);
        b->text = realloc(b->text, b->cap);
        if (!b->text) { fprintf(stderr, "run: out of memory for the output\n"); exit(1); }
    }
    memcpy(b->text + b->len, text, n);
    b->len += n;
    b->text[b->len] = '\0';
}

/* Prints the held text, except a tail that could still grow into a stop
   string; if a stop string has appeared, prints what precedes it, drops the
   rest and marks the session stopped. */
static void release_held_text(Session *s, int at_end) {
    TextBuffer *b = &s->held;
    size_t cut = b->len, keep = 0;
    int n_stop_strings = s->generating ? s->n_stop_strings : 0;
    for (int i = 0; i < n_stop_strings; i++) {
        const char *hit = memmem(b->text, b->len, s->stop_strings[i], strlen(s->stop_strings[i]));
        if (hit && (size_t)(hit - b->text) < cut) cut = (size_t)(hit - b->text), s->stopped = 1;
    }
    if (!s->stopped && !at_end) {
        for (int i = 0; i < n_stop_strings; i++) { // the longest tail that begins a stop string
            size_t n = strlen(s->stop_strings[i]);
            for (size_t k = n - 1; k > keep; k--)
                if (k <= b->len && memcmp(b->text + b->len - k, s->stop_strings[i], k) == 0) { keep = k; break; }
        }
        cut = b->len - keep;
    }
    fwrite(b->text, 1, cut, stdout);
    memmove(b->text, b->text + b->len - keep, keep);
    b->len = s->stopped ? 0 : keep;
}

/* stdout carries the text, so a write that fails there (a full disk, a
   closed stdout, a pipe whose reader left while SIGPIPE is ignored) ends the
   run at once with status 1, instead of running on with nothing written;
   so does one on stderr, which carries --probs and --trace, though nothing
   can be said about it there. Called after each token, and at the end with
   closing = 1, when an error that only the close reports shows too. */
static void check_output(int closing) {
    if (fflush(stdout) != 0 || ferror(stdout) || (closing && fclose(stdout) != 0)) {
        fprintf(stderr, "run: writing the output: %s\n", strerror(errno));
        exit(1);
    }
    if (ferror(stderr)) exit(1);
}

/* Prints a token as soon as it is known: its text when there is a tokenizer
   (held back while a UTF-8 character is incomplete, or while it may begin a
   stop string), else its id. */
static void emit_token(Session *s, int token) {
    if (!s->tokenizer) {
        printf("%d ", token);
    } else {
        char piece[1024];
        size_t n = tokenizer_decode(s->tokenizer, &s->decoder, token, piece, sizeof piece);
        append_text(&s->held, piece, n);
        release_held_text(s, 0);
    }
    check_output(0);
}

static void finish_output(Session *s) {
    if (s->tokenizer) {
        char piece[64];
        size_t n = tokenizer_decode_flush(s->tokenizer, &s->decoder, piece, sizeof piece);
        append_text(&s->held, piece, n);
        release_held_text(s, 1);
    }
    putchar('\n');
    check_output(0);
}

static int is_stop_token(const Session *s, int token) {
    for (int i = 0; i < s->n_stop_tokens; i++) if (s->stop_tokens[i] == token) return 1;
    return 0;
}

/* Writes a token's text for --probs: its stored bytes, with quotes,
   backslashes, control bytes and bytes that are not UTF-8 escaped, so that
   text and JSON output stay one line of valid UTF-8. */
static void print_token_text(FILE *f, const Session *s, int token) {
    if (!s->tokenizer) { fprintf(f, "\"#%d\"", token); return; }
    size_t len;
    const unsigned char *p = tokenizer_piece(s->tokenizer, token, &len);
    fputc('"', f);
    for (size_t i = 0; i < len;) {
        int n = utf8_valid_len(p + i, len - i);
        if (n > 1) { fwrite(p + i, 1, n, f); i += n; continue; }
        unsigned char c = p[i++];
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c >= 0x20 && c < 0x7f) fputc(c, f);
        else fprintf(f, "\\u%04x", c);
    }
    fputc('"', f);
}

/* top (k) = the indices of the k largest of p (n), largest first, ties to
   the lower index: an insertion into the k kept so far, which most values
   pass over at one comparison. */
static void top_indices(int *top, const float *p, int n, int k) {
    int kept = 0;
    for (int i = 0; i < n; i++) {
        if (kept == k && !(p[i] > p[top[k - 1]])) continue;
        int j = kept < k ? kept++ : k - 1;
        for (; j > 0 && p[i] > p[top[j - 1]]; j--) top[j] = top[j - 1];
        top[j] = i;
    }
}

/* --probs: the chosen token and the k most likely, under the distribution
   of sampling step 2 (penalised logits, temperature, softmax; temperature 1
   when greedy), before top-k, top-p and min-p cut it. probs (vocab). */
static void show_probs(const Session *s, const float *probs, int token) {
    int vocab = s->transformer->config.vocab_size, k = s->probs_k < vocab ? s->probs_k : vocab;
    int top[128];
    top_indices(top, probs, vocab, k);
    int json = s->probs_format == PROBS_JSON;
    fprintf(stderr, json ? "{\"pos\": %d, \"token\": %d, \"text\": " : "probs: pos %d, token %d ", s->pos, token);
    print_token_text(stderr, s, token);
    fprintf(stderr, json ? ", \"prob\": %.6f, \"top\": [" : " p=%.4f | top:", probs[token]);
    for (int j = 0; j < k; j++) {
        fprintf(stderr, json ? "%s{\"token\": %d, \"text\": " : " %s%d ", j && json ? ", " : "", top[j]);
        print_token_text(stderr, s, top[j]);
        fprintf(stderr, json ? ", \"prob\": %.6f}" : " %.4f", probs[top[j]]);
    }
    fprintf(stderr, json ? "]}\n" : "\n");
}

/* Samples the next token from logits (overwritten), showing --probs. */
static int next_token(Session *s, float *logits) {
    Sampler *sp = s->sampler;
    int m = sampler_distribution(sp, logits, s->history.ids, s->history.n);
    if (m == 0) die(s->transformer->path, "the logits at position %d are not finite (NaN or inf)", s->pos - 1);
    int token = m == 1 ? sp->candidates[0].index : sampler_draw(sp, m, random_f32(&sp->rng_state));
    if (s->probs_k > 0) {
        if (sp->temperature == 0.0f) tempered_softmax(logits, sp->vocab_size, 1.0f); // penalised logits, T = 1
        show_probs(s, logits, token);
    }
    return token;
}

static void print_trace(const Session *s, const int *tokens, int n, int pos); // the views, after chat

/* Sets the thread count for the next generated token (see ThreadChoice). */
static void choose_threads(ThreadChoice *c) {
    if (c->most <= 1) return;
    c->tokens++;
    if (!c->one && c->window == WINDOW) {
        int busy = c->cpu < SHARE_MIN * c->wall * c->most;
        int lost = c->probing && c->one_seconds > 0 && c->one_seconds * WINDOW < c->wall;
        if (busy || lost) { // to one thread, until the next probe
            c->interval = !c->probing ? PROBE_FIRST : c->interval * 2 > PROBE_LAST ? PROBE_LAST : c->interval * 2;
            c->next_probe = c->tokens + c->interval;
            c->one = 1;
        }
        c->probing = c->window = 0;
        c->wall = c->cpu = 0;
    } else if (c->one && c->tokens >= c->next_probe) {
        c->one = 0;
        c->probing = 1;
    }
#ifdef _OPENMP
    omp_set_num_threads(c->one ? 1 : c->most);
#endif
}

/* CPU time this process has used, all threads together, in seconds. */
static double cpu_seconds(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

static float *forward_and_record(Session *s, int token) {
    Transformer *t = s->transformer;
    choose_threads(&s->threads);
    double start = now_seconds(), cpu = cpu_seconds();
    float *logits = forward(t, token, s->pos++);
    ThreadChoice *c = &s->threads;
    if (c->one) {
        c->one_seconds = now_seconds() - start;
    } else {
        c->window++;
        c->wall += now_seconds() - start;
        c->cpu += cpu_seconds() - cpu;
    }
    if (t->state.trace) print_trace(s, &token, 1, s->pos - 1);
    push_token(&s->history, token);
    if (s->logits_file &&
        fwrite(logits, sizeof(float), t->config.vocab_size, s->logits_file) != (size_t)t->config.vocab_size)
        die(s->logits_path, "write failed: %s", strerror(errno));
    return logits;
}

/* Feeds n tokens into the cache from s->pos on, in batches of up to the
   run state's batch, recording their logits; returns the last one's. */
static float *prefill(Session *s, const int *tokens, int n) {
    Transformer *t = s->transformer;
    int batch = t->state.batch, vocab = t->config.vocab_size;
    float *logits = NULL;
    for (int i = 0; i < n; i += batch) {
        int m = n - i < batch ? n - i : batch, rows = s->logits_file ? m : i + m == n; // only the last batch's
        logits = forward_tokens(t, tokens + i, m, s->pos, rows);                         // last row is needed
        if (t->state.trace) print_trace(s, tokens + i, m, s->pos);
        s->pos += m;
        for (int j = 0; j < m; j++) push_token(&s->history, tokens[i + j]);
        size_t count = (size_t)rows * vocab;
        if (s->logits_file && fwrite(logits, sizeof(float), count, s->logits_file) != count)
            die(s->logits_path, "write failed: %s", strerror(errno));
        if (rows) logits += count - vocab;
    }
    return logits;
}

/* Feeds the prompt into the cache from s->pos on, then samples up to max_new
   tokens, feeding each back, and stops early at a stop token or string, or
   when the context is full. With echo, the prompt's own text is printed
   first. Returns the last token sampled (-1 if none). */
static int complete(Session *s, const int *prompt, int n_prompt, int max_new, int echo) {
    int ctx = s->transformer->state.ctx;
    double start = now_seconds();
    for (int i = 0; echo && i < n_prompt; i++) emit_token(s, prompt[i]);
    float *logits = prefill(s, prompt, n_prompt);
    double prompt_done = now_seconds();
    s->n_prompt_tokens += n_prompt;
    s->prompt_seconds += prompt_done - start;

    int token = -1;
    s->stopped = 0;
    s->generating = 1;
    for (int generated = 0; generated < max_new; generated++) {
        token = next_token(s, logits);
        if (s->n_generated_tokens == 0) s->first_token_seconds = now_seconds() - start;
        s->n_generated_tokens++;
        if (is_stop_token(s, token)) { s->stopped = 1; break; }
        emit_token(s, token);
        if (s->stopped || generated + 1 == max_new) break; // the last token is shown, never fed back
        if (s->pos >= ctx) {
            s->context_full = 1;
            break;
        }
        logits = forward_and_record(s, token);
    }
#ifdef _OPENMP
    omp_set_num_threads(s->threads.most); // prompts take every thread
#endif
    s->generating = 0;
    s->generate_seconds += now_seconds() - prompt_done;
    return token;
}

/* -m score: the mean negative log-likelihood of tokens under the model, and
   its exponential, the perplexity. A text longer than the context is read
   in windows of ctx tokens that start stride (< ctx) tokens apart, each
   from an empty cache; every token after the first is scored once, in the
   first window that holds it with its predecessor, so a token has at least
   ctx - stride tokens of context, except those of the first window. */
static int score_text(Session *s, const int *tokens, int n, int stride) {
    int ctx = s->transformer->state.ctx, vocab = s->transformer->config.vocab_size;
    double nll = 0.0;
    long scored = 0;
    int scored_until = 1; // targets before this index are done
    for (int begin = 0; scored_until < n; begin += stride) {
        int end = begin + ctx < n ? begin + ctx : n;
        s->pos = 0;
        for (int i = begin; i < end - 1; i++) {
            const float *logits = forward_and_record(s, tokens[i]);
            if (!all_finite(logits, vocab))
                die(s->transformer->path, "the logits at position %d are not finite (NaN or inf)", i);
            if (i + 1 < scored_until) continue;
            double max = logits[argmax(logits, vocab)], sum = 0.0;
            for (int v = 0; v < vocab; v++) sum += exp(logits[v] - max);
            nll += max + log(sum) - logits[tokens[i + 1]];
            scored++;
        }
        scored_until = end;
    }
    if (scored == 0) {
        fprintf(stderr, "run: nothing to score: the text is %d token%s\n", n, n == 1 ? "" : "s");
        return 1;
    }
    printf("tokens scored %ld, mean nll %.6f, perplexity %.6f (context %d, stride %d)\n", scored,
           nll / scored, exp(nll / scored), ctx, stride);
    return 0;
}

static void print_statistics(const Session *s) {
    fprintf(stderr, "run: prompt %ld tokens (%.1f tok/s), generated %ld tokens (%.1f tok/s), first token after %.0f ms, load %.0f ms\n",
            s->n_prompt_tokens, s->prompt_seconds > 0 ? s->n_prompt_tokens / s->prompt_seconds : 0.0,
            s->n_generated_tokens,
            s->generate_seconds > 0 ? s->n_generated_tokens / s->generate_seconds : 0.0,
            s->first_token_seconds * 1000, s->load_seconds * 1000);
}

/* ----------------------------------------------------------------------------
   Chat. A template wraps each user turn in the markers the model was tuned
   on; the KV cache is kept between turns, so earlier turns are not re-read.
     llama2:  <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>
     chatml:  <|im_start|>system\n{system}<|im_end|>\n
              <|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n
     llama3:  <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
              <|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>
              <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>
              (system and user trimmed of surrounding whitespace, as its template does)
     llama3 as Llama 3.1 / 3.2 Instruct write it: a system turn always, its text
              "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}",
              {date} "26 Jul 2024" (3.1) or today's, "%d %b %Y" in English (3.2)
   Markers such as <s> and <|im_start|> enter as token ids. (Text a user
   types is tokenized as Hugging Face does: a byte-level tokenizer matches
   special tokens typed in it, sentencepiece does not.) Without -y, the system
   prompt is the template's default that the tokenizer file carries (for
   SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging
   Face"), so the tokens are those of transformers' apply_chat_template. */

/* The template: --template's name if given, else the tokenizer's, else Llama 2's. */
static int chat_template(const char *name, const Tokenizer *tok) {
    if (!name) return tok->chat_template == TEMPLATE_NONE ? TEMPLATE_LLAMA2 : tok->chat_template;
    if (!strcmp(name, "chatml")) return TEMPLATE_CHATML;
    return strcmp(name, "llama3") ? TEMPLATE_LLAMA2 : TEMPLATE_LLAMA3;
}

/* Whether a template is one of Llama 3's, whose turns end at <|eot_id|>. */
static int is_llama3_template(int template) {
    return template == TEMPLATE_LLAMA3 || template == TEMPLATE_LLAMA31 || template == TEMPLATE_LLAMA32;
}

/* The system prompt: -y's if given (-y "" means none), else the template's default. */
static const char *chat_system_prompt(const char *given, const Tokenizer *tok) {
    return given ? given : tok->system_prompt;
}

/* Appends the tokens of text, in room that tokenizer_max_tokens() sizes. */
static void push_text(TokenList *list, const Tokenizer *tok, const char *text) {
    size_t len = strlen(text);
    if (len > TOK_MAX_TEXT) {
        fprintf(stderr, "run: the prompt is %zu bytes; at most %zu MiB are tokenized at once\n", len,
                TOK_MAX_TEXT >> 20);
        exit(1);
    }
    size_t room = tokenizer_max_tokens(tok, len);
    int *ids = xcalloc(room, sizeof(int), "the prompt's tokens");
    int n = tokenizer_encode_n(tok, text, len, 0, ids, room);
    if (n == -1) { fprintf(stderr, "run: out of memory tokenizing the prompt\n"); exit(1); }
    if (n < 0) { fprintf(stderr, "run: the prompt gives more than the %zu tokens expected\n", room); exit(1); }
    for (int i = 0; i < n; i++) push_token(list, ids[i]);
    free(ids);
}

/* Looks up a marker token that a template needs, by its text. */
static int marker_token(const Tokenizer *tok, const char *text, const char *tok_path) {
    int id = tokenizer_find(tok, text, strlen(text));
    if (id < 0) die(tok_path, "the chat template needs the token %s, which the tokenizer lacks", text);
    return id;
}

/* Whether the valid UTF-8 character c is whitespace to Python's str.isspace(),
   which the trim filter of Jinja (the templates' language) strips. */
static int is_python_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
           c == 0x3000;
}

/* The part of text between its leading and trailing whitespace: its start,
   and its length in *len. */
static const char *trimmed(const char *text, size_t *len) {
    const unsigned char *s = (const unsigned char *)text;
    size_t n = strlen(text), first = n, end = n;
    for (size_t i = 0; i < n;) {
        int k = utf8_valid_len(s + i, n - i);
        size_t step = k ? (size_t)k : 1; // a byte that is not UTF-8 counts as text
        if (!k || !is_python_space(tok_utf8_decode(s + i, k))) {
            if (first == n) first = i;
            end = i + step;
        }
        i += step;
    }
    *len = end - first;
    return text + first;
}

/* Appends one Llama 3 message: <|start_header_id|>role<|end_header_id|>, then
   "\n\n", preamble and the content trimmed, tokenized together as the
   template's text is, then <|eot_id|>. With content NULL, only the header and
   "\n\n" that open the answer. */
static void push_llama3_message(TokenList *list, const Tokenizer *tok, const char *tok_path, const char *role,
                                const char *preamble, const char *content) {
    push_token(list, marker_token(tok, "<|start_header_id|>", tok_path));
    push_text(list, tok, role);
    push_token(list, marker_token(tok, "<|end_header_id|>", tok_path));
    size_t len = 0, pre = strlen(preamble);
    const char *start = content ? trimmed(content, &len) : "";
    char *text = xcalloc(pre + len + 3, 1, "the prompt");
    memcpy(text, "\n\n", 2);
    memcpy(text + 2, preamble, pre);
    memcpy(text + 2 + pre, start, len);
    push_text(list, tok, text);
    free(text);
    if (content) push_token(list, marker_token(tok, "<|eot_id|>", tok_path));
}

/* Llama 3.1 / 3.2's system preamble, dated as the template dates it: 3.2's
   calls strftime_now("%d %b %Y") (month names in English, as in the C locale),
   3.1's writes 26 Jul 2024. */
static void llama3_preamble(char *out, size_t size, int template) {
    static const char *const months[12] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    struct tm day = {.tm_mday = 26, .tm_mon = 6, .tm_year = 2024 - 1900};
    time_t now = time(NULL);
    if (template == TEMPLATE_LLAMA32) localtime_r(&now, &day);
    snprintf(out, size, "Cutting Knowledge Date: December 2023\nToday Date: %02d %s %d\n\n", day.tm_mday,
             months[day.tm_mon], day.tm_year + 1900);
}

/* Appends one user turn, as the template spells it, to list. */
static void push_user_turn(TokenList *list, const Tokenizer *tok, const char *tok_path, int template,
                           const char *system, const char *user, int first_turn) {
    if (is_llama3_template(template)) {
        if (first_turn && tok->bos_id >= 0) push_token(list, tok->bos_id);
        if (first_turn && template != TEMPLATE_LLAMA3) {
            char preamble[96];
            llama3_preamble(preamble, sizeof preamble, template);
            push_llama3_message(list, tok, tok_path, "system", preamble, system ? system : "");
        } else if (first_turn && system && *system) {
            push_llama3_message(list, tok, tok_path, "system", "", system);
        }
        push_llama3_message(list, tok, tok_path, "user", "", user);
        push_llama3_message(list, tok, tok_path, "assistant", "", NULL);
        return;
    }
    if (template == TEMPLATE_CHATML) {
        int start = marker_token(tok, "<|im_start|>", tok_path), end = marker_token(tok, "<|im_end|>", tok_path);
        if (first_turn && system && *system) {
            push_token(list, start);
            push_text(list, tok, "system\n");
            push_text(list, tok, system);
            push_token(list, end);
            push_text(list, tok, "\n");
        }
        push_token(list, start);
        push_text(list, tok, "user\n");
        push_text(list, tok, user);
        push_token(list, end);
        push_text(list, tok, "\n");
        push_token(list, start);
        push_text(list, tok, "assistant\n");
        return;
    }
    if (tok->bos_id >= 0) push_token(list, tok->bos_id);
    size_t len = strlen(user) + (system ? strlen(system) : 0) + 64;
    char *text = xcalloc(len, 1, "the prompt");
    if (first_turn && system && *system)
        snprintf(text, len, "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", system, user);
    else
        snprintf(text, len, "[INST] %s [/INST]", user);
    push_text(list, tok, text);
    free(text);
}

/* Closes the previous answer as the template writes it: its last token
   if that was shown but never fed back (the -n limit or a stop string ended
   the answer), then </s>, <|im_end|>\n or <|eot_id|>. */
static void push_answer_end(TokenList *list, const Session *s, const Tokenizer *tok, const char *tok_path,
                            int template, int last) {
    if (last >= 0 && !is_stop_token(s, last)) push_token(list, last);
    if (template == TEMPLATE_CHATML) {
        push_token(list, marker_token(tok, "<|im_end|>", tok_path));
        push_text(list, tok, "\n");
    } else if (is_llama3_template(template)) {
        push_token(list, marker_token(tok, "<|eot_id|>", tok_path));
    } else if (tok->eos_id >= 0) {
        push_token(list, tok->eos_id);
    }
}

#define MAX_PROMPT_BYTES ((size_t)64 << 20) // of a prompt file or a chat line: more than any context holds

/* Reads one line from stdin, without its line end, into line (room for
   MAX_PROMPT_BYTES + 1): returns 1, 0 at end of input, or -1 for a longer
   line, whose rest is read and dropped, so that memory stays bounded. */
static int read_line(char *line) {
    size_t n = 0;
    int c;
    while ((c = getchar()) != EOF && c != '\n') {
        if (n == MAX_PROMPT_BYTES) {
            while ((c = getchar()) != EOF && c != '\n') {}
            return -1;
        }
        line[n++] = (char)c;
    }
    while (n > 0 && line[n - 1] == '\r') n--;
    line[n] = '\0';
    return c != EOF || n > 0;
}

/* ----------------------------------------------------------------------------
   The trace, for watching a model work. --trace: per token and layer, how
   the residual stream grows, how spread out each head's attention is, and
   where it looks. --lens K: the logit lens, what the model would predict
   if it stopped after each layer. --attention P-Q: every head's attention
   weights at positions P to Q, for heatmaps. Three calls in
   forward_tokens(), each behind `if (s->trace)`, fill them in; with all
   three views off they cost three untaken branches per layer. Everything is recomputed here with the
   plain kernels, apart from the kernel table, so that the fast kernels stay
   as they are. */

/* What the command line asked the trace for. */
typedef struct {
    int stats;                  // --trace
    int lens_k;                 // --lens: tokens shown per position and layer; 0 = off
    int attention_first;        // --attention: the positions whose weights are kept;
    int attention_last;         // -1 = off
    int json;                   // --trace-format json: JSON lines instead of text
} TraceRequest;

/* What each layer did to each token of the last forward pass, filled in by
   forward_tokens() when RunState.trace is set (NULL, and no cost,
   otherwise) and printed by the generation code, which knows the tokens'
   text. */
#define TRACE_TOP 3 // attended positions shown per token and layer
typedef struct {
    float rms[2][3];        // [attention, MLP] x [residual before, the block's output, residual after]
    int top[TRACE_TOP];     // the positions attended most, by weight averaged over heads; -1: none
    float top_weight[TRACE_TOP];
} TraceRow;

struct Trace {
    TraceRequest asked;
    TraceRow *rows;     // (batch, n_layers)
    float *entropy;     // (batch, n_layers, n_heads) of each head's attention weights, in bits
    float *weights;     // (ctx) one head's attention weights
    float *mean;        // (ctx) the weights averaged over heads
    int n_layers, n_heads, dim;
    const Matrix *classifier;   // --lens: the model's last steps, applied to every layer's output
    const float *final_norm;
    float norm_eps;
    int *lens_top;              // (batch, n_layers, lens_k) the likeliest next tokens, most first
    float *lens_prob;           // (batch, n_layers, lens_k) their probabilities
    float *lens_x;              // (dim) one row of the stream, final-normed
    float *lens_logits;         // (vocab) its logits, then probabilities
    ProductScratch lens_in;     // lens_x as the classifier's product takes it
    float *attention;           // --attention: (slots, n_layers, n_heads, attention_last + 1)
    int slots;                  // positions of one batch that --attention can ask for
};

/* Turns the trace on, with room for a whole batch. */
static void alloc_trace(Transformer *t, const TraceRequest *asked) {
    RunState *s = &t->state;
    const Config *c = &t->config;
    Trace *tr = xcalloc(1, sizeof *tr, "the trace");
    size_t rows = mul_size(s->batch, c->n_layers), heads = mul_size(rows, c->n_heads);
    tr->asked = *asked;
    tr->rows = xcalloc(rows, sizeof *tr->rows, "the trace");
    tr->entropy = xcalloc(heads, sizeof(float), "the trace");
    tr->weights = xcalloc(s->ctx, sizeof(float), "the trace");
    tr->mean = xcalloc(s->ctx, sizeof(float), "the trace");
    tr->n_layers = c->n_layers, tr->n_heads = c->n_heads, tr->dim = c->dim;
    tr->classifier = &t->weights.classifier, tr->final_norm = t->weights.final_norm, tr->norm_eps = c->norm_eps;
    if (asked->lens_k) {
        tr->lens_top = xcalloc(mul_size(rows, asked->lens_k), sizeof(int), "the logit lens");
        tr->lens_prob = xcalloc(mul_size(rows, asked->lens_k), sizeof(float), "the logit lens");
        tr->lens_x = xcalloc(c->dim, sizeof(float), "the logit lens");
        tr->lens_logits = xcalloc(c->vocab_size, sizeof(float), "the logit lens");
        alloc_quantized(&tr->lens_in.q, c->dim, "the logit lens"); // one row of dim
        alloc_quantized(&tr->lens_in.rest, c->dim, "the logit lens");
        tr->lens_in.wide = xcalloc(c->dim, sizeof(int16_t), "the logit lens"); // q8_0 on AVX2
        tr->lens_in.wide_d = xcalloc(c->dim / GROUP_SIZE + 1, sizeof(float), "the logit lens");
    }
    if (asked->attention_last >= 0) {
        int span = asked->attention_last - asked->attention_first + 1;
        tr->slots = span < s->batch ? span : s->batch;
        size_t per_slot = mul_size((size_t)c->n_layers * c->n_heads, (size_t)asked->attention_last + 1);
        tr->attention = xcalloc(mul_size(tr->slots, per_slot), sizeof(float), "the attention weights");
    }
    s->trace = tr;
}

static void free_trace(Trace *tr) {
    if (!tr) return;
    free_quantized(&tr->lens_in.q);
    free_quantized(&tr->lens_in.rest);
    free(tr->lens_in.wide), free(tr->lens_in.wide_d);
    free(tr->rows), free(tr->entropy), free(tr->weights), free(tr->mean), free(tr->lens_top), free(tr->lens_prob);
    free(tr->lens_x), free(tr->lens_logits), free(tr->attention), free(tr);
}

/* sqrt(mean(x^2)) of a row of n. */
static float rms(const float *x, int n) {
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += (double)x[i] * x[i];
    return (float)sqrt(sum / n);
}

/* --lens, after layer `layer`: each of the n rows of the stream x (n, dim)
   through the final norm, the classifier and a softmax, as if it were the
   last layer, and the lens_k likeliest tokens. */
static void lens(Trace *tr, int layer, const float *x, int n) {
    const Matrix *w = tr->classifier;
    int k = tr->asked.lens_k, vocab = w->rows;
    for (int t = 0; t < n; t++) {
        kernels.rmsnorm(tr->lens_x, x + (size_t)t * tr->dim, tr->final_norm, 1, tr->dim, tr->norm_eps);
        Product logits = {tr->lens_logits, w};
        linear(&logits, 1, tr->lens_x, 1, &tr->lens_in);
        softmax(tr->lens_logits, vocab);
        size_t at = ((size_t)t * tr->n_layers + layer) * k;
        top_indices(tr->lens_top + at, tr->lens_logits, vocab, k);
        for (int j = 0; j < k; j++) tr->lens_prob[at + j] = tr->lens_logits[tr->lens_top[at + j]];
    }
}

/* After a block's residual add: the stream x (n, dim) as it is now and the
   block's output (n, dim) that was added to it. The stream before is
   x - output, up to the rounding of one addition. After the MLP, the lens. */
static void trace_residual(Trace *tr, int layer, int block, const float *x, const float *output, int n) {
    int dim = tr->dim;
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * dim, *ot = output + (size_t)t * dim;
        double before = 0.0;
        for (int i = 0; i < dim; i++) before += (double)(xt[i] - ot[i]) * (xt[i] - ot[i]);
        float *r = tr->rows[(size_t)t * tr->n_layers + layer].rms[block];
        r[0] = (float)sqrt(before / dim), r[1] = rms(ot, dim), r[2] = rms(xt, dim);
    }
    if (block == TRACE_MLP && tr->asked.lens_k) lens(tr, layer, x, n);
}

static int attention_asked(const Trace *tr, int position) {
    return position >= tr->asked.attention_first && position <= tr->asked.attention_last;
}

/* Where --attention keeps the weights (position + 1) of one head at a
   position it asked for: the positions of one batch that it asked for
   are consecutive, at most slots of them, so each has a slot of its own. */
static float *attention_kept(const Trace *tr, int position, int layer, int head) {
    size_t slot = (size_t)position % tr->slots;
    return tr->attention + ((slot * tr->n_layers + layer) * tr->n_heads + head) * (tr->asked.attention_last + 1);
}

/* Before attention overwrites the queries q (n, q_dim): each head's
   attention weights, softmax(q k^T / sqrt(head_dim)) over the positions it
   sees, recomputed from the cache; their entropy per head, the TRACE_TOP
   positions of the most weight averaged over the heads, and the weights
   themselves at the positions --attention asked for. */
static void trace_attention(Trace *tr, int layer, const float *q, const KVCache *kv, int pos, int n) {
    int n_heads = kv->n_heads, group = n_heads / kv->n_kv_heads;
    for (int t = 0; t < n; t++) {
        int n_pos = pos + t + 1;
        TraceRow *row = &tr->rows[(size_t)t * tr->n_layers + layer];
        float *entropy = tr->entropy + ((size_t)t * tr->n_layers + layer) * n_heads;
        memset(tr->mean, 0, (size_t)n_pos * sizeof(float));
        for (int h = 0; h < n_heads; h++) {
            attention_scores(tr->weights, q + ((size_t)t * n_heads + h) * kv->head_dim, kv, h / group, n_pos);
            softmax(tr->weights, n_pos);
            if (attention_asked(tr, pos + t))
                memcpy(attention_kept(tr, pos + t, layer, h), tr->weights, (size_t)n_pos * sizeof(float));
            double bits = 0.0;
            for (int p = 0; p < n_pos; p++) {
                float w = tr->weights[p];
                if (w > 0.0f) bits -= w * log2((double)w);
                tr->mean[p] += w / n_heads;
            }
            entropy[h] = (float)bits;
        }
        for (int j = 0; j < TRACE_TOP; j++) { // selection: TRACE_TOP is small; ties to the earlier position
            int best = -1;
            for (int p = 0; p < n_pos; p++) {
                int taken = 0;
                for (int i = 0; i < j && !taken; i++) taken = row->top[i] == p;
                if (!taken && (best < 0 || tr->mean[p] > tr->mean[best])) best = p;
            }
            row->top[j] = best;
            row->top_weight[j] = best >= 0 ? tr->mean[best] : 0.0f;
        }
    }
}

/* ---- The views' output */

/* A number of a JSON line: 7 significant digits, as a float holds; null
   when it is not finite (a damaged model), which JSON cannot write. */
static void print_json_number(FILE *f, float v) {
    if (isfinite(v)) fprintf(f, "%.7g", v);
    else fputs("null", f);
}

/* The start of a trace line of view `view` for position pos of token. */
static void print_trace_head(const Session *s, const char *view, int pos, int layer, int token) {
    const Trace *tr = s->transformer->state.trace;
    if (!tr->asked.json) { fprintf(stderr, "%s pos=%d layer=%d", view, pos, layer); return; }
    fprintf(stderr, "{\"view\": \"%s\", \"pos\": %d, \"layer\": %d, \"token\": %d, \"text\": ", view, pos, layer,
            token);
    print_token_text(stderr, s, token);
}

/* --trace: what layer l did at position pos (row t of the last pass). */
static void print_trace_stats(const Session *s, int t, int l, int pos, int token) {
    const Config *c = &s->transformer->config;
    const Trace *tr = s->transformer->state.trace;
    const TraceRow *row = &tr->rows[(size_t)t * c->n_layers + l];
    const float *entropy = tr->entropy + ((size_t)t * c->n_layers + l) * c->n_heads;
    print_trace_head(s, "trace", pos, l, token);
    if (tr->asked.json) {
        const char *names[5] = {"rms_in", "attn", "rms_mid", "mlp", "rms_out"};
        float values[5] = {row->rms[TRACE_ATTENTION][0], row->rms[TRACE_ATTENTION][1], row->rms[TRACE_ATTENTION][2],
                           row->rms[TRACE_MLP][1], row->rms[TRACE_MLP][2]};
        for (int i = 0; i < 5; i++) {
            fprintf(stderr, ", \"%s\": ", names[i]);
            print_json_number(stderr, values[i]);
        }
        fprintf(stderr, ", \"entropy\": [");
        for (int h = 0; h < c->n_heads; h++) {
            fputs(h ? ", " : "", stderr);
            print_json_number(stderr, entropy[h]);
        }
        fprintf(stderr, "], \"top\": [");
        for (int j = 0; j < TRACE_TOP && row->top[j] >= 0; j++) {
            fprintf(stderr, "%s{\"pos\": %d, \"weight\": ", j ? ", " : "", row->top[j]);
            print_json_number(stderr, row->top_weight[j]);
            fputc('}', stderr);
        }
        fprintf(stderr, "]}\n");
        return;
    }
    fprintf(stderr, " rms_in=%.6g attn=%.6g rms_mid=%.6g mlp=%.6g rms_out=%.6g entropy=",
            row->rms[TRACE_ATTENTION][0], row->rms[TRACE_ATTENTION][1], row->rms[TRACE_ATTENTION][2],
            row->rms[TRACE_MLP][1], row->rms[TRACE_MLP][2]);
    for (int h = 0; h < c->n_heads; h++) fprintf(stderr, h ? ",%.4f" : "%.4f", entropy[h]);
    fprintf(stderr, " top=");
    for (int j = 0; j < TRACE_TOP && row->top[j] >= 0; j++)
        fprintf(stderr, j ? ",%d:%.4f" : "%d:%.4f", row->top[j], row->top_weight[j]);
    fputc('\n', stderr);
}

/* --lens: the likeliest next tokens had layer l been the last, at position
   pos (row t of the last pass). */
static void print_lens(const Session *s, int t, int l, int pos, int token) {
    const Trace *tr = s->transformer->state.trace;
    int k = tr->asked.lens_k, json = tr->asked.json;
    size_t at = ((size_t)t * tr->n_layers + l) * k;
    print_trace_head(s, "lens", pos, l, token);
    fprintf(stderr, json ? ", \"top\": [" : " top:");
    for (int j = 0; j < k; j++) {
        fprintf(stderr, json ? "%s{\"token\": %d, \"text\": " : " %s%d ", j && json ? ", " : "", tr->lens_top[at + j]);
        print_token_text(stderr, s, tr->lens_top[at + j]);
        if (json) {
            fprintf(stderr, ", \"prob\": ");
            print_json_number(stderr, tr->lens_prob[at + j]);
            fputc('}', stderr);
        } else {
            fprintf(stderr, " %.4f", tr->lens_prob[at + j]);
        }
    }
    fprintf(stderr, json ? "]}\n" : "\n");
}

/* --attention: every head's weights over positions 0 .. pos at layer l. */
static void print_attention(const Session *s, int l, int pos, int token) {
    const Trace *tr = s->transformer->state.trace;
    if (tr->asked.json) {
        print_trace_head(s, "attention", pos, l, token);
        fprintf(stderr, ", \"weights\": [");
    }
    for (int h = 0; h < tr->n_heads; h++) {
        const float *w = attention_kept(tr, pos, l, h);
        if (tr->asked.json) {
            fputs(h ? ", [" : "[", stderr);
            for (int p = 0; p <= pos; p++) {
                fputs(p ? ", " : "", stderr);
                print_json_number(stderr, w[p]);
            }
            fputc(']', stderr);
        } else {
            fprintf(stderr, "attention pos=%d layer=%d head=%d weights=", pos, l, h);
            for (int p = 0; p <= pos; p++) fprintf(stderr, p ? ",%.4f" : "%.4f", w[p]);
            fputc('\n', stderr);
        }
    }
    if (tr->asked.json) fprintf(stderr, "]}\n");
}

/* After a forward pass over tokens (n) from position pos, what the trace
   was asked for, position by position:

     --trace: a line naming the token, then one for each layer

       trace pos=P token=ID text="..."
       trace pos=P layer=L rms_in=R attn=A rms_mid=R mlp=M rms_out=R entropy=E0,E1,.. top=P0:W0,P1:W1,..

     rms_in, rms_mid and rms_out are the RMS of the residual stream entering
     the layer, after attention's output (of RMS attn) was added, and after
     the MLP's (mlp) was; entropy is each head's attention, in bits (0: all
     weight on one position; log2(P + 1): spread evenly); top, the positions
     attended most, with their weight averaged over heads;

     --lens K: one line for each layer, its K likeliest next tokens

       lens pos=P layer=L top: ID "..." PROB ID "..." PROB ..

     --attention: for a position asked for, one line per layer and head

       attention pos=P layer=L head=H weights=W0,W1,..,WP

   With --trace-format json, each of these is one JSON object per position
   and layer instead, with the token and its text (docs/VIEWS.md). */
static void print_trace(const Session *s, const int *tokens, int n, int pos) {
    const Config *c = &s->transformer->config;
    const Trace *tr = s->transformer->state.trace;
    for (int t = 0; t < n; t++) {
        if (tr->asked.stats && !tr->asked.json) {
            fprintf(stderr, "trace pos=%d token=%d text=", pos + t, tokens[t]);
            print_token_text(stderr, s, tokens[t]);
            fputc('\n', stderr);
        }
        for (int l = 0; tr->asked.stats && l < c->n_layers; l++) print_trace_stats(s, t, l, pos + t, tokens[t]);
        for (int l = 0; tr->asked.lens_k && l < c->n_layers; l++) print_lens(s, t, l, pos + t, tokens[t]);
        for (int l = 0; attention_asked(tr, pos + t) && l < c->n_layers; l++) print_attention(s, l, pos + t, tokens[t]);
    }
}

/* ----------------------------------------------------------------------------
   The command line. */

static void print_help(void) {
    printf(
        "usage: ./run MODEL [options]\n"
        "       ./run [MODEL] --tokenize -z TOKENIZER -i TEXT\n"
        "       ./run MODEL -m score -f TEXT_FILE\n"
        "\n"
        "Runs a Llama-2-style checkpoint (ours, written by export.py, llama2.c's\n"
        "legacy format, or llama.cpp's GGUF). Text goes to stdout; statistics and\n"
        "notices to stderr.\n"
        "\n"
        "prompt and model:\n"
        "  -i TEXT       prompt (without -i or -f, generation starts from BOS alone)\n"
        "  -f PATH       read the prompt from a file (a regular file, at most 64 MiB)\n"
        "  --tokens IDS  prompt as token ids, e.g. \"1 450 4996\" (no tokenizer needed;\n"
        "                the output is token ids, or text when -z names a tokenizer)\n"
        "  -z PATH       tokenizer (default: a GGUF model's own, else tokenizer.bin beside\n"
        "                MODEL, then ./tokenizer.bin)\n"
        "  -n N          new tokens to generate (default 256; stops earlier at end of\n"
        "                sequence, at a stop string or when the context is full)\n"
        "  -c N          context length: positions the KV cache holds (default: the model's)\n"
        "  -b N          prompt tokens per forward pass (default 256; 1 = one at a time)\n"
        "  -m MODE       generate (default), chat, or score (perplexity of the prompt text)\n"
        "  -y TEXT       system prompt for chat (default: the template's, if the tokenizer\n"
        "                has one; -y \"\" for none)\n"
        "  --template T  chat template: llama2, chatml or llama3 (default: from the\n"
        "                tokenizer); a chatml or llama3 answer ends at <|im_end|> or\n"
        "                <|eot_id|> too\n"
        "  --stride N    score: windows of the context length start N tokens apart\n"
        "                (default: half the context)\n"
        "sampling, applied in this order:\n"
        "  --repeat-penalty F     divide a positive logit (multiply a negative one) of a\n"
        "                         token seen in the window by F (default 1 = off)\n"
        "  --frequency-penalty F  subtract F x the token's count in the window (default 0)\n"
        "  --presence-penalty F   subtract F once if the token is in the window (default 0)\n"
        "  --repeat-window N      the last N tokens, prompt included (default 64)\n"
        "  -t F          temperature (default 1.0; 0 = greedy)\n"
        "  -k N          top-k (default 0 = off)\n"
        "  -p F          top-p, in (0, 1] (default 0.9; 1 = off)\n"
        "  --min-p F     drop tokens below F x the top probability (default 0 = off)\n"
        "  -s N          random seed for the draw (default: from the clock)\n"
        "  --stop TEXT   end generation where the output contains TEXT (repeatable)\n"
        "output:\n"
        "  --logits PATH write raw little-endian float32 logits, one row of vocab_size\n"
        "                for every forward position (prompt, then each fed-back token);\n"
        "                a run that fails removes it\n"
        "  --probs K     after each generated token, show its probability and the K most\n"
        "                likely tokens on stderr (after penalties and temperature)\n"
        "  --probs-format text|json  one line per token, plain or JSON (default text)\n"
        "  --trace       for each position and layer, one line on stderr: RMS of the\n"
        "                residual stream before and after attention and the MLP, each\n"
        "                head's attention entropy (bits), the positions attended most\n"
        "  --lens K      logit lens: for each position and layer, the K most likely next\n"
        "                tokens (1 <= K <= 100, at most the vocabulary) and their\n"
        "                probabilities, had the model stopped after that layer\n"
        "  --attention P or P-Q  every head's attention weights in every layer at\n"
        "                position P (or each of P to Q that the run reaches), over\n"
        "                positions 0 .. P\n"
        "  --trace-format text|json  --trace, --lens and --attention as lines of text\n"
        "                (default) or JSON objects, one per position and layer\n"
        "  --tokenize    print the prompt's token ids on one line and exit (with -m chat:\n"
        "                the first turn, as the chat template wraps it)\n"
        "  -h, --help    this help\n"
        "\n"
        "Without a tokenizer, prompts are given with --tokens and output is token ids.\n"
        "Exit status: 0 ok, 1 bad file or failed run (a write to stdout that fails\n"
        "included), 2 bad command line.\n");
}

typedef struct {
    const char *model_path, *tokenizer_path, *prompt, *prompt_file, *prompt_ids;
    const char *mode, *system_prompt, *template_name, *logits_path;
    int steps, context, batch, stride, tokenize_only, seed_given, probs_k, probs_format;
    TraceRequest views;         // --trace, --lens, --attention, --trace-format
    SamplerSettings sampling;
    const char *stop_strings[MAX_STOP_STRINGS];
    int n_stop_strings;
    uint64_t seed;
} Options;

/* The parsers below never exit: a bad value is -1 with the reason in err
   (ERROR_SIZE), which main() prints with usage_error(), so that a fuzzer can
   feed them any command line. */

static int parse_int(int *out, const char *flag, const char *text, long min, long max, char *err) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end != '\0' || v < min || v > max)
        return fail(err, "%s expects an integer in [%ld, %ld], got '%s'", flag, min, max, text);
    *out = (int)v;
    return 0;
}

static int parse_float(float *out, const char *flag, const char *text, float min, float max, int min_inclusive,
                       char *err) {
    char *end;
    errno = 0;
    float v = strtof(text, &end);
    int below = min_inclusive ? v < min : v <= min;
    if (errno || end == text || *end != '\0' || !isfinite(v) || below || v > max)
        return fail(err, "%s expects a number in %c%g, %g], got '%s'", flag, min_inclusive ? '[' : '(', min, max,
                    text);
    *out = v;
    return 0;
}

/* --attention's P or P-Q: the positions whose attention weights to show. */
static int parse_positions(TraceRequest *r, const char *text, char *err) {
    char *end;
    errno = 0;
    long first = strtol(text, &end, 10), last = first;
    if (!errno && end != text && *end == '-' && end[1] >= '0' && end[1] <= '9') last = strtol(end + 1, &end, 10);
    if (errno || end == text || *end != '\0' || first < 0 || last < first || last >= MAX_SEQ_LEN)
        return fail(err, "--attention expects a position P or positions P-Q, 0 <= P <= Q < %d, got '%s'",
                    MAX_SEQ_LEN, text);
    r->attention_first = (int)first, r->attention_last = (int)last;
    return 0;
}

/* Reads the command line into o. Returns 0 to run, 1 when -h asks for the
   help, -1 (with err) for a bad command line. */
static int parse_options(Options *o, int argc, char **argv, char *err) {
    *o = (Options){.steps = 256, .batch = DEFAULT_BATCH, .mode = "generate",
                   .views = {.attention_first = -1, .attention_last = -1},
                   .sampling = {.temperature = 1.0f, .top_p = 0.9f, .repeat_penalty = 1.0f,
                                .repeat_window = 64}};
    SamplerSettings *sp = &o->sampling;
    int i = 1;
    if (i < argc && argv[i][0] != '-') o->model_path = argv[i++];
    for (; i < argc; i++) {
        const char *flag = argv[i];
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help")) return 1;
        if (!strcmp(flag, "--tokenize")) { o->tokenize_only = 1; continue; }
        if (!strcmp(flag, "--trace")) { o->views.stats = 1; continue; }
        if (flag[0] != '-') return fail(err, "unexpected argument '%s'", flag);
        if (i + 1 >= argc) return fail(err, "%s needs a value", flag);
        const char *value = argv[++i];
        int bad = 0;
        if (!strcmp(flag, "-i")) o->prompt = value;
        else if (!strcmp(flag, "-f")) o->prompt_file = value;
        else if (!strcmp(flag, "--tokens")) o->prompt_ids = value;
        else if (!strcmp(flag, "-z")) o->tokenizer_path = value;
        else if (!strcmp(flag, "-n")) bad = parse_int(&o->steps, flag, value, 0, INT32_MAX, err);
        else if (!strcmp(flag, "-c")) bad = parse_int(&o->context, flag, value, 1, INT32_MAX, err);
        else if (!strcmp(flag, "-b")) bad = parse_int(&o->batch, flag, value, 1, MAX_BATCH, err);
        else if (!strcmp(flag, "--stride")) bad = parse_int(&o->stride, flag, value, 1, INT32_MAX, err);
        else if (!strcmp(flag, "-t")) bad = parse_float(&sp->temperature, flag, value, 0.0f, 100.0f, 1, err);
        else if (!strcmp(flag, "-p")) bad = parse_float(&sp->top_p, flag, value, 0.0f, 1.0f, 0, err);
        else if (!strcmp(flag, "-k")) bad = parse_int(&sp->top_k, flag, value, 0, INT32_MAX, err);
        else if (!strcmp(flag, "--min-p")) bad = parse_float(&sp->min_p, flag, value, 0.0f, 1.0f, 1, err);
        else if (!strcmp(flag, "--repeat-penalty"))
            bad = parse_float(&sp->repeat_penalty, flag, value, 0.0f, 100.0f, 0, err);
        else if (!strcmp(flag, "--frequency-penalty"))
            bad = parse_float(&sp->frequency_penalty, flag, value, -100.0f, 100.0f, 1, err);
        else if (!strcmp(flag, "--presence-penalty"))
            bad = parse_float(&sp->presence_penalty, flag, value, -100.0f, 100.0f, 1, err);
        else if (!strcmp(flag, "--repeat-window")) bad = parse_int(&sp->repeat_window, flag, value, 0, INT32_MAX, err);
        else if (!strcmp(flag, "--probs")) bad = parse_int(&o->probs_k, flag, value, 0, 100, err);
        else if (!strcmp(flag, "--probs-format")) {
            if (strcmp(value, "text") && strcmp(value, "json"))
                return fail(err, "--probs-format expects text or json, got '%s'", value);
            o->probs_format = strcmp(value, "json") ? PROBS_TEXT : PROBS_JSON;
        } else if (!strcmp(flag, "--lens")) bad = parse_int(&o->views.lens_k, flag, value, 1, 100, err);
        else if (!strcmp(flag, "--attention")) bad = parse_positions(&o->views, value, err);
        else if (!strcmp(flag, "--trace-format")) {
            if (strcmp(value, "text") && strcmp(value, "json"))
                return fail(err, "--trace-format expects text or json, got '%s'", value);
            o->views.json = !strcmp(value, "json");
        } else if (!strcmp(flag, "--stop")) {
            if (!*value) return fail(err, "--stop needs a non-empty text");
            if (o->n_stop_strings == MAX_STOP_STRINGS) return fail(err, "at most %d --stop strings", MAX_STOP_STRINGS);
            o->stop_strings[o->n_stop_strings++] = value;
        } else if (!strcmp(flag, "-s")) {
            char *end;
            errno = 0;
            unsigned long long seed = strtoull(value, &end, 10);
            if (errno || end == value || *end != '\0' || value[0] == '-')
                return fail(err, "-s expects a non-negative integer, got '%s'", value);
            o->seed = seed;
            o->seed_given = 1;
        } else if (!strcmp(flag, "-m")) o->mode = value;
        else if (!strcmp(flag, "-y")) o->system_prompt = value;
        else if (!strcmp(flag, "--template")) o->template_name = value;
        else if (!strcmp(flag, "--logits")) o->logits_path = value;
        else return fail(err, "unknown option '%s'", flag);
        if (bad) return -1;
    }
    if (strcmp(o->mode, "generate") && strcmp(o->mode, "chat") && strcmp(o->mode, "score"))
        return fail(err, "-m expects generate, chat or score, got '%s'", o->mode);
    if (o->template_name && strcmp(o->template_name, "llama2") && strcmp(o->template_name, "chatml") &&
        strcmp(o->template_name, "llama3"))
        return fail(err, "--template expects llama2, chatml or llama3, got '%s'", o->template_name);
    if ((o->prompt != NULL) + (o->prompt_file != NULL) + (o->prompt_ids != NULL) > 1)
        return fail(err, "give the prompt once: -i, -f or --tokens");
    if (!o->model_path && !o->tokenize_only) return fail(err, "no model given");
    if (o->tokenize_only && o->prompt_ids) return fail(err, "--tokenize takes a text prompt (-i or -f)");
    if (!strcmp(o->mode, "chat") && o->prompt_ids) return fail(err, "chat takes a text prompt (-i or -f)");
    if (!strcmp(o->mode, "score") && !o->prompt && !o->prompt_file && !o->prompt_ids)
        return fail(err, "score needs a text to score (-f, -i or --tokens)");
    if (o->n_stop_strings && o->prompt_ids && !o->tokenizer_path)
        return fail(err, "--stop needs text output: with --tokens, name a tokenizer (-z)");
    return 0;
}

/* The whole of a prompt file as a NUL-terminated string. */
static char *read_text_file(const char *path) {
    struct stat st;
    int fd = open_input(path, MAX_PROMPT_BYTES, "a prompt file", &st);
    size_t size = (size_t)st.st_size, n = 0;
    char *text = xcalloc(size + 1, 1, "the prompt file");
    while (n < size) { // a file that shrinks meanwhile gives what it still has
        ssize_t got = read(fd, text + n, size - n);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) die(path, "read failed: %s", strerror(errno));
        if (got == 0) break;
        n += (size_t)got;
    }
    close(fd);
    text[n] = '\0';
    if (strlen(text) != n) die(path, "the prompt file contains a NUL byte");
    return text;
}

/* Parses "1 2 3" or "1,2,3" into ids, each checked against the vocabulary;
   returns how many, or -1 (with err) for a bad id. */
static int parse_token_ids(const char *text, int vocab_size, TokenList *list, char *err) {
    const char *p = text;
    while (*p) {
        if (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n') { p++; continue; }
        char *end;
        errno = 0;
        long id = strtol(p, &end, 10);
        if (end == p || errno || id < 0 || id >= vocab_size)
            return fail(err, "--tokens: '%.20s' is not a token id in [0, %d)", p, vocab_size);
        push_token(list, (int)id);
        p = end;
    }
    return list->n;
}

/* Whether the file at path starts with GGUF's magic: a llama.cpp file,
   whose tokenizer is in its metadata. */
static int is_gguf(const char *path) {
    unsigned char magic[4] = {0};
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    int got = fd < 0 ? 0 : (int)read(fd, magic, 4);
    if (fd >= 0) close(fd);
    return got == 4 && memcmp(magic, "GGUF", 4) == 0;
}

/* Finds the tokenizer: -z, else a GGUF model's own, else tokenizer.bin
   beside the model, else ./tokenizer.bin. Returns NULL when there is none
   to be found. */
static char *find_tokenizer(const Options *o) {
    if (o->tokenizer_path) return strdup(o->tokenizer_path);
    if (o->model_path && is_gguf(o->model_path)) return strdup(o->model_path);
    if (o->model_path) {
        const char *slash = strrchr(o->model_path, '/');
        size_t dir_len = slash ? (size_t)(slash - o->model_path + 1) : 0;
        char *beside = xcalloc(dir_len + sizeof "tokenizer.bin", 1, "a path");
        memcpy(beside, o->model_path, dir_len);
        strcpy(beside + dir_len, "tokenizer.bin");
        if (access(beside, F_OK) == 0) return beside;
        free(beside);
    }
    if (access("tokenizer.bin", F_OK) == 0) return strdup("tokenizer.bin");
    return NULL;
}

static void load_tokenizer_or_die(Tokenizer *tok, const char *path, int vocab_size) {
    char err[ERROR_SIZE] = "";
    int failed = is_gguf(path) ? gguf_load_tokenizer(tok, path, vocab_size, err)
                               : tokenizer_load(tok, path, vocab_size, err, sizeof err);
    if (failed) die(path, "%s", err);
}

/* --tokenize: prints the prompt's ids and exits; with -m chat, the ids of
   the first turn as the chat template wraps the prompt. */
static int run_tokenize(const Options *o, const char *tok_path, int vocab_size, const char *text) {
    if (!tok_path) usage_error("--tokenize needs a tokenizer (-z PATH)");
    Tokenizer tok;
    load_tokenizer_or_die(&tok, tok_path, vocab_size);
    TokenList prompt = {0};
    if (!strcmp(o->mode, "chat")) {
        push_user_turn(&prompt, &tok, tok_path, chat_template(o->template_name, &tok),
                       chat_system_prompt(o->system_prompt, &tok), text, 1);
    } else {
        if (tok.add_bos) push_token(&prompt, tok.bos_id);
        push_text(&prompt, &tok, text);
        if (tok.add_eos) push_token(&prompt, tok.eos_id);
    }
    for (int i = 0; i < prompt.n; i++) printf(i ? " %d" : "%d", prompt.ids[i]);
    putchar('\n');
    free(prompt.ids);
    tokenizer_free(&tok);
    return 0;
}

static int run_chat(Session *s, const Options *o, const char *tok_path, const char *first_prompt) {
    Tokenizer *tok = s->tokenizer;
    int template = chat_template(o->template_name, tok);
    const char *system = chat_system_prompt(o->system_prompt, tok);
    if (template == TEMPLATE_CHATML) s->stop_tokens[s->n_stop_tokens++] = marker_token(tok, "<|im_end|>", tok_path);
    if (is_llama3_template(template)) s->stop_tokens[s->n_stop_tokens++] = marker_token(tok, "<|eot_id|>", tok_path);
    int interactive = first_prompt == NULL, status = 0;
    char *line = interactive ? zeroed(MAX_PROMPT_BYTES + 1, 1, "the chat line", 1) : NULL; // touched as lines fill it
    int last = -1;
    for (int turn = 0;; turn++) {
        const char *user = first_prompt;
        if (interactive) {
            fprintf(stderr, "> ");
            int got = read_line(line);
            if (got == 0) break;
            if (got < 0) fprintf(stderr, "run: stdin: the line is longer than %zu MiB; try a shorter line\n",
                                 MAX_PROMPT_BYTES >> 20);
            if (got < 0 || !*line) { turn--; continue; }
            user = line;
        } else if (turn > 0) break;
        TokenList prompt = {0};
        if (turn > 0) push_answer_end(&prompt, s, tok, tok_path, template, last);
        push_user_turn(&prompt, tok, tok_path, template, system, user, turn == 0);
        if (s->pos + prompt.n > s->transformer->state.ctx) { // a line that does not fit is refused, not cut
            fprintf(stderr, "run: this turn needs %d more positions but the context has %d left%s\n", prompt.n,
                    s->transformer->state.ctx - s->pos, interactive ? "; try a shorter line" : " (see -c)");
            free(prompt.ids);
            if (!interactive) { status = 1; break; }
            turn--;
            continue;
        }
        decoder_init(&s->decoder);
        last = complete(s, prompt.ids, prompt.n, o->steps, 0);
        finish_output(s);
        free(prompt.ids);
        if (s->context_full) {
            fprintf(stderr, "run: the context is full (%d positions); ending the chat\n", s->transformer->state.ctx);
            break;
        }
    }
    free(line);
    return status;
}

/* A failed run leaves no half-written file: while the --logits file is
   being written its path is kept here, and every exit but a successful
   one removes it (at exit, or in the SIGBUS handler). */
static const char *unfinished_output;

static void remove_unfinished_output(void) {
    if (unfinished_output) unlink(unfinished_output);
}

/* Another program that truncates the model while it is mapped makes the
   kernels' next read past the new end raise SIGBUS. catch_truncation()
   installs a handler that says so in one line, prepared beforehand, since
   it may only call async-signal-safe functions (write, unlink, _exit). */
static char mapped_file_changed[4096];
static size_t mapped_file_changed_len;

static void on_sigbus(int signal) {
    (void)signal;
    ssize_t written = write(STDERR_FILENO, mapped_file_changed, mapped_file_changed_len);
    (void)written; // nothing more can be done if stderr is gone
    if (unfinished_output) unlink(unfinished_output);
    _exit(1);
}

static void catch_truncation(const char *path) {
    snprintf(mapped_file_changed, sizeof mapped_file_changed - 1,
             "run: %s: the file changed while mapped (truncated by another program?)", path);
    make_one_line(mapped_file_changed);
    strcat(mapped_file_changed, "\n");
    mapped_file_changed_len = strlen(mapped_file_changed);
    struct sigaction sa = {.sa_handler = on_sigbus};
    sigaction(SIGBUS, &sa, NULL);
}

/* Opens the --logits file. A path that names the model or another input
   of the run (the same device and inode) is refused before anything is
   truncated: writing over the model would pull the mapped weights from
   under the engine, and the tokenizer or prompt would be lost. A regular
   file is removed again if the run fails (see unfinished_output). */
static FILE *open_output(const char *path, const Transformer *model, const char *tok_path,
                         const char *prompt_path) {
    int fd = open(path, O_WRONLY | O_CREAT, 0666);
    if (fd < 0) die(path, "cannot open for writing: %s", strerror(errno));
    struct stat out, in;
    if (fstat(fd, &out) != 0) die(path, "cannot stat: %s", strerror(errno));
    if (out.st_dev == model->device && out.st_ino == model->inode)
        die(path, "is the model file %s; --logits must name another file", model->path);
    const char *inputs[][2] = {{"tokenizer", tok_path}, {"prompt", prompt_path}};
    for (int i = 0; i < 2; i++)
        if (inputs[i][1] && stat(inputs[i][1], &in) == 0 && in.st_dev == out.st_dev && in.st_ino == out.st_ino)
            die(path, "is the %s file %s; --logits must name another file", inputs[i][0], inputs[i][1]);
    if (S_ISREG(out.st_mode)) {
        if (ftruncate(fd, 0) != 0) die(path, "cannot truncate: %s", strerror(errno));
        unfinished_output = path;
        atexit(remove_unfinished_output);
    }
    FILE *f = fdopen(fd, "wb");
    if (!f) die(path, "cannot open for writing: %s", strerror(errno));
    return f;
}

/* Generation or chat with a loaded model; returns the exit status. */
static int run_model(const Options *o, Transformer *transformer, const char *tok_path, const char *text) {
    Tokenizer tokenizer;
    int have_tokenizer = 0;
    if (tok_path && (!o->prompt_ids || o->tokenizer_path)) { // --tokens -z: ids in, text out
        load_tokenizer_or_die(&tokenizer, tok_path, transformer->config.vocab_size);
        have_tokenizer = 1;
    } else if (text || !strcmp(o->mode, "chat")) {
        die(o->model_path, "no tokenizer found beside the model or in ./tokenizer.bin; pass -z PATH");
    } else if (!o->prompt_ids) {
        fprintf(stderr, "run: no tokenizer found; output is token ids (pass -z PATH for text)\n");
    }
    const Config *c = &transformer->config;
    int ctx = transformer->state.ctx;

    Sampler sampler;
    uint64_t seed = o->seed_given ? o->seed : (uint64_t)time(NULL);
    init_sampler(&sampler, c->vocab_size, &o->sampling, seed);

    Session s = {.transformer = transformer, .tokenizer = have_tokenizer ? &tokenizer : NULL,
                 .sampler = &sampler, .logits_path = o->logits_path, .probs_k = o->probs_k,
                 .probs_format = o->probs_format, .n_stop_strings = o->n_stop_strings,
                 .threads = {.most = transformer->state.threads}};
    memcpy(s.stop_strings, o->stop_strings, sizeof s.stop_strings);
    decoder_init(&s.decoder);
    s.load_seconds = now_seconds() - process_start_seconds;
    if (o->logits_path) s.logits_file = open_output(o->logits_path, transformer, tok_path, o->prompt_file);

    /* llama2.c's models end a story by starting the next with BOS */
    int bos = have_tokenizer ? tokenizer.bos_id : 1;
    if (c->legacy) s.stop_tokens[s.n_stop_tokens++] = bos;
    else if (have_tokenizer && tokenizer.eos_id >= 0) s.stop_tokens[s.n_stop_tokens++] = tokenizer.eos_id;

    int status = 0;
    if (!strcmp(o->mode, "chat")) {
        status = run_chat(&s, o, tok_path, text);
        if (status == 0) print_statistics(&s);
    } else {
        TokenList prompt = {0};
        char err[ERROR_SIZE];
        if (o->prompt_ids && parse_token_ids(o->prompt_ids, c->vocab_size, &prompt, err) < 0) usage_error("%s", err);
        else if (text) {
            if (tokenizer.add_bos) push_token(&prompt, tokenizer.bos_id);
            push_text(&prompt, &tokenizer, text);
            if (tokenizer.add_eos) push_token(&prompt, tokenizer.eos_id);
        }
        if (prompt.n == 0 && (bos < 0 || bos >= c->vocab_size)) // Qwen2's tokenizer has no BOS
            die(tok_path ? tok_path : o->model_path,
                "has no BOS token to start an empty prompt from; give a prompt (-i, -f or --tokens)");
        if (prompt.n == 0) push_token(&prompt, bos);
        if (!strcmp(o->mode, "score")) {
            int stride = o->stride ? o->stride : ctx / 2;
            if (ctx < 2) usage_error("score needs a context of at least 2 positions");
            if (stride >= ctx) usage_error("--stride %d must be below the context of %d", stride, ctx);
            status = score_text(&s, prompt.ids, prompt.n, stride);
        } else if (prompt.n > ctx) {
            fprintf(stderr, "run: the prompt is %d tokens but the context holds %d (see -c)\n", prompt.n, ctx);
            status = 1;
        } else {
            int last = complete(&s, prompt.ids, prompt.n, o->steps, 1);
            finish_output(&s);
            if (s.context_full)
                fprintf(stderr, "run: stopped: the context is full (%d positions)\n", ctx);
            else if (o->steps > 0 && is_stop_token(&s, last))
                fprintf(stderr, "run: stopped at end of sequence (token %d)\n", last);
            else if (s.stopped)
                fprintf(stderr, "run: stopped at a stop string\n");
            print_statistics(&s);
        }
        free(prompt.ids);
    }
    if (s.logits_file && fclose(s.logits_file) != 0) die(o->logits_path, "write failed: %s", strerror(errno));
    if (status == 0) unfinished_output = NULL; // complete: it stays
    free_sampler(&sampler);
    free(s.history.ids);
    free(s.held.text);
    if (have_tokenizer) tokenizer_free(&tokenizer);
    return status;
}

/* A standard stream that the caller closed (./run >&-) is taken by
   /dev/null, opened read-only: no file opened later becomes stdout (the
   --logits file would get the text), reading gives end of input, and a
   write fails (EBADF) as it would have, for check_output() to report. */
static void hold_standard_streams(void) {
    for (int fd = 0; fd <= 2; fd++)
        if (fcntl(fd, F_GETFD) < 0) open("/dev/null", O_RDONLY); // takes the lowest free descriptor: fd
}

#ifndef TESTING
int main(int argc, char **argv) {
    process_start_seconds = now_seconds();
    hold_standard_streams();
    signal(SIGPIPE, SIG_IGN); // a reader that leaves is a failed write: one line, status 1, not a signal
#ifndef PLAIN
    choose_fast_kernels();
#endif
    Options o;
    char err[ERROR_SIZE];
    int parsed = parse_options(&o, argc, argv, err);
    if (parsed < 0) usage_error("%s", err);
    if (parsed == 1) {
        print_help();
        check_output(1);
        return 0;
    }
    limit_threads();

    Transformer transformer;
    int vocab_size = -1;
    if (o.model_path) {
        load_transformer(&transformer, o.model_path);
        catch_truncation(o.model_path);
        Config *c = &transformer.config;
        vocab_size = c->vocab_size;
        int ctx = o.context ? o.context : c->max_seq_len;
        if (ctx > c->max_seq_len) usage_error("-c %d exceeds the model's max_seq_len of %d", ctx, c->max_seq_len);
        if (!o.tokenize_only) alloc_run_state(&transformer.state, c, ctx, o.batch);
        const TraceRequest *views = &o.views;
        if (views->lens_k > vocab_size)
            usage_error("--lens %d exceeds the model's vocabulary of %d tokens", views->lens_k, vocab_size);
        if (views->attention_last >= ctx)
            usage_error("--attention %d is beyond the context of %d positions (see -c)", views->attention_last, ctx);
        if (!o.tokenize_only && (views->stats || views->lens_k || views->attention_last >= 0))
            alloc_trace(&transformer, views);
    }
    char *prompt_text = o.prompt_file ? read_text_file(o.prompt_file) : NULL;
    const char *text = o.prompt ? o.prompt : prompt_text;
    char *tok_path = find_tokenizer(&o);

    int status;
    if (o.tokenize_only) {
        if (!text) usage_error("--tokenize needs a prompt (-i or -f)");
        status = run_tokenize(&o, tok_path, vocab_size, text);
    } else {
        status = run_model(&o, &transformer, tok_path, text);
    }
    free(tok_path);
    free(prompt_text);
    if (o.model_path) free_transformer(&transformer);
    check_output(1);
    return status;
}
#endif

/* ----------------------------------------------------------------------------
   llama2.c's legacy checkpoints, read as they are (see the format at the top). */

/* Reads a llama2.c header; size is at least LEGACY_HEADER_SIZE. Its fixed
   head_dim, theta and eps are the ones llama2.c trains with. */
static int read_legacy_header(Config *c, const unsigned char *data, char *err) {
    int32_t h[7];
    for (int i = 0; i < 7; i++) h[i] = read_i32(data + 4 * i);
    c->legacy = 1;
    c->dim = h[0];
    c->hidden_dim = h[1];
    c->n_layers = h[2];
    c->n_heads = h[3];
    c->n_kv_heads = h[4];
    c->tied_classifier = h[5] > 0;
    c->vocab_size = h[5] == INT32_MIN ? 0 : abs(h[5]);
    c->max_seq_len = h[6];
    c->rope_theta = 10000.0f;
    c->norm_eps = 1e-5f;
    c->weight_type = WEIGHT_F32;
    c->types_used = TYPE_BIT(WEIGHT_F32);
    if (c->n_heads <= 0 || c->dim <= 0 || c->dim % c->n_heads != 0)
        return fail(err, "not a checkpoint: no \"%s\" magic, and as a llama2.c header dim = %d is not a multiple of n_heads = %d",
                    CHECKPOINT_MAGIC, c->dim, c->n_heads);
    c->head_dim = c->dim / c->n_heads;
    return validate_config(c, err);
}

/* Walks a llama2.c legacy layout: f32 tensors packed (no alignment) and
   stored tensor-major, so layer l of wq starts l * dim * dim floats into wq. */
static size_t layout_legacy_checkpoint(const Config *c, const unsigned char *data, Weights *w) {
    size_t dim = c->dim, hidden = c->hidden_dim, vocab = c->vocab_size, L = c->n_layers;
    size_t kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    size_t shapes[9][2] = {{1, dim},      {dim, dim}, {kv_dim, dim},    {kv_dim, dim}, {dim, dim},
                           {1, dim},      {hidden, dim}, {dim, hidden}, {hidden, dim}};
    size_t off = LEGACY_HEADER_SIZE;
    const float *start[9];
    w->token_embedding = place_matrix(data, &off, vocab, dim, WEIGHT_F32, 1);
    for (int i = 0; i < 9; i++) start[i] = place_floats(data, &off, mul_size(L, shapes[i][0] * shapes[i][1]), 1);
    w->final_norm = place_floats(data, &off, dim, 1);
    place_floats(data, &off, mul_size(2, (size_t)c->max_seq_len * (c->head_dim / 2)), 1); // RoPE tables, unused
    w->classifier = c->tied_classifier ? w->token_embedding : place_matrix(data, &off, vocab, dim, WEIGHT_F32, 1);
    for (size_t l = 0; data && l < L; l++) {
        Matrix m[9];
        for (int i = 0; i < 9; i++)
            m[i] = (Matrix){.values = start[i] + l * shapes[i][0] * shapes[i][1], .rows = (int)shapes[i][0],
                            .cols = (int)shapes[i][1], .type = WEIGHT_F32};
        w->layers[l] = (LayerWeights){m[0].values, m[1], m[2], m[3], m[4], m[5].values, m[6], m[7], m[8],
                                      NULL, NULL, NULL}; // no biases
    }
    return off;
}

/* ----------------------------------------------------------------------------
   llama.cpp's GGUF files, run as they are (docs/FORMATS.md draws them):

     u32 magic "GGUF", u32 version (2 or 3), u64 tensor_count, u64 kv_count
     kv_count times:     string key, u32 value type, value
     tensor_count times: string name, u32 n_dims, u64 dims[n_dims] (the
                         fastest axis first), u32 ggml type, u64 offset
     padding to general.alignment (default 32), then the tensors' data

   where a string is a u64 length and its bytes, and an array a u32 item
   type, a u64 count and the items. Every count and length is held to the
   bytes left in the file before it is used, and each tensor's data to its
   place: a multiple of the alignment, within the file, apart from the others.

   The model is read as export.py --gguf reads it (convert/sources.py), and
   its matrices take the types export.py gives them by default, so that the
   logits are those of ./run on export.py's conversion, bit for bit: Q4_K,
   Q5_K and Q6_K blocks and, in a file of floats alone, F32, BF16 and F16
   matrices are mapped in place (BF16 as export.py --dtype bf16 keeps it,
   where its default widens it to the same numbers in f32; F16 as f16, a
   type of memory alone, whose kernels sum exactly as f32's do on the
   widened numbers, which export.py writes); every other matrix of a
   quantized file becomes q8_0, and F16 and BF16 vectors f32, once, in
   memory, as export.py converts them (gguf.quants' arithmetic, then
   quantize_q8_0's).
   qwen2's q/k rows are permuted from Hugging Face's RoPE halves into our
   pairs, so those matrices are copied. */

#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_DIMS 4
#define GGUF_MAX_NESTING 4       // arrays of arrays
#define GGUF_MAX_ARRAY_ITEMS (1 << 22) // over all the metadata arrays, as export.py allows
#define GGUF_MAX_ENTRIES (1 << 20) // keys, or tensors
enum { GGUF_STRING = 8, GGUF_ARRAY = 9 };
enum { GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7, GGML_Q8_0 = 8,
       GGML_Q2_K = 10, GGML_Q3_K = 11, GGML_Q4_K = 12, GGML_Q5_K = 13, GGML_Q6_K = 14, GGML_IQ4_NL = 20,
       GGML_IQ4_XS = 23, GGML_BF16 = 30, GGML_TYPES = 31 };
/* bytes of a metadata scalar of each value type (0: not a scalar) */
static const uint8_t GGUF_SCALAR_SIZE[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

/* The ggml types ./run reads: weights per block, bytes per block, name. */
static const struct { int block, bytes; const char *name; } GGML_TYPE[GGML_TYPES] = {
    [GGML_F32] = {1, 4, "F32"},        [GGML_F16] = {1, 2, "F16"},        [GGML_Q4_0] = {32, 18, "Q4_0"},
    [GGML_Q4_1] = {32, 20, "Q4_1"},    [GGML_Q5_0] = {32, 22, "Q5_0"},    [GGML_Q5_1] = {32, 24, "Q5_1"},
    [GGML_Q8_0] = {32, 34, "Q8_0"},    [GGML_Q2_K] = {256, 84, "Q2_K"},   [GGML_Q3_K] = {256, 110, "Q3_K"},
    [GGML_Q4_K] = {256, 144, "Q4_K"},  [GGML_Q5_K] = {256, 176, "Q5_K"},  [GGML_Q6_K] = {256, 210, "Q6_K"},
    [GGML_IQ4_NL] = {32, 18, "IQ4_NL"}, [GGML_IQ4_XS] = {256, 136, "IQ4_XS"}, [GGML_BF16] = {1, 2, "BF16"},
};

typedef struct {
    const unsigned char *text;
    size_t len;
} GgufString;

typedef struct {
    GgufString key;
    uint32_t type;      // the value's type
    size_t at;          // the value's offset in the file
} GgufKey;

typedef struct {
    GgufString name;
    uint32_t n_dims, type;
    uint64_t dims[GGUF_MAX_DIMS];
    const unsigned char *data;
    size_t bytes;
} GgufTensor;

typedef struct {
    const unsigned char *data;
    size_t size, at;    // the file, and the reading position
    size_t array_items; // metadata array items walked so far
    GgufKey *keys;
    size_t n_keys;
    GgufTensor *tensors;
    size_t n_tensors;
    char *err;
} Gguf;

/* Steps over n bytes at the reading position, if the file holds them. */
static int gguf_take(Gguf *g, size_t n, const char *what, const unsigned char **out) {
    if (n > g->size - g->at)
        return fail(g->err, "a damaged GGUF file: %s: %zu bytes at offset %zu, past the end of the file (%zu bytes)",
                    what, n, g->at, g->size);
    if (out) *out = g->data + g->at;
    g->at += n;
    return 0;
}

static uint64_t read_u64(const unsigned char *p) { return read_u32(p) | (uint64_t)read_u32(p + 4) << 32; }

static int gguf_u32(Gguf *g, const char *what, uint32_t *out) {
    const unsigned char *p = NULL;
    if (gguf_take(g, 4, what, &p)) return -1;
    *out = read_u32(p);
    return 0;
}

static int gguf_u64(Gguf *g, const char *what, uint64_t *out) {
    const unsigned char *p = NULL;
    if (gguf_take(g, 8, what, &p)) return -1;
    *out = read_u64(p);
    return 0;
}

/* A u64 count of items of at least item_size bytes each, held to the bytes left. */
static int gguf_count(Gguf *g, const char *what, size_t item_size, uint64_t *n) {
    if (gguf_u64(g, what, n)) return -1;
    if (*n > (g->size - g->at) / item_size)
        return fail(g->err, "a damaged GGUF file: %s claims %llu items of at least %zu bytes, but only %zu bytes are "
                    "left in the file", what, (unsigned long long)*n, item_size, g->size - g->at);
    return 0;
}

static int gguf_string(Gguf *g, const char *what, GgufString *s) {
    uint64_t n;
    char length[128];
    snprintf(length, sizeof length, "%s (its length)", what);
    if (gguf_count(g, length, 1, &n) || gguf_take(g, n, what, &s->text)) return -1;
    s->len = n;
    return 0;
}

/* The fewest bytes a value of a type takes, 0 for an unknown type. */
static size_t gguf_smallest(uint32_t type) {
    return type == GGUF_STRING ? 8 : type == GGUF_ARRAY ? 12 : type < 13 ? GGUF_SCALAR_SIZE[type] : 0;
}

/* Steps over one metadata value; the walk of arrays is bounded by the
   file's size and GGUF_MAX_ARRAY_ITEMS, so no count can make it long. */
static int gguf_skip_value(Gguf *g, uint32_t type, const char *what, int depth) {
    if (!gguf_smallest(type)) return fail(g->err, "a damaged GGUF file: %s: unknown value type %u", what, type);
    if (type == GGUF_STRING) {
        GgufString s;
        return gguf_string(g, what, &s);
    }
    if (type != GGUF_ARRAY) return gguf_take(g, GGUF_SCALAR_SIZE[type], what, NULL);
    uint32_t item;
    uint64_t n;
    if (depth == GGUF_MAX_NESTING)
        return fail(g->err, "a damaged GGUF file: %s: arrays nested more than %d deep", what, GGUF_MAX_NESTING);
    if (gguf_u32(g, what, &item)) return -1;
    if (!gguf_smallest(item)) return fail(g->err, "a damaged GGUF file: %s: unknown array item type %u", what, item);
    if (gguf_count(g, what, gguf_smallest(item), &n)) return -1;
    g->array_items += n;
    if (g->array_items > GGUF_MAX_ARRAY_ITEMS)
        return fail(g->err, "a damaged GGUF file: %s: the metadata arrays hold more than %d items", what,
                    GGUF_MAX_ARRAY_ITEMS);
    if (item != GGUF_STRING && item != GGUF_ARRAY) return gguf_take(g, n * GGUF_SCALAR_SIZE[item], what, NULL);
    for (uint64_t i = 0; i < n; i++)
        if (gguf_skip_value(g, item, what, depth + 1)) return -1;
    return 0;
}

/* A key or name, cut and made printable, for messages. */
static const char *gguf_printable(GgufString s, char out[81]) {
    size_t n = s.len < 80 ? s.len : 80;
    memcpy(out, s.text, n);
    out[n] = '\0';
    for (size_t i = 0; i < n; i++)
        if (out[i] == '\0') out[i] = '?';
    return out;
}

static int gguf_is(GgufString s, const char *text) { return s.len == strlen(text) && !memcmp(s.text, text, s.len); }

/* The order of keys: by their bytes, a shorter one first where one starts the other. */
static int by_key(const void *a, const void *b) {
    GgufString x = ((const GgufKey *)a)->key, y = ((const GgufKey *)b)->key;
    int c = memcmp(x.text, y.text, x.len < y.len ? x.len : y.len);
    return c ? c : (x.len > y.len) - (x.len < y.len);
}

/* The key of that name, found in the keys gguf_read_metadata() sorted; or NULL. */
static const GgufKey *gguf_find(const Gguf *g, const char *key) {
    GgufKey wanted = {.key = {(const unsigned char *)key, strlen(key)}};
    return g->n_keys ? bsearch(&wanted, g->keys, g->n_keys, sizeof(GgufKey), by_key) : NULL;
}

/* Reads the header and the metadata, remembering where each value lies. */
static int gguf_read_metadata(Gguf *g, uint64_t *n_tensors, size_t *alignment) {
    uint32_t version;
    uint64_t n_keys;
    g->at = 4;
    if (gguf_u32(g, "version", &version)) return -1;
    if ((version & 0xFFFF) == 0) return fail(g->err, "a big-endian GGUF file; ./run reads little-endian ones");
    if (version != 2 && version != 3) return fail(g->err, "not a GGUF file of version 2 or 3 (version %u)", version);
    if (gguf_u64(g, "tensor_count", n_tensors) || gguf_count(g, "kv_count", 8 + 4 + 1, &n_keys)) return -1;
    if (n_keys > GGUF_MAX_ENTRIES) return fail(g->err, "%llu metadata keys, more than %d", (unsigned long long)n_keys,
                                               GGUF_MAX_ENTRIES);
    g->keys = xcalloc(n_keys, sizeof(GgufKey), "the GGUF metadata");
    *alignment = GGUF_DEFAULT_ALIGNMENT;
    for (uint64_t k = 0; k < n_keys; k++) {
        GgufKey *key = &g->keys[g->n_keys++];
        char name[81], what[100];
        snprintf(what, sizeof what, "metadata key %llu", (unsigned long long)k);
        if (gguf_string(g, what, &key->key)) return -1;
        snprintf(what, sizeof what, "metadata %s", gguf_printable(key->key, name));
        if (gguf_u32(g, what, &key->type)) return -1;
        key->at = g->at;
        if (gguf_skip_value(g, key->type, what, 0)) return -1;
        if (gguf_is(key->key, "general.alignment")) {
            *alignment = key->type == 4 ? read_u32(g->data + key->at) : 0;
            if (*alignment == 0 || (*alignment & (*alignment - 1)))
                return fail(g->err, "a damaged GGUF file: general.alignment: expected a u32 power of two");
        }
    }
    if (g->n_keys) qsort(g->keys, g->n_keys, sizeof(GgufKey), by_key);
    for (size_t k = 1; k < g->n_keys; k++)
        if (by_key(&g->keys[k - 1], &g->keys[k]) == 0) {
            char name[81];
            return fail(g->err, "metadata key %s appears twice", gguf_printable(g->keys[k].key, name));
        }
    return 0;
}

/* Reads one tensor info: its name, shape, type and offset from the data. */
static int gguf_read_tensor_info(Gguf *g, GgufTensor *t, uint64_t *offset) {
    char name[81], what[100];
    if (gguf_string(g, "a tensor's name", &t->name)) return -1;
    snprintf(what, sizeof what, "tensor %s", gguf_printable(t->name, name));
    if (gguf_u32(g, what, &t->n_dims)) return -1;
    if (t->n_dims > GGUF_MAX_DIMS)
        return fail(g->err, "a damaged GGUF file: %s: %u dimensions, more than %d", what, t->n_dims, GGUF_MAX_DIMS);
    for (uint32_t d = 0; d < t->n_dims; d++)
        if (gguf_u64(g, what, &t->dims[d])) return -1;
    if (gguf_u32(g, what, &t->type) || gguf_u64(g, what, offset)) return -1;
    if (t->type >= GGML_TYPES || !GGML_TYPE[t->type].block)
        return fail(g->err, "%s: ggml type %u is not one ./run reads (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, "
                    "Q2_K .. Q6_K, IQ4_NL, IQ4_XS); convert the file with export.py --gguf", what, t->type);
    size_t elements = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) elements = mul_size(elements, t->dims[d]);
    if (t->n_dims && t->dims[0] % GGML_TYPE[t->type].block)
        return fail(g->err, "a damaged GGUF file: %s: %llu elements a row, not whole blocks of %d", what,
                    (unsigned long long)t->dims[0], GGML_TYPE[t->type].block);
    t->bytes = mul_size(elements / GGML_TYPE[t->type].block, GGML_TYPE[t->type].bytes);
    return 0;
}

static int by_data(const void *a, const void *b) {
    const GgufTensor *x = a, *y = b;
    return (x->data > y->data) - (x->data < y->data);
}

/* Reads the tensor infos and places each tensor's data, aligned, within the
   file and apart from the others. */
static int gguf_read_tensors(Gguf *g, uint64_t n, size_t alignment) {
    if (n > (g->size - g->at) / (8 + 4 + 8 + 4 + 8))
        return fail(g->err, "a damaged GGUF file: tensor_count claims %llu tensors, but only %zu bytes are left in "
                    "the file", (unsigned long long)n, g->size - g->at);
    if (n > GGUF_MAX_ENTRIES)
        return fail(g->err, "%llu tensors, more than %d", (unsigned long long)n, GGUF_MAX_ENTRIES);
    g->tensors = xcalloc(n, sizeof(GgufTensor), "the GGUF tensor infos");
    uint64_t *offsets = xcalloc(n, sizeof(uint64_t), "the GGUF tensor infos");
    int status = 0;
    for (; g->n_tensors < n && status == 0; g->n_tensors++)
        status = gguf_read_tensor_info(g, &g->tensors[g->n_tensors], &offsets[g->n_tensors]);
    size_t start = add_size(g->at, (alignment - g->at % alignment) % alignment);
    for (size_t i = 0; i < g->n_tensors && status == 0; i++) {
        GgufTensor *t = &g->tensors[i];
        char name[81];
        if (offsets[i] % alignment)
            status = fail(g->err, "a damaged GGUF file: tensor %s: offset %llu is not a multiple of "
                          "general.alignment %zu", gguf_printable(t->name, name), (unsigned long long)offsets[i],
                          alignment);
        else if (start > g->size || offsets[i] > g->size - start || t->bytes > g->size - start - offsets[i])
            status = fail(g->err, "a damaged GGUF file: tensor %s: %zu bytes at offset %llu reach past the end of "
                          "the file (%zu bytes, data from %zu)", gguf_printable(t->name, name), t->bytes,
                          (unsigned long long)offsets[i], g->size, start);
        else
            t->data = g->data + start + offsets[i];
    }
    free(offsets);
    if (status) return -1;
    GgufTensor *sorted = xcalloc(n, sizeof(GgufTensor), "the GGUF tensor infos");
    memcpy(sorted, g->tensors, n * sizeof(GgufTensor));
    qsort(sorted, n, sizeof(GgufTensor), by_data);
    const GgufTensor *last = NULL; // of the tensors placed so far, the one that ends last
    for (size_t i = 0; i < n && status == 0; i++) {
        char a[81], b[81];
        if (!sorted[i].bytes) continue;
        if (last && sorted[i].data < last->data + last->bytes)
            status = fail(g->err, "a damaged GGUF file: tensors %s and %s overlap in the file",
                          gguf_printable(last->name, a), gguf_printable(sorted[i].name, b));
        else if (!last || sorted[i].data + sorted[i].bytes > last->data + last->bytes)
            last = &sorted[i];
    }
    free(sorted);
    return status;
}

/* A metadata number: 0 with *value set, 1 when the key is missing, -1 (with
   err) for a value that is no number: a string, an array, or a bool, which
   export.py takes for no count or size either. integer: 1 when an integer
   type holds it. */
static int gguf_number(const Gguf *g, const char *key, double *value, int *integer) {
    const GgufKey *k = gguf_find(g, key);
    if (!k) return 1;
    const unsigned char *p = g->data + k->at;
    int64_t i;
    float f;
    switch (k->type) {
    case 0: i = p[0]; break;
    case 1: i = (int8_t)p[0]; break;
    case 2: i = read_u16(p); break;
    case 3: i = (int16_t)read_u16(p); break;
    case 4: i = read_u32(p); break;
    case 5: i = read_i32(p); break;
    case 10: i = (int64_t)(read_u64(p) > INT64_MAX ? INT64_MAX : read_u64(p)); break;
    case 11: i = (int64_t)read_u64(p); break;
    case 6: f = read_f32(p), *value = f, *integer = 0; return 0;
    case 12: { uint64_t bits = read_u64(p); memcpy(value, &bits, 8); *integer = 0; return 0; }
    default: return fail(g->err, "metadata %s: expected a number", key);
    }
    *value = (double)i, *integer = 1;
    return 0;
}

/* An integer field of the model, 1..most (a whole float is one, as ModelArgs
   takes it; strict: only an integer type); a missing key gives fallback, or
   an error when fallback is 0. */
static int gguf_int(const Gguf *g, const char *key, long long fallback, long long most, int strict, int *out) {
    double v = (double)fallback;
    int integer = 1, found = gguf_number(g, key, &v, &integer);
    if (found < 0) return -1;
    if (found == 1 && !fallback) return fail(g->err, "metadata %s is missing", key);
    if ((strict && !integer) || !(v >= 1 && v <= (double)most && v == floor(v)))
        return fail(g->err, "metadata %s = %g: expected an integer from 1 to %lld", key, v, most);
    *out = (int)v;
    return 0;
}

/* A positive float field that float32 holds; a missing key gives fallback,
   or an error when fallback is 0. */
static int gguf_float(const Gguf *g, const char *key, double fallback, double *out) {
    int integer, found = gguf_number(g, key, out, &integer);
    if (found < 0) return -1;
    if (found == 1 && !fallback) return fail(g->err, "metadata %s is missing", key);
    if (found == 1) *out = fallback;
    if (!(*out > 0 && *out <= FLT_MAX && (float)*out > 0))
        return fail(g->err, "metadata %s = %g: expected a positive number that float32 holds", key, *out);
    return 0;
}

/* A string value, or `fallback` when the key is missing. */
static int gguf_text(const Gguf *g, const char *key, const char *fallback, GgufString *out) {
    const GgufKey *k = gguf_find(g, key);
    if (!k) {
        *out = (GgufString){(const unsigned char *)fallback, fallback ? strlen(fallback) : 0};
        return 0;
    }
    if (k->type != GGUF_STRING) return fail(g->err, "metadata %s: expected a string", key);
    out->len = read_u64(g->data + k->at);
    out->text = g->data + k->at + 8;
    return 0;
}

/* Where each tensor goes: the model-wide ones, then GGUF_LAYER_SLOTS per
   layer, in the order of GGUF_LAYER_NAMES. */
enum { SLOT_EMBEDDING, SLOT_FINAL_NORM, SLOT_OUTPUT, SLOT_ROPE_FREQS, GGUF_GLOBAL_SLOTS };
enum { L_ATTN_NORM, L_WQ, L_WK, L_WV, L_WO, L_FFN_NORM, L_W1, L_W2, L_W3, L_BQ, L_BK, L_BV, GGUF_LAYER_SLOTS };
static const char *const GGUF_GLOBAL_NAMES[] = {"token_embd.weight", "output_norm.weight", "output.weight",
                                                "rope_freqs.weight"};
static const char *const GGUF_LAYER_NAMES[] = {"attn_norm.weight", "attn_q.weight", "attn_k.weight",
    "attn_v.weight", "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_down.weight",
    "ffn_up.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias"};

/* The slot of a tensor name (blk.{i}.X for i < n_layers, no leading zeros),
   or -1 for a name export.py does not read. */
static int gguf_slot(GgufString name, int n_layers, int biased) {
    for (int s = 0; s < GGUF_GLOBAL_SLOTS; s++)
        if (gguf_is(name, GGUF_GLOBAL_NAMES[s])) return s;
    const unsigned char *p = name.text, *end = name.text + name.len;
    if (name.len < 6 || memcmp(p, "blk.", 4) || p[4] < '0' || p[4] > '9' || (p[4] == '0' && p[5] != '.')) return -1;
    long layer = 0;
    for (p += 4; p < end && *p >= '0' && *p <= '9' && layer < n_layers; p++) layer = 10 * layer + (*p - '0');
    if (layer >= n_layers || p == end || *p != '.') return -1;
    GgufString rest = {p + 1, (size_t)(end - p - 1)};
    for (int s = 0; s < (biased ? GGUF_LAYER_SLOTS : L_BQ); s++)
        if (gguf_is(rest, GGUF_LAYER_NAMES[s])) return GGUF_GLOBAL_SLOTS + (int)layer * GGUF_LAYER_SLOTS + s;
    return -1;
}

/* The model read from the metadata, as export.py's load_gguf() reads it,
   with what the conversion needs to know beside it. */
typedef struct {
    int qwen2;          // q/k rows in Hugging Face's halves, q/k/v biases
    int quantized;      // a tensor in a type other than F32, F16, BF16
    int scaled;         // RoPE frequencies from rope_freqs.weight or linear scaling
    double theta;       // rope.freq_base as the file has it
    double factor;      // linear scaling's, else 1
    GgufTensor **slots; // (GGUF_GLOBAL_SLOTS + n_layers * GGUF_LAYER_SLOTS) the tensors, NULL where none
} GgufModel;

/* head_dim, as export.py finds it: attention.key_length, else
   rope.dimension_count, else dim / n_heads; value_length and a RoPE over
   part of a head (dimension_count given, and not head_dim) are refused. */
static int gguf_head_dim(const Gguf *g, const char *arch, Config *c) {
    char key[128];
    int head_dim, value_dim, rope_dim, fallback = c->dim / c->n_heads > 0 ? c->dim / c->n_heads : 1;
    snprintf(key, sizeof key, "%s.rope.dimension_count", arch);
    int have_rope_dim = gguf_find(g, key) != NULL;
    if (gguf_int(g, key, fallback, MAX_HEAD_DIM, 0, &rope_dim)) return -1;
    snprintf(key, sizeof key, "%s.attention.key_length", arch);
    if (gguf_int(g, key, rope_dim, MAX_HEAD_DIM, 0, &head_dim)) return -1;
    snprintf(key, sizeof key, "%s.attention.value_length", arch);
    if (gguf_int(g, key, head_dim, MAX_HEAD_DIM, 0, &value_dim)) return -1;
    if (value_dim != head_dim) return fail(g->err, "%s.attention.value_length differs from key_length", arch);
    if (have_rope_dim && rope_dim != head_dim)
        return fail(g->err, "%s.rope.dimension_count %d: RoPE over part of a head of %d is not implemented", arch,
                    rope_dim, head_dim);
    c->head_dim = head_dim;
    return 0;
}

/* Reads the architecture's hyperparameters into c, and refuses what run.c
   does not compute, as export.py does. */
static int gguf_read_config(const Gguf *g, Config *c, GgufModel *m) {
    GgufString arch, scaling;
    char key[128], name[81];
    double theta, eps;
    if (gguf_text(g, "general.architecture", NULL, &arch)) return -1;
    if (!arch.text) return fail(g->err, "metadata general.architecture is missing");
    m->qwen2 = gguf_is(arch, "qwen2");
    if (!m->qwen2 && !gguf_is(arch, "llama"))
        return fail(g->err, "general.architecture '%s': only 'llama' and 'qwen2' are supported",
                    gguf_printable(arch, name));
    const char *a = m->qwen2 ? "qwen2" : "llama";
#define KEY(suffix) (snprintf(key, sizeof key, "%s.%s", a, suffix), key)
    if (gguf_text(g, KEY("rope.scaling.type"), "none", &scaling)) return -1;
    m->scaled = gguf_is(scaling, "linear");
    if (!m->scaled && !gguf_is(scaling, "none"))
        return fail(g->err, "%s '%s' is not implemented (only linear)", key, gguf_printable(scaling, name));
    m->factor = 1;
    if (gguf_int(g, KEY("attention.head_count"), 0, MAX_HEADS, 1, &c->n_heads) ||
        gguf_int(g, KEY("embedding_length"), 0, MAX_DIM, 1, &c->dim) || gguf_head_dim(g, a, c) ||
        gguf_int(g, KEY("feed_forward_length"), 0, MAX_HIDDEN, 0, &c->hidden_dim) ||
        gguf_int(g, KEY("block_count"), 0, MAX_LAYERS, 0, &c->n_layers) ||
        gguf_int(g, KEY("attention.head_count_kv"), c->n_heads, MAX_HEADS, 0, &c->n_kv_heads) ||
        gguf_int(g, KEY("context_length"), 0, MAX_SEQ_LEN, 0, &c->max_seq_len) ||
        gguf_float(g, KEY("rope.freq_base"), 10000.0, &theta) ||
        gguf_float(g, KEY("attention.layer_norm_rms_epsilon"), 0, &eps) ||
        (m->scaled && gguf_float(g, KEY("rope.scaling.factor"), 0, &m->factor)))
        return -1;
#undef KEY
    m->theta = theta;
    c->rope_theta = (float)theta;
    c->norm_eps = (float)eps;
    c->weight_type = -1;
    c->flags = m->qwen2 ? FLAG_QKV_BIAS : 0;
    return 0;
}

/* The expected shape (rows, cols; rows 0 for a vector) of the tensor in a slot. */
static void gguf_slot_shape(const Config *c, int slot, size_t *rows, size_t *cols) {
    size_t dim = c->dim, hidden = c->hidden_dim, q_dim = (size_t)c->n_heads * c->head_dim;
    size_t kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    size_t shapes[GGUF_LAYER_SLOTS][2] = {
        [L_ATTN_NORM] = {0, dim}, [L_WQ] = {q_dim, dim},     [L_WK] = {kv_dim, dim},  [L_WV] = {kv_dim, dim},
        [L_WO] = {dim, q_dim},    [L_FFN_NORM] = {0, dim},   [L_W1] = {hidden, dim},  [L_W2] = {dim, hidden},
        [L_W3] = {hidden, dim},   [L_BQ] = {0, q_dim},       [L_BK] = {0, kv_dim},    [L_BV] = {0, kv_dim}};
    if (slot < GGUF_GLOBAL_SLOTS) {
        size_t global[GGUF_GLOBAL_SLOTS][2] = {{c->vocab_size, dim}, {0, dim}, {c->vocab_size, dim},
                                               {0, c->head_dim / 2}};
        *rows = global[slot][0], *cols = global[slot][1];
        return;
    }
    int s = (slot - GGUF_GLOBAL_SLOTS) % GGUF_LAYER_SLOTS;
    *rows = shapes[s][0], *cols = shapes[s][1];
}

/* The name export.py gives a slot's tensor, for messages. */
static const char *gguf_slot_name(int slot, char out[96]) {
    static const char *const ours[] = {"tok_embeddings.weight", "norm.weight", "output.weight", "rope_freqs"};
    static const char *const layer[] = {"attention_norm.weight", "attention.wq.weight", "attention.wk.weight",
        "attention.wv.weight", "attention.wo.weight", "ffn_norm.weight", "feed_forward.w1.weight",
        "feed_forward.w2.weight", "feed_forward.w3.weight", "attention.wq.bias", "attention.wk.bias",
        "attention.wv.bias"};
    if (slot < GGUF_GLOBAL_SLOTS) return ours[slot];
    snprintf(out, 96, "layers.%d.%s", (slot - GGUF_GLOBAL_SLOTS) / GGUF_LAYER_SLOTS,
             layer[(slot - GGUF_GLOBAL_SLOTS) % GGUF_LAYER_SLOTS]);
    return out;
}

/* The vocabulary's size: the rows of token_embd.weight, as export.py takes it. */
static int gguf_vocab_size(const Gguf *g, Config *c) {
    for (size_t i = 0; i < g->n_tensors; i++) {
        const GgufTensor *t = &g->tensors[i];
        if (!gguf_is(t->name, "token_embd.weight")) continue;
        if (t->n_dims != 2 || t->dims[1] < 1 || t->dims[1] > MAX_VOCAB)
            return fail(g->err, "token_embd.weight: expected a matrix of 1 to %d rows", MAX_VOCAB);
        c->vocab_size = (int)t->dims[1];
        return 0;
    }
    return fail(g->err, "tensor token_embd.weight is missing");
}

/* A tensor's shape as export.py writes it, slowest axis first: "(3, 4)". */
static const char *gguf_shape(const GgufTensor *t, char out[128]) {
    size_t n = (size_t)snprintf(out, 128, "(");
    for (uint32_t d = t->n_dims; d-- > 0 && n < 128;)
        n += (size_t)snprintf(out + n, 128 - n, "%llu%s", (unsigned long long)t->dims[d],
                              d ? ", " : t->n_dims == 1 ? ",)" : ")");
    if (t->n_dims == 0) snprintf(out, 128, "()");
    return out;
}

/* Whether a slot may stay empty: the classifier when tied, rope_freqs
   (linear scaling alone divides by 1), and llama's biases. */
static int gguf_optional(const GgufModel *m, int slot) {
    int in_layer = slot < GGUF_GLOBAL_SLOTS ? -1 : (slot - GGUF_GLOBAL_SLOTS) % GGUF_LAYER_SLOTS;
    return slot == SLOT_OUTPUT || slot == SLOT_ROPE_FREQS || (!m->qwen2 && in_layer >= L_BQ);
}

/* Puts every tensor in its slot, and checks that each slot the model needs
   has one of the shape it needs (export.py's check_state_dict()). */
static int gguf_place_tensors(const Gguf *g, Config *c, GgufModel *m) {
    char name[81], ours[96], shape[128];
    int n_slots = GGUF_GLOBAL_SLOTS + c->n_layers * GGUF_LAYER_SLOTS;
    m->slots = xcalloc(n_slots, sizeof(GgufTensor *), "the GGUF tensor table");
    for (size_t i = 0; i < g->n_tensors; i++) {
        GgufTensor *t = &g->tensors[i];
        int slot = gguf_slot(t->name, c->n_layers, m->qwen2);
        if (slot < 0) return fail(g->err, "unexpected tensor %s", gguf_printable(t->name, name));
        if (m->slots[slot]) return fail(g->err, "tensor %s appears twice", gguf_printable(t->name, name));
        m->slots[slot] = t;
        m->quantized |= t->type != GGML_F32 && t->type != GGML_F16 && t->type != GGML_BF16;
    }
    c->tied_classifier = !m->slots[SLOT_OUTPUT];
    m->scaled |= m->slots[SLOT_ROPE_FREQS] != NULL;
    c->flags |= m->scaled ? FLAG_ROPE_FREQS : 0;
    for (int slot = 0; slot < n_slots; slot++) {
        const GgufTensor *t = m->slots[slot];
        size_t rows, cols;
        gguf_slot_shape(c, slot, &rows, &cols);
        if (!t && gguf_optional(m, slot)) continue;
        if (!t) return fail(g->err, "tensor %s is missing", gguf_slot_name(slot, ours));
        if (rows ? t->n_dims != 2 || t->dims[0] != cols || t->dims[1] != rows : t->n_dims != 1 || t->dims[0] != cols) {
            char expected[64];
            if (rows) snprintf(expected, sizeof expected, "(%zu, %zu)", rows, cols);
            else snprintf(expected, sizeof expected, "(%zu,)", cols);
            return fail(g->err, "%s: expected shape %s, got %s", gguf_slot_name(slot, ours), expected,
                        gguf_shape(t, shape));
        }
    }
    return 0;
}

/* out (256) = one Q2_K or Q3_K block. Weight i is in sub-block i / 16 and
   takes 2 bits of qs[32 (i / 128) + i % 32] at bit 2 ((i % 128) / 32).
     Q2_K  scales (16) | qs (64) | d | dmin: w = d (s & 15) q - dmin (s >> 4)
     Q3_K  hmask (32) | qs (64) | scales (12) | d: w = d (s - 32) (q - 4 h'),
           h' = 1 - bit i / 32 of hmask[i % 32]; the 6-bit scale s of
           sub-block j: 4 bits of byte j % 8 (the high ones for j >= 8), and
           2 bits of byte 8 + j % 4 at bit 2 (j / 4) */
static void dequantize_q2_q3_k(float *out, const unsigned char *b, int type) {
    const unsigned char *qs = b + (type == GGML_Q2_K ? 16 : 32);
    float d = f16_to_f32(read_u16(b + (type == GGML_Q2_K ? 80 : 108)));
    float dmin = type == GGML_Q2_K ? f16_to_f32(read_u16(b + 82)) : 0;
    for (int i = 0; i < SUPER_BLOCK; i++) {
        int j = i / 16, q = qs[32 * (i / 128) + i % 32] >> 2 * (i % 128 / 32) & 3;
        if (type == GGML_Q2_K) {
            out[i] = d * (float)(b[j] & 15) * (float)q - dmin * (float)(b[j] >> 4);
            continue;
        }
        const unsigned char *scales = b + 96;
        int s = (scales[j % 8] >> 4 * (j / 8) & 15) | (scales[8 + j % 4] >> 2 * (j / 4) & 3) << 4;
        int high = b[i % 32] >> (i / 32) & 1;
        out[i] = d * (float)(s - 32) * (float)(q - 4 * (1 - high));
    }
}

/* out (block weights) = one block of a GGUF tensor, decoded as gguf.quants
   decodes it: every product of a half scale and a small integer is exact in
   float32, so the order of the float steps cannot change a bit. */
/* IQ4_NL (d | 16 bytes of 4-bit indices for 32 weights) and IQ4_XS (256
   weights: d | 16 bits, then 4 bytes, of 6-bit sub-block scales, ls - 32
   with the low 4 bits in scales_l and the top 2 in scales_h | 128 bytes
   of indices): each weight d (times its sub-block's scale) times the
   index's value on a fixed non-linear grid, in gguf.quants' order of
   float operations. */
static void dequantize_iq4(float *out, const unsigned char *b, int type) {
    static const int8_t grid[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
    float d = f16_to_f32(read_u16(b));
    int subs = type == GGML_IQ4_XS ? SUPER_BLOCK / 32 : 1;
    const unsigned char *qs = b + (type == GGML_IQ4_XS ? 8 : 2);
    for (int s = 0; s < subs; s++) {
        int ls = (b[4 + s / 2] >> 4 * (s % 2) & 15) | (read_u16(b + 2) >> 2 * s & 3) << 4;
        float dl = type == GGML_IQ4_XS ? d * (float)(ls - 32) : d;
        for (int j = 0; j < 16; j++) {
            out[32 * s + j] = dl * (float)grid[qs[16 * s + j] & 15];
            out[32 * s + j + 16] = dl * (float)grid[qs[16 * s + j] >> 4];
        }
    }
}

static void gguf_dequantize_block(float *out, const unsigned char *b, int type) {
    if (type == GGML_F32) {
        memcpy(out, b, 4);
    } else if (type == GGML_F16) {
        *out = f16_to_f32(read_u16(b));
    } else if (type == GGML_BF16) {
        *out = bf16_to_f32(read_u16(b));
    } else if (type == GGML_Q8_0) { // d | q[32] int8
        float d = f16_to_f32(read_u16(b));
        for (int i = 0; i < GROUP_SIZE; i++) out[i] = d * (float)(int8_t)b[2 + i];
    } else if (type == GGML_Q4_K || type == GGML_Q5_K || type == GGML_Q6_K) {
        dequantize_block(out, b, WEIGHT_Q4_K + (type - GGML_Q4_K));
    } else if (type == GGML_IQ4_NL || type == GGML_IQ4_XS) {
        dequantize_iq4(out, b, type);
    } else if (type == GGML_Q2_K || type == GGML_Q3_K) {
        dequantize_q2_q3_k(out, b, type);
    } else { // Q4_0: d | nibbles; Q4_1: d | m | nibbles; Q5_0: d | qh | nibbles; Q5_1: d | m | qh | nibbles
        int with_min = type == GGML_Q4_1 || type == GGML_Q5_1, five = type == GGML_Q5_0 || type == GGML_Q5_1;
        float d = f16_to_f32(read_u16(b)), m = with_min ? f16_to_f32(read_u16(b + 2)) : 0;
        uint32_t high = five ? read_u32(b + 2 + 2 * with_min) : 0;
        const unsigned char *qs = b + 2 + 2 * with_min + 4 * five;
        int offset = with_min ? 0 : five ? 16 : 8; // the zero of the unsigned q
        for (int i = 0; i < GROUP_SIZE; i++) {
            int q = (qs[i % 16] >> 4 * (i / 16) & 15) | (int)(high >> i & 1) << 4;
            out[i] = with_min ? d * (float)q + m : d * (float)(q - offset);
        }
    }
}

/* out (cols) = row `row` of tensor t, as floats. */
static void gguf_dequantize_row(float *out, const GgufTensor *t, size_t row, size_t cols) {
    int block = GGML_TYPE[t->type].block, bytes = GGML_TYPE[t->type].bytes;
    const unsigned char *p = t->data + row * (cols / block) * bytes;
    for (size_t b = 0; b < cols / block; b++) gguf_dequantize_block(out + b * block, p + b * bytes, t->type);
}

/* q (GROUP_SIZE), *d = one group of weights in q8_0, as export.py's
   quantize_q8_0() computes it in float32: d = max|x| / 127 rounded to a
   half, q = x / d rounded to even. */
static void quantize_weights_q8_0(int8_t *q, uint16_t *d, const float *x) {
    float most = 0;
    for (int i = 0; i < GROUP_SIZE; i++) most = fabsf(x[i]) > most ? fabsf(x[i]) : most;
    *d = f32_to_f16(most / 127.0f);
    float scale = f16_to_f32(*d), inverse = scale != 0 ? 1.0f / scale : 0.0f;
    for (int i = 0; i < GROUP_SIZE; i++) {
        float r = rintf(x[i] * inverse);
        q[i] = (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
    }
}

/* The row of the file that row r of ours is: qwen2's q and k rows (and
   biases) are Hugging Face's, the halves of each head apart, and ours pair
   them (hf_to_interleaved()): our row 2j (+ 1) of a head is its row j
   (+ head_dim / 2). */
static size_t gguf_source_row(size_t r, int permuted, int head_dim) {
    if (!permuted) return r;
    size_t head = r / head_dim, j = r % head_dim / 2, second = r % 2;
    return head * head_dim + second * (head_dim / 2) + j;
}

/* How a tensor is kept: its type (WEIGHT_*; vectors are f32), and whether it
   is copied (converted, permuted, or not aligned for its type in place). */
typedef struct {
    int type, copied, permuted;
    int interleaved;          // a Q8_0 or Q4_0 tensor's blocks kept as they are (Matrix.interleaved)
    size_t rows, cols, bytes; // of the copy
} GgufPlan;

/* Whether our weight type holds a tensor of the ggml type as it is, byte for
   byte (mapped in place, or copied for qwen2's permutation; Q8_0 and Q4_0
   in their blocks, Matrix.interleaved). */
static int gguf_same_type(int type, uint32_t ggml_type) {
    return (type == WEIGHT_F32 && ggml_type == GGML_F32) || (type == WEIGHT_BF16 && ggml_type == GGML_BF16) ||
           (type == WEIGHT_F16 && ggml_type == GGML_F16) || (type == WEIGHT_Q8_0 && ggml_type == GGML_Q8_0) ||
           (type == WEIGHT_Q4_0 && ggml_type == GGML_Q4_0) || is_k_type(type);
}

/* The plan for tensor t in a slot: K, Q8_0 and Q4_0 blocks kept; in a
   quantized file every other matrix q8_0; else F32, BF16 and F16 matrices
   kept (vectors f32). */
static GgufPlan gguf_plan(const Config *c, const GgufModel *m, int slot, const GgufTensor *t) {
    GgufPlan p = {.type = WEIGHT_F32};
    gguf_slot_shape(c, slot, &p.rows, &p.cols);
    int in_layer = slot < GGUF_GLOBAL_SLOTS ? -1 : (slot - GGUF_GLOBAL_SLOTS) % GGUF_LAYER_SLOTS;
    p.permuted = m->qwen2 && (in_layer == L_WQ || in_layer == L_WK || in_layer == L_BQ || in_layer == L_BK);
    size_t n = p.rows ? p.rows * p.cols : p.cols;
    int k_type = t->type == GGML_Q4_K || t->type == GGML_Q5_K || t->type == GGML_Q6_K;
    p.interleaved = p.rows && (t->type == GGML_Q8_0 || t->type == GGML_Q4_0);
    if (p.rows && k_type) p.type = WEIGHT_Q4_K + (int)(t->type - GGML_Q4_K);
    else if (p.rows && t->type == GGML_Q4_0) p.type = WEIGHT_Q4_0;
    else if (p.rows && m->quantized) p.type = WEIGHT_Q8_0;
    else if (p.rows && t->type == GGML_BF16) p.type = WEIGHT_BF16;
    else if (p.rows && t->type == GGML_F16) p.type = WEIGHT_F16;
    int unit = p.type == WEIGHT_F32 ? 4 : p.type == WEIGHT_BF16 || p.type == WEIGHT_F16 ? 2 : 1; // bytes to align to
    p.copied = !gguf_same_type(p.type, t->type) || (uintptr_t)t->data % unit != 0 || p.permuted;
    p.bytes = !p.copied ? 0 : p.interleaved ? t->bytes + TENSOR_ALIGN
            : p.type == WEIGHT_Q8_0 ? n + n / GROUP_SIZE * 2 + 2 * TENSOR_ALIGN
            : p.type == WEIGHT_F32 ? n * 4 + TENSOR_ALIGN : t->bytes + TENSOR_ALIGN;
    return p;
}

/* The column of the first NaN or infinite number of a row of n bf16 or f16
   weights (all ones in the exponent), else -1. */
static long nonfinite_half(const unsigned char *row, size_t n, int type) {
    uint16_t exponent = type == WEIGHT_BF16 ? 0x7f80 : 0x7c00;
    for (size_t i = 0; i < n; i++)
        if ((read_u16(row + 2 * i) & exponent) == exponent) return (long)i;
    return -1;
}

/* Copies row r of tensor t into values (and scales, for q8_0) as the plan
   says: from its source row, as it is when it keeps its type, else decoded
   (into row, room for p->cols floats) and encoded anew; a vector's entries
   likewise. Returns the column of a NaN or infinite weight, which export.py
   refuses, else -1 (blocks: gguf_kept_finite() checks their scales). */
static long gguf_copy_row(unsigned char *values, uint16_t *scales, const GgufPlan *p, const GgufTensor *t,
                          int head_dim, float *row, size_t r) {
    size_t row_bytes = t->bytes / (p->rows ? p->rows : 1), from = gguf_source_row(r, p->permuted && p->rows, head_dim);
    if (p->type == WEIGHT_BF16 || p->type == WEIGHT_F16 || is_k_type(p->type) || p->interleaved) {
        memcpy(values + r * row_bytes, t->data + from * row_bytes, row_bytes);
        return is_k_type(p->type) || p->interleaved ? -1 : nonfinite_half(values + r * row_bytes, p->cols, p->type);
    }
    gguf_dequantize_row(row, t, from, p->cols);
    for (size_t i = 0; i < p->cols; i++)
        if (!isfinite(row[i])) return (long)i;
    if (p->type == WEIGHT_Q8_0) {
        for (size_t g = 0; g < p->cols / GROUP_SIZE; g++)
            quantize_weights_q8_0((int8_t *)values + r * p->cols + g * GROUP_SIZE,
                                  scales + r * p->cols / GROUP_SIZE + g, row + g * GROUP_SIZE);
        return -1;
    }
    float *out = (float *)values + r * p->cols;
    for (size_t i = 0; i < p->cols; i++) out[i] = row[gguf_source_row(i, p->permuted && !p->rows, head_dim)];
    return -1;
}

/* Copies tensor t as its plan says, its rows spread over the threads.
   Returns 0, or -1 (with err) for the first NaN or infinite weight. */
static int gguf_copy(unsigned char *values, uint16_t *scales, const GgufPlan *p, const GgufTensor *t, int head_dim,
                     char *err) {
    size_t rows = p->rows ? p->rows : 1, bad_row = SIZE_MAX;
    long bad_column = -1;
    #pragma omp parallel
    {
        float *row = xcalloc(p->cols, sizeof(float), "a row of weights");
        #pragma omp for schedule(static)
        for (size_t r = 0; r < rows; r++) {
            long column = gguf_copy_row(values, scales, p, t, head_dim, row, r);
            if (column >= 0) {
                #pragma omp critical
                if (r < bad_row) bad_row = r, bad_column = column;
            }
        }
        free(row);
    }
    if (bad_row == SIZE_MAX) return 0;
    return fail(err, "holds NaN or infinite numbers (row %zu, column %ld)", bad_row, bad_column);
}

/* RoPE's inverse frequencies as export.py stores them when the file scales
   them: theta^(-2i / head_dim) in double, divided by the linear factor,
   rounded to float, then divided by rope_freqs.weight's divisor and rounded
   again; else computed as for our own files. */
static int gguf_rope_frequencies(double *inv_freq, const Config *c, const GgufModel *m, char *err) {
    int half = c->head_dim / 2;
    const GgufTensor *divisors = m->slots[SLOT_ROPE_FREQS];
    float *divisor = xcalloc(half, sizeof(float), "the RoPE frequencies");
    for (int i = 0; i < half; i++) divisor[i] = 1;
    if (divisors) gguf_dequantize_row(divisor, divisors, 0, half);
    int status = 0;
    for (int i = 0; i < half && status == 0; i++) {
        if (!m->scaled) {
            inv_freq[i] = pow(c->rope_theta, -2.0 * i / c->head_dim);
            continue;
        }
        float unscaled = (float)(pow(m->theta, -2.0 * i / c->head_dim) / m->factor);
        if (!(divisor[i] > 0 && isfinite(divisor[i])))
            status = fail(err, "rope_freqs.weight: %g for pair %d; RoPE needs finite positive numbers", divisor[i], i);
        else if (!(unscaled > 0 && isfinite(unscaled)))
            status = fail(err, "the RoPE scaling factor %g makes frequencies that float32 cannot hold", m->factor);
        inv_freq[i] = (float)((double)unscaled / divisor[i]);
    }
    free(divisor);
    return status ? -1 : check_rope_frequencies(inv_freq, m->scaled ? half : 0, err);
}

/* Says in one line what the load converted, and what it costs. */
static void gguf_report(const char *path, const int counts[GGML_TYPES][WEIGHT_TYPES], int permuted,
                        size_t bytes) {
    char line[1024] = "";
    size_t n = 0;
    for (int s = 0; s < GGML_TYPES; s++)
        for (int d = 0; d < WEIGHT_TYPES; d++)
            if (counts[s][d] && n < sizeof line)
                n += snprintf(line + n, sizeof line - n, "%s%d %s tensors to %s", n ? ", " : "", counts[s][d],
                              GGML_TYPE[s].name, WEIGHT_NAMES[d]);
    if (permuted && n < sizeof line)
        n += snprintf(line + n, sizeof line - n, "%s%d q/k matrices copied, their rows permuted from qwen2's RoPE "
                      "halves into pairs", n ? "; " : "", permuted);
    if (n) fprintf(stderr, "run: %s: converted in memory at load: %s (+%.1f MB)\n", path, line, bytes / 1e6);
}

/* Where a slot's tensor goes in w: a matrix, or a vector. */
static void gguf_destination(Weights *w, int slot, Matrix **matrix, const float ***vector) {
    *matrix = NULL, *vector = NULL;
    if (slot == SLOT_EMBEDDING) *matrix = &w->token_embedding;
    if (slot == SLOT_OUTPUT) *matrix = &w->classifier;
    if (slot == SLOT_FINAL_NORM) *vector = &w->final_norm;
    if (slot < GGUF_GLOBAL_SLOTS) return;
    LayerWeights *lw = &w->layers[(slot - GGUF_GLOBAL_SLOTS) / GGUF_LAYER_SLOTS];
    Matrix *matrices[GGUF_LAYER_SLOTS] = {[L_WQ] = &lw->wq, [L_WK] = &lw->wk, [L_WV] = &lw->wv, [L_WO] = &lw->wo,
                                          [L_W1] = &lw->w1, [L_W2] = &lw->w2, [L_W3] = &lw->w3};
    const float **vectors[GGUF_LAYER_SLOTS] = {[L_ATTN_NORM] = &lw->attn_norm, [L_FFN_NORM] = &lw->ffn_norm,
                                               [L_BQ] = &lw->bq, [L_BK] = &lw->bk, [L_BV] = &lw->bv};
    *matrix = matrices[(slot - GGUF_GLOBAL_SLOTS) % GGUF_LAYER_SLOTS];
    *vector = vectors[(slot - GGUF_GLOBAL_SLOTS) % GGUF_LAYER_SLOTS];
}

/* Whether a vector (a norm, a bias) mapped in place holds finite numbers,
   as export.py checks them. Matrices mapped in place are not read at load,
   as our own files' are not: that would read the whole file, which is what
   mapping saves (a NaN among them makes NaN logits, which end the run with
   a line of their own); gguf_copy_row() checks the copied ones. */
static int gguf_kept_finite(const GgufPlan *p, const GgufTensor *t) {
    for (size_t i = 0; !p->rows && !p->copied && i < p->cols; i++)
        if (!isfinite(((const float *)t->data)[i])) return 0;
    return 1;
}

/* The tensor t as its plan p says: in place, or copied into the arena at
   *at. A Q8_0 or Q4_0 matrix kept points its scales at its first block and
   its values 2 bytes on (group_values()). */
static int gguf_place(Matrix *out, const GgufPlan *p, const GgufTensor *t, unsigned char *arena, size_t *at,
                      int head_dim, char *err) {
    char name[81], why[ERROR_SIZE];
    *out = (Matrix){.values = t->data, .rows = (int)p->rows, .cols = (int)p->cols, .type = p->type,
                    .interleaved = p->interleaved};
    if (!gguf_kept_finite(p, t))
        return fail(err, "tensor %s holds NaN or infinite numbers", gguf_printable(t->name, name));
    if (p->copied) {
        size_t n = (p->rows ? p->rows : 1) * p->cols, converted = p->type == WEIGHT_Q8_0 && !p->interleaved;
        size_t bytes = converted ? n : p->type == WEIGHT_F32 ? n * sizeof(float) : t->bytes;
        unsigned char *values = (unsigned char *)place_bytes(arena, at, bytes, TENSOR_ALIGN);
        uint16_t *scales = converted ? (uint16_t *)place_bytes(arena, at, n / GROUP_SIZE * 2, TENSOR_ALIGN) : NULL;
        out->values = values, out->scales = (const uint8_t *)scales;
        if (gguf_copy(values, scales, p, t, head_dim, err) != 0) {
            snprintf(why, sizeof why, "%s", err);
            return fail(err, "tensor %s %s", gguf_printable(t->name, name), why);
        }
    }
    if (p->interleaved) out->scales = out->values, out->values = (const uint8_t *)out->values + 2;
    return 0;
}

/* The matrix types in our file order (token_embedding, per layer wq, wk,
   wv, wo, w1, w2, w3, then the classifier if untied) into types. */
static void gguf_matrix_types(uint8_t *types, const Config *c, const GgufPlan *plans) {
    static const int in_layer[] = {L_WQ, L_WK, L_WV, L_WO, L_W1, L_W2, L_W3};
    int k = 0;
    types[k++] = (uint8_t)plans[SLOT_EMBEDDING].type;
    for (int l = 0; l < c->n_layers; l++)
        for (int i = 0; i < 7; i++)
            types[k++] = (uint8_t)plans[GGUF_GLOBAL_SLOTS + l * GGUF_LAYER_SLOTS + in_layer[i]].type;
    if (!c->tied_classifier) types[k] = (uint8_t)plans[SLOT_OUTPUT].type;
}

/* Points t's weights at the tensors, mapped in place or converted into
   t->converted as gguf_plan() says, and says what was converted. */
static int gguf_assemble(Transformer *t, const GgufModel *m, char *err) {
    Config *c = &t->config;
    Weights *w = &t->weights;
    int n_slots = GGUF_GLOBAL_SLOTS + c->n_layers * GGUF_LAYER_SLOTS, counts[GGML_TYPES][WEIGHT_TYPES] = {{0}};
    int permuted = 0, status = 0;
    size_t at = 0, total = matrix_count(c);
    GgufPlan *plans = xcalloc(n_slots, sizeof(GgufPlan), "the GGUF tensor table");
    for (int s = 0; s < n_slots; s++)
        if (m->slots[s] && s != SLOT_ROPE_FREQS) plans[s] = gguf_plan(c, m, s, m->slots[s]), total += plans[s].bytes;
    unsigned char *arena = t->converted = xcalloc(total, 1, "the converted weights");
    gguf_matrix_types(arena, c, plans);
    c->matrix_types = arena;
    place_bytes(arena, &at, matrix_count(c), 1);
    w->layers = xcalloc(c->n_layers, sizeof(LayerWeights), "the layer table");
    status = check_matrix_types(c, err);
    for (int s = 0; s < n_slots && status == 0; s++) {
        Matrix *matrix, placed;
        const float **vector;
        const GgufTensor *tensor = m->slots[s];
        gguf_destination(w, s, &matrix, &vector);
        if (!tensor || s == SLOT_ROPE_FREQS) continue;
        status = gguf_place(&placed, &plans[s], tensor, arena, &at, c->head_dim, err);
        if (matrix) *matrix = placed;
        if (vector) *vector = placed.values;
        int kept = gguf_same_type(plans[s].type, tensor->type);
        permuted += plans[s].permuted && matrix;
        if (plans[s].copied && !(plans[s].permuted && kept)) counts[tensor->type][plans[s].type]++;
    }
    if (c->tied_classifier) w->classifier = w->token_embedding;
    free(plans);
    if (status == 0 && t->path) gguf_report(t->path, counts, permuted, total);
    return status;
}

/* Reads a GGUF file of the llama or qwen2 architecture as export.py --gguf
   does, into t's config and weights (see the top of this section).
   Returns 0, or -1 with err set and nothing left allocated. */
static int parse_gguf(Transformer *t, const unsigned char *data, size_t size, char *err) {
    Gguf g = {.data = data, .size = size, .err = err};
    GgufModel m = {0};
    uint64_t n_tensors = 0;
    size_t alignment = GGUF_DEFAULT_ALIGNMENT;
    t->weights.rope_inv_freq = xcalloc(MAX_HEAD_DIM / 2, sizeof(double), "the RoPE frequencies");
    int status = gguf_read_metadata(&g, &n_tensors, &alignment) || gguf_read_tensors(&g, n_tensors, alignment) ||
                 gguf_read_config(&g, &t->config, &m) || gguf_vocab_size(&g, &t->config) ||
                 validate_config(&t->config, err) || gguf_place_tensors(&g, &t->config, &m) ||
                 gguf_assemble(t, &m, err) ||
                 gguf_rope_frequencies(t->weights.rope_inv_freq, &t->config, &m, err);
    free(g.keys);
    free(g.tensors);
    free(m.slots);
    if (status == 0) return 0;
    free(t->weights.layers);
    free(t->weights.rope_inv_freq);
    free(t->converted);
    t->weights.layers = NULL, t->weights.rope_inv_freq = NULL, t->converted = NULL;
    return -1;
}

/* ----------------------------------------------------------------------------
   A GGUF file's tokenizer: the tokenizer.bin that export.py's
   write_tokenizer_gguf() (convert/tokenizers.py) makes of its metadata is
   built in memory, byte for byte, and tokenizer.c loads it. */

typedef struct {
    unsigned char *bytes;
    size_t n, cap;
} ByteBuffer;

static void put_bytes(ByteBuffer *b, const void *data, size_t n) {
    if (n > b->cap - b->n) {
        b->cap = add_size(add_size(b->cap, b->cap), n + 4096);
        b->bytes = realloc(b->bytes, b->cap);
        if (!b->bytes) die(NULL, "out of memory building the tokenizer");
    }
    if (n) memcpy(b->bytes + b->n, data, n);
    b->n += n;
}

static void put_u32(ByteBuffer *b, uint32_t v) {
    unsigned char p[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    put_bytes(b, p, 4);
}

/* An array value: its item type, count, and the offset of its first item.
   -1 (with err) unless key holds an array of items of type `item` (or of
   any integer type for item 4, of f32 or f64 for item 6); 1 if missing. */
static int gguf_array(const Gguf *g, const char *key, uint32_t item, uint32_t *type, uint64_t *n, size_t *at) {
    static const char *const kinds[] = {[4] = "integers", [6] = "floats", [7] = "bools", [8] = "strings"};
    const GgufKey *k = gguf_find(g, key);
    if (!k) return 1;
    *type = k->type == GGUF_ARRAY ? read_u32(g->data + k->at) : 0;
    int fits = item == 4 ? *type <= 5 || *type == 10 || *type == 11 : item == 6 ? *type == 6 || *type == 12
                                                                                 : *type == item;
    if (k->type != GGUF_ARRAY || !fits) return fail(g->err, "metadata %s: expected a list of %s", key, kinds[item]);
    *n = read_u64(g->data + k->at + 4);
    *at = k->at + 12;
    return 0;
}

/* The string at *at, which moves past it (within the metadata walked). */
static GgufString gguf_next_string(const Gguf *g, size_t *at) {
    GgufString s = {g->data + *at + 8, read_u64(g->data + *at)};
    *at += 8 + s.len;
    return s;
}

/* The number at *at of a numeric item type, which moves past it. */
static double gguf_next_number(const Gguf *g, uint32_t type, size_t *at) {
    const unsigned char *p = g->data + *at;
    *at += GGUF_SCALAR_SIZE[type];
    static const int is_signed[13] = {[1] = 1, [3] = 1, [5] = 1, [11] = 1};
    if (type == 6) return read_f32(p);
    if (type == 12) {
        double d;
        uint64_t bits = read_u64(p);
        memcpy(&d, &bits, 8);
        return d;
    }
    uint64_t u = GGUF_SCALAR_SIZE[type] == 1 ? p[0] : GGUF_SCALAR_SIZE[type] == 2 ? read_u16(p)
               : GGUF_SCALAR_SIZE[type] == 4 ? read_u32(p) : read_u64(p);
    int bits = 8 * GGUF_SCALAR_SIZE[type];
    if (is_signed[type] && bits < 64 && u >> (bits - 1)) return (double)((int64_t)u - ((int64_t)1 << bits));
    return is_signed[type] ? (double)(int64_t)u : (double)u;
}

/* A bool metadata value, or fallback when the key is missing. */
static int gguf_bool(const Gguf *g, const char *key, int fallback, int *out) {
    const GgufKey *k = gguf_find(g, key);
    if (k && k->type != 7) return fail(g->err, "metadata %s: expected bool", key);
    *out = k ? g->data[k->at] != 0 : fallback;
    return 0;
}

/* An integer metadata value, or -1 when the key is missing. */
static int gguf_token_id(const Gguf *g, const char *key, long long *out) {
    double v = -1;
    int integer = 1, found = gguf_number(g, key, &v, &integer);
    if (found < 0 || !integer) return fail(g->err, "metadata %s: expected int", key);
    *out = (long long)v;
    return 0;
}

/* An index from token text to the first id that has it (vocab.setdefault). */
typedef struct {
    GgufString *texts;  // (n) each token's text
    int32_t *slots;     // (cap) an id, or -1
    size_t cap;
} TextIndex;

static uint64_t text_hash(const unsigned char *s, size_t n) {
    uint64_t h = 1469598103934665603u;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211u;
    return h;
}

static int text_index_find(const TextIndex *ix, const unsigned char *s, size_t n) {
    for (size_t i = text_hash(s, n) & (ix->cap - 1);; i = (i + 1) & (ix->cap - 1)) {
        int32_t id = ix->slots[i];
        if (id < 0 || (ix->texts[id].len == n && !memcmp(ix->texts[id].text, s, n))) return id;
    }
}

static void text_index_build(TextIndex *ix, GgufString *texts, size_t n) {
    ix->texts = texts;
    for (ix->cap = 16; ix->cap < 2 * n; ix->cap *= 2) {}
    ix->slots = xcalloc(ix->cap, sizeof(int32_t), "the tokenizer's index");
    for (size_t i = 0; i < ix->cap; i++) ix->slots[i] = -1;
    for (size_t id = 0; id < n; id++) {
        size_t i = text_hash(texts[id].text, texts[id].len) & (ix->cap - 1);
        while (ix->slots[i] >= 0 && !(ix->texts[ix->slots[i]].len == texts[id].len &&
                                      !memcmp(ix->texts[ix->slots[i]].text, texts[id].text, texts[id].len)))
            i = (i + 1) & (ix->cap - 1);
        if (ix->slots[i] < 0) ix->slots[i] = (int32_t)id;
    }
}

/* Where `what` first occurs in s at or after `from`, or -1. */
static long find_text(GgufString s, const char *what, size_t from) {
    if (from > s.len) return -1;
    const unsigned char *at = memmem(s.text + from, s.len - from, what, strlen(what));
    return at ? (long)(at - s.text) : -1;
}

/* The text of the first ChatML system turn a template writes literally
   (export.py's _literal_system_turn(), in time linear in the template):
   from "<|im_start|>system" and a newline ("\n" or the two characters
   \n) to "<|im_end|>", with none of ' " { } + between; empty if none. */
static GgufString literal_system_turn(GgufString t) {
    GgufString none = {t.text, 0};
    long end = -1, stop = -1, start = find_text(t, "<|im_start|>system", 0);
    while (start >= 0) {
        size_t body = (size_t)start + strlen("<|im_start|>system");
        size_t newline = body < t.len && t.text[body] == '\n' ? 1
                       : body + 1 < t.len && t.text[body] == '\\' && t.text[body + 1] == 'n' ? 2 : 0;
        if (newline) {
            body += newline;
            if (end < (long)body && (end = find_text(t, "<|im_end|>", body)) < 0) return none;
            if (stop < (long)body)
                for (stop = (long)body; (size_t)stop < t.len && !strchr("'\"{}+", t.text[stop]); stop++) {}
            if (stop >= end) return (GgufString){t.text + body, (size_t)(end - (long)body)};
        }
        start = find_text(t, "<|im_start|>system", (size_t)start + 1);
    }
    return none;
}

/* The chat template (TEMPLATE_*) and default system prompt (into *system)
   that export.py's gguf_chat_template() finds in a Jinja template. */
static int chat_template_kind(GgufString t, ByteBuffer *system) {
    if (!t.len) return TEMPLATE_NONE;
    if (find_text(t, "<|im_start|>", 0) >= 0) {
        GgufString text = literal_system_turn(t);
        for (size_t i = 0; i < text.len; i++) { // "\n" written as two characters is a newline; other escapes: none
            int escaped_newline = text.text[i] == '\\' && i + 1 < text.len && text.text[i + 1] == 'n';
            if (text.text[i] == '\\' && !escaped_newline) {
                system->n = 0;
                break;
            }
            put_bytes(system, escaped_newline ? "\n" : (const char *)text.text + i, 1);
            i += escaped_newline;
        }
        return TEMPLATE_CHATML;
    }
    if (find_text(t, "<|start_header_id|>", 0) >= 0 && find_text(t, "<|end_header_id|>", 0) >= 0) {
        if (find_text(t, "Cutting Knowledge Date", 0) < 0) return TEMPLATE_LLAMA3;
        return find_text(t, "strftime_now", 0) >= 0 ? TEMPLATE_LLAMA32 : TEMPLATE_LLAMA31;
    }
    return find_text(t, "[INST]", 0) >= 0 ? TEMPLATE_LLAMA2 : TEMPLATE_NONE;
}

/* A byte-level token's bytes: its characters mapped back through GPT-2's
   byte alphabet when every one is in it, else its own UTF-8. */
static void put_byte_level_token(ByteBuffer *b, GgufString text) {
    size_t start = b->n;
    for (size_t i = 0; i < text.len;) {
        int k = utf8_valid_len(text.text + i, text.len - i);
        int byte = k ? bl_alphabet_byte(tok_utf8_decode(text.text + i, k)) : -1;
        if (byte < 0) {
            b->n = start;
            put_bytes(b, text.text, text.len);
            return;
        }
        unsigned char c = (unsigned char)byte;
        put_bytes(b, &c, 1);
        i += (size_t)k;
    }
}

/* The pre-tokenizers a byte-level GGUF may name (tokenizer.ggml.pre), as
   export.py's GGUF_PRETOKENIZERS maps them. */
static const struct { const char *name; uint32_t pretokenizer, flags; } GGUF_PRETOKENIZERS[] = {
    {"gpt-2", PRETOK_GPT2, 0}, {"smollm", PRETOK_DIGITS_GPT2, 0}, {"starcoder", PRETOK_DIGITS_GPT2, 0},
    {"llama-bpe", PRETOK_LLAMA3, TOKF_IGNORE_MERGES}, {"qwen2", PRETOK_QWEN2, TOKF_NFC}};

/* The token records of a GGUF's vocabulary into out, as write_tokenizer()
   writes them; sentencepiece: the pieces and scores as they are, byte-level:
   bytes as put_byte_level_token() says for normal tokens. Sets *max_len,
   *unknown (the one unknown piece) and *byte_pieces. */
static int gguf_token_records(const Gguf *g, int sentencepiece, GgufString *texts, size_t n, ByteBuffer *out,
                              uint32_t *max_len, long long *unknown, int *byte_pieces) {
    uint32_t types_type, scores_type = 6;
    uint64_t n_types, n_scores = 0;
    size_t types_at, scores_at = 0;
    int found = gguf_array(g, "tokenizer.ggml.token_type", 4, &types_type, &n_types, &types_at);
    if (found < 0) return -1;
    if (found || n_types != n) return fail(g->err, "%zu tokens but %llu token types", n,
                                           (unsigned long long)(found ? 0 : n_types));
    if (sentencepiece && (found = gguf_array(g, "tokenizer.ggml.scores", 6, &scores_type, &n_scores, &scores_at)))
        return found < 0 ? -1 : fail(g->err, "metadata tokenizer.ggml.scores: expected a list of floats");
    if (sentencepiece && n_scores != n)
        return fail(g->err, "%zu tokens but %llu scores", n, (unsigned long long)n_scores);
    int unknowns = 0;
    for (size_t i = 0; i < n; i++) {
        double type = gguf_next_number(g, types_type, &types_at);
        float score = sentencepiece ? (float)gguf_next_number(g, scores_type, &scores_at) : 0.0f;
        int known = sentencepiece ? type >= 1 && type <= 6 : type == 1 || type == 3 || type == 4 || type == 5;
        if (!known)
            return fail(g->err, "token %zu has type %g, %s", i, type,
                        sentencepiece ? "which is unknown" : "not normal, control, user-defined or unused");
        unknowns += type == 2, *byte_pieces |= type == 6;
        if (type == 2) *unknown = (long long)i;
        size_t start = out->n;
        put_u32(out, 0);
        uint32_t score_bits;
        memcpy(&score_bits, &score, 4);
        put_u32(out, score_bits);
        unsigned char t = (unsigned char)type;
        put_bytes(out, &t, 1);
        if (sentencepiece || type != 1) put_bytes(out, texts[i].text, texts[i].len);
        else put_byte_level_token(out, texts[i]);
        uint32_t len = (uint32_t)(out->n - start - 9);
        if (len == 0) return fail(g->err, "token %zu is empty", i);
        for (int k = 0; k < 4; k++) out->bytes[start + k] = (unsigned char)(len >> 8 * k);
        if (len > *max_len) *max_len = len;
    }
    if (sentencepiece && unknowns != 1)
        return fail(g->err, "%d unknown tokens; sentencepiece needs exactly one", unknowns);
    return 0;
}

/* The merges ("left right", in rank order) as (left, right, result) ids. */
static int gguf_merges(const Gguf *g, GgufString *texts, size_t n, ByteBuffer *out, uint32_t *count) {
    uint32_t type;
    uint64_t n_merges;
    size_t at;
    int found = gguf_array(g, "tokenizer.ggml.merges", GGUF_STRING, &type, &n_merges, &at);
    if (found) return found < 0 ? -1 : 0;
    TextIndex ix;
    text_index_build(&ix, texts, n);
    ByteBuffer joined = {0};
    int status = 0;
    for (uint64_t r = 0; r < n_merges && status == 0; r++) {
        GgufString m = gguf_next_string(g, &at);
        const unsigned char *space = memchr(m.text, ' ', m.len);
        size_t left_len = space ? (size_t)(space - m.text) : m.len;
        GgufString right = {m.text + left_len + (space != NULL), m.len - left_len - (space != NULL)};
        joined.n = 0;
        put_bytes(&joined, m.text, left_len);
        put_bytes(&joined, right.text, right.len);
        int ids[3] = {text_index_find(&ix, m.text, left_len), text_index_find(&ix, right.text, right.len),
                      text_index_find(&ix, joined.bytes, joined.n)};
        if (ids[0] < 0 || ids[1] < 0 || ids[2] < 0)
            status = fail(g->err, "merge %llu names a token not in the vocab", (unsigned long long)r);
        for (int k = 0; k < 3; k++) put_u32(out, (uint32_t)ids[k]);
    }
    *count = (uint32_t)n_merges;
    free(joined.bytes);
    free(ix.slots);
    return status;
}

/* The tokenizer.bin (LTOK) bytes of the tokenizer in a parsed GGUF's
   metadata, as write_tokenizer_gguf() writes them. */
static int gguf_tokenizer_bytes(const Gguf *g, int vocab_size, ByteBuffer *out) {
    GgufString kind, pre = {(const unsigned char *)"", 0}, chat_text;
    char name[81];
    if (gguf_text(g, "tokenizer.ggml.model", NULL, &kind)) return -1;
    if (!kind.text)
        return fail(g->err, "holds no tokenizer (no tokenizer.ggml.model in its metadata); pass one with -z");
    int sentencepiece = gguf_is(kind, "llama");
    if (!sentencepiece && !gguf_is(kind, "gpt2"))
        return fail(g->err, "tokenizer.ggml.model '%s'; only 'llama' (sentencepiece BPE) and 'gpt2' (byte-level "
                    "BPE) are read from GGUF", gguf_printable(kind, name));
    uint32_t texts_type, pretokenizer = PRETOK_NONE, flags = 0, max_len = 0, n_merges = 0;
    uint64_t n = 0;
    size_t at;
    int found = gguf_array(g, "tokenizer.ggml.tokens", GGUF_STRING, &texts_type, &n, &at);
    if (found < 0) return -1;
    if (vocab_size >= 0 && n != (uint64_t)vocab_size)
        return fail(g->err, "%llu tokens but the model has %d", (unsigned long long)n, vocab_size);
    long long ids[4];
    static const char *const id_keys[4] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                           "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id"};
    for (int i = 0; i < 4; i++)
        if (gguf_token_id(g, id_keys[i], &ids[i])) return -1;
    int add_bos, add_eos, space_prefix, extra_spaces;
    if (gguf_text(g, "tokenizer.chat_template", NULL, &chat_text) ||
        gguf_bool(g, "tokenizer.ggml.add_eos_token", 0, &add_eos))
        return -1;
    if (!sentencepiece) {
        if (gguf_text(g, "tokenizer.ggml.pre", "default", &pre)) return -1;
        size_t p = 0, count = sizeof GGUF_PRETOKENIZERS / sizeof GGUF_PRETOKENIZERS[0];
        while (p < count && !gguf_is(pre, GGUF_PRETOKENIZERS[p].name)) p++;
        if (p == count)
            return fail(g->err, "tokenizer.ggml.pre '%s' is not supported (gpt-2, llama-bpe, qwen2, smollm, "
                        "starcoder)", gguf_printable(pre, name));
        pretokenizer = GGUF_PRETOKENIZERS[p].pretokenizer, flags = GGUF_PRETOKENIZERS[p].flags;
    }
    if (gguf_bool(g, "tokenizer.ggml.add_bos_token", sentencepiece || gguf_is(pre, "llama-bpe"), &add_bos) ||
        gguf_bool(g, "tokenizer.ggml.add_space_prefix", sentencepiece, &space_prefix) ||
        gguf_bool(g, "tokenizer.ggml.remove_extra_whitespaces", 0, &extra_spaces))
        return -1;
    if (n == 0) return fail(g->err, "0 tokens");
    GgufString *texts = xcalloc(n, sizeof(GgufString), "the tokenizer's tokens");
    for (uint64_t i = 0; i < n; i++) texts[i] = gguf_next_string(g, &at);
    ByteBuffer records = {0}, merges = {0}, system = {0};
    long long unknown = -1;
    int byte_pieces = 0, chat = chat_template_kind(chat_text, &system);
    if (chat == TEMPLATE_NONE) { // from the marker tokens (export.py's chat_from_vocab())
        TextIndex ix;
        text_index_build(&ix, texts, n);
#define HAS(text) (text_index_find(&ix, (const unsigned char *)(text), strlen(text)) >= 0)
        chat = HAS("<|im_start|>") && HAS("<|im_end|>") ? TEMPLATE_CHATML
             : HAS("<|start_header_id|>") && HAS("<|end_header_id|>") && HAS("<|eot_id|>") ? TEMPLATE_LLAMA3
             : TEMPLATE_NONE;
#undef HAS
        free(ix.slots);
    }
    int status = gguf_token_records(g, sentencepiece, texts, n, &records, &max_len, &unknown, &byte_pieces);
    if (status == 0 && sentencepiece && ids[3] != -1 && ids[3] != unknown)
        status = fail(g->err, "unknown_token_id %lld is not the unknown token %lld", ids[3], unknown);
    if (sentencepiece) ids[3] = unknown;
    if (status == 0 && !sentencepiece) status = gguf_merges(g, texts, n, &merges, &n_merges);
    for (int i = 0; i < 4 && status == 0; i++)
        if (ids[i] < -1 || ids[i] >= (long long)n)
            status = fail(g->err, "%s %lld is outside -1..%llu", id_keys[i], ids[i], (unsigned long long)n - 1);
    if (status == 0 && memchr(system.bytes ? system.bytes : (unsigned char *)"", 0, system.n))
        status = fail(g->err, "the default system prompt contains a NUL character");
    flags |= (add_eos ? TOKF_ADD_EOS : 0) | (add_bos ? TOKF_ADD_BOS : 0) | (space_prefix ? TOKF_DUMMY_PREFIX : 0);
    if (sentencepiece) flags |= (extra_spaces ? TOKF_REMOVE_EXTRA_WS : 0) | (byte_pieces ? TOKF_BYTE_FALLBACK : 0);
    uint32_t header[14] = {0, 1, sentencepiece ? TOK_SENTENCEPIECE : TOK_BYTELEVEL, (uint32_t)n};
    for (int i = 0; i < 4; i++) header[4 + i] = (uint32_t)ids[i];
    header[8] = flags, header[9] = pretokenizer, header[10] = (uint32_t)chat, header[11] = n_merges;
    header[12] = max_len, header[13] = (uint32_t)system.n;
    put_bytes(out, "LTOK", 4);
    for (int i = 1; i < 14; i++) put_u32(out, header[i]);
    put_bytes(out, (const unsigned char[8]){0}, 8);
    put_bytes(out, records.bytes, records.n);
    put_bytes(out, merges.bytes, merges.n);
    put_bytes(out, system.bytes, system.n);
    free(texts);
    free(records.bytes);
    free(merges.bytes);
    free(system.bytes);
    return status;
}

/* Loads the tokenizer of the GGUF file at path: 0, or -1 with err set. */
static int gguf_load_tokenizer(Tokenizer *tok, const char *path, int vocab_size, char *err) {
    struct stat st;
    int fd = open_input(path, INT64_MAX, "a GGUF file", &st);
    void *data = st.st_size ? mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
    close(fd);
    if (data == MAP_FAILED) return fail(err, "cannot map: %s", st.st_size ? strerror(errno) : "file is empty");
    Gguf g = {.data = data, .size = (size_t)st.st_size, .err = err};
    uint64_t n_tensors;
    size_t alignment;
    ByteBuffer ltok = {0};
    int status = gguf_read_metadata(&g, &n_tensors, &alignment) || gguf_tokenizer_bytes(&g, vocab_size, &ltok) ||
                 tokenizer_load_memory(tok, ltok.bytes, ltok.n, vocab_size, err, ERROR_SIZE);
    free(ltok.bytes);
    free(g.keys);
    munmap(data, (size_t)st.st_size);
    return status ? -1 : 0;
}

/* ============================================================================
   Appendix: the fast kernels

   Everything above runs on the plain kernels. This appendix holds kernels
   that compute the same, faster, and a reader may skip it: SIMD intrinsics
   (AVX2, AVX-512 with VNNI), tiles that keep weights and inputs in
   the L1 cache, weights repacked for the batched kernels, and software
   prefetch. choose_fast_kernels() at its end puts the fastest ones that
   this build and CPU have into the kernel table, once, at startup.
   Built with -DPLAIN, the appendix is left out.

   Where the time goes. With n = 1 every weight is read once per token for a
   few multiply-adds, so generation runs at the speed of memory: the
   products stream the weights, each thread reading a contiguous share,
   prefetched well ahead. A batch reuses each weight n times, so the prompt
   runs at the speed of the multiply-adds: gemm_rows() works in tiles that
   keep weights and inputs in the L1 cache, and on AVX-512 int8 weights are
   repacked so that one instruction works on 16 rows.

   SIMD. The portable loops here are written so that the compiler can
   vectorise them without reordering a float sum (independent lanes, summed
   in a fixed order at the end): the default build targets AVX2
   (-march=x86-64-v3). The int8 products and the f32 tiles have AVX2
   versions behind __AVX2__, and the matrix products AVX-512 versions (VNNI
   for int8) that are compiled function by function and chosen when the
   CPU has AVX-512 F, BW, VL, DQ and VNNI, so that the same binary still
   runs where it does not (and under valgrind, which cannot execute
   AVX-512). RUN_AVX512=0 turns them off. Constants that a kernel is
   specialised on (token counts) are passed as literals to an
   always-inlined body, one call per value. tests/test_kernels.c holds
   every kernel here to its plain version on random data.

   One idiom is written twice on purpose: the AVX2 and the AVX-512 version
   of a kernel have the same shape (a body specialised on literals and the
   switch that calls it, a row widened to floats), each in its own
   instruction set, 8 lanes or 16; the duplicates tool pairs them.

   What runs where: choose_fast_kernels() fills the kernel table, and
   nothing else chooses. By the CPU, for each weight type, the kernel of
   one token (n = 1) and of a batch (n > 1), with the line each starts at
   (tests/test_student_path.py holds the lines true):

   CPU            type          one token                         batch
   any (portable) f32 bf16 f16  lanes8_fast (line 4619)           gemm_rows (line 4765)
                  q8_0 q4_0 K   the book's plain kernels, matmul_q8_0, matmul_q4_0 and matmul_k
   AVX2           f32 bf16 f16  lanes8_avx2 (line 5368)           gemm_rows_avx2 (line 5465)
                  q8_0 q4_0     q_tile_avx2 (line 5686)           packed_batch_avx2 (line 6148); n < 5: q_tiles_avx2
                  K             k_rows_avx2 (line 5830)           packed_batch_avx2; n < 5: k_rows_avx2
   AVX-512 VNNI   f32 bf16 f16  lanes8_avx512 (line 6540)         gemm_rows_avx512 (line 6546)
                  q8_0          dot_q8_both_avx512 (line 6335)    qgemm_rows_avx512 (line 6694)
                  q4_0          dot_q4_avx512 (line 6320)         qgemm_rows_avx512
                  K             k_rows_avx512 (line 6429)         kgemm_rows_avx512 (line 6811)
   every CPU: attention_fast (line 5238), on AVX-512 with a batch's blocks
   of 16 queries in attention_chunk_avx512 (line 6924); swiglu_fast (line 4948),
   rmsnorm_fast (line 4965) and to_halves_fast (line 4686); the K types' input
   quantized by quantize_input() on AVX-512, quantize_input_k_avx2() on AVX2;
   AVX-512's batches and AVX2's batches pack weights in the products' room
   (panel_room(), line 7054).
   ========================================================================= */

#ifndef PLAIN

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX512 1
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))
#define AVX512_INLINE AVX512 static inline __attribute__((always_inline))
static int use_avx512; // chosen once, by choose_fast_kernels()
#else
#define HAVE_AVX512 0
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif

/* Software prefetch: the weights a matrix-vector product streams are asked
   for this far ahead of the loads, which keeps more of them in flight than
   the hardware prefetchers do (measured: 16 -> 33 GB/s on one core here).
   A prefetch never faults, so reading past the end of a matrix is safe. */
#define PREFETCH_AHEAD 4096 // bytes
/* Packing weights for the batched kernels reads 16 rows side by side, 64
   bytes of each at a time: streams the hardware does not follow far, so
   each row is asked for a few lines ahead. */
#define PACK_AHEAD 256 // bytes

static inline void prefetch(const void *p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch((const char *)p + PREFETCH_AHEAD);
#else
    (void)p;
#endif
}

static inline void prefetch_pack(const void *p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch((const char *)p + PACK_AHEAD);
#else
    (void)p;
#endif
}

/* ---- Products of f32, bf16 and f16 weights, in one order (any CPU)

   Every fast f32, bf16 and f16 product, one token or a batch, on any CPU,
   adds in the same order, so that -b and the thread count change no bit of
   the logits: the columns in passes of GEMM_DEPTH; within a pass 16 lanes,
   lane j taking columns j, j + 16, j + 32, ... by fused multiply-adds; the
   lanes added as a tree of halves (sum_lanes()); the passes' sums added in
   turn. bf16 and f16 weights are widened to f32 first, exactly, so that
   their products are bit for bit those of f32 weights of the same values;
   the inputs stay f32. The kernels take the weight type (WEIGHT_F32,
   WEIGHT_BF16, WEIGHT_F16) as a constant, one inlined copy per type. */
#define LANES 16
#define GEMM_DEPTH 1024 // columns per pass: a batch tile's rows of them (24-32 KiB) stay in L1

/* The 16 lanes added as ((0 + 8) + (4 + 12)) + ... : halves, then halves of those. */
static float sum_lanes(float acc[LANES]) {
    for (int half = LANES / 2; half > 0; half /= 2)
        for (int j = 0; j < half; j++) acc[j] += acc[j + half];
    return acc[0];
}

/* Bytes of a weight of an f32, bf16 or f16 row. */
static inline int float_size(const int type) { return type == WEIGHT_F32 ? 4 : 2; }

/* Weight i of an f32, bf16 or f16 row, as a float (widened exactly). */
static inline float weight_at(const void *w, size_t i, const int type) {
    if (type == WEIGHT_BF16) return bf16_to_f32(((const uint16_t *)w)[i]);
    if (type == WEIGHT_F16) return f16_to_f32(((const uint16_t *)w)[i]);
    return ((const float *)w)[i];
}

/* acc (LANES) += the lanes of w . x over columns from .. n - 1 of a pass
   (n <= GEMM_DEPTH), w the streamed operand, of a constant type. */
static inline __attribute__((always_inline)) void dot_lanes_typed(float acc[LANES], const void *w, const float *x,
                                                                  int from, int n, const int type) {
    int i = from;
    for (; i + LANES <= n; i += LANES) {
        prefetch((const char *)w + (size_t)i * float_size(type));
        for (int j = 0; j < LANES; j++) acc[j] = fmaf(weight_at(w, i + j, type), x[i + j], acc[j]);
    }
    for (int j = 0; i + j < n; j++) acc[j] = fmaf(weight_at(w, i + j, type), x[i + j], acc[j]);
}

/* dot_lanes_typed() for a type known at run time: one copy per type. */
static inline __attribute__((always_inline)) void dot_lanes(float acc[LANES], const void *w, const float *x,
                                                            int from, int n, int type) {
    if (type == WEIGHT_BF16) dot_lanes_typed(acc, w, x, from, n, WEIGHT_BF16);
    else if (type == WEIGHT_F16) dot_lanes_typed(acc, w, x, from, n, WEIGHT_F16);
    else dot_lanes_typed(acc, w, x, from, n, WEIGHT_F32);
}

/* w . x over one pass in the order above. */
static inline __attribute__((always_inline)) float dot_pass(const void *w, const float *x, int n, int type) {
    float acc[LANES] = {0};
    dot_lanes(acc, w, x, 0, n, type);
    return sum_lanes(acc);
}

/* One token's products with 8 rows of a pass: lanes[r] (LANES) = the
   lanes of row r . x over the first n columns, n a multiple of LANES, the
   rows ld weights of the type apart. The CPU's own versions follow in the
   appendix. */
typedef void Lanes8Kernel(float lanes[8][LANES], const void *w, size_t ld, const float *x, int n, int type);

static void lanes8_fast(float lanes[8][LANES], const void *w, size_t ld, const float *x, int n, int type) {
    memset(lanes, 0, 8 * sizeof *lanes);
    for (int r = 0; r < 8; r++) dot_lanes(lanes[r], (const char *)w + r * ld * float_size(type), x, 0, n, type);
}

/* One token's products with rows r0 .. r1 - 1 of f32, bf16 or f16 weights:
   8 rows at a time through lanes8 (the columns of a pass that fill whole
   lanes), the rest of each pass and the sums here; rows left over alone. */
static inline __attribute__((always_inline)) void matvec_floats_with(float *out, const Matrix *w, int r0, int r1,
                                                                     const float *x, Lanes8Kernel *lanes8) {
    int cols = w->cols, type = w->type, size = float_size(type), r = r0;
    const char *values = (const char *)w->values;
    for (; r + 8 <= r1; r += 8) {
        float sum[8] = {0};
        for (int k = 0; k < cols; k += GEMM_DEPTH) {
            int depth = cols - k < GEMM_DEPTH ? cols - k : GEMM_DEPTH, whole = depth / LANES * LANES;
            float lanes[8][LANES];
            const char *at = values + ((size_t)r * cols + k) * size;
            lanes8(lanes, at, cols, x + k, whole, type);
            for (int i = 0; i < 8; i++) {
                dot_lanes(lanes[i], at + (size_t)i * cols * size, x + k, whole, depth, type);
                sum[i] += sum_lanes(lanes[i]);
            }
        }
        memcpy(out + r - r0, sum, sizeof sum);
    }
    for (; r < r1; r++) {
        float sum = 0.0f;
        for (int k = 0; k < cols; k += GEMM_DEPTH) {
            const char *at = values + ((size_t)r * cols + k) * size;
            int depth = cols - k < GEMM_DEPTH ? cols - k : GEMM_DEPTH;
            sum += dot_pass(at, x + k, depth, type);
        }
        out[r - r0] = sum;
    }
}

/* Batches (n > 1) in tiles of weight rows by tokens, one pass at a time:
   each weight of a pass is loaded once per tile and used for every token
   of it. Each CPU's tile has its own shape; the portable one takes
   GEMM_ROWS by GEMM_TOKENS, AVX2's 4 rows by GEMM_TOKENS. */
#define GEMM_ROWS 8    // weight rows per portable tile
#define GEMM_TOKENS 3  // tokens per tile: AVX2 keeps 4 rows x 3 sums, 3 inputs and a row in its 16 registers
#define GEMM_CHUNK_BYTES (512 * 1024) // inputs of a chunk of tokens: they stay in L2 for every tile of a row block

/* One tile: c (tokens, rows; row stride ldc) = x (tokens, depth; stride
   ldx) @ w (rows, depth; stride ldw)^T, for depth <= GEMM_DEPTH, added to
   what c holds when accumulate is set. */
typedef struct {
    float *c;
    const float *w, *x;
    int ldc, ldw, ldx;
    int depth, rows, tokens, accumulate;
} GemmTile;
typedef void GemmTileKernel(const GemmTile *g);

static void gemm_tile_fast(const GemmTile *g) {
    for (int t = 0; t < g->tokens; t++)
        for (int r = 0; r < g->rows; r++) {
            float sum = dot_pass(g->w + (size_t)r * g->ldw, g->x + (size_t)t * g->ldx, g->depth, WEIGHT_F32);
            float *c = g->c + (size_t)t * g->ldc + r;
            *c = g->accumulate ? *c + sum : sum;
        }
}

/* to_halves() with F16C where the build has it: the same halves, each NaN
   made first the quiet NaN of its sign that f32_to_f16() gives. */
static void to_halves_fast(uint16_t *out, const float *x, int n) {
    int i = 0;
#if HAVE_AVX2
    __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    __m256 quiet = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000));
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i), nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        v = _mm256_blendv_ps(v, _mm256_or_ps(_mm256_and_ps(v, sign), quiet), nan);
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
#endif
    for (; i < n; i++) out[i] = f32_to_f16(x[i]);
}

/* out (n) = the halves in as floats (f16 weights, and the f16 cache). */
static void widen_f16(float *out, const uint16_t *in, size_t n) {
    size_t i = 0;
#if HAVE_AVX2
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i))));
#endif
    for (; i < n; i++) out[i] = f16_to_f32(in[i]);
}

/* The batch product of f32, bf16 or f16 weights, rows r0 .. r1 - 1, in
   tiles of up to tile_rows rows by tile_tokens tokens (the kernel `tile`
   takes any count up to those), a block of ROW_BLOCK rows at a time: the
   tokens in chunks of chunk_bytes of inputs, which stay in L2 while each
   tile of rows runs every pass over them, so that neither the inputs nor
   the row block leave L2; bf16 and f16 weights widened once a block into
   the thread's room (panel_room()), then reused by every chunk. Inlined
   into each CPU's version, with its shape as literals, so that its tile
   kernel is a direct call. */
static inline __attribute__((always_inline)) void gemm_rows_with(float *out, int ldo, const Matrix *w, int r0, int r1,
                                                                 const ProductScratch *in, GemmTileKernel *tile_kernel,
                                                                 const int tile_rows, const int tile_tokens,
                                                                 const size_t chunk_bytes) {
    int cols = w->cols, n = in->n;
    int chunk = (int)(chunk_bytes / (sizeof(float) * cols)) / tile_tokens * tile_tokens;
    if (chunk < tile_tokens) chunk = tile_tokens;
    for (int b0 = r0; b0 < r1; b0 += ROW_BLOCK) {
        int b1 = r1 - b0 < ROW_BLOCK ? r1 : b0 + ROW_BLOCK, ldw = cols;
        const float *rows = (const float *)w->values + (size_t)b0 * cols; // the block's rows as floats, ldw apart
        if (w->type != WEIGHT_F32) {
            float *wide = (float *)((char *)in->room + (size_t)thread_num() * in->room_size);
            for (int r = b0; r < b1; r++)
                if (w->type == WEIGHT_F16)
                    widen_f16(wide + (size_t)(r - b0) * ldw, (const uint16_t *)w->values + (size_t)r * cols, cols);
                else dequantize_row(wide + (size_t)(r - b0) * ldw, w, r, 0, cols);
            rows = wide;
        }
        for (int t0 = 0; t0 < n; t0 += chunk) {
            int t1 = n - t0 < chunk ? n : t0 + chunk;
            for (int r = b0; r < b1; r += tile_rows) {
                int nr = b1 - r < tile_rows ? b1 - r : tile_rows;
                for (int k = 0; k < cols; k += GEMM_DEPTH) {
                    GemmTile tile = {.w = rows + (size_t)(r - b0) * ldw + k, .ldc = ldo, .ldw = ldw, .ldx = cols,
                                     .depth = cols - k < GEMM_DEPTH ? cols - k : GEMM_DEPTH, .rows = nr,
                                     .accumulate = k > 0};
                    for (int t = t0; t < t1; t += tile_tokens) {
                        tile.tokens = t1 - t < tile_tokens ? t1 - t : tile_tokens;
                        tile.c = out + (size_t)t * ldo + (r - r0);
                        tile.x = in->x + (size_t)t * cols + k;
                        tile_kernel(&tile);
                    }
                }
            }
        }
    }
}

/* f32, bf16 and f16 weights: one token 8 rows at a time through lanes8, a
   batch through gemm: the CPU's kernels. */
static inline __attribute__((always_inline)) void matmul_floats(float *out, int ldo, const Matrix *w, int r0, int r1,
                                                                const ProductScratch *in, MatmulKernel *gemm,
                                                                Lanes8Kernel *lanes8) {
    if (in->n > 1) gemm(out, ldo, w, r0, r1, in);
    else matvec_floats_with(out, w, r0, r1, in->x, lanes8);
}

static void gemm_rows(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    gemm_rows_with(out, ldo, w, r0, r1, in, gemm_tile_fast, GEMM_ROWS, GEMM_TOKENS, GEMM_CHUNK_BYTES);
}

static void matmul_floats_fast(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    matmul_floats(out, ldo, w, r0, r1, in, gemm_rows, lanes8_fast);
}

/* ---- Attention (any CPU) */

#define ATTENTION_CHUNK 128  // positions per task: one token's attention at depth spreads over the threads
#define ATTENTION_QUERIES 16 // queries of a batch done together: they share each chunk's keys and values, widened once
#define ATTENTION_SPAN 32    // positions of a chunk at a time (an f16 cache's widened to f32 in the thread's scratch, L1)

/* Floats of scratch that an f16 cache's keys and values take as f32, for
   positions up to ctx of n_heads heads (kv heads are as many or fewer). */
static size_t wide_cache_floats(int ctx, int n_heads, int head_dim) {
    return mul_size(2, mul_size((size_t)ctx * n_heads, head_dim));
}

/* Floats of scratch that attention_fast() needs: a batch's cache widened to
   f32 (wide_cache_floats()), then per thread each chunk's
   partial results for ATTENTION_QUERIES queries of every head, the scores
   of a chunk for them, their queries (a copy that a CPU's kernel may
   take) and a span of widened keys or values. */
static size_t attention_fast_scratch(int ctx, int n_heads, int head_dim, int threads) {
    size_t rows = (size_t)ATTENTION_QUERIES * n_heads, chunks = ((size_t)ctx + ATTENTION_CHUNK - 1) / ATTENTION_CHUNK;
    size_t work = rows * (ATTENTION_CHUNK + head_dim) + (size_t)ATTENTION_SPAN * head_dim;
    size_t rooms = mul_size(threads, mul_size(chunks, rows * (head_dim + 2)) + work);
    return rooms + wide_cache_floats(ctx, n_heads, head_dim);
}

/* span (n rounded up to 8, head_dim) = positions p0 .. p0 + n - 1 of one
   kv head's keys or values (f32, or f16 when f16 is set) as floats, and
   zeros after them; the positions that follow are prefetched. */
static void widen_span(float *span, const void *head, int p0, int n, int head_dim, int f16) {
    size_t at = (size_t)p0 * head_dim, len = (size_t)n * head_dim, padded = (size_t)(n + 7) / 8 * 8 * head_dim;
    const char *from = (const char *)head + at * (f16 ? 2 : sizeof(float));
    for (size_t byte = 0; byte < len * (f16 ? 2 : sizeof(float)); byte += 64) prefetch(from + byte);
    if (f16) widen_f16(span, (const uint16_t *)head + at, len);
    else memcpy(span, (const float *)head + at, len * sizeof(float));
    memset(span + len, 0, (padded - len) * sizeof(float));
}

/* Positions p0 .. p0 + n - 1 of one kv head's keys or values as floats:
   where they lie in an f32 cache, unless the reader takes rows 8 at a time
   (eights) and n is not a multiple of 8; else widen_span()'s copy. */
static const float *span_floats(float *span, const void *head, int p0, int n, int head_dim, int f16, int eights) {
    if (!f16 && (!eights || n % 8 == 0)) return (const float *)head + (size_t)p0 * head_dim;
    widen_span(span, head, p0, n, head_dim, f16);
    return span;
}

/* scores[j] = scale * (q . keys[j]) for 8 rows of keys (8, head_dim), each
   dot product in 8 lanes summed as a tree: a position's score does not
   depend on the positions computed beside it. */
static void attention_scores8(float scores[8], const float *q, const float *keys, int head_dim, float scale) {
#if HAVE_AVX2
    if (head_dim % 8 == 0) { // the same sums, the lanes in registers and the tree in hadds
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int i = 0; i < head_dim; i += 8) {
            __m256 qv = _mm256_loadu_ps(q + i);
            for (int j = 0; j < 8; j++)
                acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + (size_t)j * head_dim + i), acc[j]);
        }
        __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
        __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                    _mm256_permute2f128_ps(s0123, s4567, 0x31)); // low halves + high halves
        _mm256_storeu_ps(scores, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
        return;
    }
#endif
    float acc[8][8] = {{0}};
    int i = 0;
    for (; i + 8 <= head_dim; i += 8)
        for (int j = 0; j < 8; j++)
            for (int l = 0; l < 8; l++) acc[j][l] += q[i + l] * keys[(size_t)j * head_dim + i + l];
    for (int l = 0; i + l < head_dim; l++)
        for (int j = 0; j < 8; j++) acc[j][l] += q[i + l] * keys[(size_t)j * head_dim + i + l];
    for (int j = 0; j < 8; j++) {
        const float *a = acc[j];
        scores[j] = scale * (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])));
    }
}

/* attention_scores8() for nq rows of queries (a literal, up to 3) and the
   same 8 keys: scores[i] (8) of query q[i], the same sums. On AVX2 they
   take the keys 4 at a time and share each key's loads: 12 sums in flight
   where one query keeps 8, which the multiply-add's latency holds back. */
static inline __attribute__((always_inline)) void attention_scores8_rows(float *const scores[3], const float *const q[3],
                                                                         const float *keys, int head_dim, float scale,
                                                                         const int nq) {
#if HAVE_AVX2
    if (nq > 1 && head_dim % 8 == 0) {
        for (int k0 = 0; k0 < 8; k0 += 4) {
            __m256 acc[3][4];
            for (int r = 0; r < nq; r++)
                for (int k = 0; k < 4; k++) acc[r][k] = _mm256_setzero_ps();
            for (int i = 0; i < head_dim; i += 8)
                for (int k = 0; k < 4; k++) {
                    __m256 key = _mm256_loadu_ps(keys + (size_t)(k0 + k) * head_dim + i);
                    for (int r = 0; r < nq; r++) acc[r][k] = _mm256_fmadd_ps(_mm256_loadu_ps(q[r] + i), key, acc[r][k]);
                }
            for (int r = 0; r < nq; r++) { // lanes 0-3 of the 4 keys' trees in the low half, 4-7 in the high
                __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(acc[r][0], acc[r][1]), _mm256_hadd_ps(acc[r][2], acc[r][3]));
                __m128 sums = _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
                _mm_storeu_ps(scores[r] + k0, _mm_mul_ps(sums, _mm_set1_ps(scale)));
            }
        }
        return;
    }
#endif
    for (int r = 0; r < nq; r++) attention_scores8(scores[r], q[r], keys, head_dim, scale);
}

/* exp(x) for x <= 0 in plain arithmetic, which the compiler vectorises:
   x = k ln 2 + r with |r| <= ln 2 / 2, exp(r) by its Taylor polynomial to
   r^7 (relative error below 1e-7), times 2^k put straight into the
   exponent. |x| is capped at 87 (exp(-87) = 1.6e-38) on its bits: a float
   comparison would keep the compiler from vectorising. A NaN x comes out
   NaN (its bits ORed in at the end), so that a damaged model's NaN reaches
   the logits instead of becoming a weight of 0. */
static inline float exp_nonpositive(float x) {
    int32_t mag;
    memcpy(&mag, &x, sizeof mag);
    int32_t nan = -(int32_t)((mag & 0x7fffffff) > 0x7f800000) & 0x7fc00000; // 0, or a NaN's bits
    mag = (mag & 0x7fffffff) < 0x42ae0000 ? mag & 0x7fffffff : 0x42ae0000; // 0x42ae0000: 87.0f
    memcpy(&x, &mag, sizeof x);
    x = -x;
    float shifted = x * 1.44269504f + 12582912.0f; // 1.5 * 2^23: k = round(x / ln 2) in the low bits
    float k = shifted - 12582912.0f;
    float r = x - k * 0.693145752f; // ln 2 in two parts, so that r keeps its low bits
    r = r - k * 1.42860677e-6f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4b400000 + 127) * (1 << 23); // 2^k: k + 127 into the exponent
    float two_k, y;
    memcpy(&two_k, &bits, sizeof two_k);
    y = p * two_k;
    memcpy(&bits, &y, sizeof bits);
    bits |= nan;
    memcpy(&y, &bits, sizeof y);
    return y;
}

/* The largest of w[0 .. n - 1] (n >= 1), in 8 lanes (one pass in order was
   a chain of dependent compares): the same value, but for the sign of a
   zero, which exp() does not see; a NaN is passed over either way, and its
   own exp carries it on. On AVX2 the lanes are one maxps, which makes the
   same comparison (its second operand unless the first is greater): GCC
   leaves the loop below scalar. */
static float max_of(const float *w, int n) {
    float lanes[8];
    for (int l = 0; l < 8; l++) lanes[l] = w[0];
    int p = 0;
#if HAVE_AVX2
    __m256 m = _mm256_loadu_ps(lanes);
    for (; p + 8 <= n; p += 8) m = _mm256_max_ps(_mm256_loadu_ps(w + p), m);
    _mm256_storeu_ps(lanes, m);
#endif
    for (; p + 8 <= n; p += 8)
        for (int l = 0; l < 8; l++) lanes[l] = w[p + l] > lanes[l] ? w[p + l] : lanes[l];
    for (; p < n; p++) lanes[0] = w[p] > lanes[0] ? w[p] : lanes[0];
    float max = lanes[0];
    for (int l = 1; l < 8; l++) max = lanes[l] > max ? lanes[l] : max;
    return max;
}

/* swiglu() with exp_nonpositive(), which the compiler vectorises (expf
   is a call for each element): silu(g) = g / (1 + e) with e = exp(-g) for
   g >= 0, and g e / (1 + e) with e = exp(g) below, so that exp only meets
   arguments <= 0 (within 4e-7 of silu; below g = -87 a silu of at most
   2e-36 in size, for one of 1e-38 or less). NaN stays NaN. */
static void swiglu_fast(float *gate, const float *up, int n) {
    for (int i = 0; i < n; i++) {
        float g = gate[i], e = exp_nonpositive(-fabsf(g)), factor; // factor: e where g < 0, else 1
        int32_t g_bits, e_bits, one_bits = 0x3f800000;
        memcpy(&g_bits, &g, sizeof g_bits);
        memcpy(&e_bits, &e, sizeof e_bits);
        int32_t negative = g_bits >> 31; // all ones where the sign is set (by bits: a float comparison would
        e_bits = (e_bits & negative) | (one_bits & ~negative); // keep the compiler from vectorising)
        memcpy(&factor, &e_bits, sizeof factor);
        gate[i] = g * factor / (1.0f + e) * up[i];
    }
}

/* rmsnorm() with each row's sum of squares in 8 lanes of doubles, summed
   as a tree (the compiler vectorises it; rmsnorm()'s one sum is a chain of
   dependent adds): a row's scale differs from rmsnorm()'s only where the
   two double sums round to either side of a float's rounding boundary. */
static void rmsnorm_fast(float *out, const float *x, const float *weight, int n, int dim, float eps) {
    #pragma omp parallel for if (n > 1)
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * dim;
        float *ot = out + (size_t)t * dim;
        double acc[8] = {0};
        int i = 0;
        for (; i + 8 <= dim; i += 8)
            for (int l = 0; l < 8; l++) acc[l] += (double)xt[i + l] * xt[i + l];
        for (int l = 0; i + l < dim; l++) acc[l] += (double)xt[i + l] * xt[i + l];
        double sum_sq = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        rms_scale(ot, xt, weight, dim, sum_sq, eps);
    }
}

/* w[p] = exp(w[p] - max) for p < n; returns their sum, in 8 lanes summed as a tree. */
static float exp_sum(float *w, int n, float max) {
    for (int p = 0; p < n; p++) w[p] = exp_nonpositive(w[p] - max);
    float acc[8] = {0};
    int p = 0;
    for (; p + 8 <= n; p += 8)
        for (int l = 0; l < 8; l++) acc[l] += w[p + l];
    for (int l = 0; p + l < n; l++) acc[l] += w[p + l];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* out (head_dim) += the sum over p < n of weights[p] * values[p], values
   (n, head_dim) f32: the sums stay in registers for the whole pass over the
   positions, 64 lanes at a time, then 8, then one. */
#define MIX_LANES 64
static void attention_mix_add(float *out, const float *weights, const float *values, int n, int head_dim) {
    int i0 = 0;
#if HAVE_AVX2
    if (head_dim % 8 == 0) { // the same sums, fused at any optimisation (-O1 contracts none): AVX-512's, to the bit
        for (; i0 + MIX_LANES <= head_dim; i0 += MIX_LANES) {
            __m256 acc[MIX_LANES / 8];
            for (int j = 0; j < MIX_LANES / 8; j++) acc[j] = _mm256_loadu_ps(out + i0 + 8 * j);
            for (int p = 0; p < n; p++)
                for (int j = 0; j < MIX_LANES / 8; j++)
                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(weights[p]),
                                             _mm256_loadu_ps(values + (size_t)p * head_dim + i0 + 8 * j), acc[j]);
            for (int j = 0; j < MIX_LANES / 8; j++) _mm256_storeu_ps(out + i0 + 8 * j, acc[j]);
        }
        for (; i0 < head_dim; i0 += 8) {
            __m256 acc = _mm256_loadu_ps(out + i0);
            for (int p = 0; p < n; p++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(weights[p]), _mm256_loadu_ps(values + (size_t)p * head_dim + i0), acc);
            _mm256_storeu_ps(out + i0, acc);
        }
        return;
    }
#endif
    for (; i0 + MIX_LANES <= head_dim; i0 += MIX_LANES) {
        float acc[MIX_LANES];
        memcpy(acc, out + i0, sizeof acc);
        for (int p = 0; p < n; p++)
            for (int j = 0; j < MIX_LANES; j++) acc[j] += weights[p] * values[(size_t)p * head_dim + i0 + j];
        memcpy(out + i0, acc, sizeof acc);
    }
    for (; i0 + 8 <= head_dim; i0 += 8) {
        float acc[8];
        memcpy(acc, out + i0, sizeof acc);
        for (int p = 0; p < n; p++)
            for (int j = 0; j < 8; j++) acc[j] += weights[p] * values[(size_t)p * head_dim + i0 + j];
        memcpy(out + i0, acc, sizeof acc);
    }
    for (; i0 < head_dim; i0++)
        for (int p = 0; p < n; p++) out[i0] += weights[p] * values[(size_t)p * head_dim + i0];
}

/* attention_mix_add() for nq rows (a literal, up to 3) of the same values:
   out[i] += the sum over p < seen[i] of weights[i][p] * values[p], the same
   sums, for seen[0] <= seen[1] <= .... On AVX2, 32 columns at a time: 12
   sums in flight. */
static inline __attribute__((always_inline)) void attention_mix_add_rows(float *const out[3], const float *const weights[3],
                                                                         const float *values, const int seen[3],
                                                                         int head_dim, const int nq) {
#if HAVE_AVX2
    if (nq > 1 && head_dim % 32 == 0) {
        for (int i0 = 0; i0 < head_dim; i0 += 32) {
            __m256 acc[3][4];
            for (int r = 0; r < nq; r++)
                for (int j = 0; j < 4; j++) acc[r][j] = _mm256_loadu_ps(out[r] + i0 + 8 * j);
            for (int p = 0; p < seen[nq - 1]; p++)
                for (int r = 0; r < nq; r++) {
                    if (p >= seen[r]) continue; // a position only the later rows see
                    __m256 weight = _mm256_set1_ps(weights[r][p]);
                    for (int j = 0; j < 4; j++)
                        acc[r][j] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(values + (size_t)p * head_dim + i0 + 8 * j),
                                                    acc[r][j]);
                }
            for (int r = 0; r < nq; r++)
                for (int j = 0; j < 4; j++) _mm256_storeu_ps(out[r] + i0 + 8 * j, acc[r][j]);
        }
        return;
    }
#endif
    for (int r = 0; r < nq; r++)
        if (seen[r] > 0) attention_mix_add(out[r], weights[r], values, seen[r], head_dim);
}

/* A span's scores for nq rows (a literal) whose queries see seen[i] of its
   keys, seen[0] <= seen[1] <= ...: all rows as far as the last sees (an
   earlier row's scores past its own are never read). The rows' scores
   start at scores[i]. */
static inline __attribute__((always_inline)) void attention_span_scores(float *const scores[3], const float *const q[3],
                                                                        const int seen[3], const float *keys, int head_dim,
                                                                        float scale, const int nq) {
    for (int j = 0; j < seen[nq - 1]; j += 8) {
        float *at[3];
        for (int r = 0; r < nq; r++) at[r] = scores[r] + j;
        attention_scores8_rows(at, q, keys + (size_t)j * head_dim, head_dim, scale, nq);
    }
}

/* Up to three rows of a task of attention_chunk() from row r0 (of rows),
   for its span of n positions from p0: how many of them each row's query
   sees, the row's scores (then weights) there, its query and its output. */
typedef struct {
    int n, seen[3];
    float *scores[3];
    const float *weights[3], *q[3];
    float *out[3];
} AttentionRows;

static AttentionRows attention_rows(float *parts, float *work, const float *q, const KVCache *kv, int h, int c0,
                                    int pos, int t0, int first, int r0, int rows, int p0, int n) {
    int hd = kv->head_dim, group = kv->n_heads / kv->n_kv_heads;
    AttentionRows a = {.n = rows - r0 < 3 ? rows - r0 : 3};
    for (int i = 0; i < a.n; i++) { // row r: query first + r / group, head h * group + r % group
        int t = first + (r0 + i) / group, head = h * group + (r0 + i) % group;
        a.seen[i] = pos + t + 1 - p0 < n ? pos + t + 1 - p0 : n;
        a.scores[i] = work + (size_t)(r0 + i) * ATTENTION_CHUNK + (p0 - c0);
        a.weights[i] = a.scores[i];
        a.q[i] = q + ((size_t)t * kv->n_heads + head) * hd;
        a.out[i] = parts + ((size_t)(t - t0) * kv->n_heads + head) * (hd + 2) + 2;
    }
    return a;
}

/* One task of attention_fast(): kv head h, the chunk of positions c0 ..
   c0 + ATTENTION_CHUNK - 1, queries t0 .. t1 - 1 of q at positions pos +
   t. For each query that sees some of the chunk and each query head on h,
   its partial result [m, s, o] at parts + ((t - t0) * n_heads + head) *
   (head_dim + 2): m the max of its scores there, s the sum of exp(score -
   m), o (head_dim) the sum of exp(score - m) times the values. The keys
   and values are read once for all of them. work: this thread's scratch. */
static void attention_chunk(float *parts, float *work, const float *q, const KVCache *kv, int h, int c0, int pos,
                            int t0, int t1) {
    int hd = kv->head_dim, group = kv->n_heads / kv->n_kv_heads;
    int end = c0 + ATTENTION_CHUNK < pos + t1 ? c0 + ATTENTION_CHUNK : pos + t1; // after the last position seen
    int first = c0 - pos > t0 ? c0 - pos : t0;                                   // the first query that sees one
    size_t head = (size_t)h * kv->ctx * hd * (kv->f16 ? 2 : sizeof(float));
    const char *keys = (const char *)kv->keys + head, *values = (const char *)kv->values + head;
    float *span = work + (size_t)ATTENTION_QUERIES * kv->n_heads * ATTENTION_CHUNK; // (ATTENTION_SPAN, hd)
    float scale = 1.0f / sqrtf((float)hd);
    int rows = (t1 - first) * group; // a query and a query head each (attention_rows())
    for (int p0 = c0; p0 < end; p0 += ATTENTION_SPAN) { // scores, row r of work, three rows at a time
        int n = end - p0 < ATTENTION_SPAN ? end - p0 : ATTENTION_SPAN;
        const float *k = span_floats(span, keys, p0, n, hd, kv->f16, 1);
        for (int r0 = 0; r0 < rows; r0 += 3) {
            AttentionRows a = attention_rows(parts, work, q, kv, h, c0, pos, t0, first, r0, rows, p0, n);
            switch (a.n) {
            case 3: attention_span_scores(a.scores, a.q, a.seen, k, hd, scale, 3); break;
            case 2: attention_span_scores(a.scores, a.q, a.seen, k, hd, scale, 2); break;
            default: attention_span_scores(a.scores, a.q, a.seen, k, hd, scale, 1);
            }
        }
    }
    for (int t = first; t < t1; t++) // scores into weights: m, s
        for (int g = 0, n = (pos + t + 1 < end ? pos + t + 1 : end) - c0; g < group; g++) {
            float *w = work + (size_t)((t - first) * group + g) * ATTENTION_CHUNK;
            float *part = parts + ((size_t)(t - t0) * kv->n_heads + h * group + g) * (hd + 2);
            float max = max_of(w, n);
            part[0] = max;
            part[1] = exp_sum(w, n, max);
            memset(part + 2, 0, (size_t)hd * sizeof(float));
        }
    for (int p0 = c0; p0 < end; p0 += ATTENTION_SPAN) { // o
        int n = end - p0 < ATTENTION_SPAN ? end - p0 : ATTENTION_SPAN;
        const float *v = span_floats(span, values, p0, n, hd, kv->f16, 0);
        for (int r0 = 0; r0 < rows; r0 += 3) {
            AttentionRows a = attention_rows(parts, work, q, kv, h, c0, pos, t0, first, r0, rows, p0, n);
            switch (a.n) {
            case 3: attention_mix_add_rows(a.out, a.weights, v, a.seen, hd, 3); break;
            case 2: attention_mix_add_rows(a.out, a.weights, v, a.seen, hd, 2); break;
            default: attention_mix_add_rows(a.out, a.weights, v, a.seen, hd, 1);
            }
        }
    }
}

/* out (head_dim) = one query head's attention output from the partial
   results [m, s, o] of chunks 0 .. last, `step` floats apart, merged in
   chunk order: where the max grows, what was summed so far is scaled by
   exp(old max - new max), and the chunk's part by exp(its max - new max). */
static void attention_merge(float *out, const float *part, size_t step, int last, int head_dim) {
    float max = part[0], sum = part[1];
    memcpy(out, part + 2, (size_t)head_dim * sizeof(float));
    for (int c = 1; c <= last; c++) {
        const float *more = part + c * step;
        float m = more[0] > max ? more[0] : max, old_scale = expf(max - m), more_scale = expf(more[0] - m);
        sum = sum * old_scale + more[1] * more_scale;
        for (int i = 0; i < head_dim; i++) out[i] = out[i] * old_scale + more[2 + i] * more_scale;
        max = m;
    }
    float inv = 1.0f / sum;
    for (int i = 0; i < head_dim; i++) out[i] *= inv;
}

/* attention_plain()'s result, computed by chunks of the positions (flash
   decoding): per kv head and chunk (attention_chunk()) for up to
   ATTENTION_QUERIES queries at a time, then per query and head the chunks'
   parts merged in order. One token's chunks are spread over the threads,
   then merged; a batch is one task per block of queries and kv head (the
   last blocks, which see the most positions, first), which does its chunks
   in turn and merges them, so that the threads meet once a layer. Each
   query's result comes out the same, to the bit, whichever threads do its
   chunks and whether it comes alone or in a batch: its chunks start at
   fixed positions, and nothing it sums depends on the other queries.
   scratch: attention_fast_scratch() floats; out may be q. A batch's
   blocks go to batch_chunk, attention_chunk() or a CPU's version of it
   with the same results (inlined into each, so that it is a direct call). */
typedef void AttentionChunk(float *parts, float *work, const float *q, const KVCache *kv, int h, int c0, int pos,
                            int t0, int t1);
static inline __attribute__((always_inline)) void attention_with(float *out, const float *q, const KVCache *kv,
                                                                 int pos, int n, float *scratch,
                                                                 AttentionChunk *batch_chunk) {
    int hd = kv->head_dim, heads = kv->n_heads, group = heads / kv->n_kv_heads;
    size_t step = (size_t)ATTENTION_QUERIES * heads * (hd + 2); // one chunk's parts
    size_t parts_size = ((size_t)kv->ctx + ATTENTION_CHUNK - 1) / ATTENTION_CHUNK * step;
    size_t room = parts_size + (size_t)ATTENTION_QUERIES * heads * (ATTENTION_CHUNK + hd) + (size_t)ATTENTION_SPAN * hd;
    float *wide = scratch;
    scratch += wide_cache_floats(kv->ctx, heads, hd);
    if (n == 1) {
        int chunks = pos / ATTENTION_CHUNK + 1;
        #pragma omp parallel for collapse(2) schedule(dynamic, 1)
        for (int c = 0; c < chunks; c++)
            for (int h = 0; h < kv->n_kv_heads; h++)
                attention_chunk(scratch + c * step, scratch + (size_t)thread_num() * room + parts_size, q, kv, h,
                                c * ATTENTION_CHUNK, pos, 0, 1);
        for (int h = 0; h < heads; h++) // a small part of the work: no second wait for the threads
            attention_merge(out + (size_t)h * hd, scratch + (size_t)h * (hd + 2), step, chunks - 1, hd);
        return;
    }
    KVCache widened = *kv; // an f16 cache's positions up to pos + n widened once, not by every block of queries
    if (kv->f16) {
        widened.f16 = 0, widened.ctx = pos + n;
        widened.keys = wide, widened.values = wide + (size_t)kv->n_kv_heads * widened.ctx * hd;
        #pragma omp parallel for
        for (int part = 0; part < 2 * kv->n_kv_heads; part++) { // keys and values of each head
            int h = part / 2;
            const uint16_t *from = (const uint16_t *)(part % 2 ? kv->values : kv->keys) + (size_t)h * kv->ctx * hd;
            widen_f16((float *)(part % 2 ? widened.values : widened.keys) + (size_t)h * widened.ctx * hd, from,
                      (size_t)widened.ctx * hd);
        }
    }
    int blocks = (n + ATTENTION_QUERIES - 1) / ATTENTION_QUERIES;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int h = 0; h < kv->n_kv_heads; h++)
        for (int b = blocks - 1; b >= 0; b--) {
            float *parts = scratch + (size_t)thread_num() * room;
            int t0 = b * ATTENTION_QUERIES, t1 = t0 + ATTENTION_QUERIES < n ? t0 + ATTENTION_QUERIES : n;
            for (int c = 0; c * ATTENTION_CHUNK < pos + t1; c++)
                batch_chunk(parts + c * step, parts + parts_size, q, &widened, h, c * ATTENTION_CHUNK, pos, t0, t1);
            for (int t = t0; t < t1; t++)
                for (int head = h * group; head < (h + 1) * group; head++)
                    attention_merge(out + ((size_t)t * heads + head) * hd,
                                    parts + ((size_t)(t - t0) * heads + head) * (hd + 2), step,
                                    (pos + t) / ATTENTION_CHUNK, hd);
        }
}

static void attention_fast(float *out, const float *q, const KVCache *kv, int pos, int n, float *scratch) {
    attention_with(out, q, kv, pos, n, scratch, attention_chunk);
}

/* ---- Matrix products on AVX2

   Each output of these kernels has its own 8-lane sum, which takes the
   same multiply-adds in the same order whatever tile it is computed in,
   and is summed by the same tree at the end: a row's result does not
   depend on its neighbours, its thread, or the number of tokens beside it
   (a prompt's logits equal those of its tokens one by one, bit for bit).
   Several rows and tokens share a tile so that each load of a weight or an
   input serves several of these sums, which also keeps several multiply-
   adds in flight instead of one chain. */

#if HAVE_AVX2 || HAVE_AVX512
/* The f16 at p and the one after it, as floats in lanes 0 and 1 (a K
   block's d and dmin). */
static inline __attribute__((always_inline, target("f16c"))) __m128 two_halves(const uint8_t *p) {
    int32_t both;
    memcpy(&both, p, sizeof both);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(both));
}

/* group_step() and scale_step() of a q8_0 (q8 1) or q4_0 matrix laid out
   as il (Matrix.interleaved) says; the q8_0 and q4_0 kernels take both as
   literals, so that each layout gets its own code. */
static inline int q_step(const int q8, const int il) { return (q8 ? GROUP_SIZE : GROUP_SIZE / 2) + 2 * il; }
static inline int q_scale_step(const int q8, const int il) { return il ? q_step(q8, il) : 2; }

/* The f16 scales of 8 groups, step bytes apart from p on. */
static inline __m128i eight_halves(const uint8_t *p, const int step) {
    if (step == 2) return _mm_loadu_si128((const __m128i *)p);
    return _mm_setr_epi16((short)read_u16(p), (short)read_u16(p + step), (short)read_u16(p + 2 * step),
                          (short)read_u16(p + 3 * step), (short)read_u16(p + 4 * step), (short)read_u16(p + 5 * step),
                          (short)read_u16(p + 6 * step), (short)read_u16(p + 7 * step));
}

/* The 8 bytes of the 6-bit scales (or mins, from their other words) of a
   q4_k or q5_k block: first the low 6 bits of `low`, then the 4 bits of
   `rest` with the top 2 bits of `low` above them (docs/FORMATS.md). */
static inline uint64_t k_scale_bytes(uint32_t low, uint32_t rest) {
    return (low & 0x3f3f3f3fu) | (uint64_t)((rest & 0x0f0f0f0fu) | (low >> 2 & 0x30303030u)) << 32;
}

/* d (all lanes) times each of the 8 bytes (a K block's scales or mins). */
static inline __attribute__((always_inline, target("avx2"))) __m256 widen8_scales(uint64_t bytes, __m256 d) {
    return _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)bytes))));
}

/* A q4_k or q5_k block's 8 group scales d scale_g and mins dmin min_g. */
static inline __attribute__((always_inline, target("avx2,f16c"))) void scales_and_mins(__m256 *scale, __m256 *min,
                                                                                       const uint8_t *block) {
    uint32_t s[3];
    memcpy(s, block + 4, sizeof s);
    __m128 d = two_halves(block); // d, dmin
    *scale = widen8_scales(k_scale_bytes(s[0], s[2]), _mm256_broadcastss_ps(d));
    *min = widen8_scales(k_scale_bytes(s[1], s[2] >> 4), _mm256_broadcastss_ps(_mm_movehdup_ps(d)));
}

/* The sums of 8 outputs, each of 16 lanes, h[i] holding lanes j + (j + 8)
   of output i: the rest of sum_lanes()'s tree, output i into lane i. */
static inline __attribute__((always_inline, target("avx2,fma"))) __m256 sum8_lanes(const __m256 h[8]) {
    __m256 a[4], b[2];
    for (int i = 0; i < 4; i++) // (j) + (j + 4): outputs 2i and 2i + 1 in the two halves
        a[i] = _mm256_add_ps(_mm256_permute2f128_ps(h[2 * i], h[2 * i + 1], 0x20),
                             _mm256_permute2f128_ps(h[2 * i], h[2 * i + 1], 0x31));
    for (int i = 0; i < 2; i++) // (j) + (j + 2)
        b[i] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                             _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0xee));
    __m256 c = _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], 0x88), _mm256_shuffle_ps(b[0], b[1], 0xdd)); // 0 + 1
    return _mm256_permutevar8x32_ps(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); // was 0 2 4 6 1 3 5 7
}
#endif

#if HAVE_AVX2
#define AVX2_INLINE static inline __attribute__((always_inline))

static inline float sum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* The sums of 4 outputs, each of 16 lanes, h[i] holding lanes j + (j + 8)
   of output i: sum8_lanes()'s tree for 4 outputs, output i into lane i. */
AVX2_INLINE __m128 sum4_lanes(const __m256 h[4]) {
    __m128 a[4], b[2];
    for (int i = 0; i < 4; i++) // (j) + (j + 4)
        a[i] = _mm_add_ps(_mm256_castps256_ps128(h[i]), _mm256_extractf128_ps(h[i], 1));
    for (int i = 0; i < 2; i++) // (j) + (j + 2)
        b[i] = _mm_add_ps(_mm_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm_shuffle_ps(a[2 * i], a[2 * i + 1], 0xee));
    return _mm_add_ps(_mm_shuffle_ps(b[0], b[1], 0x88), _mm_shuffle_ps(b[0], b[1], 0xdd)); // 0 + 1
}

/* 8 columns of an f32, bf16 or f16 row at w, as floats. */
AVX2_INLINE __m256 widen8_avx2(const void *w, const int type) {
    if (type == WEIGHT_F32) return _mm256_loadu_ps((const float *)w);
    if (type == WEIGHT_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w));
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

/* lanes8_fast(), `rows` (1 or 4) rows at a time: up to 4 x 2 sums and the input's 16 columns in registers. */
AVX2_INLINE void lanes8_body_avx2(float lanes[8][LANES], const void *w, size_t ld, const float *x, int n,
                                  const int type, const int rows) {
    int size = float_size(type);
    for (int r0 = 0; r0 < 8; r0 += rows) {
        __m256 acc[4][2];
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < 2; h++) acc[r][h] = _mm256_setzero_ps();
        for (int i = 0; i < n; i += LANES) {
            __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
            for (int r = 0; r < rows; r++) {
                const char *row = (const char *)w + ((r0 + r) * ld + i) * size;
                if (type == WEIGHT_F32 || i % 32 == 0) // the next 8 rows' line: each step reads f32's
                    __builtin_prefetch(row + 8 * ld * size);
                acc[r][0] = _mm256_fmadd_ps(widen8_avx2(row, type), x0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(widen8_avx2(row + 8 * size, type), x1, acc[r][1]);
            }
        }
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < 2; h++) _mm256_storeu_ps(lanes[r0 + r] + 8 * h, acc[r][h]);
    }
}

/* bf16 rows that one pass holds whole (ld <= GEMM_DEPTH: 110m's 768
   columns) go one at a time, the 8 rows one sequential stream, which Zen 3
   reads faster than 4 rows side by side; f32's and longer rows' passes
   four at a time. */
static void lanes8_avx2(float lanes[8][LANES], const void *w, size_t ld, const float *x, int n, int type) {
    if (type == WEIGHT_BF16 && ld <= GEMM_DEPTH) lanes8_body_avx2(lanes, w, ld, x, n, WEIGHT_BF16, 1);
    else if (type == WEIGHT_BF16) lanes8_body_avx2(lanes, w, ld, x, n, WEIGHT_BF16, 4);
    else if (type == WEIGHT_F16) lanes8_body_avx2(lanes, w, ld, x, n, WEIGHT_F16, 4);
    else lanes8_body_avx2(lanes, w, ld, x, n, WEIGHT_F32, 4);
}

/* AVX2's batch products of f32, bf16 and f16 weights read packed copies,
   so that a tile reads two sequential streams, not 7 rows a row's length
   apart: the input by token triples (pack_input_avx2(), once a product,
   for every thread), each block of weight rows by quads (packed into the
   thread's room, f32 copied, bf16 and f16 widened). A group of `count`
   rows packs each pass of GEMM_DEPTH columns, padded with zeros to whole
   steps of 16, as [sweep][step][row][8]: the 8 columns 16m .. 16m + 7 of
   every row (sweep 0, lanes 0-7 of a sum), then 16m + 8 .. 16m + 15 (sweep
   1, lanes 8-15). A pass takes count * GEMM_DEPTH floats, and a group
   starts at its first row times packed_width(). The zeros add +0, as the
   masked loads they replace did: the same bits. */
#define AVX2_TILE_ROWS 4
#define AVX2_CHUNK_BYTES (256 * 1024) // gemm_rows_avx2()'s chunks: half of Zen 3's 512 KiB L2

/* Floats a packed row takes: cols rounded up to whole steps of 16. */
static int packed_width(int cols) { return (cols + 15) / 16 * 16; }

/* out = `count` rows (ld weights of the type apart) packed as above, the
   first `present` of them from rows, the others zeros. */
AVX2_INLINE void pack_group_avx2(float *out, const void *rows, size_t ld, const int type, int count, int present,
                                 int cols) {
    int size = float_size(type);
    for (int k = 0; k < cols; k += GEMM_DEPTH) {
        int steps = ((cols - k < GEMM_DEPTH ? cols - k : GEMM_DEPTH) + 15) / 16;
        for (int sweep = 0; sweep < 2; sweep++)
            for (int m = 0; m < steps; m++)
                for (int i = 0; i < count; i++, out += 8) {
                    int col = k + 16 * m + 8 * sweep;
                    const char *at = (const char *)rows + ((size_t)i * ld + col) * size;
                    if (i < present && col + 8 <= cols) _mm256_storeu_ps(out, widen8_avx2(at, type));
                    else
                        for (int j = 0; j < 8; j++) out[j] = i < present && col + j < cols ? weight_at(at, j, type) : 0;
                }
    }
}

/* The input of a batch (n > 1) packed by token triples, the last one of
   the tokens left, into in->triples: the prepare kernel of f32, bf16 and
   f16 weights. One token's product reads x as it is. */
static void pack_input_avx2(ProductScratch *in, const float *x, int n, int cols) {
    if (n < 2) return;
    for (int t = 0; t < n; t += GEMM_TOKENS) {
        int nt = n - t < GEMM_TOKENS ? n - t : GEMM_TOKENS;
        pack_group_avx2(in->triples + (size_t)t * packed_width(cols), x + (size_t)t * cols, cols, WEIGHT_F32, nt, nt,
                        cols);
    }
}

/* acc[t][i] = the 8 lanes of packed row i . packed token t over a sweep
   of `steps` steps (w and x at the sweep's start). */
AVX2_INLINE void gemm_sweep_avx2(__m256 acc[GEMM_TOKENS][4], const float *w, const float *x, int steps, const int nt) {
    for (int t = 0; t < nt; t++)
        for (int i = 0; i < 4; i++) acc[t][i] = _mm256_setzero_ps();
    for (int m = 0; m < steps; m++, w += 4 * 8, x += nt * 8) {
        __m256 xv[GEMM_TOKENS];
        for (int t = 0; t < nt; t++) xv[t] = _mm256_loadu_ps(x + 8 * t);
        for (int i = 0; i < 4; i++) {
            __m256 wv = _mm256_loadu_ps(w + 8 * i);
            for (int t = 0; t < nt; t++) acc[t][i] = _mm256_fmadd_ps(wv, xv[t], acc[t][i]);
        }
    }
}

/* c (nt tokens, nr <= 4 rows; row stride ldc) = the products of a pass of
   a packed quad of rows w with a packed group of nt tokens x, `steps`
   steps of 16 columns, added to what c holds when accumulate is set. Its
   4 x 3 sums, 3 inputs and a row fill the 16 registers; the 4 rows, 16
   KiB of a pass, stay in L1 while a chunk's tokens stream past them. */
AVX2_INLINE void gemm_tile_avx2(float *c, int ldc, const float *w, const float *x, int steps, int accumulate, int nr,
                                const int nt) {
    __m256 h[GEMM_TOKENS][4], acc[GEMM_TOKENS][4];
    gemm_sweep_avx2(h, w, x, steps, nt);                                        // lanes 0-7
    gemm_sweep_avx2(acc, w + (size_t)steps * 4 * 8, x + (size_t)steps * nt * 8, steps, nt); // lanes 8-15
    for (int t = 0; t < nt; t++) {
        for (int i = 0; i < 4; i++) h[t][i] = _mm256_add_ps(h[t][i], acc[t][i]); // lanes j + (j + 8)
        float *ct = c + (size_t)t * ldc, sums[4];
        __m128 sum = sum4_lanes(h[t]); // row i in lane i
        if (nr == 4) {
            _mm_storeu_ps(ct, accumulate ? _mm_add_ps(_mm_loadu_ps(ct), sum) : sum);
            continue;
        }
        _mm_storeu_ps(sums, sum);
        for (int i = 0; i < nr; i++) ct[i] = accumulate ? ct[i] + sums[i] : sums[i];
    }
}

/* gemm_rows_with()'s order on the packed copies: a block of ROW_BLOCK rows
   packed into the thread's room (a last quad of fewer than 4 rows padded
   with zero rows), then the tokens in chunks whose inputs stay in L2, each
   quad of rows running every pass over a chunk's triples. */
static void gemm_rows_avx2(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    int cols = w->cols, n = in->n, width = packed_width(cols), size = float_size(w->type);
    int chunk = (int)(AVX2_CHUNK_BYTES / (sizeof(float) * cols)) / GEMM_TOKENS * GEMM_TOKENS;
    if (chunk < GEMM_TOKENS) chunk = GEMM_TOKENS;
    float *rows = (float *)((char *)in->room + (size_t)thread_num() * in->room_size);
    for (int b0 = r0; b0 < r1; b0 += ROW_BLOCK) {
        int b1 = r1 - b0 < ROW_BLOCK ? r1 : b0 + ROW_BLOCK;
        for (int r = b0; r < b1; r += AVX2_TILE_ROWS)
            pack_group_avx2(rows + (size_t)(r - b0) * width, (const char *)w->values + (size_t)r * cols * size, cols,
                            w->type, AVX2_TILE_ROWS, b1 - r < AVX2_TILE_ROWS ? b1 - r : AVX2_TILE_ROWS, cols);
        for (int t0 = 0; t0 < n; t0 += chunk) {
            int t1 = n - t0 < chunk ? n : t0 + chunk;
            for (int r = b0; r < b1; r += AVX2_TILE_ROWS) {
                int nr = b1 - r < AVX2_TILE_ROWS ? b1 - r : AVX2_TILE_ROWS;
                for (int k = 0; k < cols; k += GEMM_DEPTH) {
                    int steps = ((cols - k < GEMM_DEPTH ? cols - k : GEMM_DEPTH) + 15) / 16;
                    const float *quad = rows + (size_t)(r - b0) * width + (size_t)AVX2_TILE_ROWS * k;
                    for (int t = t0; t < t1; t += GEMM_TOKENS) {
                        int nt = t1 - t < GEMM_TOKENS ? t1 - t : GEMM_TOKENS;
                        const float *triple = in->triples + (size_t)t * width + (size_t)nt * k;
                        float *c = out + (size_t)t * ldo + (r - r0);
                        if (nt == 3) gemm_tile_avx2(c, ldo, quad, triple, steps, k > 0, nr, 3);
                        else if (nt == 2) gemm_tile_avx2(c, ldo, quad, triple, steps, k > 0, nr, 2);
                        else gemm_tile_avx2(c, ldo, quad, triple, steps, k > 0, nr, 1);
                    }
                }
            }
        }
    }
}

static void matmul_floats_avx2(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    matmul_floats(out, ldo, w, r0, r1, in, gemm_rows_avx2, lanes8_avx2);
}

/* q8_0's input as the AVX2 kernels take it, in one 16-bit part: per group
   of 32, wide_d = max |x| / 32767 and wide = x / wide_d rounded, as
   quantize_group() does with 127 (a value that is not finite alike). About
   15 bits, as the two int8 parts of quantize_input_q8_0() carry, in half
   the multiplies: AVX2 has no byte products without 16-bit pair sums, and
   madd_epi16 multiplies 16-bit values into 32 bits (a group's 32 products
   with weights of magnitude up to 128 stay below 2^28, exact). */
static void quantize_input_wide(ProductScratch *in, const float *x, int n, int cols) {
    int groups = cols / GROUP_SIZE;
    #pragma omp parallel for if (n > 1)
    for (int t = 0; t < n; t++)
        for (int g = 0; g < groups; g++) {
            const float *xg = x + (size_t)t * cols + (size_t)g * GROUP_SIZE;
            int16_t *q = in->wide + (size_t)t * cols + (size_t)g * GROUP_SIZE;
            float inv = input_scale(&in->wide_d[(size_t)t * groups + g], xg, 32767.0f);
            for (int i = 0; i < GROUP_SIZE; i++) q[i] = (int16_t)round_clamped(xg[i] * inv, 32767.0f);
        }
}

/* The 8 sums of the lanes of v[0] .. v[7], in order. Integer: exact. */
AVX2_INLINE __m256i lane_sums8_avx2(const __m256i v[8]) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

#define QTILE_ROWS 4   // weight rows per tile of the integer products
#define QTILE_TOKENS 3 // tokens per tile: 4 x 3 sums (some inputs then wait in L1: measured 5-8% faster than 4 x 2)

/* A tile's weight rows and input tokens. */
typedef struct {
    const uint8_t *w[QTILE_ROWS];  // row r + i's first group: q8_0 int8, q4_0 nibbles
    const uint8_t *wd[QTILE_ROWS]; // its first scale
    const void *x[QTILE_TOKENS];   // token t0 + j: q8_0 16-bit (quantize_input_wide()), q4_0 int8
    const float *xd[QTILE_TOKENS]; // its scales
} QTile;

static QTile qtile(const Matrix *w, int r, const ProductScratch *in, int t0, int nr, int nt) {
    int cols = w->cols, groups = cols / GROUP_SIZE;
    QTile tile = {0};
    for (int i = 0; i < nr; i++) {
        tile.w[i] = group_values(w, (size_t)(r + i) * groups);
        tile.wd[i] = w->scales + (size_t)(r + i) * groups * scale_step(w);
    }
    for (int j = 0; j < nt; j++)
        if (w->type == WEIGHT_Q8_0) {
            tile.x[j] = in->wide + (size_t)(t0 + j) * cols;
            tile.xd[j] = in->wide_d + (size_t)(t0 + j) * groups;
        } else {
            QuantizedVector x = quantized_row(&in->q, t0 + j, cols);
            tile.x[j] = x.q, tile.xd[j] = x.d;
        }
    return tile;
}

/* The scales of a block of ng <= 8 groups from g0: for each row i and
   token j, the row's scale of group g0 + k times the input's, s[i][j][k],
   zeros after ng. 8 at a time, or one by one: the same products. */
typedef float QScales[QTILE_ROWS][QTILE_TOKENS][8];
AVX2_INLINE void qtile_scales(QScales s, const QTile *tile, int g0, int ng, const int q8, const int il, const int nr,
                              const int nt) {
    const int step = q_scale_step(q8, il);
    for (int i = 0; i < nr; i++) {
        if (ng == 8) {
            __m256 wd = _mm256_cvtph_ps(eight_halves(tile->wd[i] + (size_t)g0 * step, step));
            for (int j = 0; j < nt; j++) _mm256_store_ps(s[i][j], _mm256_mul_ps(wd, _mm256_loadu_ps(tile->xd[j] + g0)));
            continue;
        }
        for (int k = 0; k < 8; k++) {
            float wd = k < ng ? _cvtsh_ss(read_u16(tile->wd[i] + (size_t)(g0 + k) * step)) : 0.0f;
            for (int j = 0; j < nt; j++) s[i][j][k] = k < ng ? wd * tile->xd[j][g0 + k] : 0.0f;
        }
    }
}

/* Each tile output's integer sums, a vector of a lane per group of the
   block, before lane_sums8_avx2() (q8_0) or q4_pair_sums_avx2() (q4_0)
   adds them up: dots[i][j][k]. */
typedef __m256i QDots[QTILE_ROWS][QTILE_TOKENS][8];

/* dots[i][j][k] = the 32 products of group g of row i of q8_0 weights,
   widened to 16 bits, with token j's 16-bit input, in 8 lanes of 4. */
AVX2_INLINE void q8_group_avx2(QDots dots, const QTile *tile, int g, int k, const int il, const int nr, const int nt) {
    __m256i x[QTILE_TOKENS][2];
    for (int j = 0; j < nt; j++)
        for (int h = 0; h < 2; h++)
            x[j][h] = _mm256_loadu_si256((const __m256i *)((const int16_t *)tile->x[j] + g * GROUP_SIZE + 16 * h));
    for (int i = 0; i < nr; i++) {
        const uint8_t *w = tile->w[i] + (size_t)g * q_step(1, il);
        __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
        __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
        for (int j = 0; j < nt; j++)
            dots[i][j][k] = _mm256_add_epi32(_mm256_madd_epi16(lo, x[j][0]), _mm256_madd_epi16(hi, x[j][1]));
    }
}

/* dots[i][j][p] = the integer dot products of groups g and g + 1 (two)
   or g alone of row i of q4_0 weights and token j, lanes 0..3 group g's,
   4..7 group g + 1's. A row's 32 bytes of the two groups hold weights
   0..15 of each in their low nibbles and 16..31 in the high ones: masked
   and shifted, they meet the inputs with the middle halves of the two
   groups swapped. The weights are q - 8, q in 0..15: each 16-bit pair of
   q x sums, less 8 x of the same pair, summed with the other half's, stays
   within 3 * 2 * 15 * 127 (exact). */
AVX2_INLINE void q4_pair_avx2(QDots dots, const QTile *tile, int g, int p, const int two, const int il, const int nr,
                              const int nt) {
    __m256i lo[QTILE_TOKENS], hi[QTILE_TOKENS], eights[QTILE_TOKENS];
    for (int j = 0; j < nt; j++) {
        const int8_t *x = (const int8_t *)tile->x[j] + g * GROUP_SIZE;
        __m256i a = _mm256_loadu_si256((const __m256i *)x);
        __m256i b = two ? _mm256_loadu_si256((const __m256i *)(x + GROUP_SIZE)) : _mm256_setzero_si256();
        lo[j] = _mm256_permute2x128_si256(a, b, 0x20), hi[j] = _mm256_permute2x128_si256(a, b, 0x31);
        eights[j] = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(8), lo[j]),
                                     _mm256_maddubs_epi16(_mm256_set1_epi8(8), hi[j]));
    }
    for (int i = 0; i < nr; i++) {
        const uint8_t *w = tile->w[i] + (size_t)g * q_step(0, il);
        __m128i second = !two ? _mm_setzero_si128() : _mm_loadu_si128((const __m128i *)(w + q_step(0, il)));
        __m256i b = two && !il ? _mm256_loadu_si256((const __m256i *)w)
                               : _mm256_set_m128i(second, _mm_loadu_si128((const __m128i *)w));
        __m256i low = _mm256_and_si256(b, _mm256_set1_epi8(15));
        __m256i high = _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(15));
        for (int j = 0; j < nt; j++) {
            __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, lo[j]), _mm256_maddubs_epi16(high, hi[j]));
            dots[i][j][p] = _mm256_madd_epi16(_mm256_sub_epi16(pairs, eights[j]), _mm256_set1_epi16(1));
        }
    }
}

/* The 8 group sums of 4 pairs' vectors from q4_pair_avx2(), in order. */
AVX2_INLINE __m256i q4_pair_sums_avx2(const __m256i pair[4]) {
    __m256i halves = _mm256_hadd_epi32(_mm256_hadd_epi32(pair[0], pair[1]), _mm256_hadd_epi32(pair[2], pair[3]));
    return _mm256_permutevar8x32_epi32(halves, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); // was 0 2 4 6 1 3 5 7
}

/* out[j * ldo + i] = row i of the tile times token j, for nr rows and nt
   tokens of q8_0 (q8 set) or q4_0 weights: the groups in blocks of 8,
   each group's exact sum in a lane of its own (lane k: groups k, k + 8,
   ...) times (weight scale x input scale) added by a fused multiply-add;
   then the 8 lanes added by sum_avx2().
   packed_batch_avx2() takes the same steps. The tile's rows lie one after
   another, and the block reads nr / rows of them: the prefetches run
   PREFETCH_AHEAD bytes ahead of the same share of the tile's bytes, as if
   it were read front to back. */
AVX2_INLINE void q_tile_body_avx2(float *out, int ldo, const QTile *tile, int groups, const int q8, const int il,
                                  const int nr, const int nt) {
    const int group_bytes = q_step(q8, il);
    __m256 acc[QTILE_ROWS][QTILE_TOKENS];
    _Alignas(32) QScales s;
    QDots dots;
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < nt; j++) acc[i][j] = _mm256_setzero_ps();
    for (int g0 = 0; g0 < groups; g0 += 8) {
        int ng = groups - g0 < 8 ? groups - g0 : 8;
        qtile_scales(s, tile, g0, ng, q8, il, nr, nt);
        for (int b = 0; b < nr * 8 * group_bytes; b += 64) // the rows follow each other: read as one stream
            prefetch(tile->w[0] + (size_t)nr * g0 * group_bytes + b);
        if (!il) prefetch(tile->wd[0] + 2 * nr * g0);
        if (q8 && ng == 8)
            for (int k = 0; k < 8; k++) q8_group_avx2(dots, tile, g0 + k, k, il, nr, nt);
        else if (q8)
            for (int k = 0; k < 8; k++)
                if (k < ng) q8_group_avx2(dots, tile, g0 + k, k, il, nr, nt);
                else
                    for (int i = 0; i < nr; i++)
                        for (int j = 0; j < nt; j++) dots[i][j][k] = _mm256_setzero_si256();
        else if (ng == 8)
            for (int k = 0; k < 8; k += 2) q4_pair_avx2(dots, tile, g0 + k, k / 2, 1, il, nr, nt);
        else
            for (int k = 0; k < 8; k += 2)
                if (k + 1 < ng) q4_pair_avx2(dots, tile, g0 + k, k / 2, 1, il, nr, nt);
                else if (k < ng) q4_pair_avx2(dots, tile, g0 + k, k / 2, 0, il, nr, nt);
                else
                    for (int i = 0; i < nr; i++)
                        for (int j = 0; j < nt; j++) dots[i][j][k / 2] = _mm256_setzero_si256();
        for (int i = 0; i < nr; i++)
            for (int j = 0; j < nt; j++) {
                __m256i sums = q8 ? lane_sums8_avx2(dots[i][j]) : q4_pair_sums_avx2(dots[i][j]);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_load_ps(s[i][j]), acc[i][j]);
            }
    }
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < nt; j++) out[(size_t)j * ldo + i] = sum_avx2(acc[i][j]);
}

/* One tile of nr rows from r and nt tokens from t0, nr and nt literals. */
AVX2_INLINE void q_tile_avx2(float *out, int ldo, const Matrix *w, int r, const ProductScratch *in, int t0, const int nr,
                             const int nt) {
    QTile tile = qtile(w, r, in, t0, nr, nt);
    int groups = w->cols / GROUP_SIZE;
    if (w->type == WEIGHT_Q8_0 && w->interleaved) q_tile_body_avx2(out, ldo, &tile, groups, 1, 1, nr, nt);
    else if (w->type == WEIGHT_Q8_0) q_tile_body_avx2(out, ldo, &tile, groups, 1, 0, nr, nt);
    else if (w->interleaved) q_tile_body_avx2(out, ldo, &tile, groups, 0, 1, nr, nt);
    else q_tile_body_avx2(out, ldo, &tile, groups, 0, 0, nr, nt);
}

/* The tiles of rows r0 .. r1 - 1 for the tokens t0 .. t0 + nt - 1. */
AVX2_INLINE void q_tiles_avx2(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in, int t0,
                              const int nt) {
    int r = r0;
    for (; r + QTILE_ROWS <= r1; r += QTILE_ROWS)
        q_tile_avx2(out + (size_t)t0 * ldo + r - r0, ldo, w, r, in, t0, QTILE_ROWS, nt);
    for (; r < r1; r++) q_tile_avx2(out + (size_t)t0 * ldo + r - r0, ldo, w, r, in, t0, 1, nt);
}

#endif


#if HAVE_AVX2
/* ---- K types on AVX2: as on AVX-512 below (the same integers, the same
   float steps in the same order), with maddubs for the products: unsigned
   weights of at most 6 bits times signed inputs keep its 16-bit pair sums
   within 2 * 63 * 127. */
typedef struct {
    __m256i w[8];          // group g's 32 weights, unsigned bytes
    __m256 scale, min;     // per group: d scale_g, dmin min_g (q4_k, q5_k); d (q6_k)
    __m256i pair_scales[8]; // q6_k: group g's two sub-block scales, each in 8 int16 lanes
    __m256i sub_scales[2]; // q6_k: the 16 sub-block scales, int32
} KBlockAvx2;


/* Where a block's weight bits start, and the 32-byte chunks they fill:
   q4_k's qs; q5_k's qh and qs; q6_k's ql and qh (docs/FORMATS.md). */
static inline int k_weights_at(const int type) { return type == WEIGHT_Q6_K ? 0 : 16; }
static inline int k_weight_chunks(const int type) { return type == WEIGHT_Q4_K ? 4 : type == WEIGHT_Q5_K ? 5 : 6; }

/* w[g]: group g's 32 weights, unsigned bytes, from a block's chunks of
   weight bits. Byte by byte: byte i of each chunk gives byte i of each
   group, so that 8 blocks' chunks, their bytes 4j .. 4j + 3 side by side,
   give the groups' columns 4j .. 4j + 3 of the 8 side by side. */
AVX2_INLINE void unpack_weights_avx2(__m256i w[8], const __m256i chunk[6], const int type) {
    __m256i fifteen = _mm256_set1_epi8(15), three = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    if (type == WEIGHT_Q6_K) {
        for (int h = 0; h < 2; h++) {
            __m256i ql0 = chunk[2 * h], ql1 = chunk[2 * h + 1], qh = chunk[4 + h];
            __m256i low[4] = {ql0, ql1, _mm256_srli_epi16(ql0, 4), _mm256_srli_epi16(ql1, 4)};
            for (int quarter = 0; quarter < 4; quarter++) {
                __m256i high = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * quarter), three);
                w[4 * h + quarter] = _mm256_or_si256(_mm256_and_si256(low[quarter], fifteen), _mm256_slli_epi16(high, 4));
            }
        }
        return;
    }
    const __m256i *qs = chunk + (type == WEIGHT_Q5_K);
    for (int j = 0; j < 4; j++) {
        w[2 * j] = _mm256_and_si256(qs[j], fifteen);
        w[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(qs[j], 4), fifteen);
        for (int i = 0; i < 2 && type == WEIGHT_Q5_K; i++) // bit 2j + i of qh[k]: 16 more
            w[2 * j + i] = _mm256_or_si256(w[2 * j + i],
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(chunk[0], 2 * j + i), one), 4));
    }
}

AVX2_INLINE KBlockAvx2 unpack_block_avx2(const uint8_t *block, const int type) {
    KBlockAvx2 k;
    __m256i chunk[6];
    for (int c = 0; c < k_weight_chunks(type); c++)
        chunk[c] = _mm256_loadu_si256((const __m256i *)(block + k_weights_at(type) + 32 * c));
    unpack_weights_avx2(k.w, chunk, type);
    if (type == WEIGHT_Q6_K) {
        const int8_t *scales = (const int8_t *)(block + 192);
        for (int g = 0; g < 8; g++)
            k.pair_scales[g] = _mm256_set_m128i(_mm_set1_epi16(scales[2 * g + 1]), _mm_set1_epi16(scales[2 * g]));
        for (int i = 0; i < 2; i++) k.sub_scales[i] = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(scales + 8 * i)));
        k.scale = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(read_u16(block + 208))));
        k.min = _mm256_setzero_ps();
        return k;
    }
    scales_and_mins(&k.scale, &k.min, block);
    return k;
}

/* The 8 sums of adjacent pairs of the 16 int32 in lo, hi, in order. */
AVX2_INLINE __m256i pair_sums_avx2(__m256i lo, __m256i hi) {
    return _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo, hi), _MM_SHUFFLE(3, 1, 2, 0));
}

/* The K types' input on AVX2: quantize_input()'s, and each group's d times
   its sum, from which k_block_avx2() and the packed tile take the weights'
   minimum terms. */
static void quantize_input_k_avx2(ProductScratch *in, const float *x, int n, int cols) {
    quantize_input(in, x, n, cols);
    for (size_t g = 0; g < (size_t)n * (cols / GROUP_SIZE); g++)
        in->q.scaled_sums[g] = in->q.d[g] * (float)in->q.group_sums[g];
}

/* k_block_avx512(), on AVX2, but for its last step: min times the inputs'
   scaled sums (d X, one load) rather than (min d) times X (a conversion and
   a multiply more). */
AVX2_INLINE __m256 k_block_avx2(__m256 acc, const KBlockAvx2 *k, const QuantizedVector *x, int g, const int type) {
    __m256i dot[8];
    for (int j = 0; j < 8; j++) {
        __m256i pairs = _mm256_maddubs_epi16(k->w[j], _mm256_loadu_si256((const __m256i *)(x->q + (g + j) * GROUP_SIZE)));
        dot[j] = _mm256_madd_epi16(pairs, type == WEIGHT_Q6_K ? k->pair_scales[j] : _mm256_set1_epi16(1));
    }
    __m256i sums = lane_sums8_avx2(dot);
    __m256 dx = _mm256_loadu_ps(x->d + g);
    if (type == WEIGHT_Q6_K) { // minus 32 scale_s X_s
        __m256i lo = _mm256_loadu_si256((const __m256i *)(x->half_sums + 2 * g));
        __m256i hi = _mm256_loadu_si256((const __m256i *)(x->half_sums + 2 * g + 8));
        __m256i pairs = pair_sums_avx2(_mm256_mullo_epi32(lo, k->sub_scales[0]), _mm256_mullo_epi32(hi, k->sub_scales[1]));
        sums = _mm256_sub_epi32(sums, _mm256_slli_epi32(pairs, 5));
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(k->scale, dx), acc);
    }
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(k->scale, dx), acc);
    return _mm256_fnmadd_ps(k->min, _mm256_loadu_ps(x->scaled_sums + g), acc);
}

#define KROW_TOKENS 4 // tokens that share a block's unpacking, row by row

/* Rows r0 .. r1 - 1 for the nt tokens from t0 (KROW_TOKENS at most). */
AVX2_INLINE void k_rows_body_avx2(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in,
                                  int t0, const int nt, const int type) {
    int cols = w->cols, blocks = cols / SUPER_BLOCK, bytes = K_BLOCK_BYTES[type];
    QuantizedVector x[KROW_TOKENS];
    for (int t = 0; t < nt; t++) x[t] = quantized_row(&in->q, t0 + t, cols);
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->values + (size_t)r * blocks * bytes;
        __m256 acc[KROW_TOKENS];
        for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
        for (int b = 0; b < blocks; b++) {
            for (int line = 0; line < bytes; line += 64) prefetch(row + (size_t)b * bytes + line + PREFETCH_AHEAD);
            KBlockAvx2 k = unpack_block_avx2(row + (size_t)b * bytes, type);
            for (int t = 0; t < nt; t++) acc[t] = k_block_avx2(acc[t], &k, &x[t], 8 * b, type);
        }
        for (int t = 0; t < nt; t++) out[(size_t)(t0 + t) * ldo + r - r0] = sum_avx2(acc[t]);
    }
}

/* Rows r0 .. r1 - 1 for every token: one, or a few too few to pack. */
AVX2_INLINE void k_rows_avx2(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in,
                             const int type) {
    int t = 0;
    for (; t + KROW_TOKENS <= in->n; t += KROW_TOKENS) k_rows_body_avx2(out, ldo, w, r0, r1, in, t, KROW_TOKENS, type);
    for (; t < in->n; t++) k_rows_body_avx2(out, ldo, w, r0, r1, in, t, 1, type);
}

/* A batch: a thread's rows packed, 8 at a time, side by side (a slice),
   so that one maddubs takes 4 columns of 8 rows times the same 4 inputs of
   a token (broadcast) and each row's sums come out in a lane of their own,
   with no horizontal adds; the float steps are k_block_avx2()'s, lane by
   lane. */
#define KSLICE 8       // rows of a slice: a vector holds one int32 or float of each
#define KTILE_TOKENS 5 // tokens per tile: 5 integer and 5 float sums in registers (measured: 4 and 6 slower)
#define KBATCH_MIN 5   // fewer tokens go row by row: packing costs more than it saves there (measured)

/* 8 rows of weights, packed: vectors of one int32 or float of each row. */
typedef struct {
    uint32_t *values; // (cols / 4, KSLICE): each row's 4 unsigned weights of columns 4j .. 4j + 3;
                      // q8_0: (cols / 2, KSLICE) byte pairs, its 2 weights of columns 2j, 2j + 1 (int8)
    float *scales;    // (groups, KSLICE): d scale_g (q4_k, q5_k), d (q6_k)
    float *mins;      // (groups, KSLICE): dmin min_g (q4_k, q5_k)
    int32_t *subs;    // q6_k, in mins' place: (groups, 3, KSLICE): the group's two sub-block
                      // scales, each as two int16, then both as an int16 pair
    int cols;
} KSliceAvx2;

/* Slices packed at a time: each tile of tokens is run on all of them while
   its inputs are in L1, not streamed from L2 or L3 again for each slice. */
#define KSLICES (ROW_BLOCK / KSLICE)

/* The thread's slice i (of KSLICES), in its room: 20 bytes a column each. */
static KSliceAvx2 k_slice_avx2(const ProductScratch *in, int cols, int i) {
    char *at = (char *)in->room + (size_t)thread_num() * in->room_size + (size_t)i * 20 * cols;
    KSliceAvx2 s = {.values = (uint32_t *)at, .scales = (float *)(at + (size_t)16 * cols), .cols = cols};
    s.mins = s.scales + (size_t)cols / GROUP_SIZE * KSLICE;
    s.subs = (int32_t *)s.mins;
    return s;
}

/* The 8 x 8 transpose of 32-bit elements: r[i] lane j -> r[j] lane i. */
AVX2_INLINE void transpose8_avx2(__m256i r[8]) {
    __m256i a[8], b[8];
    for (int i = 0; i < 8; i += 2) {
        a[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        a[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) { // b[i + e]: rows i .. i + 3 of elements e | e + 4
        b[i] = _mm256_unpacklo_epi64(a[i], a[i + 2]);
        b[i + 1] = _mm256_unpackhi_epi64(a[i], a[i + 2]);
        b[i + 2] = _mm256_unpacklo_epi64(a[i + 1], a[i + 3]);
        b[i + 3] = _mm256_unpackhi_epi64(a[i + 1], a[i + 3]);
    }
    for (int e = 0; e < 4; e++) {
        r[e] = _mm256_permute2x128_si256(b[e], b[4 + e], 0x20);
        r[e + 4] = _mm256_permute2x128_si256(b[e], b[4 + e], 0x31);
    }
}

/* A block's scales as vectors of its groups: d scale_g (or q6_k's d) in
   scale, dmin min_g in min; q6_k's 16 sub-block scales as int16 in pairs.
   Zeros for no block (a row past the matrix). */
AVX2_INLINE void k_row_scales_avx2(__m256i *scale, __m256i *min, __m256i *pairs, const uint8_t *block, const int type) {
    __m256 s = _mm256_setzero_ps(), m = _mm256_setzero_ps();
    *pairs = _mm256_setzero_si256();
    if (block && type == WEIGHT_Q6_K) {
        s = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(read_u16(block + 208))));
        *pairs = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(block + 192)));
    } else if (block) {
        scales_and_mins(&s, &m, block);
    }
    *scale = _mm256_castps_si256(s), *min = _mm256_castps_si256(m);
}

/* Rows r .. r + 7 of w (those past its end as zeros) into s: each block's
   chunks of weight bits transposed, 8 rows' 4-byte pieces side by side,
   and unpacked (unpack_weights_avx2()) 8 rows at once. */
AVX2_INLINE void k_pack_slice_avx2(const KSliceAvx2 *s, const Matrix *w, int r, const int type) {
    int blocks = w->cols / SUPER_BLOCK, bytes = K_BLOCK_BYTES[type];
    for (int b = 0; b < blocks; b++) {
        __m256i chunks[6][KSLICE], scale[KSLICE], min[KSLICE], pairs[KSLICE]; // chunks[c][i]: chunk c of row r + i
        for (int i = 0; i < KSLICE; i++) {
            const uint8_t *block =
                r + i < w->rows ? (const uint8_t *)w->values + ((size_t)(r + i) * blocks + b) * bytes : NULL;
            if (block) prefetch_pack(block);
            for (int c = 0; c < k_weight_chunks(type); c++)
                chunks[c][i] = block ? _mm256_loadu_si256((const __m256i *)(block + k_weights_at(type) + 32 * c))
                                     : _mm256_setzero_si256();
            k_row_scales_avx2(&scale[i], &min[i], &pairs[i], block, type);
        }
        for (int c = 0; c < k_weight_chunks(type); c++) transpose8_avx2(chunks[c]);
        size_t g0 = (size_t)8 * b; // the block's first group
        for (int j = 0; j < 8; j++) { // columns 4j .. 4j + 3 of each group
            __m256i piece[6], q[8];
            for (int c = 0; c < k_weight_chunks(type); c++) piece[c] = chunks[c][j];
            unpack_weights_avx2(q, piece, type);
            for (int g = 0; g < 8; g++) _mm256_storeu_si256((__m256i *)(s->values + ((g0 + g) * 8 + j) * KSLICE), q[g]);
        }
        transpose8_avx2(scale);
        for (int g = 0; g < 8; g++) _mm256_storeu_si256((__m256i *)(s->scales + (g0 + g) * KSLICE), scale[g]);
        if (type != WEIGHT_Q6_K) {
            transpose8_avx2(min);
            for (int g = 0; g < 8; g++) _mm256_storeu_si256((__m256i *)(s->mins + (g0 + g) * KSLICE), min[g]);
            continue;
        }
        transpose8_avx2(pairs);
        for (int g = 0; g < 8; g++) {
            __m256i *sub = (__m256i *)(s->subs + (g0 + g) * 3 * KSLICE);
            _mm256_storeu_si256(sub, _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(pairs[g], 0xa0), 0xa0));
            _mm256_storeu_si256(sub + 1, _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(pairs[g], 0xf5), 0xf5));
            _mm256_storeu_si256(sub + 2, pairs[g]);
        }
    }
}

/* A slice times the tokens t0 ... of x. */
typedef struct {
    const KSliceAvx2 *slice;
    const QuantizedVector *x;
    float *out;            // the slice's first output of token 0, row stride ldo
    int ldo, rows, t0;     // rows: of the slice, those stored
} KTileAvx2;

/* sums[t]: each row's exact sum of group g with token t0 + t, one row to
   a lane, the integer of k_block_avx2() (q6_k: each sub-block's times its
   scale, less 32 s X_s). The maddubs results are added in int16 4 at a
   time, 2 for 6-bit weights (2 x 2 x 63 x 127 stays below 32767): 8 of
   4-bit weights would fit too, but their 8 weight vectors beside 5 sums
   leave too few of the 16 registers. */
AVX2_INLINE void k_group_sums_avx2(__m256i sums[KTILE_TOKENS], const KTileAvx2 *tile, int g, const int nt,
                                   const int type) {
    const KSliceAvx2 *s = tile->slice;
    const int run = type == WEIGHT_Q6_K ? 2 : 4;
    int cols = s->cols, groups = cols / GROUP_SIZE;
    const uint32_t *values = s->values + (size_t)g * (GROUP_SIZE / 4) * KSLICE;
    const int32_t *subs = s->subs + (size_t)g * 3 * KSLICE;
    for (int j0 = 0; j0 < GROUP_SIZE / 4; j0 += run) {
        __m256i wv[4], mult = _mm256_set1_epi16(1);
        for (int j = 0; j < run; j++) wv[j] = _mm256_loadu_si256((const __m256i *)(values + (j0 + j) * KSLICE));
        if (type == WEIGHT_Q6_K) // the scale of the sub-block of columns 4 j0 ..
            mult = _mm256_loadu_si256((const __m256i *)(subs + j0 / (GROUP_SIZE / 8) * KSLICE));
        for (int t = 0; t < nt; t++) {
            const int8_t *xq = tile->x->q + (size_t)(tile->t0 + t) * cols + g * GROUP_SIZE + 4 * j0;
            __m256i part = _mm256_setzero_si256();
            for (int j = 0; j < run; j++) {
                int32_t four;
                memcpy(&four, xq + 4 * j, sizeof four);
                __m256i prod = _mm256_maddubs_epi16(wv[j], _mm256_set1_epi32(four));
                part = j ? _mm256_add_epi16(part, prod) : prod;
            }
            __m256i sum = _mm256_madd_epi16(part, mult);
            sums[t] = j0 ? _mm256_add_epi32(sums[t], sum) : sum;
        }
    }
    if (type != WEIGHT_Q6_K) return;
    __m256i pair = _mm256_loadu_si256((const __m256i *)(subs + 2 * KSLICE));
    for (int t = 0; t < nt; t++) {
        const int32_t *halves = tile->x->half_sums + ((size_t)(tile->t0 + t) * groups + g) * 2;
        __m256i inputs = _mm256_set1_epi32((int32_t)((uint32_t)(uint16_t)halves[0] | (uint32_t)halves[1] << 16));
        sums[t] = _mm256_sub_epi32(sums[t], _mm256_slli_epi32(_mm256_madd_epi16(pair, inputs), 5));
    }
}

/* lanes[l][t] = 0 for every lane l and token t < nt. */
AVX2_INLINE void zero_lanes_avx2(__m256 lanes[8][KTILE_TOKENS], const int nt) {
    for (int lane = 0; lane < 8; lane++)
        for (int t = 0; t < nt; t++) lanes[lane][t] = _mm256_setzero_ps();
}

/* Each row's output for the nt tokens of a tile: its 8 lanes, lanes[l][t]
   holding lane l of every row, added as sum_avx2() adds them,
   ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)); rows past tile->rows not stored. */
AVX2_INLINE void store_slice_sums_avx2(const KTileAvx2 *tile, __m256 lanes[8][KTILE_TOKENS], const int nt) {
    __m256i stored = _mm256_cmpgt_epi32(_mm256_set1_epi32(tile->rows), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int t = 0; t < nt; t++) {
        __m256 even = _mm256_add_ps(_mm256_add_ps(lanes[0][t], lanes[4][t]), _mm256_add_ps(lanes[2][t], lanes[6][t]));
        __m256 odd = _mm256_add_ps(_mm256_add_ps(lanes[1][t], lanes[5][t]), _mm256_add_ps(lanes[3][t], lanes[7][t]));
        _mm256_maskstore_ps(tile->out + (size_t)(tile->t0 + t) * tile->ldo, stored, _mm256_add_ps(even, odd));
    }
}

/* One tile of nt tokens (a literal): the groups in order, group g into
   lane g mod 8 (so lane j takes groups j, j + 8, ... in turn), each
   group's sum times (scale x input scale) added by a fused multiply-add,
   and for q4_k and q5_k min times its inputs' scaled sum taken off by
   another: k_block_avx2()'s steps; then each row's 8 lanes added as
   sum_avx2() adds them, ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)). The
   lanes' sums wait in L1 between groups: read in order, the weights and
   inputs stream from L2 faster than lane by lane, 8 groups apart. */
AVX2_INLINE void k_tile_body_avx2(const KTileAvx2 *tile, const int nt, const int type) {
    const KSliceAvx2 *s = tile->slice;
    int groups = s->cols / GROUP_SIZE;
    __m256 lanes[8][KTILE_TOKENS];
    zero_lanes_avx2(lanes, nt);
    for (int g = 0; g < groups; g++) {
        __m256 *acc = lanes[g % 8];
        __m256i sums[KTILE_TOKENS];
        k_group_sums_avx2(sums, tile, g, nt, type);
        __m256 scale = _mm256_loadu_ps(s->scales + (size_t)g * KSLICE);
        __m256 min = type == WEIGHT_Q6_K ? _mm256_setzero_ps() : _mm256_loadu_ps(s->mins + (size_t)g * KSLICE);
        for (int t = 0; t < nt; t++) {
            size_t at = (size_t)(tile->t0 + t) * groups + g;
            __m256 dx = _mm256_set1_ps(tile->x->d[at]);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[t]), _mm256_mul_ps(scale, dx), acc[t]);
            if (type != WEIGHT_Q6_K) acc[t] = _mm256_fnmadd_ps(min, _mm256_set1_ps(tile->x->scaled_sums[at]), acc[t]);
        }
    }
    store_slice_sums_avx2(tile, lanes, nt);
}

/* ---- q8_0 and q4_0 batches on AVX2: packed as the K types' (k_slice_avx2()),
   8 rows side by side, their scales as floats; q_tile_body_avx2()'s float
   steps lane by lane. */

/* Rows r .. r + 7 of w (those past its end as zeros) into s: each group's
   weights transposed, 8 rows' 4-byte pieces side by side: q4_0's as bytes
   0..15 in column order; q8_0's transposed as int16 pairs, then stored as
   byte pairs (half the bytes that each tile reads). */
AVX2_INLINE void q_pack_slice_avx2(const KSliceAvx2 *s, const Matrix *w, int r, const int q8) {
    int groups = w->cols / GROUP_SIZE, pieces = q8 ? 16 : 8; // 4-byte pieces of a group's row
    for (int g = 0; g < groups; g++) {
        __m256i v[2][KSLICE];
        _Alignas(32) float d[KSLICE];
        for (int i = 0; i < KSLICE; i++) {
            size_t at = (size_t)(r + i) * groups + g;
            const uint8_t *p = r + i < w->rows ? group_values(w, at) : NULL;
            if (!p) {
                v[0][i] = v[1][i] = _mm256_setzero_si256(), d[i] = 0.0f;
                continue;
            }
            prefetch_pack(p);
            __m128i b = _mm_loadu_si128((const __m128i *)p), fifteen = _mm_set1_epi8(15);
            v[0][i] = q8 ? _mm256_cvtepi8_epi16(b)
                         : _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), fifteen), _mm_and_si128(b, fifteen));
            v[1][i] = q8 ? _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16))) : _mm256_setzero_si256();
            d[i] = group_scale(w, at);
        }
        for (int h = 0; h < pieces / 8; h++) {
            transpose8_avx2(v[h]);
            for (int j = 0; j < 8; j++)
                if (q8)
                    _mm_storeu_si128((__m128i *)((int8_t *)s->values + ((size_t)g * pieces + 8 * h + j) * 2 * KSLICE),
                                     _mm_packs_epi16(_mm256_castsi256_si128(v[h][j]), _mm256_extracti128_si256(v[h][j], 1)));
                else _mm256_storeu_si256((__m256i *)(s->values + ((size_t)g * pieces + 8 * h + j) * KSLICE), v[h][j]);
        }
        _mm256_storeu_ps(s->scales + (size_t)g * KSLICE, _mm256_load_ps(d));
    }
}

/* v, unchanged, in the register where it is: GCC otherwise follows each
   update of a sum that a loop carries with a copy to another register. */
AVX2_INLINE void stay_in_register(__m256i *v) { __asm__("" : "+x"(*v)); }

/* sums[t]: each row's exact sum of the products of q8_0 group g with token
   t0 + t of the 16-bit input wide, one row to a lane: madd_epi16, 2
   columns at a time (the byte pairs widened as they are read), two pairs'
   products added before a sum takes them: one update of a sum per 4
   columns, each kept in its register (stay_in_register()). */
AVX2_INLINE void q8_group_sums_avx2(__m256i sums[KTILE_TOKENS], const KTileAvx2 *tile, const int16_t *wide, int g,
                                    const int nt) {
    const int8_t *values = (const int8_t *)tile->slice->values + (size_t)g * GROUP_SIZE * KSLICE;
    int cols = tile->slice->cols;
    for (int t = 0; t < nt; t++) sums[t] = _mm256_setzero_si256();
    for (int j = 0; j < GROUP_SIZE / 2; j += 2) {
        __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(values + j * 2 * KSLICE)));
        __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(values + (j + 1) * 2 * KSLICE)));
        for (int t = 0; t < nt; t++) {
            int32_t two[2];
            memcpy(two, wide + (size_t)(tile->t0 + t) * cols + g * GROUP_SIZE + 2 * j, sizeof two);
            __m256i four = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_set1_epi32(two[0])),
                                            _mm256_madd_epi16(w1, _mm256_set1_epi32(two[1])));
            sums[t] = _mm256_add_epi32(sums[t], four);
            stay_in_register(&sums[t]);
        }
    }
}

/* One tile of nt tokens (a literal): q_tile_body_avx2()'s steps for each
   row, the groups in order as k_tile_body_avx2() takes them (lane k:
   groups k, k + 8, ...), then the 8 lanes added as sum_avx2() adds them,
   ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)). */
AVX2_INLINE void q_tile_packed_avx2(const KTileAvx2 *tile, const ProductScratch *in, const int nt, const int q8) {
    const KSliceAvx2 *s = tile->slice;
    int groups = s->cols / GROUP_SIZE;
    __m256 lanes[8][KTILE_TOKENS];
    zero_lanes_avx2(lanes, nt);
    for (int g = 0; g < groups; g++) {
        __m256 *acc = lanes[g % 8];
        __m256i sums[KTILE_TOKENS];
        if (q8) {
            q8_group_sums_avx2(sums, tile, in->wide, g, nt);
        } else {
            k_group_sums_avx2(sums, tile, g, nt, WEIGHT_Q4_K); // the weights as unsigned 0..15
            for (int t = 0; t < nt; t++) { // less 8 x the inputs' sum
                __m256i inputs = _mm256_set1_epi32(tile->x->group_sums[(size_t)(tile->t0 + t) * groups + g]);
                sums[t] = _mm256_sub_epi32(sums[t], _mm256_slli_epi32(inputs, 3));
            }
        }
        __m256 scale = _mm256_loadu_ps(s->scales + (size_t)g * KSLICE);
        for (int t = 0; t < nt; t++) {
            const float *xd = q8 ? in->wide_d : tile->x->d;
            __m256 dx = _mm256_set1_ps(xd[(size_t)(tile->t0 + t) * groups + g]);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[t]), _mm256_mul_ps(scale, dx), acc[t]);
        }
    }
    store_slice_sums_avx2(tile, lanes, nt);
}

/* One tile of nt tokens on a packed slice: type (a literal) picks the steps. */
AVX2_INLINE void packed_tile_avx2(const KTileAvx2 *tile, const ProductScratch *in, const int nt, const int type) {
    if (type == WEIGHT_Q8_0 || type == WEIGHT_Q4_0) q_tile_packed_avx2(tile, in, nt, type == WEIGHT_Q8_0);
    else k_tile_body_avx2(tile, nt, type);
}

/* A batch of type (a literal), rows r0 .. r1 - 1: up to KSLICES slices
   packed into the thread's room, then each tile of tokens run on all of
   them. Each output comes out as the one-token kernels give it
   (q_tile_body_avx2(), k_rows_avx2()). */
AVX2_INLINE void packed_batch_avx2(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in,
                                   const int type) {
    for (int b = r0; b < r1; b += KSLICES * KSLICE) {
        KSliceAvx2 s[KSLICES];
        int slices = 0;
        for (int r = b; r < r1 && slices < KSLICES; r += KSLICE, slices++) {
            s[slices] = k_slice_avx2(in, w->cols, slices);
            if (type == WEIGHT_Q8_0 || type == WEIGHT_Q4_0) q_pack_slice_avx2(&s[slices], w, r, type == WEIGHT_Q8_0);
            else k_pack_slice_avx2(&s[slices], w, r, type);
        }
        for (int t0 = 0; t0 < in->n; t0 += KTILE_TOKENS)
            for (int i = 0; i < slices; i++) {
                int r = b + i * KSLICE;
                KTileAvx2 tile = {.slice = &s[i], .x = &in->q, .out = out + r - r0, .ldo = ldo,
                                  .rows = r1 - r, .t0 = t0};
                switch (in->n - t0 < KTILE_TOKENS ? in->n - t0 : KTILE_TOKENS) {
                case 5: packed_tile_avx2(&tile, in, 5, type); break;
                case 4: packed_tile_avx2(&tile, in, 4, type); break;
                case 3: packed_tile_avx2(&tile, in, 3, type); break;
                case 2: packed_tile_avx2(&tile, in, 2, type); break;
                default: packed_tile_avx2(&tile, in, 1, type);
                }
            }
    }
}

/* One token, or a few, row by row; more packed. */
AVX2_INLINE void k_product_avx2(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in,
                                const int type) {
    if (in->n >= KBATCH_MIN) packed_batch_avx2(out, ldo, w, r0, r1, in, type);
    else k_rows_avx2(out, ldo, w, r0, r1, in, type);
}

/* matmul_k() on AVX2, with the quantized input. */
static void matmul_k_avx2(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    switch (w->type) {
    case WEIGHT_Q4_K: k_product_avx2(out, ldo, w, r0, r1, in, WEIGHT_Q4_K); break;
    case WEIGHT_Q5_K: k_product_avx2(out, ldo, w, r0, r1, in, WEIGHT_Q5_K); break;
    default: k_product_avx2(out, ldo, w, r0, r1, in, WEIGHT_Q6_K);
    }
}

/* matmul_q8_0() and matmul_q4_0(): batches of KBATCH_MIN tokens or more
   packed (packed_batch_avx2()), fewer in tiles of 4 rows by 3 tokens (one
   token: 4 rows of q4_0, or q8_0's rows one by one, which streams them
   faster from memory), rows and tokens left over one at a time. */
static void matmul_quantized_avx2(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    int t = 0;
    if (in->n >= KBATCH_MIN) {
        if (w->type == WEIGHT_Q8_0) packed_batch_avx2(out, ldo, w, r0, r1, in, WEIGHT_Q8_0); // a copy for each type
        else packed_batch_avx2(out, ldo, w, r0, r1, in, WEIGHT_Q4_0);
        return;
    }
    if (in->n == 1 && w->type == WEIGHT_Q8_0) {
        for (int r = r0; r < r1; r++) q_tile_avx2(out + r - r0, ldo, w, r, in, 0, 1, 1);
        return;
    }
    for (; t + QTILE_TOKENS <= in->n; t += QTILE_TOKENS) q_tiles_avx2(out, ldo, w, r0, r1, in, t, QTILE_TOKENS);
    for (; t < in->n; t++) q_tiles_avx2(out, ldo, w, r0, r1, in, t, 1);
}
#endif

#if HAVE_AVX512
/* ---- Integer dot products on AVX-512 VNNI

   vpdpbusd multiplies unsigned weight bytes by signed input bytes and adds
   each four products into an int32 lane. The kernels add an offset to each
   weight to make it unsigned (128 for q8_0, 8 for q4_0); a group's sum
   starts from -offset * (the sum of the group's inputs, from the input's
   group_sums), which takes it off again, so that it is the exact signed dot
   product of the group.

   A row's float result from its group sums is the same in every kernel
   here, one token or a batch, so that a prompt gives the same logits
   whatever -b is: 8 float lanes, lane j taking groups j, j + 8, j + 16, ...
   in turn, each group's sum times (weight scale x input scale) added by one
   fused multiply-add; then the lanes added as
   ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)). */

/* The lanes of 16 that `left` elements fill: all, some, or none. */
static inline __mmask16 tail_mask(int left) {
    return left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
}

/* Two groups of weights (64) as unsigned bytes in the input's order, from
   w and w + step (q_step()); with `both` 0, only the first (the second
   zeros). */
AVX512_INLINE __m512i q8_bytes(const uint8_t *w, const int step, int both) {
    __m512i b = step == GROUP_SIZE ? _mm512_maskz_loadu_epi8(both ? ~0ull : 0xffffffffull, w)
              : _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)w)),
                                   both ? _mm256_loadu_si256((const __m256i *)(w + step)) : _mm256_setzero_si256(), 1);
    return _mm512_xor_si512(b, _mm512_set1_epi8((char)0x80)); // w + 128
}
AVX512_INLINE __m512i q4_bytes(const uint8_t *w, const int step, int both) {
    __m128i second = both ? _mm_loadu_si128((const __m128i *)(w + step)) : _mm_setzero_si128();
    __m256i b = both && step == GROUP_SIZE / 2 ? _mm256_loadu_si256((const __m256i *)w) // 2 x 16 bytes, or 1 x 16
                                              : _mm256_set_m128i(second, _mm_loadu_si128((const __m128i *)w));
    __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1);
    z = _mm512_and_si512(z, _mm512_set1_epi8(15));          // [lo g, lo g+1, hi g, hi g+1]
    return _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0)); // [lo g, hi g, lo g+1, hi g+1]
}

/* The sums of each 4 lanes of dot[0..3]: lane 4i + j of the result sums
   lanes 4i .. 4i + 3 of dot[j] (16 values of the weights' row, 16i + 64j ..,
   when dot[j] holds 64 of them). Integer sums: any order is exact. */
AVX512_INLINE __m512i quad_sums(const __m512i dot[4]) {
    __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(dot[0], dot[1]), _mm512_unpackhi_epi32(dot[0], dot[1]));
    __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(dot[2], dot[3]), _mm512_unpackhi_epi32(dot[2], dot[3]));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}

/* The 8 group sums from quad_sums() c: group 2j is lanes j and 4 + j, 2j + 1
   lanes 8 + j and 12 + j. */
AVX512_INLINE __m256i pair_quads(__m512i c) {
    c = _mm512_add_epi32(c, _mm512_shuffle_i32x4(c, c, _MM_SHUFFLE(2, 3, 0, 1)));
    __m128i even = _mm512_castsi512_si128(c), odd = _mm512_extracti32x4_epi32(c, 2); // groups 0 2 4 6, 1 3 5 7
    return _mm256_set_m128i(_mm_unpackhi_epi32(even, odd), _mm_unpacklo_epi32(even, odd));
}

/* The 8 sums of groups g .. g + 7 from their vpdpbusd lanes: dot[j] holds
   8 lanes of group 2j, then 8 of group 2j + 1. */
AVX512_INLINE __m256i group_sums(const __m512i dot[4]) {
    return pair_quads(quad_sums(dot));
}

/* The f16 scales of groups g .. g + m - 1 (m <= 8) from wd, each step
   bytes on from the last (q_scale_step()); zeros after them. */
AVX512_INLINE __m128i group_halves(const uint8_t *wd, int g, int m, const int step) {
    if (step == 2) return _mm_maskz_loadu_epi16((__mmask8)((1u << m) - 1), wd + 2 * g);
    if (m == 8) return eight_halves(wd + (size_t)g * step, step);
    uint16_t h[8] = {0};
    for (int k = 0; k < m; k++) h[k] = read_u16(wd + (size_t)(g + k) * step);
    return _mm_loadu_si128((const __m128i *)h);
}

/* acc (the 8 lanes above) after the groups g .. g + m - 1 (m <= 8) of a row
   whose first group's values are w and first scale wd, times x: q8_0, or
   q4_0 with q4, laid out as il says. */
AVX512_INLINE __m256 dot_groups_avx512(__m256 acc, const uint8_t *w, const uint8_t *wd, const QuantizedVector *x,
                                       int g, int m, const int q4, const int il) {
    __mmask8 gm = (__mmask8)((1u << m) - 1);
    const int step = q_step(!q4, il);
    __m512i dot[4];
    for (int j = 0; j < 4; j++) {
        int k = (g + 2 * j) * GROUP_SIZE, both = 2 * j + 1 < m;
        __mmask64 bytes = 2 * j >= m ? 0 : both ? ~0ull : 0xffffffffull;
        const uint8_t *wj = w + (size_t)(g + 2 * j) * step;
        __m512i wv = 2 * j >= m ? _mm512_setzero_si512() : q4 ? q4_bytes(wj, step, both) : q8_bytes(wj, step, both);
        dot[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, _mm512_maskz_loadu_epi8(bytes, x->q + k));
    }
    __m256i inputs = _mm256_maskz_loadu_epi32(gm, x->group_sums + g);
    __m256i sums = _mm256_sub_epi32(group_sums(dot), _mm256_slli_epi32(inputs, q4 ? 3 : 7));
    __m256 wd8 = _mm256_cvtph_ps(group_halves(wd, g, m, q_scale_step(!q4, il)));
    __m256 scale = _mm256_mul_ps(wd8, _mm256_maskz_loadu_ps(gm, x->d + g));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
}

/* The 8 lanes added in the order above. */
AVX512_INLINE float sum_lanes8(__m256 acc) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)); // 0+4 1+5 2+6 3+7
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Prefetches the next 8 groups of a row from group g: their values, and
   their scales when they lie apart. */
AVX512_INLINE void prefetch_groups(const uint8_t *w, const uint8_t *wd, int g, const int q8, const int il) {
    for (int b = 0; b < 8 * q_step(q8, il); b += 64) prefetch(w + (size_t)g * q_step(q8, il) + b);
    if (!il) prefetch(wd + 2 * g);
}

/* dot_q4_0() of row r, in the order above. */
AVX512_INLINE float dot_q4_avx512(const Matrix *w, int r, const QuantizedVector *x, const int il) {
    __m256 acc = _mm256_setzero_ps();
    int groups = w->cols / GROUP_SIZE, g = 0;
    const uint8_t *values = group_values(w, (size_t)r * groups), *wd = w->scales + (size_t)r * groups * scale_step(w);
    for (; g + 8 <= groups; g += 8) {
        prefetch_groups(values, wd, g, 0, il);
        acc = dot_groups_avx512(acc, values, wd, x, g, 8, 1, il);
    }
    if (g < groups) acc = dot_groups_avx512(acc, values, wd, x, g, groups - g, 1, il);
    return sum_lanes8(acc);
}

/* dot_q8_0(w, r, x) + dot_q8_0(w, r, rest), the two parts of a q8_0 input
   (quantize_remainder()), each in the order above, in one pass over the
   row: the weights stay in cache for the second part. */
AVX512_INLINE float dot_q8_both_avx512(const Matrix *w, int r, const QuantizedVector *x, const QuantizedVector *rest,
                                       const int il) {
    __m256 acc = _mm256_setzero_ps(), acc_rest = _mm256_setzero_ps();
    int groups = w->cols / GROUP_SIZE, g = 0;
    const uint8_t *values = group_values(w, (size_t)r * groups), *wd = w->scales + (size_t)r * groups * scale_step(w);
    for (; g + 8 <= groups; g += 8) {
        prefetch_groups(values, wd, g, 1, il);
        acc = dot_groups_avx512(acc, values, wd, x, g, 8, 0, il);
        acc_rest = dot_groups_avx512(acc_rest, values, wd, rest, g, 8, 0, il);
    }
    if (g < groups) {
        acc = dot_groups_avx512(acc, values, wd, x, g, groups - g, 0, il);
        acc_rest = dot_groups_avx512(acc_rest, values, wd, rest, g, groups - g, 0, il);
    }
    return sum_lanes8(acc) + sum_lanes8(acc_rest);
}

/* ---- K types on AVX-512 VNNI

   A block is unpacked once into unsigned weight bytes in the input's order
   (vector j: groups 2j and 2j + 1) and its scales into vectors of the 8
   groups, then multiplied by each token of a tile. Per group g of 32, in
   integers: S_g = the sum of q x, X_g = the sum of x; q4_k and q5_k give
   (d scale_g) S_g - (dmin min_g) X_g, q6_k d G_g with G_g the sum over the
   group's two sub-blocks of scale_s (S_s - 32 X_s). Each group's result
   times the input's scale goes into float lane g % 8 by a fused
   multiply-add, as in the q8_0 and q4_0 kernels, so one token or a batch,
   each output comes out the same. */
typedef struct {
    __m512i w[4];       // the 256 weights, unsigned bytes
    __m256 scale;       // per group: d scale_g (q4_k, q5_k), d (q6_k)
    __m256 min;         // per group: dmin min_g (q4_k, q5_k)
    __m512i sub_scales; // q6_k: the 16 sub-block scales, int32
} KBlock;



AVX512_INLINE KBlock unpack_block_avx512(const uint8_t *block, const int type) {
    KBlock k;
    if (type == WEIGHT_Q6_K) {
        for (int h = 0; h < 2; h++) { // ql (64 bytes): quarters 0, 1 low nibbles, 2, 3 high
            __m512i ql = _mm512_loadu_si512(block + 64 * h);
            __m256i qh = _mm256_loadu_si256((const __m256i *)(block + 128 + 32 * h));
            __m512i bits = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
            __m512i three = _mm512_set1_epi8(3), fifteen = _mm512_set1_epi8(15);
            k.w[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, fifteen),
                                         _mm512_slli_epi16(_mm512_and_si512(bits, three), 4));
            k.w[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), fifteen),
                                             _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(bits, 4), three), 4));
        }
        k.sub_scales = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(block + 192)));
        k.scale = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(read_u16(block + 208))));
        k.min = _mm256_setzero_ps();
        return k;
    }
    scales_and_mins(&k.scale, &k.min, block);
    k.sub_scales = _mm512_setzero_si512();
    const uint8_t *qs = block + (type == WEIGHT_Q5_K ? 48 : 16);
    __m512i qh = type == WEIGHT_Q5_K ? _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(block + 16)))
                                     : _mm512_setzero_si512();
    // each 32 bytes in both halves of a vector: the low nibbles kept in the first, the high in the second
    __m512i halves = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    __m512i fifteen = _mm512_set1_epi8(15), one = _mm512_set1_epi8(1);
    for (int j = 0; j < 4; j++) {
        __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qs + 32 * j)));
        k.w[j] = _mm512_and_si512(_mm512_srlv_epi16(v, halves), fifteen);
        if (type == WEIGHT_Q5_K) { // bit 2j of qh[i] for group 2j, bit 2j + 1 for 2j + 1: 16 more
            __m512i bit = _mm512_srlv_epi16(qh, _mm512_add_epi16(_mm512_srli_epi16(halves, 2), _mm512_set1_epi16(2 * j)));
            k.w[j] = _mm512_or_si512(k.w[j], _mm512_slli_epi16(_mm512_and_si512(bit, one), 4));
        }
    }
    return k;
}

/* acc (8 lanes) after one block times the input x from group g (its 8 groups). */
AVX512_INLINE __m256 k_block_avx512(__m256 acc, const KBlock *k, const QuantizedVector *x, int g, const int type) {
    __m512i dot[4];
    for (int j = 0; j < 4; j++)
        dot[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), k->w[j], _mm512_loadu_si512(x->q + (g + 2 * j) * GROUP_SIZE));
    __m256 dx = _mm256_loadu_ps(x->d + g);
    if (type == WEIGHT_Q6_K) { // per sub-block s: scale_s (S_s - 32 X_s), then in pairs
        __m512i transpose = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15); // as quad_sums()
        __m512i inputs = _mm512_permutexvar_epi32(transpose, _mm512_loadu_si512(x->half_sums + 2 * g));
        __m512i subs = _mm512_sub_epi32(quad_sums(dot), _mm512_slli_epi32(inputs, 5));
        __m256i sums = pair_quads(_mm512_mullo_epi32(subs, _mm512_permutexvar_epi32(transpose, k->sub_scales)));
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(k->scale, dx), acc);
    }
    __m256i sums = group_sums(dot);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(k->scale, dx), acc);
    __m256i inputs = _mm256_loadu_si256((const __m256i *)(x->group_sums + g));
    return _mm256_fnmadd_ps(_mm256_cvtepi32_ps(inputs), _mm256_mul_ps(k->min, dx), acc);
}

/* Rows r0 .. r1 - 1 times one token's quantized input x. */
AVX512_INLINE void k_rows_avx512(float *out, const Matrix *w, int r0, int r1, const QuantizedVector *x,
                                 const int type) {
    int blocks = w->cols / SUPER_BLOCK, bytes = K_BLOCK_BYTES[type];
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = (const uint8_t *)w->values + (size_t)r * blocks * bytes;
        __m256 acc = _mm256_setzero_ps();
        for (int b = 0; b < blocks; b++) {
            for (int line = 0; line < bytes; line += 64) prefetch(row + (size_t)b * bytes + line + PREFETCH_AHEAD);
            KBlock k = unpack_block_avx512(row + (size_t)b * bytes, type);
            acc = k_block_avx512(acc, &k, x, 8 * b, type);
        }
        out[r - r0] = sum_lanes8(acc);
    }
}

/* ---- Matrix products for a batch (n > 1) on AVX-512 */

/* AVX-512's tile: 6 rows by 4 tokens, 24 sums in registers, 10 loads for
   24 multiply-adds, its 6 rows of a pass (24 KiB) in L1 beside the inputs. */
#define GEMM512_ROWS 6
#define GEMM512_TOKENS 4

/* acc[t][r] += w[r] * x[t] for nr rows w (stride ldw) and nt inputs x
   (stride ldx), the 16 columns at k, those of mask alone. A literal full
   mask makes plain loads (masked ones here run the tile at half speed). */
AVX512_INLINE void gemm_step_avx512(__m512 acc[GEMM512_TOKENS][GEMM512_ROWS], const float *w, int ldw, const float *x,
                                    int ldx, int k, __mmask16 mask, const int nr, const int nt) {
    __m512 wv[GEMM512_ROWS];
    for (int r = 0; r < nr; r++) {
        const float *wr = w + (size_t)r * ldw + k;
        wv[r] = mask == 0xffff ? _mm512_loadu_ps(wr) : _mm512_maskz_loadu_ps(mask, wr);
    }
    for (int t = 0; t < nt; t++) {
        const float *xt = x + (size_t)t * ldx + k;
        __m512 xv = mask == 0xffff ? _mm512_loadu_ps(xt) : _mm512_maskz_loadu_ps(mask, xt);
        for (int r = 0; r < nr; r++) acc[t][r] = _mm512_fmadd_ps(wv[r], xv, acc[t][r]);
    }
}

/* A tile of nr rows and nt tokens (literals): each sum in one vector of the
   16 lanes, the depth in steps of 16 (a last step masked). */
AVX512_INLINE void gemm_tile_body_avx512(const GemmTile *g, const int nr, const int nt) {
    const float *w = g->w, *x = g->x;
    int ldw = g->ldw, ldx = g->ldx, depth = g->depth;
    __m512 acc[GEMM512_TOKENS][GEMM512_ROWS];
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < nr; r++) acc[t][r] = _mm512_setzero_ps();
    int whole = depth / LANES * LANES;
    for (int k = 0; k < whole; k += LANES) gemm_step_avx512(acc, w, ldw, x, ldx, k, 0xffff, nr, nt);
    if (whole < depth) gemm_step_avx512(acc, w, ldw, x, ldx, whole, tail_mask(depth - whole), nr, nt);
    __mmask8 rows = (__mmask8)((1u << nr) - 1);
    for (int t = 0; t < nt; t++) {
        float *c = g->c + (size_t)t * g->ldc;
        __m256 h[8];
        for (int r = 0; r < 8; r++)
            h[r] = r < nr ? _mm256_add_ps(_mm512_castps512_ps256(acc[t][r]), _mm512_extractf32x8_ps(acc[t][r], 1))
                          : _mm256_setzero_ps();
        __m256 sum = sum8_lanes(h);
        if (g->accumulate) sum = _mm256_add_ps(_mm256_maskz_loadu_ps(rows, c), sum);
        _mm256_mask_storeu_ps(c, rows, sum);
    }
}

AVX512_INLINE void gemm_tile_rows_avx512(const GemmTile *g, const int nr) {
    switch (g->tokens) {
    case 4: gemm_tile_body_avx512(g, nr, 4); break;
    case 3: gemm_tile_body_avx512(g, nr, 3); break;
    case 2: gemm_tile_body_avx512(g, nr, 2); break;
    default: gemm_tile_body_avx512(g, nr, 1);
    }
}

/* Up to 6 rows: 6, 2 or 1 at a time (a row block of 32 is 5 x 6 + 2). */
AVX512 static void gemm_tile_avx512(const GemmTile *g) {
    GemmTile part = *g;
    for (int r = 0; r < g->rows; r += part.rows) {
        part.rows = g->rows - r >= 6 ? 6 : g->rows - r >= 2 ? 2 : 1;
        part.w = g->w + (size_t)r * g->ldw;
        part.c = g->c + r;
        if (part.rows == 6) gemm_tile_rows_avx512(&part, 6);
        else if (part.rows == 2) gemm_tile_rows_avx512(&part, 2);
        else gemm_tile_rows_avx512(&part, 1);
    }
}

/* 16 columns of an f32, bf16 or f16 row at w, as floats. */
AVX512_INLINE __m512 widen16_avx512(const void *w, const int type) {
    if (type == WEIGHT_F32) return _mm512_loadu_ps((const float *)w);
    if (type == WEIGHT_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)w));
    __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

/* lanes8_fast(): the 8 rows' sums in 8 registers of 16 lanes. */
AVX512_INLINE void lanes8_body_avx512(float lanes[8][LANES], const void *w, size_t ld, const float *x, int n,
                                      const int type) {
    int size = float_size(type);
    __m512 acc[8];
    for (int r = 0; r < 8; r++) acc[r] = _mm512_setzero_ps();
    for (int i = 0; i < n; i += LANES) {
        __m512 xv = _mm512_loadu_ps(x + i);
        for (int r = 0; r < 8; r++) {
            const char *row = (const char *)w + (r * ld + i) * size;
            if (type == WEIGHT_F32) prefetch(row);
            else if (i % 32 == 0) __builtin_prefetch(row + 8 * ld * size); // the next 8 rows' line (measured faster)
            acc[r] = _mm512_fmadd_ps(widen16_avx512(row, type), xv, acc[r]);
        }
    }
    for (int r = 0; r < 8; r++) _mm512_storeu_ps(lanes[r], acc[r]);
}

AVX512 static void lanes8_avx512(float lanes[8][LANES], const void *w, size_t ld, const float *x, int n, int type) {
    if (type == WEIGHT_BF16) lanes8_body_avx512(lanes, w, ld, x, n, WEIGHT_BF16);
    else if (type == WEIGHT_F16) lanes8_body_avx512(lanes, w, ld, x, n, WEIGHT_F16);
    else lanes8_body_avx512(lanes, w, ld, x, n, WEIGHT_F32);
}

AVX512 static void gemm_rows_avx512(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    gemm_rows_with(out, ldo, w, r0, r1, in, gemm_tile_avx512, GEMM512_ROWS, GEMM512_TOKENS, GEMM_CHUNK_BYTES);
}

AVX512 static void matmul_floats_avx512(float *out, int ldo, const Matrix *w, int r0, int r1,
                                        const ProductScratch *in) {
    matmul_floats(out, ldo, w, r0, r1, in, gemm_rows_avx512, lanes8_avx512);
}

/* q8_0 and q4_0 weights: rows repacked so that vpdpbusd multiplies 16 of
   them at once by 4 inputs of a token. A thread's panel holds 32 rows,
   QGEMM_ROWS * (cols + 63) bytes of values and 4 * (cols + 63) of
   scales, within ProductScratch.room_size (panel_room()). */
#define QGEMM_ROWS 32   // weight rows per packed panel: two vectors of 16 outputs
#define QGEMM_TOKENS 4  // tokens per tile: 4 x 2 int32 sums and 4 x 2 float sums in registers

/* The 16 x 16 transpose of 32-bit elements: r[i] lane j -> r[j] lane i. */
AVX512_INLINE void transpose16_avx512(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 16; i += 2) {
        a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
        b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
        b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
        b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
    }
    for (int e = 0; e < 4; e++) { // b[4q + e], lane L: rows 4q .. 4q + 3 of element 4L + e
        __m512i c = _mm512_shuffle_i32x4(b[e], b[4 + e], 0x88), c2 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0xdd);
        __m512i d = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0x88), d2 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0xdd);
        r[e] = _mm512_shuffle_i32x4(c, d, 0x88);
        r[8 + e] = _mm512_shuffle_i32x4(c, d, 0xdd);
        r[4 + e] = _mm512_shuffle_i32x4(c2, d2, 0x88);
        r[12 + e] = _mm512_shuffle_i32x4(c2, d2, 0xdd);
    }
}

/* Packs rows r0 .. r0 + 31 of a q8_0 or q4_0 matrix (rows past its end as
   zeros) for qgemm_tile_body():
     values  (cols / 4, 32) u32: the 4 unsigned weight bytes (q + 128, or the
             nibble) of columns 4j .. 4j + 3 of each row, rows side by side
     scales  (groups, 32) f32: each row's scale of each group, widened */
AVX512 static void qgemm_pack_avx512(uint32_t *values, float *scales, const Matrix *w, int r0) {
    int cols = w->cols, groups = cols / GROUP_SIZE, q4 = w->type == WEIGHT_Q4_0;
    for (int half = 0; half < 2; half++)
        for (int k = 0; k < cols; k += 64) {
            int both = cols - k >= 64;
            __m512i seg[16];
            for (int i = 0; i < 16; i++) {
                int r = r0 + 16 * half + i;
                if (r >= w->rows) { seg[i] = _mm512_setzero_si512(); continue; }
                const uint8_t *two = group_values(w, ((size_t)r * cols + k) / GROUP_SIZE);
                prefetch_pack(two);
                seg[i] = q4 && w->interleaved ? q4_bytes(two, q_step(0, 1), both)
                       : q4                   ? q4_bytes(two, q_step(0, 0), both)
                       : w->interleaved       ? q8_bytes(two, q_step(1, 1), both)
                                              : q8_bytes(two, q_step(1, 0), both);
            }
            transpose16_avx512(seg);
            for (int j = 0; j < 16; j++)
                _mm512_storeu_si512(values + (size_t)(k / 4 + j) * QGEMM_ROWS + 16 * half, seg[j]);
        }
    for (int i = 0; i < QGEMM_ROWS; i++)
        for (int g = 0; g < groups; g++)
            scales[g * QGEMM_ROWS + i] = r0 + i < w->rows ? group_scale(w, (size_t)(r0 + i) * groups + g) : 0.0f;
}

/* One tile: out[t][r] for the tokens t0 .. t0 + nt - 1 of x and the 32
   packed rows (the first `rows` of them stored). */
typedef struct {
    float *out;             // row stride ldo
    int ldo, rows, cols, t0;
    int offset;             // added to each weight: 128 for q8_0, 8 for q4_0
    int accumulate;         // add to what out holds
    const uint32_t *values; // the packed panel
    const float *scales;
    const float *mins;          // K types: per group, dmin min_g (q4_k, q5_k)
    const int32_t *sub_scales;  // q6_k: per sub-block (two a group), its scale
    const QuantizedVector *x;
} QgemmTile;

/* out[t][r] for the tile's nt tokens and rows: the 8 lanes of each sum
   added as ((0+4)+(2+6))+((1+5)+(3+7)), to what out holds with accumulate. */
AVX512_INLINE void store_tile_sums(const QgemmTile *tile, __m512 lanes[8][QGEMM_TOKENS][2], const int nt) {
    __mmask16 m[2] = {tail_mask(tile->rows), tail_mask(tile->rows - 16)};
    for (int t = 0; t < nt; t++)
        for (int h = 0; h < 2; h++) {
            __m512 even = _mm512_add_ps(_mm512_add_ps(lanes[0][t][h], lanes[4][t][h]),
                                        _mm512_add_ps(lanes[2][t][h], lanes[6][t][h]));
            __m512 odd = _mm512_add_ps(_mm512_add_ps(lanes[1][t][h], lanes[5][t][h]),
                                       _mm512_add_ps(lanes[3][t][h], lanes[7][t][h]));
            __m512 sum = _mm512_add_ps(even, odd);
            float *o = tile->out + (size_t)(tile->t0 + t) * tile->ldo + 16 * h;
            if (tile->accumulate) sum = _mm512_add_ps(_mm512_maskz_loadu_ps(m[h], o), sum);
            _mm512_mask_storeu_ps(o, m[h], sum);
        }
}

/* For each group, int32 sums of 16 rows at once (vpdpbusd: 4 weights of
   16 rows times 4 inputs of one token, broadcast), started at -offset
   times the sum of the token's group; then the float sums in the order of the one-token kernels:
   lane j of each output (groups j, j + 8, ...) one pass at a time, kept
   in `lanes`, then the lanes added. With accumulate, the result is added
   to what out holds. */
AVX512_INLINE void qgemm_tile_body(const QgemmTile *tile, const int nt) {
    int cols = tile->cols, t0 = tile->t0;
    const uint32_t *values = tile->values;
    const float *scales = tile->scales;
    const QuantizedVector *x = tile->x;
    int groups = cols / GROUP_SIZE;
    __m512 lanes[8][QGEMM_TOKENS][2];
    for (int lane = 0; lane < 8; lane++) {
        __m512 acc[QGEMM_TOKENS][2];
        for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
        for (int g = lane; g < groups; g += 8) {
            __m512i sum[QGEMM_TOKENS][2];
            for (int t = 0; t < nt; t++) {
                sum[t][0] = sum[t][1] = _mm512_set1_epi32(-tile->offset * x->group_sums[(size_t)(t0 + t) * groups + g]);
            }
            const uint32_t *v = values + (size_t)g * (GROUP_SIZE / 4) * QGEMM_ROWS;
            for (int j = 0; j < GROUP_SIZE / 4; j++) {
                __m512i w0 = _mm512_loadu_si512(v + j * QGEMM_ROWS), w1 = _mm512_loadu_si512(v + j * QGEMM_ROWS + 16);
                for (int t = 0; t < nt; t++) {
                    int32_t four;
                    memcpy(&four, x->q + (size_t)(t0 + t) * cols + g * GROUP_SIZE + 4 * j, sizeof four);
                    __m512i xb = _mm512_set1_epi32(four);
                    sum[t][0] = _mm512_dpbusd_epi32(sum[t][0], w0, xb);
                    sum[t][1] = _mm512_dpbusd_epi32(sum[t][1], w1, xb);
                }
            }
            __m512 s0 = _mm512_loadu_ps(scales + g * QGEMM_ROWS), s1 = _mm512_loadu_ps(scales + g * QGEMM_ROWS + 16);
            for (int t = 0; t < nt; t++) {
                __m512 d = _mm512_set1_ps(x->d[(size_t)(t0 + t) * groups + g]);
                acc[t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[t][0]), _mm512_mul_ps(s0, d), acc[t][0]);
                acc[t][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[t][1]), _mm512_mul_ps(s1, d), acc[t][1]);
            }
        }
        for (int t = 0; t < nt; t++) lanes[lane][t][0] = acc[t][0], lanes[lane][t][1] = acc[t][1];
    }
    store_tile_sums(tile, lanes, nt);
}

/* matmul_q8_0() or matmul_q4_0() for a batch, rows r0 .. r1 - 1 (r0 a
   multiple of 32, at most 32 rows): packed once into the thread's panel and
   then run for every token: over x, then for q8_0 over rest, added on.
   Each output comes out as the one-token kernels give it. */
AVX512 static void qgemm_rows_avx512(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    int cols = w->cols, padded = (cols + 63) / 64 * 64;
    uint32_t *values = (uint32_t *)((char *)in->room + (size_t)thread_num() * in->room_size);
    float *scales = (float *)((char *)values + (size_t)QGEMM_ROWS * padded);
    qgemm_pack_avx512(values, scales, w, r0);
    for (int part = 0; part < (w->type == WEIGHT_Q8_0 ? 2 : 1); part++) {
        QgemmTile tile = {.out = out, .ldo = ldo, .rows = r1 - r0, .cols = cols, .accumulate = part,
                          .offset = w->type == WEIGHT_Q8_0 ? 128 : 8,
                          .values = values, .scales = scales, .x = part ? &in->rest : &in->q};
        for (int t = 0; t < in->n; t += QGEMM_TOKENS) {
            tile.t0 = t;
            switch (in->n - t < QGEMM_TOKENS ? in->n - t : QGEMM_TOKENS) {
            case 4: qgemm_tile_body(&tile, 4); break;
            case 3: qgemm_tile_body(&tile, 3); break;
            case 2: qgemm_tile_body(&tile, 2); break;
            default: qgemm_tile_body(&tile, 1);
            }
        }
    }
}

/* K-type rows r0 .. r0 + 31 packed as qgemm_pack_avx512() packs q8_0 and
   q4_0, each block unpacked (unpack_block_avx512()): values the unsigned
   weights; per group g of each row, scales (d scale_g, or q6_k's d) and
   mins (dmin min_g); q6_k's 16 sub-block scales per block in sub_scales,
   (2 groups, 32) int32. stage holds 16 rows' unpacked block. */
AVX512 static void kgemm_pack_avx512(uint32_t *values, float *scales, float *mins, int32_t *sub_scales,
                                     uint8_t stage[16][SUPER_BLOCK], const Matrix *w, int r0) {
    int cols = w->cols, blocks = cols / SUPER_BLOCK, bytes = K_BLOCK_BYTES[w->type];
    for (int half = 0; half < 2; half++)
        for (int b = 0; b < blocks; b++) {
            for (int i = 0; i < 16; i++) {
                int r = r0 + 16 * half + i, slot = 16 * half + i;
                KBlock k = {0};
                if (r < w->rows) {
                    const uint8_t *block = (const uint8_t *)w->values + ((size_t)r * blocks + b) * bytes;
                    prefetch_pack(block);
                    k = w->type == WEIGHT_Q4_K ? unpack_block_avx512(block, WEIGHT_Q4_K)
                      : w->type == WEIGHT_Q5_K ? unpack_block_avx512(block, WEIGHT_Q5_K)
                                               : unpack_block_avx512(block, WEIGHT_Q6_K);
                }
                for (int j = 0; j < 4; j++) _mm512_storeu_si512(stage[i] + 64 * j, k.w[j]);
                float scale[8], min[8];
                int32_t sub[16];
                _mm256_storeu_ps(scale, k.scale), _mm256_storeu_ps(min, k.min), _mm512_storeu_si512(sub, k.sub_scales);
                for (int g = 0; g < 8; g++) {
                    scales[(8 * b + g) * QGEMM_ROWS + slot] = scale[g];
                    mins[(8 * b + g) * QGEMM_ROWS + slot] = min[g];
                }
                for (int j = 0; j < 16; j++) sub_scales[(16 * b + j) * QGEMM_ROWS + slot] = sub[j];
            }
            for (int k = 0; k < SUPER_BLOCK; k += 64) {
                __m512i seg[16];
                for (int i = 0; i < 16; i++) seg[i] = _mm512_loadu_si512(stage[i] + k);
                transpose16_avx512(seg);
                for (int j = 0; j < 16; j++)
                    _mm512_storeu_si512(values + (size_t)((b * SUPER_BLOCK + k) / 4 + j) * QGEMM_ROWS + 16 * half, seg[j]);
            }
        }
}

/* qgemm_tile_body() for K types: per group the integer sums of 16 rows
   (q6_k: of each sub-block, from -32 X_s, times its scale), then the
   float steps of k_block_avx512() in its order, lane by lane. */
AVX512_INLINE void kgemm_tile_body(const QgemmTile *tile, const int nt, const int q6) {
    int cols = tile->cols, t0 = tile->t0, groups = cols / GROUP_SIZE;
    const QuantizedVector *x = tile->x;
    __m512 lanes[8][QGEMM_TOKENS][2];
    for (int lane = 0; lane < 8; lane++) {
        __m512 acc[QGEMM_TOKENS][2];
        for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
        for (int g = lane; g < groups; g += 8) {
            __m512i sum[QGEMM_TOKENS][2][2]; // token, 16 rows, sub-block (q6_k; else all in the first)
            for (int t = 0; t < nt; t++)
                for (int s = 0; s < 2; s++) {
                    int32_t start = q6 ? -32 * x->half_sums[((size_t)(t0 + t) * groups + g) * 2 + s] : 0;
                    sum[t][0][s] = sum[t][1][s] = _mm512_set1_epi32(start);
                }
            const uint32_t *v = tile->values + (size_t)g * (GROUP_SIZE / 4) * QGEMM_ROWS;
            for (int j = 0; j < GROUP_SIZE / 4; j++) {
                int s = q6 && j >= GROUP_SIZE / 8;
                __m512i w0 = _mm512_loadu_si512(v + j * QGEMM_ROWS), w1 = _mm512_loadu_si512(v + j * QGEMM_ROWS + 16);
                for (int t = 0; t < nt; t++) {
                    int32_t four;
                    memcpy(&four, x->q + (size_t)(t0 + t) * cols + g * GROUP_SIZE + 4 * j, sizeof four);
                    __m512i xb = _mm512_set1_epi32(four);
                    sum[t][0][s] = _mm512_dpbusd_epi32(sum[t][0][s], w0, xb);
                    sum[t][1][s] = _mm512_dpbusd_epi32(sum[t][1][s], w1, xb);
                }
            }
            for (int h = 0; h < 2; h++) {
                __m512 scale = _mm512_loadu_ps(tile->scales + g * QGEMM_ROWS + 16 * h);
                __m512 min = _mm512_loadu_ps(tile->mins + g * QGEMM_ROWS + 16 * h);
                __m512i sub0 = _mm512_loadu_si512(tile->sub_scales + (2 * g) * QGEMM_ROWS + 16 * h);
                __m512i sub1 = _mm512_loadu_si512(tile->sub_scales + (2 * g + 1) * QGEMM_ROWS + 16 * h);
                for (int t = 0; t < nt; t++) {
                    size_t at = (size_t)(t0 + t) * groups + g;
                    __m512 dx = _mm512_set1_ps(x->d[at]);
                    __m512i total = q6 ? _mm512_add_epi32(_mm512_mullo_epi32(sum[t][h][0], sub0),
                                                          _mm512_mullo_epi32(sum[t][h][1], sub1))
                                       : sum[t][h][0];
                    acc[t][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(scale, dx), acc[t][h]);
                    if (!q6) {
                        __m512 inputs = _mm512_set1_ps((float)x->group_sums[at]);
                        acc[t][h] = _mm512_fnmadd_ps(inputs, _mm512_mul_ps(min, dx), acc[t][h]);
                    }
                }
            }
        }
        for (int t = 0; t < nt; t++) lanes[lane][t][0] = acc[t][0], lanes[lane][t][1] = acc[t][1];
    }
    store_tile_sums(tile, lanes, nt);
}

/* matmul_k() for a batch, rows r0 .. r1 - 1 (r0 a multiple of 32, at most
   32 rows): packed once into the thread's panel, then run for every token.
   Each output comes out as the one-token kernel gives it. */
AVX512 static void kgemm_rows_avx512(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    int cols = w->cols, groups = cols / GROUP_SIZE;
    char *panel = (char *)in->room + (size_t)thread_num() * in->room_size;
    uint32_t *values = (uint32_t *)panel;                                   // 32 cols bytes
    float *scales = (float *)(panel + (size_t)QGEMM_ROWS * cols);            // 4 cols bytes each
    float *mins = scales + (size_t)groups * QGEMM_ROWS;
    int32_t *sub_scales = (int32_t *)(mins + (size_t)groups * QGEMM_ROWS);  // 8 cols bytes
    uint8_t (*stage)[SUPER_BLOCK] = (uint8_t (*)[SUPER_BLOCK])(sub_scales + (size_t)2 * groups * QGEMM_ROWS);
    kgemm_pack_avx512(values, scales, mins, sub_scales, stage, w, r0);
    QgemmTile tile = {.out = out, .ldo = ldo, .rows = r1 - r0, .cols = cols, .values = values, .scales = scales,
                      .mins = mins, .sub_scales = sub_scales, .x = &in->q};
    int q6 = w->type == WEIGHT_Q6_K;
    for (int t = 0; t < in->n; t += QGEMM_TOKENS) {
        tile.t0 = t;
        switch ((in->n - t < QGEMM_TOKENS ? in->n - t : QGEMM_TOKENS) + 4 * q6) {
        case 4: kgemm_tile_body(&tile, 4, 0); break;
        case 3: kgemm_tile_body(&tile, 3, 0); break;
        case 2: kgemm_tile_body(&tile, 2, 0); break;
        case 1: kgemm_tile_body(&tile, 1, 0); break;
        case 8: kgemm_tile_body(&tile, 4, 1); break;
        case 7: kgemm_tile_body(&tile, 3, 1); break;
        case 6: kgemm_tile_body(&tile, 2, 1); break;
        default: kgemm_tile_body(&tile, 1, 1);
        }
    }
}

/* ---- Attention on AVX-512: a block of a batch's queries in the lanes

   attention_chunk()'s results to the bit for a block of 16 queries, one
   query in each lane of the vectors: each key value is broadcast once for
   all of them (attention_chunk() loads a row of keys for every query), and
   the weighted sum of values takes 4 queries' rows at once. Each sum keeps
   its order: a score's 8 partial sums (over the columns of one residue mod
   8) in 8 vectors and their tree, as attention_scores8(); the largest score
   and the sum of weights as max_of() and exp_sum(); each output's products
   over the positions in turn, as attention_mix_add(). Only in a build for
   AVX2 and FMA, where attention_chunk()'s multiply-adds are rounded once,
   as these are. */

#if HAVE_AVX2
_Static_assert(ATTENTION_QUERIES == 16, "a block's queries fill the 16 lanes of a vector");

/* Keeps vector v in a register for its uses that follow, where the compiler
   would rather load it again for each (as the memory operand of each
   multiply-add); the emulation (tools/avx512_emulation.h) defines it away. */
#ifndef IN_REGISTER
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#endif

/* scores (nk, 16) = scale * (the 16 queries qt (head_dim, 16) . each of nk
   keys (nk, head_dim)); nk, a literal, up to 3: 24 partial sums held in
   registers, each load of qt used nk times. */
AVX512_INLINE void attention_scores_lanes(float *scores, const float *qt, const float *keys, int head_dim,
                                          __m512 scale, const int nk) {
    __m512 acc[3][8];
    for (int k = 0; k < nk; k++)
        for (int l = 0; l < 8; l++) acc[k][l] = _mm512_setzero_ps();
    for (int i = 0; i < head_dim; i += 8)
        for (int l = 0; l < 8; l++) {
            __m512 qv = _mm512_loadu_ps(qt + (size_t)(i + l) * 16);
            IN_REGISTER(qv);
            for (int k = 0; k < nk; k++)
                acc[k][l] = _mm512_fmadd_ps(qv, _mm512_set1_ps(keys[(size_t)k * head_dim + i + l]), acc[k][l]);
        }
    for (int k = 0; k < nk; k++) {
        const __m512 *a = acc[k];
        __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])),
                                   _mm512_add_ps(_mm512_add_ps(a[4], a[5]), _mm512_add_ps(a[6], a[7])));
        _mm512_storeu_ps(scores + k * 16, _mm512_mul_ps(sum, scale));
    }
}

/* out[r][d .. d + 16 nv - 1] += the sum over positions p0 .. p1 - 1 of
   weights[p * 16 + lane + r] * values[p][d ..], for nr rows (up to 4) of
   nv vectors (up to 4; both literals): 16 sums in registers. */
AVX512_INLINE void attention_mix_lanes(float *const out[4], const float *weights, int lane, const float *values,
                                       int p0, int p1, int head_dim, int d, const int nr, const int nv) {
    __m512 acc[4][4];
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < nv; v++) acc[r][v] = _mm512_loadu_ps(out[r] + d + 16 * v);
    for (int p = p0; p < p1; p++) {
        __m512 value[4];
        for (int v = 0; v < nv; v++) value[v] = _mm512_loadu_ps(values + (size_t)p * head_dim + d + 16 * v);
        for (int r = 0; r < nr; r++) {
            __m512 weight = _mm512_set1_ps(weights[(size_t)p * 16 + lane + r]);
            for (int v = 0; v < nv; v++) acc[r][v] = _mm512_fmadd_ps(weight, value[v], acc[r][v]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(out[r] + d + 16 * v, acc[r][v]);
}

/* attention_mix_lanes() over a whole row of head_dim (a multiple of 16). */
AVX512_INLINE void attention_mix_rows(float *const out[4], const float *weights, int lane, const float *values,
                                      int p0, int p1, int head_dim, const int nr) {
    int d = 0;
    for (; d + 64 <= head_dim; d += 64) attention_mix_lanes(out, weights, lane, values, p0, p1, head_dim, d, nr, 4);
    for (; d < head_dim; d += 16) attention_mix_lanes(out, weights, lane, values, p0, p1, head_dim, d, nr, 1);
}

/* The lanes whose queries see position c0 + p of a chunk, where lane l
   sees the positions before c0 + first_seen + l. */
AVX512_INLINE __mmask16 lanes_seeing(int p, int first_seen) {
    __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_cmpgt_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(first_seen)), _mm512_set1_epi32(p));
}

/* attention_chunk() for a block of more than 8 queries when head_dim is a
   multiple of 16 and the cache f32 (as a batch's comes, widened); fewer
   queries go to attention_chunk() itself (the lanes would stand idle).
   work: the scores (group, ATTENTION_CHUNK, 16), then the queries
   (group, head_dim, 16). */
AVX512 static void attention_chunk_avx512(float *parts, float *work, const float *q, const KVCache *kv, int h, int c0,
                                          int pos, int t0, int t1) {
    int hd = kv->head_dim, group = kv->n_heads / kv->n_kv_heads, q_dim = kv->n_heads * hd;
    if (hd % 16 || kv->f16 || t1 - t0 <= ATTENTION_QUERIES / 2) {
        attention_chunk(parts, work, q, kv, h, c0, pos, t0, t1);
        return;
    }
    int end = c0 + ATTENTION_CHUNK < pos + t1 ? c0 + ATTENTION_CHUNK : pos + t1; // after the last position seen
    int first = c0 - pos > t0 ? c0 - pos : t0;                                   // the first query that sees one
    int first_seen = pos + t0 + 1 - c0; // lane l sees positions p < first_seen + l of the chunk
    const float *keys = (const float *)kv->keys + (size_t)h * kv->ctx * hd;
    const float *values = (const float *)kv->values + (size_t)h * kv->ctx * hd;
    float *scores = work, *qt = scores + (size_t)group * ATTENTION_CHUNK * 16;
    __m512 scale = _mm512_set1_ps(1.0f / sqrtf((float)hd));
    for (int g = 0; g < group; g++) // the queries, lane t - t0 (zeros after t1), 16 columns at a time
        for (int i = 0; i < hd; i += 16) {
            __m512i rows[16];
            for (int l = 0; l < 16; l++)
                rows[l] = t0 + l < t1 ? _mm512_loadu_si512(q + (size_t)(t0 + l) * q_dim + (size_t)(h * group + g) * hd + i)
                                      : _mm512_setzero_si512();
            transpose16_avx512(rows);
            for (int c = 0; c < 16; c++) _mm512_storeu_si512(qt + ((size_t)g * hd + i + c) * 16, rows[c]);
        }
    for (int p0 = c0; p0 < end; p0 += ATTENTION_SPAN) { // scores
        int n = end - p0 < ATTENTION_SPAN ? end - p0 : ATTENTION_SPAN, j = 0;
        const float *k = keys + (size_t)p0 * hd;
        for (int g = 0; g < group; g++) {
            float *out = scores + ((size_t)g * ATTENTION_CHUNK + (p0 - c0)) * 16;
            const float *qg = qt + (size_t)g * hd * 16;
            for (j = 0; j + 3 <= n; j += 3) attention_scores_lanes(out + j * 16, qg, k + (size_t)j * hd, hd, scale, 3);
            if (n - j == 2) attention_scores_lanes(out + j * 16, qg, k + (size_t)j * hd, hd, scale, 2);
            if (n - j == 1) attention_scores_lanes(out + j * 16, qg, k + (size_t)j * hd, hd, scale, 1);
        }
    }
    for (int g = 0, n = end - c0; g < group; g++) { // scores into weights: m, s
        float *w = scores + (size_t)g * ATTENTION_CHUNK * 16;
        _Alignas(64) float max[16], sum[16];
        __m512 m = _mm512_loadu_ps(w);
        for (int p = 1; p < n; p++) m = _mm512_mask_max_ps(m, lanes_seeing(p, first_seen), _mm512_loadu_ps(w + p * 16), m);
        _mm512_store_ps(max, m);
        for (int p = 0; p < n; p++)
            for (int l = 0; l < 16; l++) w[p * 16 + l] = exp_nonpositive(w[p * 16 + l] - max[l]);
        __m512 acc[8];
        for (int l = 0; l < 8; l++) acc[l] = _mm512_setzero_ps();
        for (int p0 = 0; p0 < n; p0 += 8)
            for (int l = 0; l < 8 && p0 + l < n; l++)
                acc[l] = _mm512_mask_add_ps(acc[l], lanes_seeing(p0 + l, first_seen), acc[l], _mm512_loadu_ps(w + (p0 + l) * 16));
        _mm512_store_ps(sum, _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])),
                                           _mm512_add_ps(_mm512_add_ps(acc[4], acc[5]), _mm512_add_ps(acc[6], acc[7]))));
        for (int t = first; t < t1; t++) {
            float *part = parts + ((size_t)(t - t0) * kv->n_heads + h * group + g) * (hd + 2);
            part[0] = max[t - t0];
            part[1] = sum[t - t0];
            memset(part + 2, 0, (size_t)hd * sizeof(float));
        }
    }
    for (int p0 = c0; p0 < end; p0 += ATTENTION_SPAN) { // o: 4 queries at a time, as far as the first of them sees
        int n = end - p0 < ATTENTION_SPAN ? end - p0 : ATTENTION_SPAN;
        const float *v = values + (size_t)p0 * hd;
        for (int g = 0; g < group; g++) {
            const float *wt = scores + ((size_t)g * ATTENTION_CHUNK + (p0 - c0)) * 16;
            for (int t = first; t < t1; t += 4) {
                int nr = t1 - t < 4 ? t1 - t : 4, together = pos + t + 1 - p0;
                float *out[4];
                for (int r = 0; r < nr; r++)
                    out[r] = parts + ((size_t)(t + r - t0) * kv->n_heads + h * group + g) * (hd + 2) + 2;
                together = together < 0 ? 0 : together < n ? together : n;
                switch (together > 0 ? nr : 0) {
                case 4: attention_mix_rows(out, wt, t - t0, v, 0, together, hd, 4); break;
                case 3: attention_mix_rows(out, wt, t - t0, v, 0, together, hd, 3); break;
                case 2: attention_mix_rows(out, wt, t - t0, v, 0, together, hd, 2); break;
                case 1: attention_mix_rows(out, wt, t - t0, v, 0, together, hd, 1); break;
                }
                for (int r = 0; r < nr; r++) { // the positions after those, which only the later queries see
                    int seen = pos + t + r + 1 - p0 < n ? pos + t + r + 1 - p0 : n;
                    if (seen > together) attention_mix_rows(out + r, wt, t + r - t0, v, together, seen, hd, 1);
                }
            }
        }
    }
}

static void attention_avx512(float *out, const float *q, const KVCache *kv, int pos, int n, float *scratch) {
    attention_with(out, q, kv, pos, n, scratch, attention_chunk_avx512);
}
#endif

/* ---- The products on AVX-512 */

/* matmul_k() on AVX-512 VNNI, with the quantized input: one token row by
   row, a batch packed. */
AVX512 static void matmul_k_avx512(float *out, int ldo, const Matrix *w, int r0, int r1, const ProductScratch *in) {
    if (in->n > 1) {
        kgemm_rows_avx512(out, ldo, w, r0, r1, in);
        return;
    }
    switch (w->type) {
    case WEIGHT_Q4_K: k_rows_avx512(out, w, r0, r1, &in->q, WEIGHT_Q4_K); break;
    case WEIGHT_Q5_K: k_rows_avx512(out, w, r0, r1, &in->q, WEIGHT_Q5_K); break;
    default: k_rows_avx512(out, w, r0, r1, &in->q, WEIGHT_Q6_K);
    }
}

/* q8_0 and q4_0: one token's dot products with VNNI, a batch packed. */
AVX512 static void matmul_q8_0_avx512(float *out, int ldo, const Matrix *w, int r0, int r1,
                                      const ProductScratch *in) {
    if (in->n > 1) qgemm_rows_avx512(out, ldo, w, r0, r1, in);
    else if (w->interleaved)
        for (int r = r0; r < r1; r++) out[r - r0] = dot_q8_both_avx512(w, r, &in->q, &in->rest, 1);
    else
        for (int r = r0; r < r1; r++) out[r - r0] = dot_q8_both_avx512(w, r, &in->q, &in->rest, 0);
}

AVX512 static void matmul_q4_0_avx512(float *out, int ldo, const Matrix *w, int r0, int r1,
                                      const ProductScratch *in) {
    if (in->n > 1) qgemm_rows_avx512(out, ldo, w, r0, r1, in);
    else if (w->interleaved)
        for (int r = r0; r < r1; r++) out[r - r0] = dot_q4_avx512(w, r, &in->q, 1);
    else
        for (int r = r0; r < r1; r++) out[r - r0] = dot_q4_avx512(w, r, &in->q, 0);
}
#endif

/* ---- The choice */

/* The bytes of room each thread's batch products need: a block of
   ROW_BLOCK rows of the widest input and 64 values more, as floats
   (gemm_rows_with()'s bf16 and f16 rows widened, AVX2's packed quads of
   any float type, gemm_rows_avx2()) or packed (AVX-512's
   qgemm_pack_avx512(), AVX2's KSLICES K slices, k_slice_avx2()). */
static size_t panel_room(const Config *c, int batch) {
    int widest = c->hidden_dim > c->dim ? c->hidden_dim : c->dim;
    if (c->n_heads * c->head_dim > widest) widest = c->n_heads * c->head_dim;
    return batch > 1 ? ROW_BLOCK * (size_t)(widest + 64) * sizeof(float) : 0;
}

/* Puts the fastest kernels that this build and CPU have into the kernel
   table (the table at the top of the appendix). main() calls it once,
   before the first forward pass. */
static void choose_fast_kernels(void) {
    kernels.matmul[WEIGHT_F32] = kernels.matmul[WEIGHT_BF16] = kernels.matmul[WEIGHT_F16] = matmul_floats_fast;
    kernels.attention = attention_fast;
    kernels.attention_scratch = attention_fast_scratch;
    kernels.swiglu = swiglu_fast;
    kernels.rmsnorm = rmsnorm_fast;
    kernels.to_halves = to_halves_fast;
    kernels.product_room = panel_room;
#if HAVE_AVX2
    kernels.matmul[WEIGHT_F32] = kernels.matmul[WEIGHT_BF16] = kernels.matmul[WEIGHT_F16] = matmul_floats_avx2;
    kernels.matmul[WEIGHT_Q8_0] = kernels.matmul[WEIGHT_Q4_0] = matmul_quantized_avx2;
    kernels.matmul[WEIGHT_Q4_K] = kernels.matmul[WEIGHT_Q5_K] = kernels.matmul[WEIGHT_Q6_K] = matmul_k_avx2;
    kernels.prepare[WEIGHT_Q4_K] = kernels.prepare[WEIGHT_Q5_K] = kernels.prepare[WEIGHT_Q6_K] = quantize_input_k_avx2;
    kernels.prepare[WEIGHT_Q8_0] = quantize_input_wide;
    kernels.prepare[WEIGHT_F32] = kernels.prepare[WEIGHT_BF16] = kernels.prepare[WEIGHT_F16] = pack_input_avx2;
#endif
#if HAVE_AVX512
    const char *env = getenv("RUN_AVX512");
    __builtin_cpu_init();
    use_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("avx512vnni") && !(env && strcmp(env, "0") == 0);
    if (!use_avx512) return;
    kernels.matmul[WEIGHT_F32] = kernels.matmul[WEIGHT_BF16] = kernels.matmul[WEIGHT_F16] = matmul_floats_avx512;
    kernels.prepare[WEIGHT_F32] = kernels.prepare[WEIGHT_BF16] = kernels.prepare[WEIGHT_F16] = NULL; // x as it is
    kernels.matmul[WEIGHT_Q8_0] = matmul_q8_0_avx512;
    kernels.prepare[WEIGHT_Q8_0] = quantize_input_q8_0; // in two int8 parts, as vpdpbusd takes them
    kernels.matmul[WEIGHT_Q4_0] = matmul_q4_0_avx512;
    kernels.matmul[WEIGHT_Q4_K] = kernels.matmul[WEIGHT_Q5_K] = kernels.matmul[WEIGHT_Q6_K] = matmul_k_avx512;
    kernels.prepare[WEIGHT_Q4_K] = kernels.prepare[WEIGHT_Q5_K] = kernels.prepare[WEIGHT_Q6_K] = quantize_input;
#if HAVE_AVX2
    kernels.attention = attention_avx512;
#endif
#endif
}

#endif // PLAIN
