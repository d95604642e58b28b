/* run.c: inference for Llama-2-style decoder models, in one file of C.

   ./run model.bin -i "Once upon a time"

   The file reads from top to bottom like a chapter: the checkpoint format,
   the three structs that hold a model (Config, Weights, RunState), loading
   and validation, the kernels, forward(), then sampling, generation, chat
   and the command line. The tokenizer lives in tokenizer.c and is included
   below as part of this one translation unit.

   Rules of the file: C11, libc and libm only. OpenMP pragmas are optional:
   without -fopenmp they are ignored and everything still runs, on one core.

   Legend for sizes, as in the comments on every tensor pointer:
     dim        width of the residual stream
     hidden     width of the SwiGLU MLP (hidden_dim)
     head_dim   width of one attention head
     q_dim      n_heads * head_dim, kv_dim = n_kv_heads * head_dim
     vocab      vocab_size
     ctx        positions the KV cache holds (<= max_seq_len)
*/

#define _GNU_SOURCE // memmem, getline
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "tokenizer.c"

/* ----------------------------------------------------------------------------
   The checkpoint format (version 1). Little-endian throughout.

   offset  size  type     field
        0     4  char[4]  magic "LLAM"
        4     4  u32      version = 1
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
       52     4  u32      weight_type     0 = f32 (others reserved)
       56     4  u32      group_size      0 for f32
       60   196  zero                     the header is 256 bytes
      256        tensors, each at an offset that is a multiple of 64:

      +-----------------------------------------------+
      | token_embedding  (vocab, dim)                 |
      +-----------------------------------------------+  \
      | attn_norm (dim)                               |   |
      | wq (q_dim, dim)   wk (kv_dim, dim)            |   |
      | wv (kv_dim, dim)  wo (dim, q_dim)             |   |  once per layer
      | ffn_norm (dim)                                |   |
      | w1 (hidden, dim)  w2 (dim, hidden)            |   |
      | w3 (hidden, dim)                              |   |
      +-----------------------------------------------+  /
      | final_norm (dim)                              |
      | classifier (vocab, dim)  if tied_classifier=0 |
      +-----------------------------------------------+  end of file

   Matrices are row-major (out, in), as nn.Linear stores them: y = W x.
   RoPE rotates the interleaved pairs (x[2i], x[2i+1]) of each head (Meta's
   convention); export.py permutes Hugging Face's q/k rows into it.

   llama2.c's legacy checkpoints are read as they are: a header of seven
   int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
   max_seq_len; a negative vocab_size means an untied classifier follows),
   then packed f32 tensors stored tensor by tensor across layers, with two
   RoPE tables (max_seq_len, head_dim / 2) before the classifier that we skip.
   ------------------------------------------------------------------------- */

#define CHECKPOINT_MAGIC "LLAM"
#define CHECKPOINT_VERSION 1
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

static void die(const char *path, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "run: %s: ", path);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "run: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (see ./run --help)\n");
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

/* calloc that reports what it was for instead of returning NULL. */
static void *xcalloc(size_t count, size_t size, const char *what) {
    if (size != 0 && count > SIZE_MAX / size) {
        fprintf(stderr, "run: %s is too large to allocate\n", what);
        exit(1);
    }
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "run: out of memory allocating %s (%zu MiB)\n", what,
                count * size >> 20);
        exit(1);
    }
    return p;
}

/* ----------------------------------------------------------------------------
   The model: one struct per concern. */

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
    int legacy;          // 1: a llama2.c checkpoint (generation stops at BOS)
} Config;

typedef struct {
    const float *attn_norm; // (dim)
    const float *wq;        // (q_dim, dim)
    const float *wk;        // (kv_dim, dim)
    const float *wv;        // (kv_dim, dim)
    const float *wo;        // (dim, q_dim)
    const float *ffn_norm;  // (dim)
    const float *w1;        // (hidden, dim) gate
    const float *w2;        // (dim, hidden) down
    const float *w3;        // (hidden, dim) up
} LayerWeights;

typedef struct {
    const float *token_embedding; // (vocab, dim)
    LayerWeights *layers;         // (n_layers)
    const float *final_norm;      // (dim)
    const float *classifier;      // (vocab, dim), the embedding when tied
} Weights;

typedef struct {
    float *x;           // (dim) residual stream
    float *xb;          // (dim) normed input of a block, then its output
    float *q;           // (q_dim) queries of this position
    float *att_out;     // (q_dim) attention output, heads side by side
    float *hb;          // (hidden) gate, then the SwiGLU product
    float *hb2;         // (hidden) up
    float *scores;      // (n_heads, ctx) attention weights
    float *rope_cos;    // (head_dim / 2) rotation of this position
    float *rope_sin;    // (head_dim / 2)
    float *logits;      // (vocab)
    float *key_cache;   // (n_layers, ctx, kv_dim)
    float *value_cache; // (n_layers, ctx, kv_dim)
    int ctx;            // positions the cache holds
} RunState;

typedef struct {
    Config config;
    Weights weights;
    RunState state;
    const char *path;
    void *data;         // the memory-mapped file; weights point into it
    size_t file_size;
} Transformer;

/* ----------------------------------------------------------------------------
   Loading. The whole header is validated, and the file size must equal what
   the header implies, before any weight is touched; all sizes are computed
   in size_t with overflow checks. */

static uint32_t read_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}
static int32_t read_i32(const unsigned char *p) { return (int32_t)read_u32(p); }
static float read_f32(const unsigned char *p) {
    uint32_t bits = read_u32(p);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* a * b, or SIZE_MAX when it overflows (SIZE_MAX then fails every size check) */
static size_t mul_size(size_t a, size_t b) {
    return (b != 0 && a > SIZE_MAX / b) ? SIZE_MAX : a * b;
}
static size_t add_size(size_t a, size_t b) {
    return (a > SIZE_MAX - b) ? SIZE_MAX : a + b;
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
    if (!(c->rope_theta > 0.0f) || !isfinite(c->rope_theta))
        return fail(err, "rope_theta = %g is not a positive number", c->rope_theta);
    if (!(c->norm_eps > 0.0f) || !(c->norm_eps < 1.0f))
        return fail(err, "norm_eps = %g is not in (0, 1)", c->norm_eps);
    return 0;
}

/* Reserves n floats at *offset (first rounded up to `align`) and returns the
   tensor's address in data (NULL while only measuring); *offset moves past
   it. Overflow saturates to SIZE_MAX, which no file size can equal. */
static const float *place_tensor(const unsigned char *data, size_t *offset, size_t n_floats, size_t align) {
    size_t start = add_size(*offset, (align - *offset % align) % align);
    *offset = add_size(start, mul_size(n_floats, sizeof(float)));
    return data && *offset != SIZE_MAX ? (const float *)(data + start) : NULL;
}

/* Walks our own layout: with data NULL it only measures the file the header
   implies; with data it also points w into it. Returns the end offset. */
static size_t layout_checkpoint(const Config *c, const unsigned char *data, Weights *w) {
    size_t dim = c->dim, hidden = c->hidden_dim, vocab = c->vocab_size;
    size_t q_dim = (size_t)c->n_heads * c->head_dim, kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    size_t off = HEADER_SIZE;
    w->token_embedding = place_tensor(data, &off, vocab * dim, TENSOR_ALIGN);
    for (int l = 0; l < c->n_layers; l++) {
        size_t sizes[9] = {dim, q_dim * dim, kv_dim * dim, kv_dim * dim, dim * q_dim,
                           dim, hidden * dim, dim * hidden, hidden * dim};
        const float *p[9];
        for (int i = 0; i < 9; i++) p[i] = place_tensor(data, &off, sizes[i], TENSOR_ALIGN);
        if (data) w->layers[l] = (LayerWeights){p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]};
    }
    w->final_norm = place_tensor(data, &off, dim, TENSOR_ALIGN);
    w->classifier = c->tied_classifier ? w->token_embedding
                                       : place_tensor(data, &off, vocab * dim, TENSOR_ALIGN);
    return off;
}

/* Walks a llama2.c legacy layout: tensors packed (no alignment) and stored
   tensor-major, so layer l of wq starts l * dim * dim floats into wq. */
static size_t layout_legacy_checkpoint(const Config *c, const unsigned char *data, Weights *w) {
    size_t dim = c->dim, hidden = c->hidden_dim, vocab = c->vocab_size, L = c->n_layers;
    size_t kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    size_t per_layer[9] = {dim, dim * dim, kv_dim * dim, kv_dim * dim, dim * dim,
                           dim, hidden * dim, dim * hidden, hidden * dim};
    size_t off = LEGACY_HEADER_SIZE;
    const float *start[9];
    w->token_embedding = place_tensor(data, &off, vocab * dim, 1);
    for (int i = 0; i < 9; i++) start[i] = place_tensor(data, &off, mul_size(L, per_layer[i]), 1);
    w->final_norm = place_tensor(data, &off, dim, 1);
    place_tensor(data, &off, mul_size(2, (size_t)c->max_seq_len * (c->head_dim / 2)), 1); // RoPE tables, unused
    w->classifier = c->tied_classifier ? w->token_embedding : place_tensor(data, &off, vocab * dim, 1);
    for (size_t l = 0; data && l < L; l++) {
        const float *p[9];
        for (int i = 0; i < 9; i++) p[i] = start[i] + l * per_layer[i];
        w->layers[l] = (LayerWeights){p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]};
    }
    return off;
}

/* Reads our header; size is at least HEADER_SIZE. */
static int read_header(Config *c, const unsigned char *data, char *err) {
    uint32_t version = read_u32(data + 4);
    if (version != CHECKPOINT_VERSION)
        return fail(err, "checkpoint version %u, but this build reads version %d (re-export with export.py)",
                    version, CHECKPOINT_VERSION);
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
    if (weight_type != 0) return fail(err, "weight type %u is not supported by this build (f32 = 0 only)", weight_type);
    if (group_size != 0) return fail(err, "group_size = %u, expected 0 for f32 weights", group_size);
    c->tied_classifier = (int)tied;
    return validate_config(c, err);
}

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
    if (c->n_heads <= 0 || c->dim <= 0 || c->dim % c->n_heads != 0)
        return fail(err, "not a checkpoint: no \"%s\" magic, and as a llama2.c header dim = %d is not a multiple of n_heads = %d",
                    CHECKPOINT_MAGIC, c->dim, c->n_heads);
    c->head_dim = c->dim / c->n_heads;
    return validate_config(c, err);
}

/* Validates a checkpoint held in memory and points t's weights into it:
   the whole header is checked, and the size must equal what the header
   implies, before any weight is touched. Returns 0, or -1 with err set. */
static int parse_checkpoint(Transformer *t, const unsigned char *data, size_t size, char *err) {
    Config *c = &t->config;
    memset(c, 0, sizeof *c);
    t->file_size = size;
    int own = size >= 4 && memcmp(data, CHECKPOINT_MAGIC, 4) == 0;
    if (own && size < HEADER_SIZE)
        return fail(err, "file is %zu bytes, shorter than the %d-byte header", size, HEADER_SIZE);
    if (!own && size >= 4 && memcmp(data, "ak42", 4) == 0)
        return fail(err, "a llama2.c version 1/2 export; convert it with export.py --llama2c, or export it in llama2.c's legacy format");
    if (!own && size < LEGACY_HEADER_SIZE)
        return fail(err, "file is %zu bytes, too short to be a checkpoint", size);
    if ((own ? read_header(c, data, err) : read_legacy_header(c, data, err)) != 0) return -1;

    size_t (*layout)(const Config *, const unsigned char *, Weights *) =
        own ? layout_checkpoint : layout_legacy_checkpoint;
    Weights measured;
    size_t needed = layout(c, NULL, &measured);
    if (needed == SIZE_MAX) return fail(err, "the header describes a model too large to address");
    if (needed != size)
        return fail(err, "file is %zu bytes but the %sheader needs %zu", size, own ? "" : "llama2.c ", needed);
    t->weights.layers = xcalloc(c->n_layers, sizeof(LayerWeights), "the layer table");
    layout(c, data, &t->weights);
    return 0;
}

/* Allocates the activations and a KV cache of ctx positions. calloc maps
   zero pages lazily, so a long cache costs memory only as it fills. */
static void alloc_run_state(RunState *s, const Config *c, int ctx) {
    size_t q_dim = (size_t)c->n_heads * c->head_dim, kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    size_t cache = mul_size(mul_size(c->n_layers, ctx), kv_dim);
    s->ctx = ctx;
    s->x = xcalloc(c->dim, sizeof(float), "activations");
    s->xb = xcalloc(c->dim, sizeof(float), "activations");
    s->q = xcalloc(q_dim, sizeof(float), "activations");
    s->att_out = xcalloc(q_dim, sizeof(float), "activations");
    s->hb = xcalloc(c->hidden_dim, sizeof(float), "activations");
    s->hb2 = xcalloc(c->hidden_dim, sizeof(float), "activations");
    s->scores = xcalloc(mul_size(c->n_heads, ctx), sizeof(float), "attention scores");
    s->rope_cos = xcalloc(c->head_dim / 2, sizeof(float), "RoPE table");
    s->rope_sin = xcalloc(c->head_dim / 2, sizeof(float), "RoPE table");
    s->logits = xcalloc(c->vocab_size, sizeof(float), "logits");
    s->key_cache = xcalloc(cache, sizeof(float), "the key cache");
    s->value_cache = xcalloc(cache, sizeof(float), "the value cache");
}

/* Opens and maps a checkpoint. The mapping is read-only and private: weights
   are never copied, and pages load from the file as the kernels touch them. */
static void load_transformer(Transformer *t, const char *path) {
    memset(t, 0, sizeof *t);
    t->path = path;
    int fd = open(path, O_RDONLY);
    if (fd < 0) die(path, "cannot open: %s", strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die(path, "cannot stat: %s", strerror(errno));
    if (!S_ISREG(st.st_mode)) die(path, "not a regular file");
    if (st.st_size == 0) die(path, "file is empty");
    t->data = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (t->data == MAP_FAILED) die(path, "cannot map: %s", strerror(errno));
    char err[ERROR_SIZE];
    if (parse_checkpoint(t, t->data, (size_t)st.st_size, err) != 0) die(path, "%s", err);
}

static void free_run_state(RunState *s) {
    float *buffers[] = {s->x, s->xb, s->q, s->att_out, s->hb, s->hb2, s->scores,
                        s->rope_cos, s->rope_sin, s->logits, s->key_cache, s->value_cache};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) free(buffers[i]);
}

static void free_transformer(Transformer *t) {
    free_run_state(&t->state);
    free(t->weights.layers);
    munmap(t->data, t->file_size);
}

/* ----------------------------------------------------------------------------
   Kernels. Outputs first, sizes explicit. Each is the plain reference
   version; the forward pass below is a list of calls to them. */

/* out = x / rms(x) * weight, with rms(x) = sqrt(mean(x^2) + eps). The sum
   runs in double so that long rows lose no precision. out may alias x. */
static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    double sum_sq = 0.0;
    for (int i = 0; i < n; i++) sum_sq += (double)x[i] * x[i];
    float scale = (float)(1.0 / sqrt(sum_sq / n + eps));
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * weight[i];
}

/* out (rows) = W (rows, cols) @ x (cols). By far the most time goes here:
   every weight is read once per token, so rows are spread over threads. */
static void matmul(float *out, const float *w, const float *x, int cols, int rows) {
    #pragma omp parallel for
    for (int r = 0; r < rows; r++) {
        const float *row = w + (size_t)r * cols;
        float sum = 0.0f;
        for (int c = 0; c < cols; c++) sum += row[c] * x[c];
        out[r] = sum;
    }
}

/* The rotation RoPE applies at position pos: pair i of every head turns by
   pos * theta^(-2i / head_dim). Angles are computed in double, once per
   token, and shared by all layers. */
static void rope_angles(float *cos_out, float *sin_out, int pos, int head_dim, float theta) {
    for (int i = 0; i < head_dim / 2; i++) {
        double angle = pos * pow(theta, -2.0 * i / head_dim);
        cos_out[i] = (float)cos(angle);
        sin_out[i] = (float)sin(angle);
    }
}

/* Rotates the interleaved pairs (x[2i], x[2i+1]) of each of n_heads heads. */
static void rope(float *x, int n_heads, int head_dim, const float *cos_t, const float *sin_t) {
    for (int h = 0; h < n_heads; h++) {
        float *head = x + (size_t)h * head_dim;
        for (int i = 0; i < head_dim / 2; i++) {
            float a = head[2 * i], b = head[2 * i + 1];
            head[2 * i] = a * cos_t[i] - b * sin_t[i];
            head[2 * i + 1] = a * sin_t[i] + b * cos_t[i];
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

/* Causal attention of one query position over the n_pos cached positions.
   out (n_heads, head_dim) = softmax(q k^T / sqrt(head_dim)) v, per head.
   Query head h reads kv head h / (n_heads / n_kv_heads): with n_kv_heads ==
   n_heads that is MHA, with fewer it is GQA, with one it is MQA.
   keys and values are (n_pos, kv_dim); scores is (n_heads, ctx) scratch. */
static void attention(float *out, float *scores, const float *q, const float *keys,
                      const float *values, int n_pos, int ctx, int n_heads,
                      int n_kv_heads, int head_dim) {
    int kv_dim = n_kv_heads * head_dim, group = n_heads / n_kv_heads;
    float scale = 1.0f / sqrtf((float)head_dim);
    #pragma omp parallel for
    for (int h = 0; h < n_heads; h++) {
        const float *qh = q + (size_t)h * head_dim;
        float *sh = scores + (size_t)h * ctx;
        size_t kv_offset = (size_t)(h / group) * head_dim;
        for (int p = 0; p < n_pos; p++) {
            const float *k = keys + (size_t)p * kv_dim + kv_offset;
            float dot = 0.0f;
            for (int i = 0; i < head_dim; i++) dot += qh[i] * k[i];
            sh[p] = dot * scale;
        }
        softmax(sh, n_pos);
        float *oh = out + (size_t)h * head_dim;
        memset(oh, 0, (size_t)head_dim * sizeof(float));
        for (int p = 0; p < n_pos; p++) {
            const float *v = values + (size_t)p * kv_dim + kv_offset;
            for (int i = 0; i < head_dim; i++) oh[i] += sh[p] * v[i];
        }
    }
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

/* ----------------------------------------------------------------------------
   The forward pass: one token at position pos in, logits over the vocabulary
   out. Keys and values of this position go into the cache, so the token
   attends to every earlier position without recomputing it. */

static float *forward(Transformer *t, int token, int pos) {
    const Config *c = &t->config;
    const Weights *w = &t->weights;
    RunState *s = &t->state;
    int dim = c->dim, hidden = c->hidden_dim, head_dim = c->head_dim;
    int q_dim = c->n_heads * head_dim, kv_dim = c->n_kv_heads * head_dim;

    memcpy(s->x, w->token_embedding + (size_t)token * dim, (size_t)dim * sizeof(float)); // embedding
    rope_angles(s->rope_cos, s->rope_sin, pos, head_dim, c->rope_theta);

    for (int l = 0; l < c->n_layers; l++) {
        const LayerWeights *lw = &w->layers[l];
        float *keys = s->key_cache + (size_t)l * s->ctx * kv_dim;     // (ctx, kv_dim)
        float *values = s->value_cache + (size_t)l * s->ctx * kv_dim; // (ctx, kv_dim)
        float *k = keys + (size_t)pos * kv_dim, *v = values + (size_t)pos * kv_dim;

        rmsnorm(s->xb, s->x, lw->attn_norm, dim, c->norm_eps);        // attention norm
        matmul(s->q, lw->wq, s->xb, dim, q_dim);                      // q = wq x
        matmul(k, lw->wk, s->xb, dim, kv_dim);                        // k = wk x, into the cache
        matmul(v, lw->wv, s->xb, dim, kv_dim);                        // v = wv x, into the cache
        rope(s->q, c->n_heads, head_dim, s->rope_cos, s->rope_sin);   // rotate queries
        rope(k, c->n_kv_heads, head_dim, s->rope_cos, s->rope_sin);   // rotate keys
        attention(s->att_out, s->scores, s->q, keys, values, pos + 1, s->ctx,
                  c->n_heads, c->n_kv_heads, head_dim);              // softmax(q k^T) v
        matmul(s->xb, lw->wo, s->att_out, q_dim, dim);                // output projection
        add(s->x, s->xb, dim);                                        // residual

        rmsnorm(s->xb, s->x, lw->ffn_norm, dim, c->norm_eps);         // MLP norm
        matmul(s->hb, lw->w1, s->xb, dim, hidden);                    // gate = w1 x
        matmul(s->hb2, lw->w3, s->xb, dim, hidden);                   // up = w3 x
        swiglu(s->hb, s->hb2, hidden);                                // silu(gate) * up
        matmul(s->xb, lw->w2, s->hb, hidden, dim);                    // down = w2 h
        add(s->x, s->xb, dim);                                        // residual
    }

    rmsnorm(s->x, s->x, w->final_norm, dim, c->norm_eps);             // final norm
    matmul(s->logits, w->classifier, s->x, dim, c->vocab_size);       // classifier
    return s->logits;
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
   in the generation section calls both. */

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
        float x = logits[t];
        x = x > 0 ? x / s->repeat_penalty : x * s->repeat_penalty;
        logits[t] = x - count * s->frequency_penalty - s->presence_penalty;
        s->counts[t] = 0;
    }
}

/* Steps 1-5: fills s->candidates with the surviving tokens (most likely
   first when top-k or top-p sorted them), probabilities renormalised to sum
   to 1, and returns how many.
   logits (vocab) are overwritten. Greedy leaves one candidate. */
static int sampler_distribution(Sampler *s, float *logits, const int *history, int n_history) {
    int n = s->vocab_size;
    apply_penalties(s, logits, history, n_history);
    if (s->temperature == 0.0f) {
        s->candidates[0] = (Candidate){1.0f, argmax(logits, n)};
        return 1;
    }
    for (int i = 0; i < n; i++) logits[i] /= s->temperature;
    softmax(logits, n);
    /* Tokens that cannot survive are dropped before sorting: those below
       min_p x the top probability, and with top-p alone, those below
       (1 - p) / (n - 1), which no nucleus can reach. That leaves a few
       hundred tokens to sort instead of the vocabulary. Dropping them first
       gives the same set as steps 3-5 in order, since each keeps a prefix
       of the sorted tokens. */
    float cutoff = 0.0f;
    if (s->top_k == 0 && s->top_p < 1.0f && n > 1) cutoff = (1.0f - s->top_p) / (n - 1);
    if (s->min_p > 0.0f) cutoff = fmaxf(cutoff, s->min_p * logits[argmax(logits, n)]);
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
   for r uniform in [0, 1). */
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
} Session;

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
    fflush(stdout);
}

static void finish_output(Session *s) {
    if (s->tokenizer) {
        char piece[64];
        size_t n = tokenizer_decode_flush(s->tokenizer, &s->decoder, piece, sizeof piece);
        append_text(&s->held, piece, n);
        release_held_text(s, 1);
    }
    putchar('\n');
    fflush(stdout);
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

/* --probs: the chosen token and the k most likely, under the distribution
   of sampling step 2 (penalised logits, temperature, softmax; temperature 1
   when greedy), before top-k, top-p and min-p cut it. probs (vocab). */
static void show_probs(const Session *s, const float *probs, int token) {
    int vocab = s->transformer->config.vocab_size, k = s->probs_k < vocab ? s->probs_k : vocab;
    int top[128];
    for (int j = 0; j < k; j++) { // selection: k is small
        int best = -1;
        for (int i = 0; i < vocab; i++) {
            int taken = 0;
            for (int q = 0; q < j && !taken; q++) taken = top[q] == i;
            if (!taken && (best < 0 || probs[i] > probs[best])) best = i;
        }
        top[j] = best;
    }
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
    int token = m == 1 ? sp->candidates[0].index : sampler_draw(sp, m, random_f32(&sp->rng_state));
    if (s->probs_k > 0) {
        if (sp->temperature == 0.0f) softmax(logits, sp->vocab_size); // penalised logits, T = 1
        show_probs(s, logits, token);
    }
    return token;
}

static float *forward_and_record(Session *s, int token) {
    Transformer *t = s->transformer;
    float *logits = forward(t, token, s->pos++);
    push_token(&s->history, token);
    if (s->logits_file &&
        fwrite(logits, sizeof(float), t->config.vocab_size, s->logits_file) != (size_t)t->config.vocab_size)
        die(s->logits_path, "write failed: %s", strerror(errno));
    return logits;
}

/* Feeds the prompt into the cache from s->pos on, then samples up to max_new
   tokens, feeding each back, and stops early at a stop token or string, or
   when the context is full. With echo, the prompt's own text is printed
   first. Returns the last token sampled (-1 if none). */
static int complete(Session *s, const int *prompt, int n_prompt, int max_new, int echo) {
    int ctx = s->transformer->state.ctx;
    double start = now_seconds();
    if (echo) emit_token(s, prompt[0]);
    float *logits = NULL;
    for (int i = 0; i < n_prompt; i++) {
        logits = forward_and_record(s, prompt[i]);
        if (echo && i + 1 < n_prompt) emit_token(s, prompt[i + 1]);
    }
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
    fprintf(stderr, "run: prompt %ld tokens (%.1f tok/s), generated %ld tokens (%.1f tok/s), first token after %.0f ms\n",
            s->n_prompt_tokens, s->prompt_seconds > 0 ? s->n_prompt_tokens / s->prompt_seconds : 0.0,
            s->n_generated_tokens,
            s->generate_seconds > 0 ? s->n_generated_tokens / s->generate_seconds : 0.0,
            s->first_token_seconds * 1000);
}

/* ----------------------------------------------------------------------------
   Chat. A template wraps each user turn in the markers the model was tuned
   on; the KV cache is kept between turns, so earlier turns are not re-read.
     llama2:  <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>
     chatml:  <|im_start|>system\n{system}<|im_end|>\n
              <|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n
   Markers such as <s> and <|im_start|> enter as token ids. (Text a user
   types is tokenized as Hugging Face does: a byte-level tokenizer matches
   special tokens typed in it, sentencepiece does not.) Without -y, the system
   prompt is the template's default that the tokenizer file carries (for
   SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging
   Face"), so the tokens are those of transformers' apply_chat_template. */

enum { TEMPLATE_NONE = 0, TEMPLATE_LLAMA2 = 1, TEMPLATE_CHATML = 2 };

/* The template: --template's name if given, else the tokenizer's, else Llama 2's. */
static int chat_template(const char *name, const Tokenizer *tok) {
    if (name) return strcmp(name, "chatml") ? TEMPLATE_LLAMA2 : TEMPLATE_CHATML;
    return tok->chat_template == TEMPLATE_CHATML ? TEMPLATE_CHATML : TEMPLATE_LLAMA2;
}

/* The system prompt: -y's if given (-y "" means none), else the template's default. */
static const char *chat_system_prompt(const char *given, const Tokenizer *tok) {
    return given ? given : tok->system_prompt;
}

static void push_text(TokenList *list, const Tokenizer *tok, const char *text) {
    size_t len = strlen(text);
    int *ids = xcalloc(len + 3, sizeof(int), "the prompt");
    int n = tokenizer_encode(tok, text, len, 0, ids);
    if (n < 0) { fprintf(stderr, "run: out of memory tokenizing the prompt\n"); exit(1); }
    for (int i = 0; i < n; i++) push_token(list, ids[i]);
    free(ids);
}

/* Looks up a marker token that a template needs, by its text. */
static int marker_token(const Tokenizer *tok, const char *text, const char *tok_path) {
    int id = tokenizer_find(tok, text, strlen(text));
    if (id < 0) die(tok_path, "the chat template needs the token %s, which the tokenizer lacks", text);
    return id;
}

/* Appends one user turn, as the template spells it, to list. */
static void push_user_turn(TokenList *list, const Tokenizer *tok, const char *tok_path, int template,
                           const char *system, const char *user, int first_turn) {
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
   the answer), then </s> or <|im_end|>\n. */
static void push_answer_end(TokenList *list, const Session *s, const Tokenizer *tok, const char *tok_path,
                            int template, int last) {
    if (last >= 0 && !is_stop_token(s, last)) push_token(list, last);
    if (template == TEMPLATE_CHATML) {
        push_token(list, marker_token(tok, "<|im_end|>", tok_path));
        push_text(list, tok, "\n");
    } else if (tok->eos_id >= 0) {
        push_token(list, tok->eos_id);
    }
}

/* Reads one line from stdin into a growing buffer; 0 at end of input. */
static int read_line(char **line, size_t *cap) {
    ssize_t n = getline(line, cap, stdin);
    if (n < 0) return 0;
    while (n > 0 && ((*line)[n - 1] == '\n' || (*line)[n - 1] == '\r')) (*line)[--n] = '\0';
    return 1;
}

/* ----------------------------------------------------------------------------
   The command line. */

static void print_help(void) {
    printf(
        "usage: ./run MODEL [options]\n"
        "       ./run [MODEL] --tokenize -z TOKENIZER -i TEXT\n"
        "       ./run MODEL -m score -f TEXT_FILE\n"
        "\n"
        "Runs a Llama-2-style checkpoint (ours, written by export.py, or llama2.c's\n"
        "legacy format). Text goes to stdout; statistics and notices to stderr.\n"
        "\n"
        "prompt and model:\n"
        "  -i TEXT       prompt (without -i or -f, generation starts from BOS alone)\n"
        "  -f PATH       read the prompt from a file\n"
        "  --tokens IDS  prompt as token ids, e.g. \"1 450 4996\" (no tokenizer needed)\n"
        "  -z PATH       tokenizer (default: tokenizer.bin beside MODEL, then ./tokenizer.bin)\n"
        "  -n N          new tokens to generate (default 256; stops earlier at end of\n"
        "                sequence, at a stop string or when the context is full)\n"
        "  -c N          context length: positions the KV cache holds (default: the model's)\n"
        "  -m MODE       generate (default), chat, or score (perplexity of the prompt text)\n"
        "  -y TEXT       system prompt for chat (default: the template's, if the tokenizer\n"
        "                has one; -y \"\" for none)\n"
        "  --template T  chat template: llama2 or chatml (default: from the tokenizer)\n"
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
        "                for every forward position (prompt, then each fed-back token)\n"
        "  --probs K     after each generated token, show its probability and the K most\n"
        "                likely tokens on stderr (after penalties and temperature)\n"
        "  --probs-format text|json  one line per token, plain or JSON (default text)\n"
        "  --tokenize    print the prompt's token ids on one line and exit (with -m chat:\n"
        "                the first turn, as the chat template wraps it)\n"
        "  -h, --help    this help\n"
        "\n"
        "Without a tokenizer, prompts are given with --tokens and output is token ids.\n"
        "Exit status: 0 ok, 1 bad file or failed run, 2 bad command line.\n");
}

typedef struct {
    const char *model_path, *tokenizer_path, *prompt, *prompt_file, *prompt_ids;
    const char *mode, *system_prompt, *template_name, *logits_path;
    int steps, context, stride, tokenize_only, seed_given, probs_k, probs_format;
    SamplerSettings sampling;
    const char *stop_strings[MAX_STOP_STRINGS];
    int n_stop_strings;
    uint64_t seed;
} Options;

static long parse_long(const char *flag, const char *text, long min, long max) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end != '\0' || v < min || v > max)
        usage_error("%s expects an integer in [%ld, %ld], got '%s'", flag, min, max, text);
    return v;
}

static float parse_float(const char *flag, const char *text, float min, float max, int min_inclusive) {
    char *end;
    errno = 0;
    float v = strtof(text, &end);
    int below = min_inclusive ? v < min : v <= min;
    if (errno || end == text || *end != '\0' || !isfinite(v) || below || v > max)
        usage_error("%s expects a number in %c%g, %g], got '%s'", flag, min_inclusive ? '[' : '(',
                    min, max, text);
    return v;
}

static void parse_options(Options *o, int argc, char **argv) {
    *o = (Options){.steps = 256, .mode = "generate",
                   .sampling = {.temperature = 1.0f, .top_p = 0.9f, .repeat_penalty = 1.0f,
                                .repeat_window = 64}};
    SamplerSettings *sp = &o->sampling;
    int i = 1;
    if (i < argc && argv[i][0] != '-') o->model_path = argv[i++];
    for (; i < argc; i++) {
        const char *flag = argv[i];
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help")) { print_help(); exit(0); }
        if (!strcmp(flag, "--tokenize")) { o->tokenize_only = 1; continue; }
        if (flag[0] != '-') usage_error("unexpected argument '%s'", flag);
        if (i + 1 >= argc) usage_error("%s needs a value", flag);
        const char *value = argv[++i];
        if (!strcmp(flag, "-i")) o->prompt = value;
        else if (!strcmp(flag, "-f")) o->prompt_file = value;
        else if (!strcmp(flag, "--tokens")) o->prompt_ids = value;
        else if (!strcmp(flag, "-z")) o->tokenizer_path = value;
        else if (!strcmp(flag, "-n")) o->steps = (int)parse_long(flag, value, 0, INT32_MAX);
        else if (!strcmp(flag, "-c")) o->context = (int)parse_long(flag, value, 1, INT32_MAX);
        else if (!strcmp(flag, "--stride")) o->stride = (int)parse_long(flag, value, 1, INT32_MAX);
        else if (!strcmp(flag, "-t")) sp->temperature = parse_float(flag, value, 0.0f, 100.0f, 1);
        else if (!strcmp(flag, "-p")) sp->top_p = parse_float(flag, value, 0.0f, 1.0f, 0);
        else if (!strcmp(flag, "-k")) sp->top_k = (int)parse_long(flag, value, 0, INT32_MAX);
        else if (!strcmp(flag, "--min-p")) sp->min_p = parse_float(flag, value, 0.0f, 1.0f, 1);
        else if (!strcmp(flag, "--repeat-penalty")) sp->repeat_penalty = parse_float(flag, value, 0.0f, 100.0f, 0);
        else if (!strcmp(flag, "--frequency-penalty")) sp->frequency_penalty = parse_float(flag, value, -100.0f, 100.0f, 1);
        else if (!strcmp(flag, "--presence-penalty")) sp->presence_penalty = parse_float(flag, value, -100.0f, 100.0f, 1);
        else if (!strcmp(flag, "--repeat-window")) sp->repeat_window = (int)parse_long(flag, value, 0, INT32_MAX);
        else if (!strcmp(flag, "--probs")) o->probs_k = (int)parse_long(flag, value, 0, 100);
        else if (!strcmp(flag, "--probs-format")) {
            if (strcmp(value, "text") && strcmp(value, "json"))
                usage_error("--probs-format expects text or json, got '%s'", value);
            o->probs_format = strcmp(value, "json") ? PROBS_TEXT : PROBS_JSON;
        } else if (!strcmp(flag, "--stop")) {
            if (!*value) usage_error("--stop needs a non-empty text");
            if (o->n_stop_strings == MAX_STOP_STRINGS) usage_error("at most %d --stop strings", MAX_STOP_STRINGS);
            o->stop_strings[o->n_stop_strings++] = value;
        } else if (!strcmp(flag, "-s")) {
            char *end;
            errno = 0;
            unsigned long long seed = strtoull(value, &end, 10);
            if (errno || end == value || *end != '\0' || value[0] == '-')
                usage_error("-s expects a non-negative integer, got '%s'", value);
            o->seed = seed;
            o->seed_given = 1;
        } else if (!strcmp(flag, "-m")) o->mode = value;
        else if (!strcmp(flag, "-y")) o->system_prompt = value;
        else if (!strcmp(flag, "--template")) o->template_name = value;
        else if (!strcmp(flag, "--logits")) o->logits_path = value;
        else usage_error("unknown option '%s'", flag);
    }
    if (strcmp(o->mode, "generate") && strcmp(o->mode, "chat") && strcmp(o->mode, "score"))
        usage_error("-m expects generate, chat or score, got '%s'", o->mode);
    if (o->template_name && strcmp(o->template_name, "llama2") && strcmp(o->template_name, "chatml"))
        usage_error("--template expects llama2 or chatml, got '%s'", o->template_name);
    if ((o->prompt != NULL) + (o->prompt_file != NULL) + (o->prompt_ids != NULL) > 1)
        usage_error("give the prompt once: -i, -f or --tokens");
    if (!o->model_path && !o->tokenize_only) usage_error("no model given");
    if (o->tokenize_only && o->prompt_ids) usage_error("--tokenize takes a text prompt (-i or -f)");
    if (!strcmp(o->mode, "chat") && o->prompt_ids) usage_error("chat takes a text prompt (-i or -f)");
    if (!strcmp(o->mode, "score") && !o->prompt && !o->prompt_file && !o->prompt_ids)
        usage_error("score needs a text to score (-f, -i or --tokens)");
    if (o->n_stop_strings && o->prompt_ids) usage_error("--stop needs text output, not --tokens");
}

/* The whole of a file as a NUL-terminated string. */
static char *read_text_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path, "cannot open: %s", strerror(errno));
    size_t cap = 4096, n = 0;
    char *text = xcalloc(cap, 1, "the prompt file");
    size_t got;
    while ((got = fread(text + n, 1, cap - n - 1, f)) > 0) {
        n += got;
        if (n + 1 == cap) {
            cap *= 2;
            text = realloc(text, cap);
            if (!text) die(path, "out of memory reading the file");
        }
    }
    if (ferror(f)) die(path, "read failed: %s", strerror(errno));
    fclose(f);
    text[n] = '\0';
    if (strlen(text) != n) die(path, "the prompt file contains a NUL byte");
    return text;
}

/* Parses "1 2 3" or "1,2,3" into ids, each checked against the vocabulary. */
static int parse_token_ids(const char *text, int vocab_size, TokenList *list) {
    const char *p = text;
    while (*p) {
        if (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n') { p++; continue; }
        char *end;
        errno = 0;
        long id = strtol(p, &end, 10);
        if (end == p || errno || id < 0 || id >= vocab_size)
            usage_error("--tokens: '%.20s' is not a token id in [0, %d)", p, vocab_size);
        push_token(list, (int)id);
        p = end;
    }
    return list->n;
}

/* Finds the tokenizer: -z, else tokenizer.bin beside the model, else
   ./tokenizer.bin. Returns NULL when there is none to be found. */
static char *find_tokenizer(const Options *o) {
    if (o->tokenizer_path) return strdup(o->tokenizer_path);
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
    if (tokenizer_load(tok, path, vocab_size, err, sizeof err) != 0) die(path, "%s", err);
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
        if (tok.add_bos && tok.bos_id >= 0) push_token(&prompt, tok.bos_id);
        push_text(&prompt, &tok, text);
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
    int interactive = first_prompt == NULL;
    char *line = NULL;
    size_t cap = 0;
    int last = -1;
    for (int turn = 0;; turn++) {
        const char *user = first_prompt;
        if (interactive) {
            fprintf(stderr, "> ");
            if (!read_line(&line, &cap)) break;
            if (!*line) { turn--; continue; }
            user = line;
        } else if (turn > 0) break;
        TokenList prompt = {0};
        if (turn > 0) push_answer_end(&prompt, s, tok, tok_path, template, last);
        push_user_turn(&prompt, tok, tok_path, template, system, user, turn == 0);
        if (s->pos + prompt.n > s->transformer->state.ctx) {
            fprintf(stderr, "run: this turn needs %d more positions but the context has %d left\n", prompt.n,
                    s->transformer->state.ctx - s->pos);
            free(prompt.ids);
            break;
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
    return 0;
}

/* Generation or chat with a loaded model; returns the exit status. */
static int run_model(const Options *o, Transformer *transformer, const char *tok_path, const char *text) {
    Tokenizer tokenizer;
    int have_tokenizer = 0;
    if (tok_path && !o->prompt_ids) {
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
                 .probs_format = o->probs_format, .n_stop_strings = o->n_stop_strings};
    memcpy(s.stop_strings, o->stop_strings, sizeof s.stop_strings);
    decoder_init(&s.decoder);
    if (o->logits_path && !(s.logits_file = fopen(o->logits_path, "wb")))
        die(o->logits_path, "cannot open for writing: %s", strerror(errno));

    /* llama2.c's models end a story by starting the next with BOS */
    int bos = have_tokenizer ? tokenizer.bos_id : 1;
    if (c->legacy) s.stop_tokens[s.n_stop_tokens++] = bos;
    else if (have_tokenizer && tokenizer.eos_id >= 0) s.stop_tokens[s.n_stop_tokens++] = tokenizer.eos_id;

    int status = 0;
    if (!strcmp(o->mode, "chat")) {
        status = run_chat(&s, o, tok_path, text);
        print_statistics(&s);
    } else {
        TokenList prompt = {0};
        if (o->prompt_ids) parse_token_ids(o->prompt_ids, c->vocab_size, &prompt);
        else if (text) {
            if (tokenizer.add_bos && tokenizer.bos_id >= 0) push_token(&prompt, tokenizer.bos_id);
            push_text(&prompt, &tokenizer, text);
        }
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
    free_sampler(&sampler);
    free(s.history.ids);
    free(s.held.text);
    if (have_tokenizer) tokenizer_free(&tokenizer);
    return status;
}

#ifndef TESTING
int main(int argc, char **argv) {
    Options o;
    parse_options(&o, argc, argv);

    Transformer transformer;
    int vocab_size = -1;
    if (o.model_path) {
        load_transformer(&transformer, o.model_path);
        Config *c = &transformer.config;
        vocab_size = c->vocab_size;
        int ctx = o.context ? o.context : c->max_seq_len;
        if (ctx > c->max_seq_len) usage_error("-c %d exceeds the model's max_seq_len of %d", ctx, c->max_seq_len);
        if (!o.tokenize_only) alloc_run_state(&transformer.state, c, ctx);
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
    return status;
}
#endif
