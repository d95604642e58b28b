/* peak.c: this machine's arithmetic peak, the roofline for prompts.

   ./peak [repeats]

   Runs, on every OpenMP thread at once, a loop of nothing but the
   instructions that run.c's prompt kernels spend their time in, with enough
   independent accumulators to hide their latency, and prints the median of
   the repeats, one line each, for what the CPU has:

     fma_gflops 123.4     f32 fused multiply-adds (vfmadd: 512-bit with
                          AVX-512F, else 256-bit with AVX2 and FMA)
     int8_gops 456.7      int8 dot products as the q8_0 and q4_0 kernels do
                          them: vpdpbusd on 512 bits with AVX-512 VNNI, else
                          vpmaddubsw, vpmaddwd and vpaddd on 256 bits

   A multiply-add counts as two operations, as in GFLOP/s. Each kernel is
   compiled for its instructions alone (target attributes) and chosen at run
   time from the CPU's features, so one binary measures what this CPU runs.
   On other architectures it measures nothing and says so. */

#include <stdio.h>
#include <stdlib.h>
#include "timing.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define ITERATIONS (1L << 22) // per thread and repeat: tens of milliseconds

/* A kernel runs iters iterations of ops operations each and returns a number
   that depends on all of them, so that the compiler keeps the work. */
typedef float Kernel(long iters);

/* Billions of operations per second on all threads: the median of repeats. */
static double measure(Kernel *kernel, double ops_per_iteration, int repeats) {
    double *rates = calloc(repeats, sizeof *rates), sink = 0;
    if (!rates) { perror("peak: calloc"); exit(1); }
    for (int r = 0; r < repeats; r++) {
        int threads = 1;
        double start = now_seconds();
        #pragma omp parallel reduction(+ : sink)
        {
#ifdef _OPENMP
            #pragma omp single
            threads = omp_get_num_threads();
#endif
            sink += kernel(ITERATIONS);
        }
        rates[r] = threads * ITERATIONS * ops_per_iteration / (now_seconds() - start) / 1e9;
    }
    qsort(rates, repeats, sizeof *rates, by_value);
    double median = rates[repeats / 2];
    fprintf(stderr, "peak: min %.1f max %.1f (checksum %g)\n", rates[0], rates[repeats - 1], sink);
    free(rates);
    return median;
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/* Inputs the compiler cannot see: the loops must do their arithmetic. */
static volatile float scale = 0.999999f, offset = 1e-7f;
static volatile char byte = 3;

#define ACC 12 // accumulators: more than an FMA's latency times its ports

__attribute__((target("avx2,fma"))) static float fma_avx2(long iters) {
    __m256 acc[ACC], a = _mm256_set1_ps(scale), b = _mm256_set1_ps(offset);
    for (int j = 0; j < ACC; j++) acc[j] = _mm256_set1_ps((float)j);
    for (long i = 0; i < iters; i++)
        for (int j = 0; j < ACC; j++) acc[j] = _mm256_fmadd_ps(acc[j], a, b);
    float s = 0;
    for (int j = 0; j < ACC; j++) s += _mm256_cvtss_f32(acc[j]);
    return s;
}

__attribute__((target("avx512f"))) static float fma_avx512(long iters) {
    __m512 acc[ACC], a = _mm512_set1_ps(scale), b = _mm512_set1_ps(offset);
    for (int j = 0; j < ACC; j++) acc[j] = _mm512_set1_ps((float)j);
    for (long i = 0; i < iters; i++)
        for (int j = 0; j < ACC; j++) acc[j] = _mm512_fmadd_ps(acc[j], a, b);
    float s = 0;
    for (int j = 0; j < ACC; j++) s += _mm512_reduce_add_ps(acc[j]);
    return s;
}

/* 32 byte products per step: maddubs pairs them into 16-bit sums, madd
   with ones into 32-bit sums, which add onto the accumulator. The empty asm
   makes the input new to the compiler at every step, so that it cannot
   compute the products once for all steps. */
__attribute__((target("avx2"))) static float int8_avx2(long iters) {
    __m256i acc[ACC], a = _mm256_set1_epi8(byte), b = _mm256_set1_epi8(-byte), ones = _mm256_set1_epi16(1);
    for (int j = 0; j < ACC; j++) acc[j] = _mm256_setzero_si256();
    for (long i = 0; i < iters; i++)
        for (int j = 0; j < ACC; j++) {
            __asm__ volatile("" : "+x"(a));
            acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
        }
    int s = 0;
    for (int j = 0; j < ACC; j++) s += _mm256_extract_epi32(acc[j], 0);
    return (float)s;
}

/* 64 byte products per step, summed in fours into 32-bit lanes. */
__attribute__((target("avx512f,avx512vnni"))) static float int8_vnni(long iters) {
    __m512i acc[ACC], a = _mm512_set1_epi8(byte), b = _mm512_set1_epi8(-byte);
    for (int j = 0; j < ACC; j++) acc[j] = _mm512_setzero_si512();
    for (long i = 0; i < iters; i++)
        for (int j = 0; j < ACC; j++) acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
    int s = 0;
    for (int j = 0; j < ACC; j++) s += _mm512_reduce_add_epi32(acc[j]);
    return (float)s;
}

int main(int argc, char **argv) {
    int repeats = argc > 1 ? atoi(argv[1]) : 5;
    if (repeats <= 0 || repeats > 1000) {
        fprintf(stderr, "usage: peak [repeats in 1..1000]\n");
        return 2;
    }
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f");
    if (avx512)
        printf("fma_gflops %.1f\n", measure(fma_avx512, ACC * 16 * 2, repeats));
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        printf("fma_gflops %.1f\n", measure(fma_avx2, ACC * 8 * 2, repeats));
    if (avx512 && __builtin_cpu_supports("avx512vnni"))
        printf("int8_gops %.1f\n", measure(int8_vnni, ACC * 64 * 2, repeats));
    else if (__builtin_cpu_supports("avx2"))
        printf("int8_gops %.1f\n", measure(int8_avx2, ACC * 32 * 2, repeats));
    fflush(stdout);
    return 0;
}

#else

int main(void) {
    (void)measure;
    fprintf(stderr, "peak: measures x86 vector units only; nothing measured here\n");
    return 0;
}

#endif
