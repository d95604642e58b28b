/* test_kernels.c: run.c's kernels, plain and fast, against exact sums.

   Includes run.c with TESTING (no main), then feeds the plain kernels and
   the fast ones of the appendix (portable vectorised C, AVX2, AVX-512) random
   data of awkward sizes: lengths that are not multiples of the vector width,
   group counts that leave a tail, tiles cut short at the edges of the
   matrix; each result is held to a double-precision sum. The matrix
   products and attention are run through both kernel tables: the plain one
   run.c starts with, and the one choose_fast_kernels() fills in.
   Prints each disagreement and exits 1 if there was any, 0 otherwise.

   tests/test_kernels.py builds it with the Makefile's flags, without AVX2,
   and (under make sanitize) with AddressSanitizer and UBSan, and runs it;
   where the CPU has AVX-512 the AVX-512 kernels are compared as well.

   Tolerances: a float sum of n products differs from the exact one by at
   most about n * 2^-24 of the sum of their magnitudes; summing in another
   order (lanes, tiles) is another such rounding. The bound below, 1e-5 of
   the sum of magnitudes, covers n up to about 100 such roundings per term
   and still fails on any wrong index, scale or sign, which moves a result
   by a whole product. Integer dot products must agree exactly before
   scaling. */

#define TESTING
#include "../run.c"

static int failures, checks;
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t next_u32(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float uniform(void) { return (float)next_u32() / 4294967296.0f * 2.0f - 1.0f; } // [-1, 1)
static int below(int n) { return (int)(next_u32() % (uint32_t)n); }

/* got must be within tol of want; prints the first few failures of each kind. */
static void expect(const char *what, int a, int b, int c, double got, double want, double tol) {
    checks++;
    if (fabs(got - want) <= tol && isfinite(got)) return;
    if (++failures <= 30)
        fprintf(stderr, "FAIL %s (%d, %d, %d): got %.9g, want %.9g, |diff| %.3g > %.3g\n", what, a, b, c, got,
                want, fabs(got - want), tol);
}

/* A random half-precision scale between about 2^-12 and 2^4, either sign. */
static uint16_t random_f16(void) {
    uint16_t exp = (uint16_t)(3 + below(16)), man = (uint16_t)below(1024);
    return (uint16_t)((next_u32() & 1) << 15 | exp << 10 | man);
}

static float *random_floats(size_t n) {
    float *x = xcalloc(n ? n : 1, sizeof(float), "test data");
    for (size_t i = 0; i < n; i++) x[i] = uniform();
    return x;
}

/* 1: random_matrix() lays q8_0 and q4_0 out in GGUF's blocks (Matrix.interleaved). */
static int gguf_layout;

/* m's q8_0 or q4_0 groups in GGUF's blocks: each scale, then its values. */
static Matrix interleaved_copy(const Matrix *m) {
    size_t groups = (size_t)m->rows * (m->cols / GROUP_SIZE), bytes = m->type == WEIGHT_Q8_0 ? GROUP_SIZE : GROUP_SIZE / 2;
    uint8_t *blocks = xcalloc(groups, bytes + 2, "test data");
    for (size_t g = 0; g < groups; g++) {
        memcpy(blocks + g * (bytes + 2), m->scales + 2 * g, 2);
        memcpy(blocks + g * (bytes + 2) + 2, (const uint8_t *)m->values + g * bytes, bytes);
    }
    Matrix il = *m;
    il.scales = blocks, il.values = blocks + 2, il.interleaved = 1;
    return il;
}

static void free_matrix(Matrix *m) {
    free((void *)(m->interleaved ? m->scales : m->values));
    if (!m->interleaved) free((void *)m->scales);
}

/* A random (rows, cols) matrix of the weight type, its arrays allocated;
   q8_0 and q4_0 in GGUF's blocks when gguf_layout is set. */
static Matrix random_matrix(int type, int rows, int cols) {
    size_t n = (size_t)rows * cols;
    Matrix m = {.rows = rows, .cols = cols, .type = type};
    if (type == WEIGHT_F32) {
        m.values = random_floats(n);
    } else if (type == WEIGHT_BF16) {
        uint16_t *b = xcalloc(n, 2, "test data");
        for (size_t i = 0; i < n; i++) { float f = uniform(); uint32_t u; memcpy(&u, &f, 4); b[i] = (uint16_t)(u >> 16); }
        m.values = b;
    } else if (type == WEIGHT_F16) {
        uint16_t *h = xcalloc(n, 2, "test data");
        for (size_t i = 0; i < n; i++) h[i] = f32_to_f16(uniform());
        m.values = h;
    } else if (is_k_type(type)) { // random bytes are a valid block; its scales d (and dmin) set apart
        size_t blocks = n / SUPER_BLOCK, size = K_BLOCK_BYTES[type];
        uint8_t *b = xcalloc(blocks * size, 1, "test data");
        for (size_t i = 0; i < blocks * size; i++) b[i] = (uint8_t)next_u32();
        for (size_t i = 0; i < blocks; i++) {
            uint8_t *block = b + i * size;
            uint16_t d = random_f16(), dmin = random_f16();
            if (type == WEIGHT_Q6_K) memcpy(block + 208, &d, 2);
            else memcpy(block, &d, 2), memcpy(block + 2, &dmin, 2);
        }
        m.values = b;
    } else {
        size_t bytes = type == WEIGHT_Q8_0 ? n : n / 2;
        uint8_t *q = xcalloc(bytes, 1, "test data");
        for (size_t i = 0; i < bytes; i++) q[i] = type == WEIGHT_Q8_0 ? (uint8_t)(below(255) - 127) : (uint8_t)next_u32();
        uint16_t *d = xcalloc(n / GROUP_SIZE, 2, "test data");
        for (size_t i = 0; i < n / GROUP_SIZE; i++) d[i] = random_f16();
        m.values = q;
        m.scales = (const uint8_t *)d;
        if (gguf_layout) {
            Matrix il = interleaved_copy(&m);
            free_matrix(&m);
            return il;
        }
    }
    return m;
}

/* Whether the table's q8_0 products take their input in one 16-bit part
   (quantize_input_wide(), AVX2) rather than two int8 parts. */
static int q8_wide(void) {
#if HAVE_AVX2
    return kernels.prepare[WEIGHT_Q8_0] == quantize_input_wide;
#else
    return 0;
#endif
}

/* The values that the prepared input of w's products stands for, xd (n,
   cols): for q8_0 and q4_0 weights, and K types whose kernel in the table
   takes them quantized, the quantized x, d q (+ d' q'), or for q8_0 in one
   16-bit part (wide) its wide_d x wide; else x itself. */
static void prepared_values(float *xd, const ProductScratch *ps, const Matrix *w, const float *x, int n, int wide) {
    int cols = w->cols, k_quantized = is_k_type(w->type) && kernels.prepare[w->type];
    for (int t = 0; t < n; t++) {
        QuantizedVector row = quantized_row(&ps->q, t, cols), rest_row = quantized_row(&ps->rest, t, cols);
        for (int c = 0; c < cols; c++) {
            float *v = xd + (size_t)t * cols + c;
            size_t at = (size_t)t * cols + c;
            if (w->type == WEIGHT_Q8_0 && wide) *v = ps->wide_d[at / GROUP_SIZE] * ps->wide[at];
            else if (w->type == WEIGHT_Q8_0) *v = row.d[c / GROUP_SIZE] * row.q[c] + rest_row.d[c / GROUP_SIZE] * rest_row.q[c];
            else if (w->type == WEIGHT_Q4_0 || k_quantized) *v = row.d[c / GROUP_SIZE] * row.q[c];
            else *v = x[(size_t)t * cols + c];
        }
    }
}

/* A ProductScratch for n inputs of cols values, sized as alloc_run_state()
   sizes it. */
static ProductScratch alloc_products(int n, int cols) {
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    ProductScratch ps = {.room_size = ROW_BLOCK * (size_t)(cols + 64) * sizeof(float),
                         .up = xcalloc((size_t)threads * n * ROW_BLOCK, sizeof(float), "up"), .batch = n};
    ps.room = xcalloc((size_t)threads * ps.room_size + 1, 1, "room");
    alloc_quantized(&ps.q, (size_t)n * cols, "q");
    alloc_quantized(&ps.rest, (size_t)n * cols, "rest");
    ps.wide = xcalloc((size_t)n * cols + 1, sizeof(int16_t), "wide");
    ps.wide_d = xcalloc((size_t)n * cols / GROUP_SIZE + 1, sizeof(float), "wide");
    ps.triples = xcalloc((size_t)n * (cols + 16) + 1, sizeof(float), "triples");
    return ps;
}

static void free_products(ProductScratch *ps) {
    free_quantized(&ps->q);
    free_quantized(&ps->rest);
    free(ps->room);
    free(ps->up);
    free(ps->wide);
    free(ps->wide_d);
    free(ps->triples);
}

/* ---- Number formats */

static void test_f16(void) {
    for (uint32_t h = 0; h < 65536; h++) {
        int exp = h >> 10 & 31, man = h & 1023;
        double want = exp == 0 ? ldexp(man, -24) : exp == 31 ? (man ? NAN : INFINITY) : ldexp(1024 + man, exp - 25);
        if (h & 0x8000) want = -want;
        float got = f16_to_f32((uint16_t)h);
        checks++;
        if (isnan(want) ? !isnan(got) : got != want) {
            if (++failures <= 30) fprintf(stderr, "FAIL f16_to_f32(0x%04x) = %g, want %g\n", h, got, want);
        }
#if HAVE_AVX2
        float hw = _cvtsh_ss((uint16_t)h);
        checks++;
        if (memcmp(&hw, &got, 4) != 0 && !(isnan(hw) && isnan(got)) && ++failures <= 30)
            fprintf(stderr, "FAIL f16_to_f32(0x%04x) = %g, F16C says %g\n", h, got, hw);
#endif
    }
}

/* ---- Dot products */

static double abs_dot(const float *a, const float *b, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += fabs((double)a[i] * b[i]);
    return s;
}

/* The fast f32, bf16 and f16 dot products in lanes; the plain ones are
   inside the plain matrix products, tested below. */
/* One token's product with a single row alone (no lanes8 kernel serves it). */
static float dot_one_row(const Matrix *w, int row, const float *x) {
    float out[8]; // room for 8 rows, as the compiler cannot see that one row takes one
    matvec_floats_with(out, w, row, row + 1, x, lanes8_fast);
    return out[0];
}

/* One token's f32, bf16 and f16 products through the lanes8 kernel
   `lanes8`, for rows of many widths (passes of GEMM_DEPTH columns and their
   tails): each output against the exact dot product, and bit for bit as
   its row alone. */
static void test_matvec_floats(const char *kind, Lanes8Kernel *lanes8) {
    static const int types[] = {WEIGHT_F32, WEIGHT_BF16, WEIGHT_F16};
    char what[64];
    snprintf(what, sizeof what, "matvec_floats %s", kind);
    for (int k = 0; k < 3; k++)
        for (int n = 1; n <= 2100; n += 1 + n / 3) {
            Matrix w = random_matrix(types[k], 19, n);
            float *x = random_floats(n), out[19];
            matvec_floats_with(out, &w, 0, 19, x, lanes8);
            for (int r = 0; r < 19; r++) {
                float row[2100];
                double exact = 0;
                dequantize_row(row, &w, r, 0, n);
                for (int i = 0; i < n; i++) exact += (double)row[i] * x[i];
                expect(what, n, k, r, out[r], exact, 1e-5 * abs_dot(row, x, n) + 1e-30);
                expect(what, n, k, r, out[r], dot_one_row(&w, r, x), 0);
            }
            free(x);
            free_matrix(&w);
        }
}

static void test_quantize_vector(void) {
    int sizes[] = {32, 64, 96, 768, 2080};
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        int n = sizes[s];
        float *x = random_floats(n);
        for (int i = 0; i < n; i++) x[i] *= (float)(1 + below(1000)); // groups of different ranges
        if (n > 64) {
            x[3] = INFINITY, x[40] = NAN, x[41] = -INFINITY;             // must not be undefined behaviour
            for (int i = 64; i < 96; i++) x[i] = 0.0f;                  // an all-zero group
        }
        QuantizedVector q;
        alloc_quantized(&q, n, "q");
        quantize_vector(&q, x, n);
        for (int i = 0; i < n; i++) {
            float d = q.d[i / GROUP_SIZE];
            checks++;
            if (q.q[i] == -128) failures++, fprintf(stderr, "FAIL quantize_vector: q = -128\n");
            if (isfinite(x[i]) && isfinite(d))
                expect("quantize_vector |x - d q|", n, i, 0, (double)d * q.q[i], x[i], d * 0.5001 + 1e-30);
        }
        for (int h = 0; h < n / 16; h++) {
            double sum = 0;
            for (int i = 0; i < 16; i++) sum += q.q[16 * h + i];
            expect("quantize_vector half sums", n, h, 0, q.half_sums[h], sum, 0);
        }
        for (int g = 0; g < n / GROUP_SIZE; g++)
            expect("quantize_vector group sums", n, g, 0, q.group_sums[g], q.half_sums[2 * g] + q.half_sums[2 * g + 1], 0);
        /* the second part: x ~ d q + d' q', d' at most d / 254, within d' / 2 */
        QuantizedVector rest;
        alloc_quantized(&rest, n, "rest");
        quantize_remainder(&rest, x, &q, n);
        for (int i = 0; i < n; i++) {
            float d = q.d[i / GROUP_SIZE], d2 = rest.d[i / GROUP_SIZE];
            if (!isfinite(x[i]) || !isfinite(d) || !isfinite(d2)) continue;
            expect("quantize_remainder d'", n, i, 0, d2, 0.0, d / 254.0 * 1.0001 + 1e-30);
            expect("quantize_remainder |x - d q - d' q'|", n, i, 0, (double)d * q.q[i] + (double)d2 * rest.q[i], x[i],
                   d2 * 0.5001 + 1e-6 * fabs(x[i]) + 1e-30);
        }
        free_quantized(&rest);
#if HAVE_AVX2
        /* the 16-bit part of the AVX2 q8_0 products: x ~ wide_d wide, wide_d = max|x| / 32767, within wide_d / 2
           and the rounding of x / wide_d (up to 32767 units of 2^-24 each for x and 1 / wide_d: 0.004) */
        ProductScratch ps = alloc_products(1, n);
        quantize_input_wide(&ps, x, 1, n);
        for (int g = 0; g < n / GROUP_SIZE; g++) {
            double top = 0;
            for (int i = 0; i < GROUP_SIZE; i++) top = fmax(top, fabs(x[g * GROUP_SIZE + i]));
            if (isfinite(top)) expect("quantize_input_wide d", n, g, 0, ps.wide_d[g], top / 32767, top / 32767 * 1e-6 + 1e-30);
        }
        for (int i = 0; i < n; i++) {
            float d = ps.wide_d[i / GROUP_SIZE];
            checks++;
            if (ps.wide[i] < -32767) failures++, fprintf(stderr, "FAIL quantize_input_wide: %d\n", ps.wide[i]);
            if (isfinite(x[i]) && isfinite(d))
                expect("quantize_input_wide |x - d q|", n, i, 0, (double)d * ps.wide[i], x[i], d * 0.505 + 1e-30);
        }
        free_products(&ps);
#endif
        free(x);
        free_quantized(&q);
    }
}

/* The exact value of a q8_0 or q4_0 row times quantized x: integer sums
   per group, scaled in double. */
static double exact_grouped(const Matrix *w, int row, const QuantizedVector *x, double *magnitude) {
    int groups = w->cols / GROUP_SIZE;
    float deq[GROUP_SIZE];
    double sum = 0;
    *magnitude = 0;
    for (int g = 0; g < groups; g++) {
        dequantize_row(deq, w, row, g * GROUP_SIZE, GROUP_SIZE); // d * q exactly: q has 8 bits, d 11
        for (int i = 0; i < GROUP_SIZE; i++) {
            double term = (double)deq[i] * x->d[g] * x->q[g * GROUP_SIZE + i];
            sum += term;
            *magnitude += fabs(term);
        }
    }
    return sum;
}

#if HAVE_AVX2
/* Row r of w times q through the AVX2 kernel for one token (for q8_0 the
   same values in its 16-bit form: 256 q at d / 256). */
static float dot_grouped_avx2(const Matrix *w, int r, const QuantizedVector *q) {
    ProductScratch ps = alloc_products(1, w->cols);
    QuantizedVector own = ps.q;
    ps.q = *q, ps.n = 1;
    for (int i = 0; i < w->cols; i++) ps.wide[i] = (int16_t)(256 * q->q[i]);
    for (int g = 0; g < w->cols / GROUP_SIZE; g++) ps.wide_d[g] = q->d[g] / 256;
    float out;
    matmul_quantized_avx2(&out, 1, w, r, r + 1, &ps);
    ps.q = own;
    free_products(&ps);
    return out;
}
#endif

#if HAVE_AVX512
/* The AVX-512 one-token kernels for w's layout. */
AVX512 static float dot_q4_avx512_either(const Matrix *w, int r, const QuantizedVector *q) {
    return w->interleaved ? dot_q4_avx512(w, r, q, 1) : dot_q4_avx512(w, r, q, 0);
}
AVX512 static float dot_q8_both_avx512_either(const Matrix *w, int r, const QuantizedVector *q,
                                              const QuantizedVector *rest) {
    return w->interleaved ? dot_q8_both_avx512(w, r, q, rest, 1) : dot_q8_both_avx512(w, r, q, rest, 0);
}
#endif

static void test_dot_grouped(int type) {
    const char *name = type == WEIGHT_Q8_0 ? "q8_0" : "q4_0";
    for (int groups = 1; groups <= 70; groups += groups < 20 ? 1 : 7) {
        int n = groups * GROUP_SIZE;
        Matrix w = random_matrix(type, 3, n);
        float *x = random_floats(n);
        QuantizedVector q;
        alloc_quantized(&q, n, "q");
        quantize_vector(&q, x, n);
        for (int r = 0; r < w.rows; r++) {
            double mag, exact = exact_grouped(&w, r, &q, &mag), tol = 1e-5 * mag + 1e-30;
            char what[64];
            float got[3] = {0};
            int have[3] = {1, HAVE_AVX2, 0};
            if (type == WEIGHT_Q8_0) {
                got[0] = dot_q8_0(&w, r, &q);
            } else {
                got[0] = dot_q4_0(&w, r, &q);
#if HAVE_AVX512
                if (use_avx512) got[2] = dot_q4_avx512_either(&w, r, &q);
                have[2] = use_avx512;
#endif
            }
#if HAVE_AVX2
            got[1] = dot_grouped_avx2(&w, r, &q);
#endif
            const char *kinds[] = {"plain", "avx2", "avx512"};
            for (int k = 0; k < 3; k++) {
                if (!have[k]) continue;
                snprintf(what, sizeof what, "dot_%s_%s%s", name, kinds[k], gguf_layout ? " (GGUF blocks)" : "");
                expect(what, groups, r, 0, got[k], exact, tol);
            }
        }
        free_matrix(&w);
        free(x);
        free_quantized(&q);
    }
}

/* A q8_0 row times both parts of a q8_0 input, plain and (fused, on
   AVX-512) fast, against the exact sum: rows 0..2 of stretches of 8 groups
   and of tails. */
static void test_dot_q8_both(void) {
    for (int groups = 1; groups <= 70; groups += groups < 20 ? 1 : 7) {
        int n = groups * GROUP_SIZE;
        Matrix w = random_matrix(WEIGHT_Q8_0, 3, n);
        float *x = random_floats(n);
        QuantizedVector q, rest;
        alloc_quantized(&q, n, "q");
        alloc_quantized(&rest, n, "rest");
        quantize_vector(&q, x, n);
        quantize_remainder(&rest, x, &q, n);
        for (int r = 0; r < w.rows; r++) {
            double mag, mag_rest, exact = exact_grouped(&w, r, &q, &mag) + exact_grouped(&w, r, &rest, &mag_rest);
            double tol = 1e-5 * (mag + mag_rest) + 1e-30;
            expect("dot_q8_0 both parts", groups, r, 0, dot_q8_0(&w, r, &q) + dot_q8_0(&w, r, &rest), exact, tol);
#if HAVE_AVX512
            if (use_avx512) {
                float fused = dot_q8_both_avx512_either(&w, r, &q, &rest);
                expect(gguf_layout ? "dot_q8_both_avx512 (GGUF blocks)" : "dot_q8_both_avx512", groups, r, 0, fused,
                       exact, tol);
            }
#endif
        }
        free_matrix(&w);
        free(x);
        free_quantized(&q);
        free_quantized(&rest);
    }
}

/* ---- Matrix products, through the kernel tables */

/* out (n, rows) in double: x (n, cols) @ dequantized W^T, and the sums of
   magnitudes for the tolerance. */
static void exact_matmul(double *out, double *mag, const Matrix *w, const float *x, int n) {
    float *row = xcalloc(w->cols, sizeof(float), "row");
    for (int r = 0; r < w->rows; r++) {
        dequantize_row(row, w, r, 0, w->cols);
        for (int t = 0; t < n; t++) {
            out[(size_t)t * w->rows + r] = 0, mag[(size_t)t * w->rows + r] = 0;
            for (int c = 0; c < w->cols; c++) {
                double term = (double)row[c] * x[(size_t)t * w->cols + c];
                out[(size_t)t * w->rows + r] += term;
                mag[(size_t)t * w->rows + r] += fabs(term);
            }
        }
    }
    free(row);
}

/* Every row block of w through the table's kernel for its type, as
   linear() takes them, for a batch of n and for one token; each output
   against the exact product of the input as prepared (quantized, where
   the kernels take it so). */
/* The columns that a row of the type's blocks must fill: 256, 32 or any. */
static int block_width(int type) {
    return is_k_type(type) ? SUPER_BLOCK : type == WEIGHT_Q8_0 || type == WEIGHT_Q4_0 ? GROUP_SIZE : 1;
}

static void test_matmul(const char *table, int type) {
    const char *const *names = WEIGHT_NAMES;
    int shapes[][3] = {   // rows, cols, tokens
        {1, 32, 2}, {8, 64, 3}, {13, 96, 4}, {24, 544, 7}, {17, 1056, 5}, {9, 32, 1}, {40, 2048, 2},
        {70, 96, 9}, {5, 5, 2}, {16, 17, 3}, {11, 515, 8}, {8, 1030, 6},   // odd widths, the float types only
        {3, 256, 1}, {8, 256, 5}, {13, 512, 4}, {33, 768, 9}, {5, 1536, 3}, // widths of 256 blocks
        {9, 512, 8}, {40, 256, 6}, {31, 768, 12},
    };
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1];
        if (cols % block_width(type)) continue;
        Matrix w = random_matrix(type, rows, cols);
        for (int n = shapes[s][2]; n >= 1; n = n > 1 ? 1 : 0) {
            float *x = random_floats((size_t)n * cols), *out = random_floats((size_t)n * rows);
            float *xd = xcalloc((size_t)n * cols, sizeof(float), "xd");
            double *want = xcalloc((size_t)n * rows, sizeof(double), "want"), *mag = xcalloc((size_t)n * rows, sizeof(double), "mag");
            ProductScratch ps = alloc_products(n, cols);
            prepare_input(&ps, TYPE_BIT(type), x, n, cols);
            prepared_values(xd, &ps, &w, x, n, q8_wide());
            exact_matmul(want, mag, &w, xd, n);
            for (int r0 = 0; r0 < rows; r0 += ROW_BLOCK)
                kernels.matmul[type](out + r0, rows, &w, r0, r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows, &ps);
            char what[64];
            snprintf(what, sizeof what, "%s matmul %s%s, n = %d", table, names[type], gguf_layout ? " (GGUF blocks)" : "", n);
            for (int i = 0; i < n * rows; i++) expect(what, rows, cols, i, out[i], want[i], 1e-5 * mag[i] + 1e-30);
            free_products(&ps);
            free(x), free(out), free(xd), free(want), free(mag);
        }
        free_matrix(&w);
    }
}

/* Each token of a batch must come out of the table's kernel exactly as it
   does alone, so that a prompt's logits do not depend on -b: the input is
   the same either way (quantized alike for q8_0 and q4_0), and the kernels
   must sum it in the same order. */
static void test_batch_equals_one_token(const char *table, int type) {
    const char *const *names = WEIGHT_NAMES;
    int shapes[][3] = {{1, 32, 2}, {13, 96, 4}, {24, 544, 7}, {17, 1056, 5}, {40, 2048, 6}, {33, 288, 9},
                       {16, 17, 3}, {11, 515, 8}, {8, 1030, 6}, // odd widths, the float types only
                       {3, 256, 5}, {13, 512, 9}, {33, 768, 7}, // widths of 256 blocks
                       {8, 256, 6}, {40, 512, 8}, {9, 256, 12}, {31, 1024, 11}, {1, 512, 10}, {16, 256, 4}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1], n = shapes[s][2];
        if (cols % block_width(type)) continue;
        Matrix w = random_matrix(type, rows, cols);
        float *x = random_floats((size_t)n * cols), *batch = random_floats((size_t)n * rows);
        float *alone = random_floats(rows);
        ProductScratch ps = alloc_products(n, cols), one = alloc_products(1, cols);
        prepare_input(&ps, TYPE_BIT(type), x, n, cols);
        for (int r0 = 0; r0 < rows; r0 += ROW_BLOCK)
            kernels.matmul[type](batch + r0, rows, &w, r0, r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows, &ps);
        for (int t = 0; t < n; t++) {
            prepare_input(&one, TYPE_BIT(type), x + (size_t)t * cols, 1, cols);
            for (int r0 = 0; r0 < rows; r0 += ROW_BLOCK)
                kernels.matmul[type](alone + r0, rows, &w, r0, r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows, &one);
            char what[80];
            snprintf(what, sizeof what, "%s %s%s: token %d of a batch of %d against alone", table, names[type],
                     gguf_layout ? " (GGUF blocks)" : "", t, n);
            for (int r = 0; r < rows; r++) expect(what, rows, cols, r, batch[(size_t)t * rows + r], alone[r], 0);
        }
        free_products(&ps), free_products(&one);
        free(x), free(batch), free(alone);
        free_matrix(&w);
    }
}

/* w (rows <= 9) at the limits of its integer sums, every input +127 in
   even tokens and -127 in odd ones: a batch of n against the exact
   product, and each token against its product alone, bit for bit. */
static void test_extremes(const char *table, const Matrix *w, const char *limits, int n) {
    int rows = w->rows, cols = w->cols, type = w->type;
    float *x = xcalloc((size_t)n * cols, sizeof(float), "x"), *xd = xcalloc((size_t)n * cols, sizeof(float), "xd");
    float *batch = xcalloc((size_t)n * rows, sizeof(float), "batch"), alone[9];
    double *want = xcalloc((size_t)n * rows, sizeof(double), "want"), *mag = xcalloc((size_t)n * rows, sizeof(double), "mag");
    for (int t = 0; t < n; t++)
        for (int c = 0; c < cols; c++) x[(size_t)t * cols + c] = t % 2 ? -1.0f : 1.0f;
    ProductScratch ps = alloc_products(n, cols), one = alloc_products(1, cols);
    prepare_input(&ps, TYPE_BIT(type), x, n, cols);
    prepared_values(xd, &ps, w, x, n, q8_wide());
    exact_matmul(want, mag, w, xd, n);
    kernels.matmul[type](batch, rows, w, 0, rows, &ps);
    char what[120];
    snprintf(what, sizeof what, "%s %s%s at %s, n = %d", table, WEIGHT_NAMES[type],
             w->interleaved ? " (GGUF blocks)" : "", limits, n);
    for (int i = 0; i < n * rows; i++) expect(what, rows, cols, i, batch[i], want[i], 1e-5 * mag[i] + 1e-30);
    for (int t = 0; t < n; t++) {
        prepare_input(&one, TYPE_BIT(type), x + (size_t)t * cols, 1, cols);
        kernels.matmul[type](alone, rows, w, 0, rows, &one);
        snprintf(what, sizeof what, "%s %s%s at %s: token %d of %d against alone", table, WEIGHT_NAMES[type],
                 w->interleaved ? " (GGUF blocks)" : "", limits, t, n);
        for (int r = 0; r < rows; r++) expect(what, rows, cols, r, batch[(size_t)t * rows + r], alone[r], 0);
    }
    free_products(&ps), free_products(&one);
    free(x), free(xd), free(batch), free(want), free(mag);
}

/* K blocks at the limits of the integer sums: every weight bit set (4-bit
   15, 5-bit 31, 6-bit 63), so that the kernels' partial sums (int16 where
   they can be) reach their bounds. */
static void test_k_extremes(const char *table, int type, int n) {
    int rows = 9, cols = 512;
    size_t blocks = (size_t)rows * cols / SUPER_BLOCK, size = K_BLOCK_BYTES[type];
    uint8_t *bytes = xcalloc(blocks * size, 1, "test data");
    memset(bytes, 0xff, blocks * size);
    for (size_t i = 0; i < blocks; i++) { // d (and dmin) 1, as f16
        uint16_t one = 0x3c00;
        memcpy(bytes + i * size + (type == WEIGHT_Q6_K ? 208 : 0), &one, 2);
        if (type != WEIGHT_Q6_K) memcpy(bytes + i * size + 2, &one, 2);
    }
    Matrix w = {.rows = rows, .cols = cols, .type = type, .values = bytes};
    test_extremes(table, &w, "the integer limits", n);
    free(bytes);
}

/* q8_0 and q4_0 rows at the limits of the integer sums: even rows' weights
   q8_0 127 (q4_0 nibbles 15), odd rows' -127 (nibbles 0, weights -8), in
   9 groups (a block of 8 and one more), each scale 1, in our layout or
   GGUF's blocks. */
static void test_q_extremes(const char *table, int type, int n) {
    int rows = 9, cols = 9 * GROUP_SIZE, bytes = type == WEIGHT_Q8_0 ? cols : cols / 2;
    uint8_t *values = xcalloc((size_t)rows * bytes, 1, "test data");
    uint16_t *scales = xcalloc((size_t)rows * cols / GROUP_SIZE, sizeof(uint16_t), "test data");
    for (int r = 0; r < rows; r++) {
        int fill = type == WEIGHT_Q8_0 ? (r % 2 ? 0x81 : 0x7f) : (r % 2 ? 0x00 : 0xff);
        memset(values + (size_t)r * bytes, fill, bytes);
    }
    for (int g = 0; g < rows * cols / GROUP_SIZE; g++) scales[g] = 0x3c00;
    Matrix w = {.rows = rows, .cols = cols, .type = type, .values = values, .scales = (const uint8_t *)scales};
    Matrix il = interleaved_copy(&w);
    test_extremes(table, &w, "the integer limits", n);
    test_extremes(table, &il, "the integer limits", n);
    free_matrix(&il), free_matrix(&w);
}

/* A batch product of f32, bf16 or f16 weights (gemm_rows() or a CPU's own,
   with the prepare kernel it reads the input through, if any): every
   output against the exact product, and bit for bit what one token's
   product gives for its row alone, the order every fast float kernel
   keeps. */
static void test_gemm_rows(const char *kind, MatmulKernel *gemm, InputKernel *prepare) {
    const char *const *names = WEIGHT_NAMES;
    int shapes[][3] = {{8, 64, 3}, {13, 96, 4}, {24, 544, 7}, {17, 1056, 5}, {16, 17, 3}, {11, 515, 8},
                       {8, 8, 1}, {32, 40, 2}, {8, 7, 6}, {9, 1031, 4}, {32, 2048, 5},
                       {14, 4100, 70}}; // tokens in chunks of 28 (GEMM_CHUNK_BYTES), columns in 5 passes
    static const int types[] = {WEIGHT_F32, WEIGHT_BF16, WEIGHT_F16};
    for (int k = 0; k < 3; k++)
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
            int type = types[k], rows = shapes[s][0], cols = shapes[s][1], n = shapes[s][2];
            if (prepare && n < 2) continue; // a prepared input is a batch's: one token's product reads x as it is
            Matrix w = random_matrix(type, rows, cols);
            float *x = random_floats((size_t)n * cols), *out = random_floats((size_t)n * rows);
            double *want = xcalloc((size_t)n * rows, sizeof(double), "want"), *mag = xcalloc((size_t)n * rows, sizeof(double), "mag");
            ProductScratch ps = alloc_products(n, cols);
            ps.x = x, ps.n = n;
            if (prepare) prepare(&ps, x, n, cols);
            exact_matmul(want, mag, &w, x, n);
            for (int r0 = 0; r0 < rows; r0 += ROW_BLOCK)
                gemm(out + r0, rows, &w, r0, r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows, &ps);
            char what[64];
            snprintf(what, sizeof what, "gemm_rows %s %s", names[type], kind);
            for (int i = 0; i < n * rows; i++) expect(what, rows, cols, i, out[i], want[i], 1e-5 * mag[i] + 1e-30);
            snprintf(what, sizeof what, "gemm_rows %s %s against one token", names[type], kind);
            for (int t = 0; t < n; t++)
                for (int r = 0; r < rows; r++) {
                    float one = dot_one_row(&w, r, x + (size_t)t * cols);
                    expect(what, rows, cols, t * rows + r, out[(size_t)t * rows + r], one, 0);
                }
            free_products(&ps);
            free_matrix(&w);
            free(x), free(out), free(want), free(mag);
        }
}

/* bf16 and f16 products are those of f32 weights of the same values, bit
   for bit, through the table's kernels, one token and a batch: widening is
   exact, and each table's float kernels sum in one order. */
static void test_floats_as_f32(const char *table) {
    static const int types[] = {WEIGHT_BF16, WEIGHT_F16};
    int shapes[][3] = {{8, 64, 3}, {13, 96, 4}, {16, 17, 3}, {11, 515, 8}, {5, 5, 2}, {33, 2100, 5}, {40, 1031, 4}};
    for (int k = 0; k < 2; k++)
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
            int type = types[k], rows = shapes[s][0], cols = shapes[s][1];
            Matrix w = random_matrix(type, rows, cols), wide = {.rows = rows, .cols = cols, .type = WEIGHT_F32};
            float *values = xcalloc((size_t)rows * cols, sizeof(float), "widened");
            for (int r = 0; r < rows; r++) dequantize_row(values + (size_t)r * cols, &w, r, 0, cols);
            wide.values = values;
            for (int n = shapes[s][2]; n >= 1; n = n > 1 ? 1 : 0) {
                float *x = random_floats((size_t)n * cols), *got = random_floats((size_t)n * rows);
                float *want = random_floats((size_t)n * rows);
                ProductScratch ps = alloc_products(n, cols);
                prepare_input(&ps, TYPE_BIT(type) | TYPE_BIT(WEIGHT_F32), x, n, cols);
                for (int r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
                    int r1 = r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows;
                    kernels.matmul[type](got + r0, rows, &w, r0, r1, &ps);
                    kernels.matmul[WEIGHT_F32](want + r0, rows, &wide, r0, r1, &ps);
                }
                checks++;
                if (memcmp(got, want, (size_t)n * rows * sizeof(float)) != 0 && ++failures <= 30)
                    fprintf(stderr, "FAIL %s matmul %s (%d, %d), n = %d: not the f32 product's bits\n", table,
                            WEIGHT_NAMES[type], rows, cols, n);
                free_products(&ps);
                free(x), free(got), free(want);
            }
            free(values);
            free_matrix(&w);
        }
}

#if HAVE_AVX2
/* The AVX2 q8_0 and q4_0 kernels in their tiles (4 rows x 3 tokens, rows
   and tokens left over) and their batches (slices of 8 rows, tiles of 5
   tokens, from 5 tokens on): every output against the exact product, and equal
   bit for bit to the same token's product alone (n = 1) and to its row's
   computed in blocks of other sizes, as linear() may cut them. */
static void test_quantized_tiles(int type) {
    const char *name = type == WEIGHT_Q8_0 ? "q8_0" : "q4_0";
    int shapes[][2] = {{1, 1}, {2, 3}, {3, 8}, {4, 9}, {5, 17}, {7, 24}, {9, 2}, {13, 33}, {32, 16}, {37, 70}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
        for (int n = 1; n <= 12; n++) {
            int rows = shapes[s][0], cols = shapes[s][1] * GROUP_SIZE;
            Matrix w = random_matrix(type, rows, cols);
            float *x = random_floats((size_t)n * cols), *xd = xcalloc((size_t)n * cols, sizeof(float), "xd");
            float *out = random_floats((size_t)n * rows), *alone = random_floats(rows), *cut = random_floats(rows);
            double *want = xcalloc((size_t)n * rows, sizeof(double), "want"), *mag = xcalloc((size_t)n * rows, sizeof(double), "mag");
            ProductScratch ps = alloc_products(n, cols);
            prepare_input(&ps, TYPE_BIT(type), x, n, cols);
            quantize_input_wide(&ps, x, n, cols); // q8_0's input as the AVX2 kernels take it
            prepared_values(xd, &ps, &w, x, n, 1);
            exact_matmul(want, mag, &w, xd, n);
            for (int r0 = 0; r0 < rows; r0 += ROW_BLOCK)
                matmul_quantized_avx2(out + r0, rows, &w, r0, r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows, &ps);
            char what[64];
            snprintf(what, sizeof what, "matmul_quantized_avx2 %s%s, n = %d", name, gguf_layout ? " (GGUF blocks)" : "", n);
            for (int i = 0; i < n * rows; i++) expect(what, rows, cols, i, out[i], want[i], 1e-5 * mag[i] + 1e-30);
            for (int t = 0; t < n; t++) {
                ProductScratch one = ps;
                one.n = 1;
                one.q = quantized_row(&ps.q, t, cols), one.rest = quantized_row(&ps.rest, t, cols);
                one.wide = ps.wide + (size_t)t * cols, one.wide_d = ps.wide_d + (size_t)t * (cols / GROUP_SIZE);
                matmul_quantized_avx2(alone, 1, &w, 0, rows, &one);
                for (int r0 = 0, size = 1; r0 < rows; r0 += size, size = size % 7 + 1) // blocks of 1, 2, .. 7 rows
                    matmul_quantized_avx2(cut + r0, 1, &w, r0, r0 + size < rows ? r0 + size : rows, &one);
                checks += 2;
                for (int r = 0; r < rows; r++) {
                    float got = out[(size_t)t * rows + r];
                    if (memcmp(&got, &alone[r], 4) != 0 && ++failures <= 30)
                        fprintf(stderr, "FAIL %s, row %d, token %d: %.9g in the batch, %.9g alone\n", what, r, t, got, alone[r]);
                    if (memcmp(&cut[r], &alone[r], 4) != 0 && ++failures <= 30)
                        fprintf(stderr, "FAIL %s, row %d, token %d: %.9g in blocks of 1 to 7 rows, %.9g in one\n", what, r, t, cut[r], alone[r]);
                }
            }
            free_products(&ps);
            free_matrix(&w);
            free(x), free(xd), free(out), free(alone), free(cut), free(want), free(mag);
        }
}
#endif

/* linear() of three matrices equals three separate products, bit for bit,
   and gate_up() equals two products and swiglu(). */
static void test_fused(int type, int n) {
    int cols = is_k_type(type) ? 512 : 96, rows[3] = {40, 16, 24};
    Matrix w[3];
    float *x = random_floats((size_t)n * cols), *fused[3], *single[3];
    ProductScratch ps = alloc_products(n, cols);
    Product p[3];
    for (int i = 0; i < 3; i++) {
        w[i] = random_matrix(type, rows[i], cols);
        fused[i] = random_floats((size_t)n * rows[i]);
        single[i] = random_floats((size_t)n * rows[i]);
        p[i] = (Product){fused[i], &w[i]};
    }
    linear(p, 3, x, n, &ps);
    for (int i = 0; i < 3; i++) {
        Product one = {single[i], &w[i]};
        linear(&one, 1, x, n, &ps);
        checks++;
        if (memcmp(fused[i], single[i], (size_t)n * rows[i] * sizeof(float)) != 0 && ++failures)
            fprintf(stderr, "FAIL linear() of three differs from one at a time for matrix %d, type %d, n %d\n", i, type, n);
    }
    Matrix w3 = random_matrix(type, rows[0], cols);
    float *up2 = random_floats((size_t)n * rows[0]);
    gate_up(fused[0], &w[0], &w3, x, n, &ps);
    Product gate = {single[0], &w[0]}, up = {up2, &w3};
    linear(&gate, 1, x, n, &ps);
    linear(&up, 1, x, n, &ps);
    kernels.swiglu(single[0], up2, n * rows[0]);
    checks++;
    if (memcmp(fused[0], single[0], (size_t)n * rows[0] * sizeof(float)) != 0 && ++failures)
        fprintf(stderr, "FAIL gate_up() differs from linear() and swiglu(), type %d, n %d\n", type, n);
    for (int i = 0; i < 3; i++) free_matrix(&w[i]), free(fused[i]), free(single[i]);
    free_matrix(&w3);
    free(x), free(up2);
    free_products(&ps);
}

/* ---- Attention and the f16 cache */

static void test_f16_store(void) {
    for (uint32_t h = 0; h < 65536; h++) { // every half survives the round trip
        float f = f16_to_f32((uint16_t)h);
        if (isnan(f)) continue;
        expect("f32_to_f16(f16_to_f32(h))", (int)h, 0, 0, f32_to_f16(f), h, 0);
    }
    for (int i = 0; i < 200000; i++) { // random floats of every magnitude, and the halfway points
        uint32_t bits = next_u32();
        if (i % 4 == 0) bits = (bits & 0x8000ffffu) | (uint32_t)(0x33 + below(0x47 - 0x33 + 1)) << 23; // near half's range
        if (i % 4 == 1) bits = (bits & 0xffffe000u) | 0x1000;                                              // exact ties
        float f;
        memcpy(&f, &bits, sizeof f);
        if (isnan(f)) continue;
        uint16_t got = f32_to_f16(f);
        /* the nearest half, ties to even, by search */
        float g = f16_to_f32(got);
        uint16_t up = (uint16_t)(got + 1), down = (uint16_t)(got - 1);
        int ok = 1;
        if (isfinite(g) && (got & 0x7fff) != 0x7bff) {
            float gu = f16_to_f32(up);
            if (fabs((double)gu - f) < fabs((double)g - f) ||
                (fabs((double)gu - f) == fabs((double)g - f) && (got & 1))) ok = 0;
        }
        if ((got & 0x7fff) != 0 && isfinite(g)) {
            float gd = f16_to_f32(down);
            if (fabs((double)gd - f) < fabs((double)g - f) ||
                (fabs((double)gd - f) == fabs((double)g - f) && (got & 1))) ok = 0;
        }
        if (isinf(g) && fabs((double)f) < 65520.0) ok = 0;
        checks++;
        if (!ok && ++failures <= 30) fprintf(stderr, "FAIL f32_to_f16(%.9g) = 0x%04x (%g)\n", f, got, g);
#if HAVE_AVX2
        checks++;
        uint16_t hw = _cvtss_sh(f, 0);
        if (hw != got && ++failures <= 30) fprintf(stderr, "FAIL f32_to_f16(%.9g) = 0x%04x, F16C says 0x%04x\n", f, got, hw);
#endif
    }
    uint16_t halves[37];
    float wide[37];
    for (int i = 0; i < 37; i++) halves[i] = random_f16();
    widen_f16(wide, halves, 37);
    for (int i = 0; i < 37; i++) expect("widen_f16", i, 0, 0, wide[i], f16_to_f32(halves[i]), 0);
    /* the table's to_halves(), vector loop and tail: f32_to_f16()'s halves
       for every kind of float, NaNs of any payload and sign included */
    int n = 100003;
    float *x = xcalloc(n, sizeof(float), "floats");
    uint16_t *got = xcalloc(n, sizeof(uint16_t), "halves");
    for (int i = 0; i < n; i++) {
        uint32_t bits = next_u32();
        if (i % 4 == 0) bits = (bits & 0x8000ffffu) | (uint32_t)(0x33 + below(0x47 - 0x33 + 1)) << 23;
        if (i % 4 == 1) bits = (bits & 0xffffe000u) | 0x1000;
        if (i % 8 == 2) bits |= 0x7f800000u; // inf and NaNs
        memcpy(&x[i], &bits, sizeof bits);
    }
    kernels.to_halves(got, x, n);
    for (int i = 0; i < n; i++) expect("to_halves", i, 0, 0, got[i], f32_to_f16(x[i]), 0);
    free(x), free(got);
}

/* exp_nonpositive() against exp() in double: within 2e-7 relative (what
   expf() rounds to, about) down to -87, and below it at most 2e-38. */
static void test_exp(void) {
    for (int i = 0; i <= 200000; i++) {
        float x = i < 200000 ? -100.0f * (float)i / 200000 : -INFINITY, w[1] = {x};
        exp_sum(w, 1, 0.0f);
        double want = exp((double)x);
        expect("exp_nonpositive", i, 0, 0, w[0], want, x >= -87.0f ? 2e-7 * want : 2e-38);
    }
}

/* The fast table's RMSNorm against the book's rmsnorm(): within 2 float
   roundings of each output (their scales may round apart), rows of every
   length up to 70 and one of 4100, values up to 1e30 (the double sums). */
static void test_rmsnorm(void) {
    for (int dim = 1; dim <= 4100; dim = dim < 70 ? dim + 1 : 4100) {
        int n = 3;
        float *x = random_floats((size_t)n * dim), *weight = random_floats(dim);
        float *want = xcalloc((size_t)n * dim, sizeof(float), "want"), *got = xcalloc((size_t)n * dim, sizeof(float), "got");
        for (int i = 0; i < dim; i++) x[dim + i] *= 1e30f, x[2 * dim + i] *= 1e-30f;
        rmsnorm(want, x, weight, n, dim, 1e-5f);
        kernels.rmsnorm(got, x, weight, n, dim, 1e-5f);
        for (int i = 0; i < n * dim; i++) expect("rmsnorm", dim, i / dim, i % dim, got[i], want[i], 2.4e-7 * fabs(want[i]));
        free(x), free(weight), free(want), free(got);
        if (dim == 4100) break;
    }
}

/* The fast table's SwiGLU, silu(g) * up, against double for g from -100 to
   100 (the vector loop and its tail alike): within 4e-7 (the exp's 1e-7
   and four roundings), where g < -87 within 4e-36 (exp_nonpositive()
   stops at exp(-87)); inf stays inf, and NaN NaN. */
static void test_swiglu(void) {
    int n = 400001;
    float *gate = xcalloc(n + 3, sizeof(float), "gate"), *up = xcalloc(n + 3, sizeof(float), "up");
    for (int i = 0; i < n; i++) gate[i] = -100.0f + 200.0f * (float)i / (float)(n - 1), up[i] = 1.0f + 0.5f * uniform();
    gate[n] = INFINITY, gate[n + 1] = NAN, gate[n + 2] = -NAN, up[n] = up[n + 1] = up[n + 2] = 1;
    float *result = xcalloc(n + 3, sizeof(float), "result");
    memcpy(result, gate, (size_t)(n + 3) * sizeof(float));
    kernels.swiglu(result, up, n + 3);
    for (int i = 0; i < n; i++) {
        double g = gate[i], want = g / (1 + exp(-g)) * up[i];
        expect("swiglu", i, 0, 0, result[i], want, 4e-7 * fabs(want) + 4e-36);
    }
    checks++;
    if (!(isinf(result[n]) && result[n] > 0 && isnan(result[n + 1]) && isnan(result[n + 2])) && ++failures <= 30)
        fprintf(stderr, "FAIL swiglu: inf, NaN, -NaN gave %g %g %g\n", result[n], result[n + 1], result[n + 2]);
    free(gate), free(up), free(result);
}

/* attention_scores8_rows() and attention_mix_add_rows() for nq rows of a
   span of n positions: each row to the bit what attention_scores8() and
   attention_mix_add() give it alone, the rows seeing n or fewer positions
   (in order, as attention_chunk() hands them over). */
static void attention_rows_as_one(const float *span, int n, int hd, float scale, int nq) {
    float *q[3], *weights[3], scores[3][8], alone[8], out[3][128], before[128], want[128];
    int seen[3];
    for (int r = 0; r < nq; r++) q[r] = random_floats(hd), weights[r] = random_floats(n);
    for (int r = nq - 1; r >= 0; r--) seen[r] = r == nq - 1 ? n : below(seen[r + 1] + 1);
    for (int j = 0; j < n; j += 8) {
        float *at[3] = {scores[0], scores[1], scores[2]};
        attention_scores8_rows(at, (const float *const *)q, span + (size_t)j * hd, hd, scale, nq);
        for (int r = 0; r < nq; r++) {
            attention_scores8(alone, q[r], span + (size_t)j * hd, hd, scale);
            for (int p = j; p < j + 8 && p < n; p++)
                expect("attention_scores8_rows", hd, nq * 100 + r, p, scores[r][p - j], alone[p - j], 0);
        }
    }
    for (int i = 0; i < hd; i++) before[i] = uniform();
    float *outs[3] = {out[0], out[1], out[2]};
    for (int r = 0; r < nq; r++) memcpy(out[r], before, (size_t)hd * sizeof(float));
    attention_mix_add_rows(outs, (const float *const *)weights, span, seen, hd, nq);
    for (int r = 0; r < nq; r++) {
        memcpy(want, before, (size_t)hd * sizeof(float));
        if (seen[r] > 0) attention_mix_add(want, weights[r], span, seen[r], hd);
        for (int i = 0; i < hd; i++) expect("attention_mix_add_rows", hd, nq * 100 + seen[r], i, out[r][i], want[i], 0);
    }
    for (int r = 0; r < nq; r++) free(q[r]), free(weights[r]);
}

/* The pieces of attention_fast() for one head: a span of the cache widened,
   eight scores, softmax's exp and sum, the mix, against double sums. */
static void test_attention_kernels(void) {
    int head_dims[] = {6, 8, 16, 48, 64, 72, 128};
    for (size_t h = 0; h < sizeof head_dims / sizeof *head_dims; h++)
        for (int n = 1; n <= 40; n += 3) {
            int hd = head_dims[h], p0 = below(5);
            size_t rows = (size_t)(p0 + n + 8), len = rows * hd;
            float scale = 1.0f / sqrtf((float)hd), scores[8], out[128], before[128];
            float *q = random_floats(hd), *keys = random_floats(len), *weights = random_floats(n);
            float *span = random_floats(rows * hd), *exact = xcalloc(len, sizeof(float), "exact");
            uint16_t *keys16 = xcalloc(len, 2, "keys");
            for (size_t i = 0; i < len; i++) keys16[i] = f32_to_f16(keys[i]);
            for (int f16 = 0; f16 < 2; f16++) {
                char what[64];
                for (size_t i = 0; i < len; i++) exact[i] = f16 ? f16_to_f32(keys16[i]) : keys[i];
                widen_span(span, f16 ? (void *)keys16 : keys, p0, n, hd, f16);
                for (int p = 0; p < (n + 7) / 8 * 8; p++)
                    for (int i = 0; i < hd; i++)
                        expect(f16 ? "widen_span f16" : "widen_span", hd, p, i, span[(size_t)p * hd + i],
                               p < n ? exact[(size_t)(p0 + p) * hd + i] : 0, 0);
                for (int j = 0; j < n; j += 8) {
                    attention_scores8(scores, q, span + (size_t)j * hd, hd, scale);
                    for (int p = j; p < j + 8 && p < n; p++) {
                        double want = 0;
                        for (int i = 0; i < hd; i++) want += (double)q[i] * span[(size_t)p * hd + i];
                        snprintf(what, sizeof what, "attention_scores8%s", f16 ? " f16" : "");
                        expect(what, hd, n, p, scores[p - j], scale * want,
                               1e-5 * scale * abs_dot(q, span + (size_t)p * hd, hd) + 1e-30);
                    }
                }
                for (int i = 0; i < hd; i++) out[i] = before[i] = uniform();
                attention_mix_add(out, weights, span, n, hd);
                for (int i = 0; i < hd; i++) {
                    double want = before[i], mag = fabs(before[i]);
                    for (int p = 0; p < n; p++) {
                        want += (double)weights[p] * span[(size_t)p * hd + i];
                        mag += fabs((double)weights[p] * span[(size_t)p * hd + i]);
                    }
                    expect("attention_mix_add", hd, n, i, out[i], want, 1e-5 * mag + 1e-30);
                }
                for (int nq = 2; nq <= 3; nq++) attention_rows_as_one(span, n, hd, scale, nq);
            }
            float w[40], max = -INFINITY;
            double sum = 0;
            for (int p = 0; p < n; p++) w[p] = weights[p] * 30, max = w[p] > max ? w[p] : max;
            for (int p = 0; p < n; p++) sum += exp((double)w[p] - max);
            expect("exp_sum", n, 0, 0, exp_sum(w, n, max), sum, 1e-6 * sum);
            free(q), free(keys), free(weights), free(span), free(exact), free(keys16);
        }
}

/* The table's attention() for n queries at positions pos .. pos + n - 1 of
   a cache of ctx positions, against softmax(q k^T / sqrt(head_dim)) v in
   double, within 1e-5 of the sum of |weight * value| (+ 1e-7). Shapes: MHA,
   GQA and MQA, queries and positions that cross attention_fast()'s chunks
   and query blocks, head_dim that AVX-512's lanes take whole (64, 128), in
   part (80, 48) or not (72). The fast table's result must also be the same, to the
   bit, for each query alone and with one thread. */
static void test_attention(const char *table) {
    int shapes[][6] = {
        // head_dim, n, pos, ctx, heads, kv heads
        {16, 1, 0, 8, 6, 2},      {64, 5, 3, 40, 6, 2},     {72, 20, 0, 20, 6, 2},  {128, 3, 30, 40, 6, 2},
        {64, 40, 0, 40, 6, 2},    {64, 1, 300, 400, 9, 3},  {64, 20, 120, 300, 9, 3}, {72, 9, 250, 260, 4, 4},
        {6, 70, 200, 300, 3, 1},  {8, 1, 511, 512, 2, 1},   {48, 17, 255, 300, 8, 2}, {128, 45, 100, 200, 4, 4},
        {80, 50, 90, 160, 2, 1},
    };
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
        for (int f16 = 0; f16 < 2; f16++) {
            int hd = shapes[s][0], n = shapes[s][1], pos = shapes[s][2], ctx = shapes[s][3], heads = shapes[s][4];
            int kv_heads = shapes[s][5];
            size_t cache = (size_t)kv_heads * ctx * hd, q_dim = (size_t)heads * hd;
            int threads = 1;
#ifdef _OPENMP
            threads = omp_get_max_threads();
#endif
            float *q = random_floats(n * q_dim), *out = random_floats(n * q_dim), *k = random_floats(cache);
            float *v = random_floats(cache), *again = random_floats(n * q_dim);
            size_t plain = attention_plain_scratch(ctx, heads, hd, threads);
            size_t fast = attention_fast_scratch(ctx, heads, hd, threads);
            float *scratch = xcalloc(plain > fast ? plain : fast, sizeof(float), "scratch");
            uint16_t *k16 = xcalloc(cache, 2, "k16"), *v16 = xcalloc(cache, 2, "v16");
            for (size_t i = 0; i < cache && f16; i++) { // the exact result is then that of the rounded cache
                k16[i] = f32_to_f16(k[i]), v16[i] = f32_to_f16(v[i]);
                k[i] = f16_to_f32(k16[i]), v[i] = f16_to_f32(v16[i]);
            }
            KVCache kv = {f16 ? (void *)k16 : k, f16 ? (void *)v16 : v, f16, ctx, heads, kv_heads, hd};
            kernels.attention(out, q, &kv, pos, n, scratch);
            char what[64];
            snprintf(what, sizeof what, "%s attention%s", table, f16 ? " f16" : "");
            double *w = xcalloc(ctx, sizeof(double), "w");
            for (int t = 0; t < n; t++)
                for (int h = 0; h < heads; h++) {
                    const float *qh = q + t * q_dim + (size_t)h * hd;
                    size_t head = (size_t)(h / (heads / kv_heads)) * ctx * hd;
                    double max = -INFINITY, sum = 0;
                    for (int p = 0; p <= pos + t; p++) {
                        w[p] = 0;
                        for (int i = 0; i < hd; i++) w[p] += (double)qh[i] * k[head + (size_t)p * hd + i];
                        w[p] /= sqrt(hd);
                        max = w[p] > max ? w[p] : max;
                    }
                    for (int p = 0; p <= pos + t; p++) sum += w[p] = exp(w[p] - max);
                    for (int i = 0; i < hd; i++) {
                        double exact = 0, mag = 0;
                        for (int p = 0; p <= pos + t; p++) {
                            exact += w[p] / sum * v[head + (size_t)p * hd + i];
                            mag += w[p] / sum * fabs(v[head + (size_t)p * hd + i]);
                        }
                        expect(what, hd, t, h * hd + i, out[t * q_dim + (size_t)h * hd + i], exact, 1e-5 * mag + 1e-7);
                    }
                }
            if (!strcmp(table, "fast")) {
                for (int t = 0; t < n; t++) // each query alone
                    kernels.attention(again + t * q_dim, q + t * q_dim, &kv, pos + t, 1, scratch);
                checks++;
                if (memcmp(again, out, n * q_dim * sizeof(float)) && ++failures <= 30)
                    fprintf(stderr, "FAIL %s: a query alone differs from the batch (shape %zu)\n", what, s);
#ifdef _OPENMP
                omp_set_num_threads(1);
                kernels.attention(again, q, &kv, pos, n, scratch);
                omp_set_num_threads(threads);
                checks++;
                if (memcmp(again, out, n * q_dim * sizeof(float)) && ++failures <= 30)
                    fprintf(stderr, "FAIL %s: one thread differs from %d (shape %zu)\n", what, threads, s);
#endif
            }
            free(q), free(out), free(k), free(v), free(again), free(scratch), free(k16), free(v16), free(w);
        }
}

/* The same q8_0 or q4_0 numbers in our layout and in GGUF's blocks give
   the same outputs bit for bit through the table's kernel, one token and a
   batch: a GGUF mapped in place computes what its conversion does. */
static void test_layouts_agree(const char *table, int type) {
    int shapes[][3] = {{1, 32, 1}, {13, 96, 4}, {33, 288, 9}, {40, 2048, 5}, {7, 224, 1}, {70, 544, 3}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1], n = shapes[s][2];
        Matrix w = random_matrix(type, rows, cols), il = interleaved_copy(&w);
        float *x = random_floats((size_t)n * cols), *apart = random_floats((size_t)n * rows);
        float *blocks = random_floats((size_t)n * rows);
        ProductScratch ps = alloc_products(n, cols);
        prepare_input(&ps, TYPE_BIT(type), x, n, cols);
        for (int r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
            int r1 = r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows;
            kernels.matmul[type](apart + r0, rows, &w, r0, r1, &ps);
            kernels.matmul[type](blocks + r0, rows, &il, r0, r1, &ps);
        }
        checks++;
        if (memcmp(apart, blocks, (size_t)n * rows * sizeof(float)) != 0 && ++failures)
            fprintf(stderr, "FAIL %s %s (%d, %d), n %d: GGUF's blocks differ from our layout\n", table,
                    WEIGHT_NAMES[type], rows, cols, n);
        free_products(&ps);
        free_matrix(&w), free_matrix(&il);
        free(x), free(apart), free(blocks);
    }
}

int main(void) {
    Kernels plain = kernels;
    choose_fast_kernels();
    Kernels fast = kernels;
    int have_avx512 = 0;
#if HAVE_AVX512
    have_avx512 = use_avx512;
#endif
    printf("test_kernels: AVX2 %s, AVX-512 %s\n", HAVE_AVX2 ? "compiled" : "not compiled",
           have_avx512 ? "on this CPU" : "not used");
    test_f16();
    test_matvec_floats("portable", lanes8_fast);
    test_quantize_vector();
    for (gguf_layout = 0; gguf_layout < 2; gguf_layout++) {
        test_dot_grouped(WEIGHT_Q8_0);
        test_dot_grouped(WEIGHT_Q4_0);
        test_dot_q8_both();
    }
    test_gemm_rows("portable", gemm_rows, NULL);
#if HAVE_AVX2
    test_gemm_rows("avx2", gemm_rows_avx2, pack_input_avx2);
    test_matvec_floats("avx2", lanes8_avx2);
    for (gguf_layout = 0; gguf_layout < 2; gguf_layout++) {
        test_quantized_tiles(WEIGHT_Q8_0);
        test_quantized_tiles(WEIGHT_Q4_0);
    }
    gguf_layout = 0;
#endif
#if HAVE_AVX512
    if (have_avx512) test_gemm_rows("avx512", gemm_rows_avx512, NULL);
    if (have_avx512) test_matvec_floats("avx512", lanes8_avx512);
#endif
    for (int table = 0; table < 2; table++) {
        kernels = table ? fast : plain;
        for (int type = 0; type < WEIGHT_TYPES; type++) {
            test_matmul(table ? "fast" : "plain", type);
            test_batch_equals_one_token(table ? "fast" : "plain", type);
            for (int n = 1; n <= 4; n += 3) test_fused(type, n);
            for (int n = 2; n <= 7 && is_k_type(type); n += 5) test_k_extremes(table ? "fast" : "plain", type, n);
            for (int n = 1; n <= 11 && (type == WEIGHT_Q8_0 || type == WEIGHT_Q4_0); n += 5)
                test_q_extremes(table ? "fast" : "plain", type, n);
        }
        gguf_layout = 1; // q8_0 and q4_0 again, in GGUF's blocks
        for (int type = WEIGHT_Q8_0; type <= WEIGHT_Q4_0; type++) {
            test_matmul(table ? "fast" : "plain", type);
            test_batch_equals_one_token(table ? "fast" : "plain", type);
        }
        gguf_layout = 0;
        for (int type = WEIGHT_Q8_0; type <= WEIGHT_Q4_0; type++) test_layouts_agree(table ? "fast" : "plain", type);
        test_floats_as_f32(table ? "fast" : "plain");
        test_attention(table ? "fast" : "plain");
    }
    kernels = fast;
    test_f16_store();
    test_exp();
    test_swiglu();
    test_rmsnorm();
    test_attention_kernels();
    printf("test_kernels: %d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
