/* libFuzzer target: the checkpoint loader, then forward passes.

   Any bytes go to parse_checkpoint(); it must either refuse them with a
   message or accept a model whose every tensor lies inside the buffer. An
   accepted model (small enough to be quick) then runs a batch of two tokens
   and one more through forward_tokens(), so that ASan sees every weight read
   and UBSan every index, in the batched and the one-token kernels, plain and
   fast. */

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
            /* a batch of two (the prompt path), then one token (generation),
               on the plain kernels and then on the fast ones */
            int ctx = t.config.max_seq_len < 3 ? t.config.max_seq_len : 3, batch = ctx < 2 ? ctx : 2;
            int tokens[2] = {0, 1 % t.config.vocab_size};
            Kernels plain = kernels;
            choose_fast_kernels();
            Kernels fast = kernels;
            for (int k = 0; k < 2; k++) {
                kernels = k ? fast : plain;
                alloc_run_state(&t.state, &t.config, ctx, batch);
                forward_tokens(&t, tokens, batch, 0, batch);
                if (ctx > batch) forward(&t, 2 % t.config.vocab_size, batch);
                free_run_state(&t.state);
            }
            kernels = plain;
        }
        free(t.weights.layers);
        free(t.weights.rope_inv_freq);
        free(t.converted);
    }
    free(copy);
    return 0;
}
