/* libFuzzer target: run.c's reader of GGUF files, and their tokenizers.

   Any bytes, with GGUF's magic put over the first four, go to
   parse_checkpoint(); it must either refuse them with a message or accept
   a model whose every tensor lies inside the buffer, converted where it
   must be. An accepted model (small enough to be quick) then runs a batch
   of two tokens and one more through forward_tokens() on the plain and the
   fast kernels, as in fuzz_checkpoint.c. Then the metadata's tokenizer is
   built (gguf_tokenizer_bytes()) and, if accepted, loaded and used to
   encode a text and decode every id it gives. */

#define TESTING
#include "../run.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void run_forward(Transformer *t) {
    int ctx = t->config.max_seq_len < 3 ? t->config.max_seq_len : 3, batch = ctx < 2 ? ctx : 2;
    int tokens[2] = {0, 1 % t->config.vocab_size};
    Kernels plain = kernels;
    choose_fast_kernels();
    Kernels fast = kernels;
    for (int k = 0; k < 2; k++) {
        kernels = k ? fast : plain;
        alloc_run_state(&t->state, &t->config, ctx, batch);
        forward_tokens(t, tokens, batch, 0, batch);
        if (ctx > batch) forward(t, 2 % t->config.vocab_size, batch);
        free_run_state(&t->state);
    }
    kernels = plain;
}

static void run_tokenizer(const unsigned char *data, size_t size) {
    char err[ERROR_SIZE];
    Gguf g = {.data = data, .size = size, .err = err};
    uint64_t n_tensors;
    size_t alignment;
    ByteBuffer ltok = {0};
    Tokenizer tok;
    if (gguf_read_metadata(&g, &n_tensors, &alignment) == 0 && gguf_tokenizer_bytes(&g, -1, &ltok) == 0 &&
        tokenizer_load_memory(&tok, ltok.bytes, ltok.n, -1, err, sizeof err) == 0) {
        static const char text[] = "Once upon a time, a caf\xc3\xa9 <|im_start|> [INST] 123";
        int ids[4 * sizeof text];
        int n = tokenizer_encode_n(&tok, text, sizeof text - 1, tok.add_bos, ids, 4 * sizeof text);
        TokenDecoder d;
        decoder_init(&d);
        char out[4096];
        for (int i = 0; i < n; i++) tokenizer_decode(&tok, &d, ids[i], out, sizeof out);
        tokenizer_free(&tok);
    }
    free(ltok.bytes);
    free(g.keys);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    unsigned char *copy = malloc(size > 4 ? size : 4); // mmap gives page-aligned data; the fuzzer's may be anywhere
    if (!copy) return 0;
    memcpy(copy, data, size);
    memcpy(copy, "GGUF", 4);
    size = size > 4 ? size : 4;
    Transformer t;
    memset(&t, 0, sizeof t);
    char err[ERROR_SIZE];
    if (parse_checkpoint(&t, copy, size, err) == 0) {
        if (size <= (1 << 20) && t.config.n_layers <= 8) run_forward(&t);
        free(t.weights.layers);
        free(t.weights.rope_inv_freq);
        free(t.converted);
    }
    run_tokenizer(copy, size);
    free(copy);
    return 0;
}
