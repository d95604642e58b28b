/* Test driver: run.c's dequantize_block() on blocks given on stdin, so that
   tests/test_k_blocks.py can hold it to the gguf package's decoder.

   argv:   the weight type's name (q4_k, q5_k, q6_k)
   stdin:  whole blocks of that type
   stdout: their weights, 256 float32 per block, little-endian as in memory */

#define TESTING
#include "../run.c"

int main(int argc, char **argv) {
    int type = -1;
    for (int t = WEIGHT_Q4_K; argc == 2 && t <= WEIGHT_Q6_K; t++)
        if (strcmp(argv[1], WEIGHT_NAMES[t]) == 0) type = t;
    if (type < 0) return 2;
    uint8_t block[256];
    float weights[SUPER_BLOCK];
    while (fread(block, (size_t)K_BLOCK_BYTES[type], 1, stdin) == 1) {
        dequantize_block(weights, block, type);
        if (fwrite(weights, sizeof weights, 1, stdout) != 1) return 1;
    }
    return ferror(stdin) ? 1 : 0;
}
