/* avx512_emulation.h: run.c's AVX-512 kernels on any x86-64 CPU with AVX2,
   emulated, so that the tests check them on machines without AVX-512 (CI's).
   It proves their correctness only, never their speed: emulated, they run
   many times slower than the AVX2 kernels.

   make run-emu and make test-emu compile run.c (and tests/test_kernels.c,
   which includes it) with -march=x86-64-v3 and -include this file, which
   comes before run.c's first line and
   - includes SIMDe's AVX-512 (Debian: libsimde-dev) with its native
     aliases: _mm512_add_ps(a, b) becomes simde_mm512_add_ps(a, b), portable
     C and AVX2;
   - adds the intrinsics that SIMDe (0.7.4) lacks or computes otherwise than
     the CPU, one function each, below;
   - defines `target` away: run.c's __attribute__((target("avx512f,...")))
     become empty attributes, so the compiler emits no AVX-512 instruction
     (valgrind, which cannot execute any, runs ./run-emu);
   - makes __builtin_cpu_supports() say yes to the features emulated here,
     so that choose_fast_kernels() takes the AVX-512 kernels.
   No line of run.c changes for it; one macro of run.c, IN_REGISTER, is
   defined here first (below).

   Adding an intrinsic. When a kernel uses one that SIMDe lacks, the build
   stops at GCC's "inlining failed in call to 'always_inline' '_mm512_foo':
   target specific option mismatch" (clang's: "'__builtin_ia32_...' needs
   target feature avx512..."): the compiler's own _mm512_foo, which needs
   AVX-512. Write emu_mm512_foo() below, with the intrinsic's arguments,
   doing what the Intel Intrinsics Guide says it does: in plain C on the
   lanes (memcpy the vectors to arrays and back, as the functions below do)
   or on SIMDe's functions. Then map the name to it, in place of whatever
   the compiler's or SIMDe's headers define under it (a macro, for
   intrinsics that take an immediate):
       #undef _mm512_foo
       #define _mm512_foo emu_mm512_foo
   make test-emu then holds it to the plain kernels, and on a CPU with
   AVX-512, tests/test_emulation.py holds ./run-emu's logits to ./run's, bit
   for bit: that is where an intrinsic that SIMDe has but computes
   otherwise than the CPU shows; emulate it here too.
   New kernels must take their target attribute from run.c's AVX512 macros
   (`target`, not `__target__` or #pragma GCC target): test_emulation.py
   fails on any AVX-512 instruction left in ./run-emu. */

#ifndef AVX512_EMULATION_H
#define AVX512_EMULATION_H

#ifdef __AVX512F__
#error "avx512_emulation.h: this build has native AVX-512 (-march?), so it would emulate nothing"
#endif

#define _GNU_SOURCE // as run.c defines it (memmem), before the first system header
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <stdint.h>
#include <string.h>

/* ---- Lanes: a vector's elements copied to an array and back */

/* out = the n elements (of size bytes) at p whose bit in k is set, zero
   elsewhere. The others are not read, as the instruction does not touch
   them: a masked load may end past the end of a buffer. */
static inline void emu_masked_load(void *out, const void *p, uint64_t k, int n, size_t size) {
    memset(out, 0, (size_t)n * size);
    for (int i = 0; i < n; i++)
        if (k >> i & 1) memcpy((char *)out + i * size, (const char *)p + i * size, size);
}

/* The elements of in whose bit in k is set, written to p; the others are
   left as they are. */
static inline void emu_masked_store(void *p, const void *in, uint64_t k, int n, size_t size) {
    for (int i = 0; i < n; i++)
        if (k >> i & 1) memcpy((char *)p + i * size, (const char *)in + i * size, size);
}

/* ---- Masked loads and stores */

static inline __m512i emu_mm512_maskz_loadu_epi8(__mmask64 k, const void *p) {
    __m512i r;
    emu_masked_load(&r, p, k, 64, 1);
    return r;
}
#undef _mm512_maskz_loadu_epi8
#define _mm512_maskz_loadu_epi8 emu_mm512_maskz_loadu_epi8

static inline __m512i emu_mm512_maskz_loadu_epi16(__mmask32 k, const void *p) {
    __m512i r;
    emu_masked_load(&r, p, k, 32, 2);
    return r;
}
#undef _mm512_maskz_loadu_epi16
#define _mm512_maskz_loadu_epi16 emu_mm512_maskz_loadu_epi16

static inline __m512 emu_mm512_maskz_loadu_ps(__mmask16 k, const void *p) {
    __m512 r;
    emu_masked_load(&r, p, k, 16, 4);
    return r;
}
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps emu_mm512_maskz_loadu_ps

static inline void emu_mm512_mask_storeu_ps(void *p, __mmask16 k, __m512 a) {
    emu_masked_store(p, &a, k, 16, 4);
}
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps emu_mm512_mask_storeu_ps

static inline __m512i emu_mm512_maskz_loadu_epi32(__mmask16 k, const void *p) {
    __m512i r;
    emu_masked_load(&r, p, k, 16, 4);
    return r;
}
#undef _mm512_maskz_loadu_epi32
#define _mm512_maskz_loadu_epi32 emu_mm512_maskz_loadu_epi32

static inline __m256i emu_mm256_maskz_loadu_epi32(__mmask8 k, const void *p) {
    __m256i r;
    emu_masked_load(&r, p, k, 8, 4);
    return r;
}
#undef _mm256_maskz_loadu_epi32
#define _mm256_maskz_loadu_epi32 emu_mm256_maskz_loadu_epi32

static inline __m256 emu_mm256_maskz_loadu_ps(__mmask8 k, const void *p) {
    __m256 r;
    emu_masked_load(&r, p, k, 8, 4);
    return r;
}
#undef _mm256_maskz_loadu_ps
#define _mm256_maskz_loadu_ps emu_mm256_maskz_loadu_ps

static inline void emu_mm256_mask_storeu_ps(void *p, __mmask8 k, __m256 a) {
    emu_masked_store(p, &a, k, 8, 4);
}
#undef _mm256_mask_storeu_ps
#define _mm256_mask_storeu_ps emu_mm256_mask_storeu_ps

static inline __m128i emu_mm_maskz_loadu_epi16(__mmask8 k, const void *p) {
    __m128i r;
    emu_masked_load(&r, p, k, 8, 2);
    return r;
}
#undef _mm_maskz_loadu_epi16
#define _mm_maskz_loadu_epi16 emu_mm_maskz_loadu_epi16

/* ---- Conversions and moves */

/* 16 int32 to float, rounded to nearest even (C's conversion, in the
   default rounding mode, as the instruction's). */
static inline __m512 emu_mm512_cvtepi32_ps(__m512i a) {
    int32_t in[16];
    float out[16];
    __m512 r;
    memcpy(in, &a, sizeof in);
    for (int i = 0; i < 16; i++) out[i] = (float)in[i];
    memcpy(&r, out, sizeof r);
    return r;
}
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps emu_mm512_cvtepi32_ps

/* 16 halves to float, exactly: each half of a by F16C (x86-64-v3 has it). */
static inline __m512 emu_mm512_cvtph_ps(__m256i a) {
    __m128i halves[2];
    __m256 wide[2];
    __m512 r;
    memcpy(halves, &a, sizeof halves);
    for (int i = 0; i < 2; i++) wide[i] = _mm256_cvtph_ps(halves[i]);
    memcpy(&r, wide, sizeof r);
    return r;
}
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps emu_mm512_cvtph_ps

/* 16 uint16 widened to int32 with zeros. */
static inline __m512i emu_mm512_cvtepu16_epi32(__m256i a) {
    uint16_t in[16];
    int32_t out[16];
    __m512i r;
    memcpy(in, &a, sizeof in);
    for (int i = 0; i < 16; i++) out[i] = in[i];
    memcpy(&r, out, sizeof r);
    return r;
}
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 emu_mm512_cvtepu16_epi32

/* 16 int8 widened to int32 with their signs. */
static inline __m512i emu_mm512_cvtepi8_epi32(__m128i a) {
    int8_t in[16];
    int32_t out[16];
    __m512i r;
    memcpy(in, &a, sizeof in);
    for (int i = 0; i < 16; i++) out[i] = in[i];
    memcpy(&r, out, sizeof r);
    return r;
}
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32 emu_mm512_cvtepi8_epi32

/* The low (imm 0) or high (imm 1) 8 floats of a. */
static inline __m256 emu_mm512_extractf32x8_ps(__m512 a, int imm) {
    __m256 r;
    memcpy(&r, (const char *)&a + 32 * (imm & 1), sizeof r);
    return r;
}
#undef _mm512_extractf32x8_ps
#define _mm512_extractf32x8_ps emu_mm512_extractf32x8_ps

/* 128-bit blocks: 0 and 1 from a, 2 and 3 from b, each chosen by 2 bits of
   imm, block i by bits 2i, 2i + 1. */
static inline __m512i emu_mm512_shuffle_i64x2(__m512i a, __m512i b, int imm) {
    __m512i r;
    for (int i = 0; i < 4; i++)
        memcpy((char *)&r + 16 * i, (const char *)(i < 2 ? &a : &b) + 16 * (imm >> 2 * i & 3), 16);
    return r;
}
#undef _mm512_shuffle_i64x2
#define _mm512_shuffle_i64x2 emu_mm512_shuffle_i64x2

/* ---- The build's view of the CPU */

/* The CPU features that this file and SIMDe emulate, or that the build
   (-march=x86-64-v3) has natively. */
static inline int emu_cpu_supports(const char *feature) {
    static const char *const emulated[] = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni",
                                           "avx2", "fma", "f16c"};
    for (size_t i = 0; i < sizeof emulated / sizeof emulated[0]; i++)
        if (strcmp(feature, emulated[i]) == 0) return 1;
    return 0;
}
#define __builtin_cpu_supports emu_cpu_supports

/* __attribute__((target("avx512f,..."))) becomes __attribute__(()): the
   emulated kernels are compiled for the build's CPU. */
#define target(features)

/* run.c's hint that keeps a vector in a register: an emulated vector is a
   struct, which no register constraint takes. */
#define IN_REGISTER(v) ((void)(v))

#endif
