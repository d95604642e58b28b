/*
 * tokenizer_driver.c: runs tokenizer.c over batches, for tests/test_tokenizer.py.
 *
 *   tokenizer_driver TOK encode BOS   stdin: records { u32 len, bytes[len] }
 *                                      stdout: one line of ids per record
 *   tokenizer_driver TOK decode       stdin: records { u32 n, i32 ids[n] }
 *                                      stdout: records { u32 len, bytes[len] },
 *                                      the streamed decode of each list
 *   tokenizer_driver TOK bench        stdin: one text; stderr: tokens and seconds
 *   tokenizer_driver TOK info         the header fields
 *   tokenizer_driver nfc              stdin: records { u32 len, bytes[len] }
 *                                      stdout: records { u32 len, bytes[len] },
 *                                      the NFC of each (tok_nfc)
 *
 * TOK may be followed by ":N" to pass the model's vocab_size N to the loader.
 * BOS is 0 or 1 (the add_bos argument of tokenizer_encode).
 * The decoder checks as it goes that every chunk it streams is whole UTF-8
 * characters (unless a sentencepiece piece itself is not), and that the
 * chunks never overrun tokenizer_decode_size() bytes.
 * Exit status 0 on success; 1 with a message on stderr otherwise.
 */
#define _POSIX_C_SOURCE 200809L
#include "../tokenizer.c"

#include <time.h>

static unsigned char *read_all(FILE *f, size_t *size)
{
    size_t cap = 1 << 16, n = 0;
    unsigned char *buf = malloc(cap);
    for (;;) {
        if (n == cap) buf = realloc(buf, cap *= 2);
        if (!buf) return NULL;
        size_t got = fread(buf + n, 1, cap - n, f);
        if (!got) break;
        n += got;
    }
    *size = n;
    return buf;
}

static int die(const char *msg)
{
    fprintf(stderr, "tokenizer_driver: %s\n", msg);
    return 1;
}

// 1 if s[0..n) is whole valid UTF-8 characters.
static int whole_utf8(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        int k = utf8_valid_len(s + i, n - i);
        if (!k) return 0;
        i += (size_t)k;
    }
    return 1;
}

// The nfc mode: tok_nfc over each record of stdin.
static int nfc_records(void)
{
    size_t size;
    unsigned char *in = read_all(stdin, &size);
    if (!in) return die("out of memory");
    for (size_t pos = 0; pos < size;) {
        if (size - pos < 4) return die("nfc: record cut short");
        uint32_t len = read_u32(in + pos);
        pos += 4;
        if (len > size - pos) return die("nfc: record cut short");
        unsigned char *nfc;
        size_t n;
        if (tok_nfc(&nfc, &n, in + pos, len)) return die("out of memory");
        if (n > (size_t)UNI_NFC_MAX_GROWTH * len) return die("nfc: longer than UNI_NFC_MAX_GROWTH allows");
        uint32_t n32 = (uint32_t)n;
        fwrite(&n32, 4, 1, stdout);
        fwrite(nfc ? nfc : in + pos, 1, n, stdout);
        free(nfc);
        pos += len;
    }
    free(in);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "nfc") == 0) return nfc_records();
    if (argc < 3) return die("usage: tokenizer_driver TOK[:VOCAB] encode|decode|bench|info [BOS]");
    char path[4096];
    snprintf(path, sizeof(path), "%s", argv[1]);
    int vocab = -1;
    char *colon = strrchr(path, ':');
    if (colon && colon[1] >= '0' && colon[1] <= '9') {
        vocab = atoi(colon + 1);
        *colon = '\0';
    }
    Tokenizer t;
    char err[256];
    if (tokenizer_load(&t, path, vocab, err, sizeof(err))) {
        fprintf(stderr, "tokenizer_driver: %s: %s\n", path, err);
        return 2;
    }
    const char *mode = argv[2];
    size_t size;
    int rc = 0;
    if (strcmp(mode, "info") == 0) {
        printf("vocab_size %d\nbos_id %d\neos_id %d\npad_id %d\nunk_id %d\nadd_bos %d\n"
               "chat_template %d\nlegacy %d\nmax_token_length %d\nkind %d\nflags %u\n"
               "pretokenizer %d\nn_merges %d\n",
               t.vocab_size, t.bos_id, t.eos_id, t.pad_id, t.unk_id, t.add_bos, t.chat_template,
               t.legacy, t.max_token_length, t.kind, (unsigned)t.flags, t.pretokenizer, t.n_merges);
        tokenizer_free(&t);
        return 0;
    }
    unsigned char *in = read_all(stdin, &size);
    if (!in) return die("out of memory");
    if (strcmp(mode, "encode") == 0) {
        int add_bos = argc > 3 ? atoi(argv[3]) : 0;
        for (size_t pos = 0; pos < size;) {
            if (size - pos < 4) return die("encode: record cut short");
            uint32_t len = read_u32(in + pos);
            pos += 4;
            if (len > size - pos) return die("encode: record cut short");
            // len + 3 as run.c allocates, unless the vocabulary needs more
            size_t cap = len + 3, need = tokenizer_max_tokens(&t, len);
            int *ids = malloc(sizeof(int) * (need > cap ? need : cap));
            int n = need > cap ? tokenizer_encode_n(&t, (const char *)in + pos, len, add_bos, ids, need)
                               : tokenizer_encode(&t, (const char *)in + pos, len, add_bos, ids);
            if (n < 0) return die("encode failed");
            for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
            printf("\n");
            free(ids);
            pos += len;
        }
    } else if (strcmp(mode, "decode") == 0) {
        size_t chunk_size = tokenizer_decode_size(&t);
        char *chunk = malloc(chunk_size + 64);
        unsigned char *text = malloc(1);
        size_t text_cap = 1;
        for (size_t pos = 0; pos < size;) {
            if (size - pos < 4) return die("decode: record cut short");
            uint32_t n = read_u32(in + pos);
            pos += 4;
            if (n > (size - pos) / 4) return die("decode: record cut short");
            TokenDecoder d;
            decoder_init(&d);
            size_t len = 0;
            for (uint32_t i = 0; i <= n; i++) {
                memset(chunk + chunk_size, 0x5A, 64);
                size_t k = i < n ? tokenizer_decode(&t, &d, read_i32(in + pos + 4 * i), chunk, chunk_size)
                                 : tokenizer_decode_flush(&t, &d, chunk, chunk_size);
                for (int g = 0; g < 64; g++)
                    if (chunk[chunk_size + g] != 0x5A) return die("decode wrote past out_size");
                if (k > chunk_size) return die("decode returned more than out_size");
                if (k == chunk_size) return die("decode filled out_size: output may be cut");
                int plain = i == n || t.kind == TOK_BYTELEVEL;
                if (!plain) {
                    int id = read_i32(in + pos + 4 * i);
                    plain = id < 0 || id >= t.vocab_size || t.type[id] == PIECE_BYTE;
                    if (!plain) {
                        size_t pl;
                        const unsigned char *p = tok_piece(&t, id, &pl);
                        plain = whole_utf8(p, pl);
                    }
                }
                if (plain && !whole_utf8((const unsigned char *)chunk, k))
                    return die("decode streamed part of a UTF-8 character");
                while (len + k > text_cap) text = realloc(text, text_cap *= 2);
                memcpy(text + len, chunk, k);
                len += k;
            }
            if (d.n_pending) return die("bytes left pending after the flush");
            uint32_t len32 = (uint32_t)len;
            fwrite(&len32, 4, 1, stdout);
            fwrite(text, 1, len, stdout);
            pos += 4 * (size_t)n;
        }
        free(chunk);
        free(text);
    } else if (strcmp(mode, "bench") == 0) {
        int *ids = malloc(sizeof(int) * (size + 3));
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        int n = tokenizer_encode(&t, (const char *)in, size, t.add_bos, ids);
        clock_gettime(CLOCK_MONOTONIC, &b);
        double sec = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
        if (n < 0) return die("encode failed");
        fprintf(stderr, "%zu bytes %d tokens %.4f s\n", size, n, sec);
        printf("%d %.6f\n", n, sec);
        free(ids);
    } else {
        rc = die("unknown mode");
    }
    free(in);
    tokenizer_free(&t);
    return rc;
}
