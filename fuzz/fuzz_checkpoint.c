/* libFuzzer target: the checkpoint loader, then one forward pass.

   Any bytes go to parse_checkpoint(); it must either refuse them with a
   message or accept a model whose every tensor lies inside the buffer. An
   accepted model (small enough to be quick) then runs two positions through
   forward(), so that ASan sees every weight read and UBSan every index. */

#define TESTING
#include "../run.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* mmap gives page-aligned data; the fuzzer's buffer may be anywhere */
    unsigned char *copy = malloc(size ? size : 1);
    if (!copy) return 0;
    memcpy(copy, data, size);
    Transformer t;
    memset(&t, 0, sizeof t);
    char err[ERROR_SIZE];
    if (parse_checkpoint(&t, copy, size, err) == 0) {
        if (size <= (1 << 20) && t.config.n_layers <= 8) {
            int ctx = t.config.max_seq_len < 2 ? t.config.max_seq_len : 2;
            alloc_run_state(&t.state, &t.config, ctx);
            for (int pos = 0; pos < ctx; pos++) forward(&t, pos % t.config.vocab_size, pos);
            free_run_state(&t.state);
        }
        free(t.weights.layers);
    }
    free(copy);
    return 0;
}
