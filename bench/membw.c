/* membw.c: this machine's read bandwidth, the roofline for generation.

   ./membw [MiB] [repeats]

   Reads a buffer much larger than the last-level cache (default 1024 MiB)
   from every OpenMP thread at once, each thread its own contiguous share, as
   run.c's matrix-vector products read the weights. Prints the median of the
   repeats in GB/s (1e9 bytes per second) on one line: "read_gbps 51.3".

   The buffer is ordinary anonymous memory with 4 KiB pages, like the page
   cache that backs run.c's mapped checkpoint, and the loop is plain C that
   the compiler vectorises; summing integers keeps it exact without
   -ffast-math. It prefetches 4 KiB ahead, as run.c's kernels do: on this
   kind of machine that is worth as much as a second core, so a roofline
   measured without it would flatter them. */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "timing.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* Sum of n words, eight independent lanes so that the loop vectorises. */
static uint64_t sum_words(const uint64_t *p, size_t n) {
    uint64_t lanes[8] = {0};
    for (size_t i = 0; i + 8 <= n; i += 8) {
        __builtin_prefetch(p + i + 512);
        for (int j = 0; j < 8; j++) lanes[j] += p[i + j];
    }
    uint64_t s = 0;
    for (int j = 0; j < 8; j++) s += lanes[j];
    return s;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 1024;
    int repeats = argc > 2 ? atoi(argv[2]) : 7;
    if (mib == 0 || repeats <= 0 || repeats > 1000) {
        fprintf(stderr, "usage: membw [MiB > 0] [repeats in 1..1000]\n");
        return 2;
    }
    size_t n = mib << 17; // words of 8 bytes
    uint64_t *buf = malloc(n * sizeof *buf);
    if (!buf) { perror("membw: malloc"); return 1; }
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) buf[i] = i;

    double *gbps = calloc(repeats, sizeof *gbps);
    uint64_t check = 0;
    for (int r = 0; r < repeats; r++) {
        double start = now_seconds();
        uint64_t total = 0;
        #pragma omp parallel reduction(+ : total)
        {
            int tid = 0, nt = 1;
#ifdef _OPENMP
            tid = omp_get_thread_num();
            nt = omp_get_num_threads();
#endif
            size_t per = (n / nt) & ~(size_t)7, lo = per * tid, hi = tid == nt - 1 ? n : lo + per;
            total += sum_words(buf + lo, hi - lo);
        }
        gbps[r] = n * sizeof *buf / (now_seconds() - start) / 1e9;
        check += total;
    }
    qsort(gbps, repeats, sizeof *gbps, by_value);
    printf("read_gbps %.2f\n", gbps[repeats / 2]);
    fprintf(stderr, "membw: %zu MiB, %d repeats, min %.2f max %.2f GB/s (checksum %llu)\n", mib, repeats,
            gbps[0], gbps[repeats - 1], (unsigned long long)check);
    free(gbps);
    free(buf);
    return 0;
}
