/* libFuzzer target: the tokenizer loader, encoder and streaming decoder.

   Input layout: a little-endian u32 n, then n bytes of tokenizer file, then
   text. The file goes to tokenizer_load_memory(); if it is accepted, the
   text is encoded, and the ids, plus ids read straight from the text bytes,
   are decoded one by one as run.c streams them. */

#include <stdint.h>

#include "../tokenizer.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void decode_all(const Tokenizer *t, const int *ids, size_t n) {
    TokenDecoder d;
    decoder_init(&d);
    char out[4096];
    for (size_t i = 0; i < n; i++) tokenizer_decode(t, &d, ids[i], out, sizeof out);
    tokenizer_decode_flush(t, &d, out, sizeof out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 4) return 0;
    uint32_t n = (uint32_t)data[0] | (uint32_t)data[1] << 8 | (uint32_t)data[2] << 16 | (uint32_t)data[3] << 24;
    if (n > size - 4) n = (uint32_t)(size - 4);
    const uint8_t *file = data + 4, *text = file + n;
    size_t text_len = size - 4 - n;

    Tokenizer t;
    char err[256];
    if (tokenizer_load_memory(&t, file, n, -1, err, sizeof err) != 0) return 0;

    size_t room = tokenizer_max_tokens(&t, text_len); // more than text_len / 2, the ids below
    int *ids = malloc(room * sizeof(int));
    if (ids) {
        int count = tokenizer_encode_n(&t, (const char *)text, text_len, t.add_bos, ids, room);
        if (count == -2) __builtin_trap(); // tokenizer_max_tokens() promised room enough
        if (count > 0) decode_all(&t, ids, (size_t)count);
        /* arbitrary ids: every id in the vocabulary, in an order the text picks */
        size_t m = text_len / 2;
        for (size_t i = 0; i < m; i++) ids[i] = (text[2 * i] | text[2 * i + 1] << 8) % t.vocab_size;
        decode_all(&t, ids, m);
        free(ids);
    }
    tokenizer_free(&t);
    return 0;
}
