/* tokenizer.c: text to token ids and back, for run.c.

   run.c includes this file (a unity build); so do the fuzzers and
   tests/tokenizer_driver.c. It needs libc only and has no main().

   Two kinds of tokenizer, both exact re-implementations of a reference:

     sentencepiece BPE (Llama 2)   == sentencepiece's encode/decode
       normalize (spaces become U+2581 "▁", a dummy "▁" prefix), then merge
       adjacent symbols, the pair whose merged piece has the highest score
       first; what no piece covers falls back to <0xXX> byte tokens.

     byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2) == Hugging Face tokenizers
       split off added tokens, put the rest into Unicode NFC if the source
       does (Qwen2), pre-tokenize with the GPT-2 or Llama 3 regex
       (written out by hand below, Unicode classes measured from tokenizers
       by tools/gen_unicode_tables.py), then merge byte tokens by merge rank;
       decoding is tokenizers' decode(ids, skip_special_tokens=True).

   Both merge loops keep the symbols in a linked list and the candidate pairs
   in a binary heap, so encoding is O(n log n) in the length of the text
   (1 MB in well under 0.1 s on ordinary text); pieces are found through hash
   tables built once at load.

   The API (run.c's):
     tokenizer_load(t, path, vocab_size, err, err_size)   0, or -1 and a message
     tokenizer_load_memory(t, data, size, vocab_size, err, err_size)
     tokenizer_free(t)
     tokenizer_encode(t, text, len, add_bos, tokens)      count; tokens holds len + 3
     tokenizer_encode_n(t, text, len, add_bos, tokens, max)   the same, bounded
     tokenizer_max_tokens(t, len)                        most tokens len bytes can give
     tokenizer_find(t, piece, len)                       id of that exact token, or -1
     tokenizer_piece(t, id, &len)                        the bytes a token is stored as
     decoder_init(d), tokenizer_decode(t, d, id, out, n), tokenizer_decode_flush(t, d, out, n)
       streamed text; the concatenation equals the reference's decode(ids)
     tokenizer_decode_size(t)                            an n that always suffices

   Where the references cannot be followed: text that is not valid UTF-8.
   sentencepiece itself turns each bad byte into U+FFFD, and so does this
   file; byte-level BPE keeps the bytes (NFC passes them through, the
   pre-tokenizer counts a bad byte as a character of class "other"), so
   decoding gives them back. One known
   difference: tokenizers matches added tokens marked normalized=true (those
   added by add_tokens, not special ones) in a second pass, after the others;
   here all are matched in one pass, longest first, which differs only where
   two added tokens overlap in the text.

   File format ("LTOK", written by export.py; little-endian):

     offset  size  type     field
     ------  ----  -------  ------------------------------------------------
          0     4  char[4]  magic "LTOK"
          4     4  u32      version = 1
          8     4  u32      kind            0 sentencepiece BPE, 1 byte-level BPE
         12     4  i32      vocab_size      number of token records
         16     4  i32      bos_id          -1: none
         20     4  i32      eos_id          -1: none
         24     4  i32      pad_id          -1: none
         28     4  i32      unk_id          -1: none (sentencepiece needs one)
         32     4  u32      flags           bit 0  add BOS when encoding a prompt
                                            bit 1  add dummy prefix ("▁" / " ")
                                            bit 2  remove extra whitespaces (sp)
                                            bit 3  byte fallback (sp)
                                            bit 4  ignore merges: a pre-token that
                                                   is a token is kept whole (bl)
                                            bit 5  add EOS when encoding a prompt
                                            bit 6  normalize the text to NFC (bl)
         36     4  u32      pretokenizer    0 none, 1 GPT-2 regex,
                                            2 digits one by one, then GPT-2 regex
                                            3 Llama 3 regex
                                            4 Qwen2: Llama 3 regex, digits one
                                              by one (\p{N} for \p{N}{1,3})
         40     4  u32      chat_template   0 none, 1 llama2 [INST], 2 chatml,
                                            3 llama3 (<|start_header_id|>),
                                            4 llama3 with Llama 3.1's dated
                                              system preamble, "Today Date:
                                              26 Jul 2024", 5 the same with
                                              today's date (Llama 3.2)
         44     4  u32      n_merges        0 for sentencepiece
         48     4  u32      max_token_length  bytes in the longest token
         52     4  u32      system_len      bytes of the default system prompt (0: none)
         56     8  zero     reserved
         64        vocab_size token records, id 0 first:
                     u32   len             1 .. max_token_length
                     f32   score           sentencepiece merge score (bl: 0)
                     u8    type            1 normal, 2 unknown, 3 control,
                                           4 user-defined, 5 unused, 6 byte
                     u8    bytes[len]      the token's text; sentencepiece
                                           keeps "▁", byte-level tokens are
                                           raw bytes (GPT-2's byte-to-unicode
                                           mapping undone); a byte token is
                                           the text "<0xXX>"
                   n_merges merge records, rank = index (byte-level only):
                     i32   left, right, result    token ids; the bytes of
                                           result are left's then right's
                   u8 system[system_len]   the chat template's default system
                                           prompt (UTF-8, no NUL), for chat
                                           when the user gives none
                   the file ends here.

   Byte-level: type 3 (control) marks special added tokens, type 4 added
   tokens that are not special; both are matched whole in the input text,
   longest first, and only special ones are skipped when decoding.

   The legacy llama2.c tokenizer.bin is read too (no magic): i32
   max_token_length, then per token f32 score, i32 len, bytes, with " " in
   place of "▁". It is read as a sentencepiece tokenizer: unk 0, BOS 1, EOS
   2, add BOS, dummy prefix, <0xXX> pieces are byte tokens. */

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "unicode_tables.h"

/* ----------------------------------------------------------------------------
   Types */

enum { TOK_SENTENCEPIECE = 0, TOK_BYTELEVEL = 1 };
enum {
    PIECE_NORMAL = 1, PIECE_UNKNOWN = 2, PIECE_CONTROL = 3,
    PIECE_USER = 4, PIECE_UNUSED = 5, PIECE_BYTE = 6
};
enum {
    TOKF_ADD_BOS = 1u << 0,
    TOKF_DUMMY_PREFIX = 1u << 1,
    TOKF_REMOVE_EXTRA_WS = 1u << 2,
    TOKF_BYTE_FALLBACK = 1u << 3,
    TOKF_IGNORE_MERGES = 1u << 4,
    TOKF_ADD_EOS = 1u << 5,
    TOKF_NFC = 1u << 6,
    TOKF_ALL = (1u << 7) - 1
};
enum { PRETOK_NONE = 0, PRETOK_GPT2 = 1, PRETOK_DIGITS_GPT2 = 2, PRETOK_LLAMA3 = 3, PRETOK_QWEN2 = 4 };
enum { // run.c's chat too
    TEMPLATE_NONE = 0, TEMPLATE_LLAMA2 = 1, TEMPLATE_CHATML = 2, TEMPLATE_LLAMA3 = 3,
    TEMPLATE_LLAMA31 = 4, TEMPLATE_LLAMA32 = 5
};

/* An open-addressing hash table from token bytes to token id. */
typedef struct {
    int32_t *id;        // (cap) token id, -1 for an empty slot
    uint32_t *hash;     // (cap) hash of that token's bytes
    uint32_t cap;       // a power of two, at least twice the entries
} TokIndex;

/* A byte-level merge: the pair (left, right) becomes result, at this rank. */
typedef struct {
    int32_t left, right, result, rank;   // left = -1: empty slot
} TokMerge;

typedef struct {
    /* what run.c reads */
    int vocab_size;
    int bos_id, eos_id, pad_id, unk_id;   // -1: none
    int add_bos;            // 1: prompts start with bos_id
    int add_eos;            // 1: prompts end with eos_id
    int chat_template;      // TEMPLATE_*
    char *system_prompt;    // the template's default system prompt (NUL-terminated), NULL: none
    int legacy;             // 1: read from a llama2.c tokenizer.bin
    int max_token_length;   // bytes in the longest token
    /* the rest of the header */
    int kind;               // TOK_SENTENCEPIECE or TOK_BYTELEVEL
    uint32_t flags;         // TOKF_*
    int pretokenizer;       // PRETOK_*
    int n_merges;
    /* the vocabulary */
    unsigned char *bytes;   // all tokens' bytes, back to back
    uint32_t *offset;       // (vocab_size + 1) token i is bytes[offset[i]..offset[i+1])
    float *score;           // (vocab_size) sentencepiece merge score
    unsigned char *type;    // (vocab_size) PIECE_*
    int byte_token[256];    // token of each byte value (<0xXX> or the byte itself), -1 none
    TokIndex all;           // every token; reserved sentencepiece types win
    TokIndex bpe;           // sentencepiece: pieces merges may produce
    TokIndex special;       // matched whole in the text before BPE
    unsigned char special_first[32];   // bitmap of the first bytes of those
    int *special_len;       // distinct lengths of those, longest first
    int n_special_len;
    TokMerge *merge;        // (merge_cap) byte-level merges by (left, right)
    uint32_t merge_cap;
    int has_unused;         // sentencepiece: some piece has type UNUSED
    int fallback_ok;        // "▁" and U+FFFD are pieces: at most one token per input byte
} Tokenizer;

/* Streaming decoder state: the bytes of a UTF-8 character not yet complete,
   and sentencepiece's "drop the first leading space" bookkeeping. */
typedef struct {
    unsigned char pending[4];
    int n_pending;
    int bos_ws;             // a leading "▁" may still be dropped
    int bos_ws_seen;        // the last piece dropped one
    int emitted;            // some text has been produced
} TokenDecoder;

/* ----------------------------------------------------------------------------
   Small helpers */

static const unsigned char TOK_SPACE[3] = {0xE2, 0x96, 0x81};   // U+2581 "▁"
static const unsigned char TOK_REPLACEMENT[3] = {0xEF, 0xBF, 0xBD}; // U+FFFD

static void tok_err(char *err, size_t err_size, const char *fmt, long a, long b) {
    if (err && err_size) snprintf(err, err_size, fmt, a, b);
}

/* Little-endian fields, of the tokenizer file here and of run.c's checkpoint. */
static uint32_t read_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int32_t read_i32(const unsigned char *p) { return (int32_t)read_u32(p); }

static float read_f32(const unsigned char *p) {
    uint32_t u = read_u32(p);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t tok_hash(const unsigned char *s, size_t n) {
    /* FNV-1a, 32 bit */
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 16777619u;
    return h;
}

static const unsigned char *tok_piece(const Tokenizer *t, int id, size_t *len) {
    *len = t->offset[id + 1] - t->offset[id];
    return t->bytes + t->offset[id];
}

/* Status of the UTF-8 sequence s[0..n), n >= 1, judged as the start of one
   character: 0 a complete valid character of n bytes, 1 a proper prefix of
   a valid character, -1 invalid. Valid means well-formed UTF-8 (no overlong
   forms, no surrogates, nothing above U+10FFFF), as both references judge. */
static int utf8_status(const unsigned char *s, int n) {
    unsigned char c = s[0];
    int need;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c < 0x80) return n == 1 ? 0 : -1;
    else if (c >= 0xC2 && c <= 0xDF) need = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return -1;
    for (int i = 1; i < n; i++) {
        if (i >= need) return -1;
        unsigned char l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
        if (s[i] < l || s[i] > h) return -1;
    }
    return n == need ? 0 : 1;
}

/* Length of the valid UTF-8 character at s[0..n), or 0 if there is none. */
static int utf8_valid_len(const unsigned char *s, size_t n) {
    int k = 1;
    for (;;) {
        int st = utf8_status(s, k);
        if (st == 0) return k;
        if (st < 0 || (size_t)k >= n) return 0;
        k++;
    }
}

/* Decode the valid character at s (length len from utf8_valid_len). */
static uint32_t tok_utf8_decode(const unsigned char *s, int len) {
    switch (len) {
    case 1: return s[0];
    case 2: return (uint32_t)(s[0] & 0x1F) << 6 | (s[1] & 0x3F);
    case 3: return (uint32_t)(s[0] & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F);
    default: return (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 |
                    (uint32_t)(s[2] & 0x3F) << 6 | (s[3] & 0x3F);
    }
}

/* ----------------------------------------------------------------------------
   Hash tables */

static int tok_index_init(TokIndex *ix, int n) {
    uint32_t cap = 16;
    while (cap < 2u * (uint32_t)n) cap <<= 1;
    ix->cap = cap;
    ix->id = malloc(cap * sizeof(int32_t));
    ix->hash = malloc(cap * sizeof(uint32_t));
    if (!ix->id || !ix->hash) return -1;
    for (uint32_t i = 0; i < cap; i++) ix->id[i] = -1;
    return 0;
}

static void tok_index_free(TokIndex *ix) {
    free(ix->id);
    free(ix->hash);
    ix->id = NULL;
    ix->hash = NULL;
    ix->cap = 0;
}

/* Id of the token in ix whose bytes are s[0..n), or -1. */
static int tok_index_get(const Tokenizer *t, const TokIndex *ix, const unsigned char *s, size_t n) {
    if (!ix->cap) return -1;
    uint32_t h = tok_hash(s, n), m = ix->cap - 1;
    for (uint32_t i = h & m;; i = (i + 1) & m) {
        int id = ix->id[i];
        if (id < 0) return -1;
        if (ix->hash[i] == h) {
            size_t len;
            const unsigned char *p = tok_piece(t, id, &len);
            if (len == n && memcmp(p, s, n) == 0) return id;
        }
    }
}

/* Adds token id unless a token with the same bytes is there; 1 if added. */
static int tok_index_put(const Tokenizer *t, TokIndex *ix, int id) {
    size_t n;
    const unsigned char *s = tok_piece(t, id, &n);
    uint32_t h = tok_hash(s, n), m = ix->cap - 1;
    for (uint32_t i = h & m;; i = (i + 1) & m) {
        int other = ix->id[i];
        if (other < 0) {
            ix->id[i] = id;
            ix->hash[i] = h;
            return 1;
        }
        if (ix->hash[i] == h) {
            size_t len;
            const unsigned char *p = tok_piece(t, other, &len);
            if (len == n && memcmp(p, s, n) == 0) return 0;
        }
    }
}

static uint32_t tok_pair_hash(int32_t a, int32_t b) {
    uint64_t k = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    k *= 0x9E3779B97F4A7C15ull;
    return (uint32_t)(k >> 32);
}

/* The merge of (left, right), or NULL. */
static const TokMerge *tok_merge_get(const Tokenizer *t, int left, int right) {
    if (!t->merge_cap) return NULL;
    uint32_t m = t->merge_cap - 1;
    for (uint32_t i = tok_pair_hash(left, right) & m;; i = (i + 1) & m) {
        const TokMerge *e = &t->merge[i];
        if (e->left < 0) return NULL;
        if (e->left == left && e->right == right) return e;
    }
}

/* ----------------------------------------------------------------------------
   Loading */

void tokenizer_free(Tokenizer *t) {
    free(t->bytes);
    free(t->offset);
    free(t->score);
    free(t->type);
    free(t->special_len);
    free(t->merge);
    free(t->system_prompt);
    tok_index_free(&t->all);
    tok_index_free(&t->bpe);
    tok_index_free(&t->special);
    memset(t, 0, sizeof(*t));
    t->bos_id = t->eos_id = t->pad_id = t->unk_id = -1;
}

/* Value of a sentencepiece byte piece "<0xXX>" (upper-case hex), or -1. */
static int tok_byte_piece_value(const unsigned char *s, size_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        int c = s[i], d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return -1;
        v = v * 16 + d;
    }
    return v;
}

/* Builds the lookup tables once the vocabulary arrays are filled in.
   Returns 0, or -1 with err set. */
static int tok_build(Tokenizer *t, char *err, size_t err_size) {
    int n = t->vocab_size;
    int is_sp = t->kind == TOK_SENTENCEPIECE;
    for (int b = 0; b < 256; b++) t->byte_token[b] = -1;
    if (tok_index_init(&t->all, n) || tok_index_init(&t->bpe, is_sp ? n : 0)) goto oom;
    int n_special = 0, max_len = 0;
    for (int id = 0; id < n; id++) {
        size_t len;
        const unsigned char *s = tok_piece(t, id, &len);
        int ty = t->type[id];
        if ((int)len > max_len) max_len = (int)len;
        if (is_sp) {
            /* sentencepiece keeps two maps: reserved pieces (control, unknown,
               byte), looked up first, and the pieces merges may produce. */
            int reserved = ty == PIECE_CONTROL || ty == PIECE_UNKNOWN || ty == PIECE_BYTE;
            if (!tok_index_put(t, reserved ? &t->all : &t->bpe, id)) {
                tok_err(err, err_size, "token %ld is a duplicate", id, 0);
                return -1;
            }
            if (ty == PIECE_BYTE) {
                int v = tok_byte_piece_value(s, len);
                if (v < 0) {
                    tok_err(err, err_size, "byte token %ld is not of the form <0xXX>", id, 0);
                    return -1;
                }
                if (t->byte_token[v] < 0) t->byte_token[v] = id;
            }
            if (ty == PIECE_UNUSED) t->has_unused = 1;
            if (ty == PIECE_USER) n_special++;
        } else {
            tok_index_put(t, &t->all, id);
            if (len == 1 && (ty == PIECE_NORMAL) && t->byte_token[s[0]] < 0) t->byte_token[s[0]] = id;
            if (ty == PIECE_CONTROL || ty == PIECE_USER) n_special++;
        }
    }
    if (is_sp) {
        /* every normal piece goes into the index of all tokens too, after the
           reserved ones (sentencepiece's PieceToId looks in that order) */
        for (int id = 0; id < n; id++) {
            int ty = t->type[id];
            if (!(ty == PIECE_CONTROL || ty == PIECE_UNKNOWN || ty == PIECE_BYTE)) tok_index_put(t, &t->all, id);
        }
        if (t->unk_id < 0 || t->type[t->unk_id] != PIECE_UNKNOWN) {
            tok_err(err, err_size, "unk_id %ld is not an unknown-type token", t->unk_id, 0);
            return -1;
        }
        int sp = tok_index_get(t, &t->bpe, TOK_SPACE, 3);
        int rc = tok_index_get(t, &t->bpe, TOK_REPLACEMENT, 3);
        t->fallback_ok = !(t->flags & TOKF_BYTE_FALLBACK) || (sp >= 0 && rc >= 0);
    }
    if (max_len != t->max_token_length) {
        tok_err(err, err_size, "max_token_length is %ld but the longest token has %ld bytes",
                t->max_token_length, max_len);
        return -1;
    }
    /* the pieces matched whole in the text: user-defined (sentencepiece),
       added tokens (byte-level) */
    if (n_special) {
        if (tok_index_init(&t->special, n_special)) goto oom;
        t->special_len = malloc(sizeof(int) * (size_t)n_special);
        if (!t->special_len) goto oom;
        for (int id = 0; id < n; id++) {
            int ty = t->type[id];
            if (!(ty == PIECE_USER || (!is_sp && ty == PIECE_CONTROL))) continue;
            size_t len;
            const unsigned char *s = tok_piece(t, id, &len);
            if (!tok_index_put(t, &t->special, id)) continue;
            t->special_first[s[0] >> 3] |= (unsigned char)(1u << (s[0] & 7));
            int k = 0;
            while (k < t->n_special_len && t->special_len[k] > (int)len) k++;
            if (k < t->n_special_len && t->special_len[k] == (int)len) continue;
            memmove(t->special_len + k + 1, t->special_len + k, sizeof(int) * (size_t)(t->n_special_len - k));
            t->special_len[k] = (int)len;
            t->n_special_len++;
        }
    }
    return 0;
oom:
    tok_err(err, err_size, "out of memory", 0, 0);
    return -1;
}

/* Allocates the vocabulary arrays for n tokens of total_bytes bytes. */
static int tok_alloc(Tokenizer *t, int n, size_t total_bytes) {
    t->vocab_size = n;
    t->bytes = malloc(total_bytes ? total_bytes : 1);
    t->offset = malloc(sizeof(uint32_t) * ((size_t)n + 1));
    t->score = malloc(sizeof(float) * (size_t)(n ? n : 1));
    t->type = malloc((size_t)(n ? n : 1));
    return t->bytes && t->offset && t->score && t->type ? 0 : -1;
}

#define TOK_MAX_VOCAB (1 << 24)
#define TOK_MAX_TOKEN_LENGTH (1 << 16)
#define TOK_MAX_TEXT ((size_t)1 << 29)   // bytes of text one encode call takes
#define TOK_MAX_FILE ((off_t)1 << 30)    // bytes of a tokenizer file; real ones are a few MB

/* Reads a llama2.c tokenizer.bin. vocab_size < 0: read to the end.
   The pieces get back their "▁" (the file has " "), so that encoding and
   decoding follow sentencepiece exactly. */
static int tok_load_legacy(Tokenizer *t, const unsigned char *data, size_t size, int vocab_size,
                           char *err, size_t err_size) {
    if (size < 4) {
        tok_err(err, err_size, "file too short for a tokenizer (%ld bytes)", (long)size, 0);
        return -1;
    }
    int32_t max_len = read_i32(data);
    if (max_len < 1 || max_len > TOK_MAX_TOKEN_LENGTH) {
        tok_err(err, err_size, "not a tokenizer: no LTOK magic, and max_token_length %ld is not sane",
                max_len, 0);
        return -1;
    }
    /* first pass: count the records and the bytes they need with " " -> "▁" */
    size_t pos = 4, total = 0;
    long count = 0;
    while (pos < size) {
        if (size - pos < 8) {
            tok_err(err, err_size, "token %ld: record cut short at byte %ld", count, (long)pos);
            return -1;
        }
        int32_t len = read_i32(data + pos + 4);
        if (len < 1 || len > max_len) {
            tok_err(err, err_size, "token %ld has length %ld, outside 1..max_token_length", count, len);
            return -1;
        }
        if ((size_t)len > size - pos - 8) {
            tok_err(err, err_size, "token %ld: record cut short at byte %ld", count, (long)pos);
            return -1;
        }
        for (size_t i = 0; i < (size_t)len; i++) total += data[pos + 8 + i] == ' ' ? 3 : 1;
        pos += 8 + (size_t)len;
        count++;
        if (count > TOK_MAX_VOCAB) {
            tok_err(err, err_size, "more than %ld tokens", TOK_MAX_VOCAB, 0);
            return -1;
        }
    }
    if (vocab_size >= 0 && count != vocab_size) {
        tok_err(err, err_size, "tokenizer has %ld tokens but the model has %ld", count, vocab_size);
        return -1;
    }
    if (count < 3) {
        tok_err(err, err_size, "tokenizer has %ld tokens; a llama2.c tokenizer has unk, BOS, EOS first",
                count, 0);
        return -1;
    }
    if (total > UINT32_MAX) {
        tok_err(err, err_size, "tokens take more than 4 GiB", 0, 0);
        return -1;
    }
    if (tok_alloc(t, (int)count, total)) {
        tok_err(err, err_size, "out of memory", 0, 0);
        return -1;
    }
    /* second pass: fill in */
    pos = 4;
    size_t out = 0;
    int longest = 0;
    for (int id = 0; id < count; id++) {
        int32_t len = read_i32(data + pos + 4);
        const unsigned char *s = data + pos + 8;
        t->score[id] = read_f32(data + pos);
        t->offset[id] = (uint32_t)out;
        if (id == 1 || id == 2) {
            /* llama2.c wrote BOS and EOS as "\n<s>\n" and "\n</s>\n" */
            while (len > 1 && s[0] == '\n') s++, len--;
            while (len > 1 && s[len - 1] == '\n') len--;
        }
        for (int32_t i = 0; i < len; i++) {
            if (s[i] == ' ') {
                memcpy(t->bytes + out, TOK_SPACE, 3);
                out += 3;
            } else t->bytes[out++] = s[i];
        }
        int piece_len = (int)(out - t->offset[id]);
        if (piece_len > longest) longest = piece_len;
        if (id == 0) t->type[id] = PIECE_UNKNOWN;
        else if (id <= 2) t->type[id] = PIECE_CONTROL;
        else if (tok_byte_piece_value(t->bytes + t->offset[id], (size_t)piece_len) >= 0) t->type[id] = PIECE_BYTE;
        else t->type[id] = PIECE_NORMAL;
        pos += 8 + (size_t)read_u32(data + pos + 4);
    }
    t->offset[count] = (uint32_t)out;
    t->kind = TOK_SENTENCEPIECE;
    t->unk_id = 0;
    t->bos_id = 1;
    t->eos_id = 2;
    t->pad_id = -1;
    t->flags = TOKF_ADD_BOS | TOKF_DUMMY_PREFIX | TOKF_BYTE_FALLBACK;
    t->pretokenizer = PRETOK_NONE;
    t->chat_template = TEMPLATE_LLAMA2;
    t->legacy = 1;
    t->max_token_length = longest;
    return tok_build(t, err, err_size);
}

static int tok_load_ltok(Tokenizer *t, const unsigned char *data, size_t size, int vocab_size,
                         char *err, size_t err_size) {
    if (size < 64) {
        tok_err(err, err_size, "tokenizer header cut short (%ld of 64 bytes)", (long)size, 0);
        return -1;
    }
    uint32_t version = read_u32(data + 4);
    if (version != 1) {
        tok_err(err, err_size, "tokenizer version %ld, this build reads version 1 (re-export with export.py)",
                (long)version, 0);
        return -1;
    }
    uint32_t kind = read_u32(data + 8);
    int32_t n = read_i32(data + 12);
    int32_t ids[4];
    for (int i = 0; i < 4; i++) ids[i] = read_i32(data + 16 + 4 * i);
    uint32_t flags = read_u32(data + 32), pretok = read_u32(data + 36);
    uint32_t chat = read_u32(data + 40), n_merges = read_u32(data + 44);
    uint32_t max_len = read_u32(data + 48), system_len = read_u32(data + 52);
    if (kind > 1) {
        tok_err(err, err_size, "unknown tokenizer kind %ld", (long)kind, 0);
        return -1;
    }
    if (n < 1 || n > TOK_MAX_VOCAB) {
        tok_err(err, err_size, "vocab_size %ld is not sane", n, 0);
        return -1;
    }
    if (vocab_size >= 0 && n != vocab_size) {
        tok_err(err, err_size, "tokenizer has %ld tokens but the model has %ld", n, vocab_size);
        return -1;
    }
    static const char *names[4] = {"bos_id", "eos_id", "pad_id", "unk_id"};
    for (int i = 0; i < 4; i++) {
        if (ids[i] < -1 || ids[i] >= n) {
            char fmt[64];
            snprintf(fmt, sizeof(fmt), "%s %%ld is outside -1..%%ld", names[i]);
            tok_err(err, err_size, fmt, ids[i], (long)n - 1);
            return -1;
        }
    }
    if (flags & ~(uint32_t)TOKF_ALL) {
        tok_err(err, err_size, "unknown tokenizer flags 0x%lx", (long)flags, 0);
        return -1;
    }
    if (pretok > PRETOK_QWEN2 || (kind == TOK_SENTENCEPIECE && pretok != PRETOK_NONE)) {
        tok_err(err, err_size, "unknown pretokenizer %ld", (long)pretok, 0);
        return -1;
    }
    if (chat > TEMPLATE_LLAMA32) {
        tok_err(err, err_size, "unknown chat_template %ld", (long)chat, 0);
        return -1;
    }
    if (max_len < 1 || max_len > TOK_MAX_TOKEN_LENGTH) {
        tok_err(err, err_size, "max_token_length %ld is not sane", (long)max_len, 0);
        return -1;
    }
    /* first pass: validate the records */
    size_t pos = 64, total = 0;
    for (int32_t id = 0; id < n; id++) {
        if (size - pos < 9) {
            tok_err(err, err_size, "token %ld: record cut short at byte %ld", id, (long)pos);
            return -1;
        }
        uint32_t len = read_u32(data + pos);
        unsigned ty = data[pos + 8];
        if (len < 1 || len > max_len) {
            tok_err(err, err_size, "token %ld has length %ld, outside 1..max_token_length", id, (long)len);
            return -1;
        }
        if (len > size - pos - 9) {
            tok_err(err, err_size, "token %ld: record cut short at byte %ld", id, (long)pos);
            return -1;
        }
        if (ty < PIECE_NORMAL || ty > PIECE_BYTE) {
            tok_err(err, err_size, "token %ld has unknown type %ld", id, (long)ty);
            return -1;
        }
        total += len;
        pos += 9 + len;
    }
    if (n_merges > (size - pos) / 12) {
        tok_err(err, err_size, "%ld merges do not fit in the %ld bytes left", (long)n_merges, (long)(size - pos));
        return -1;
    }
    if (size - pos - (size_t)n_merges * 12 != system_len) {
        tok_err(err, err_size, "%ld bytes after the last merge, expected system_len = %ld",
                (long)(size - pos - (size_t)n_merges * 12), (long)system_len);
        return -1;
    }
    if (memchr(data + size - system_len, 0, system_len)) {
        tok_err(err, err_size, "the default system prompt contains a NUL byte", 0, 0);
        return -1;
    }
    if (kind == TOK_SENTENCEPIECE && n_merges) {
        tok_err(err, err_size, "a sentencepiece tokenizer has no merge records (%ld)", (long)n_merges, 0);
        return -1;
    }
    if (total > UINT32_MAX) {
        tok_err(err, err_size, "tokens take more than 4 GiB", 0, 0);
        return -1;
    }
    if (tok_alloc(t, n, total)) {
        tok_err(err, err_size, "out of memory", 0, 0);
        return -1;
    }
    pos = 64;
    size_t out = 0;
    for (int32_t id = 0; id < n; id++) {
        uint32_t len = read_u32(data + pos);
        t->score[id] = read_f32(data + pos + 4);
        t->type[id] = data[pos + 8];
        t->offset[id] = (uint32_t)out;
        memcpy(t->bytes + out, data + pos + 9, len);
        out += len;
        pos += 9 + len;
    }
    t->offset[n] = (uint32_t)out;
    t->kind = (int)kind;
    t->bos_id = ids[0];
    t->eos_id = ids[1];
    t->pad_id = ids[2];
    t->unk_id = ids[3];
    t->flags = flags;
    t->pretokenizer = (int)pretok;
    t->chat_template = (int)chat;
    t->max_token_length = (int)max_len;
    t->n_merges = (int)n_merges;
    t->legacy = 0;
    if (tok_build(t, err, err_size)) return -1;
    /* merges: (left, right) -> result at rank = index */
    if (n_merges) {
        uint32_t cap = 16;
        while (cap < 2 * n_merges) cap <<= 1;
        t->merge = malloc(sizeof(TokMerge) * cap);
        if (!t->merge) {
            tok_err(err, err_size, "out of memory", 0, 0);
            return -1;
        }
        t->merge_cap = cap;
        for (uint32_t i = 0; i < cap; i++) t->merge[i].left = -1;
        for (uint32_t r = 0; r < n_merges; r++, pos += 12) {
            int32_t l = read_i32(data + pos), rr = read_i32(data + pos + 4);
            int32_t res = read_i32(data + pos + 8);
            if (l < 0 || l >= n || rr < 0 || rr >= n || res < 0 || res >= n) {
                tok_err(err, err_size, "merge %ld has a token id outside the vocabulary", (long)r, 0);
                return -1;
            }
            size_t ll, rl, xl;
            const unsigned char *ls = tok_piece(t, l, &ll), *rs = tok_piece(t, rr, &rl);
            const unsigned char *xs = tok_piece(t, res, &xl);
            if (xl != ll + rl || memcmp(xs, ls, ll) || memcmp(xs + ll, rs, rl)) {
                tok_err(err, err_size, "merge %ld: result is not left followed by right", (long)r, 0);
                return -1;
            }
            uint32_t m = cap - 1, i = tok_pair_hash(l, rr) & m;
            while (t->merge[i].left >= 0 && !(t->merge[i].left == l && t->merge[i].right == rr)) i = (i + 1) & m;
            if (t->merge[i].left >= 0) continue;   // a repeated pair keeps its first rank
            t->merge[i] = (TokMerge){l, rr, res, (int32_t)r};
        }
    }
    if (system_len) {
        t->system_prompt = malloc((size_t)system_len + 1);
        if (!t->system_prompt) {
            tok_err(err, err_size, "out of memory", 0, 0);
            return -1;
        }
        memcpy(t->system_prompt, data + size - system_len, system_len);
        t->system_prompt[system_len] = '\0';
    }
    return 0;
}

/* Loads a tokenizer from memory (the bytes are copied; data may be freed).
   vocab_size: the model's, or -1 when unknown. Returns 0, or -1 with a
   short message in err. */
int tokenizer_load_memory(Tokenizer *t, const unsigned char *data, size_t size, int vocab_size,
                          char *err, size_t err_size) {
    memset(t, 0, sizeof(*t));
    t->bos_id = t->eos_id = t->pad_id = t->unk_id = -1;
    if (err && err_size) err[0] = '\0';
    int rc;
    if (size >= 4 && memcmp(data, "LTOK", 4) == 0) rc = tok_load_ltok(t, data, size, vocab_size, err, err_size);
    else rc = tok_load_legacy(t, data, size, vocab_size, err, err_size);
    if (rc) {
        tokenizer_free(t);
        return -1;
    }
    t->add_bos = (t->flags & TOKF_ADD_BOS) && t->bos_id >= 0;
    t->add_eos = (t->flags & TOKF_ADD_EOS) && t->eos_id >= 0;
    return 0;
}

/* Loads a tokenizer file: a regular file of at most TOK_MAX_FILE bytes (a
   FIFO or a device is refused; O_NONBLOCK keeps open() from waiting on a
   FIFO). Returns 0, or -1 with a short message in err. */
int tokenizer_load(Tokenizer *t, const char *path, int vocab_size, char *err, size_t err_size) {
    memset(t, 0, sizeof(*t));
    t->bos_id = t->eos_id = t->pad_id = t->unk_id = -1;
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) {
        if (err && err_size) snprintf(err, err_size, "cannot open tokenizer: %s", strerror(errno));
        return -1;
    }
    struct stat st;
    const char *bad = NULL;
    if (fstat(fd, &st) != 0) bad = "cannot stat tokenizer";
    else if (!S_ISREG(st.st_mode)) bad = "the tokenizer is not a regular file";
    else if (st.st_size > TOK_MAX_FILE) bad = "a tokenizer file is at most 1 GiB";
    unsigned char *data = bad ? NULL : malloc((size_t)st.st_size + 1);
    if (!bad && !data) bad = "out of memory";
    size_t size = 0;
    while (!bad && size < (size_t)st.st_size) {   // a file that shrinks meanwhile gives what it has
        ssize_t got = read(fd, data + size, (size_t)st.st_size - size);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) bad = "read error";
        if (got <= 0) break;
        size += (size_t)got;
    }
    close(fd);
    int rc = -1;
    if (bad) tok_err(err, err_size, bad, 0, 0);
    else rc = tokenizer_load_memory(t, data, size, vocab_size, err, err_size);
    free(data);
    return rc;
}

/* The bytes a token is stored as (sentencepiece's "▁" and <0xXX> spelling
   included); *len gets their count. id must be in [0, vocab_size). */
const unsigned char *tokenizer_piece(const Tokenizer *t, int id, size_t *len) {
    return tok_piece(t, id, len);
}

/* Id of the token whose bytes are exactly piece[0..len), or -1. */
int tokenizer_find(const Tokenizer *t, const char *piece, size_t len) {
    return tok_index_get(t, &t->all, (const unsigned char *)piece, len);
}

/* ----------------------------------------------------------------------------
   Encoding: shared pieces */

/* A growable array of token ids, writing into the caller's buffer first. */
typedef struct {
    int *ids;
    size_t n, cap;
} TokOut;

static int tok_emit(TokOut *o, int id) {
    if (o->n == o->cap) return -1;
    o->ids[o->n++] = id;
    return 0;
}

/* A binary heap of items of one type, the candidate merges of both BPE
   loops: pop gives the item that comes first by before(a, b) ("a comes
   first"). before() settles ties too: both loops' break an equal score or
   rank by position, leftmost first, as the references do. The heap grows by
   doubling. Each call passes the item's size and before(); the functions
   are inline, so the compiler copies and compares the items as a heap
   written for the one type would (encoding is O(n log n) through here). */
typedef int TokBefore(const void *a, const void *b);

typedef struct {
    unsigned char *items;   // (cap items)
    size_t n, cap;          // items held, items room
} TokHeap;

/* Adds a copy of item. Returns 0, or -1 out of memory (the heap unchanged). */
static inline int tok_heap_push(TokHeap *h, const void *item, size_t size, TokBefore *before) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 256;
        unsigned char *items = realloc(h->items, cap * size);
        if (!items) return -1;
        h->items = items;
        h->cap = cap;
    }
    /* sift up: parents move down into the hole until item's place is found */
    size_t i = h->n++;
    while (i > 0) {
        size_t up = (i - 1) / 2;
        if (!before(item, h->items + up * size)) break;
        memcpy(h->items + i * size, h->items + up * size, size);
        i = up;
    }
    memcpy(h->items + i * size, item, size);
    return 0;
}

/* Moves the first item into *top; the heap must not be empty. */
static inline void tok_heap_pop(TokHeap *h, void *top, size_t size, TokBefore *before) {
    memcpy(top, h->items, size);
    /* sift down: the last item, left where it is (past the end now), falls
       from the root's hole to its place */
    h->n--;
    const unsigned char *last = h->items + h->n * size;
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && before(h->items + (c + 1) * size, h->items + c * size)) c++;
        if (!before(h->items + c * size, last)) break;
        memcpy(h->items + i * size, h->items + c * size, size);
        i = c;
    }
    if (h->n) memcpy(h->items + i * size, last, size);
}

/* Length of the longest whole-matched piece (user-defined / added token) at
   s[0..n), or 0. */
static size_t tok_match_special(const Tokenizer *t, const unsigned char *s, size_t n) {
    if (!t->n_special_len || !(t->special_first[s[0] >> 3] & (1u << (s[0] & 7)))) return 0;
    for (int k = 0; k < t->n_special_len; k++) {
        size_t len = (size_t)t->special_len[k];
        if (len <= n && tok_index_get(t, &t->special, s, len) >= 0) return len;
    }
    return 0;
}

/* ----------------------------------------------------------------------------
   Encoding: sentencepiece BPE */

/* sentencepiece's normalizer with the identity rule set (what Llama uses):
   invalid UTF-8 bytes become U+FFFD one byte at a time, " " becomes "▁",
   a "▁" is put in front, and with remove_extra_whitespaces leading,
   trailing and repeated spaces go. out must hold 3 * len + 3 bytes.
   Returns the normalized length. */
static size_t sp_normalize(const Tokenizer *t, const unsigned char *in, size_t len, unsigned char *out) {
    int rm = (t->flags & TOKF_REMOVE_EXTRA_WS) != 0;
    size_t i = 0, o = 0;
    if (rm) while (i < len && in[i] == ' ') i++;
    if (i == len) return 0;
    if (t->flags & TOKF_DUMMY_PREFIX) {
        memcpy(out, TOK_SPACE, 3);
        o = 3;
    }
    int prev_space = rm;
    while (i < len) {
        /* one unit: a user-defined piece (kept as it is), or one character */
        const unsigned char *u = in + i;
        size_t ulen = rm ? tok_match_special(t, u, len - i) : 0, consumed;
        if (ulen) consumed = ulen;
        else {
            int cl = utf8_valid_len(u, len - i);
            if (cl) consumed = ulen = (size_t)cl;
            else {
                u = TOK_REPLACEMENT;
                ulen = 3;
                consumed = 1;
            }
        }
        size_t k = 0;
        if (prev_space) while (k < ulen && u[k] == ' ') k++;
        if (k < ulen) {
            for (; k < ulen; k++) {
                if (u[k] == ' ') {
                    memcpy(out + o, TOK_SPACE, 3);
                    o += 3;
                } else out[o++] = u[k];
            }
            prev_space = u[ulen - 1] == ' ';
        }
        i += consumed;
        if (!rm) prev_space = 0;
    }
    if (rm) while (o >= 3 && memcmp(out + o - 3, TOK_SPACE, 3) == 0) o -= 3;
    return o;
}

typedef struct {
    int32_t prev, next;     // neighbours in the list, -1 at the ends
    uint32_t start, len;    // bytes of the normalized text; len 0: merged away
    int32_t freeze;         // a user-defined piece: never merged
} SpSymbol;

typedef struct {
    float score;            // score of the merged piece, higher first
    int32_t left, right;    // symbols; ties go to the leftmost
    uint32_t size;          // bytes of the merged piece, to spot stale pairs
} SpPair;

/* The heap's order (a TokBefore): the highest score first, then the leftmost. */
static int sp_pair_before(const void *a, const void *b) {
    const SpPair *x = a, *y = b;
    return x->score > y->score || (x->score == y->score && x->left < y->left);
}

/* Where an unused piece came from: sentencepiece splits it back into these. */
typedef struct {
    uint32_t lstart, llen, rstart, rlen;
} SpRevMerge;

typedef struct {
    const Tokenizer *t;
    const unsigned char *norm;
    SpSymbol *sym;
    TokHeap heap;           // of SpPair
    SpRevMerge *rev;        // (vocab_size) for unused pieces, allocated on need
    unsigned char *rev_set; // (vocab_size)
    int oom;
} SpState;

/* Pushes the pair (left, right) if their concatenation is a piece. */
static void sp_maybe_add_pair(SpState *st, int left, int right) {
    if (left < 0 || right < 0 || st->sym[left].freeze || st->sym[right].freeze) return;
    const Tokenizer *t = st->t;
    const SpSymbol *l = &st->sym[left], *r = &st->sym[right];
    uint32_t size = l->len + r->len;
    int id = tok_index_get(t, &t->bpe, st->norm + l->start, size);
    if (id < 0) return;
    if (tok_heap_push(&st->heap, &(SpPair){t->score[id], left, right, size}, sizeof(SpPair), sp_pair_before)) {
        st->oom = 1;
        return;
    }
    if (t->type[id] == PIECE_UNUSED) {
        if (!st->rev) {
            st->rev = malloc(sizeof(SpRevMerge) * (size_t)t->vocab_size);
            st->rev_set = calloc((size_t)t->vocab_size, 1);
            if (!st->rev || !st->rev_set) {
                st->oom = 1;
                return;
            }
        }
        st->rev[id] = (SpRevMerge){l->start, l->len, r->start, r->len};
        st->rev_set[id] = 1;
    }
}

/* sentencepiece's PieceToId: reserved pieces first, then the others, else unk. */
static int sp_piece_to_id(const Tokenizer *t, const unsigned char *s, size_t n) {
    int id = tok_index_get(t, &t->all, s, n);
    return id >= 0 ? id : t->unk_id;
}

typedef struct {
    TokOut *out;
    int prev_unk;
} SpEmit;

/* Emits the final symbol s[0..n) as sentencepiece does: unused pieces are
   split back into the pieces they were merged from; an unknown piece
   becomes one <0xXX> token per byte (byte fallback), or one unk token for
   a run of unknown pieces. */
static int sp_emit_piece(SpState *st, SpEmit *e, uint32_t start, uint32_t n) {
    const Tokenizer *t = st->t;
    const unsigned char *s = st->norm + start;
    int id = sp_piece_to_id(t, s, n);
    if (t->type[id] == PIECE_UNUSED && st->rev_set && st->rev_set[id]) {
        SpRevMerge rm = st->rev[id];
        if (sp_emit_piece(st, e, rm.lstart, rm.llen)) return -1;
        return sp_emit_piece(st, e, rm.rstart, rm.rlen);
    }
    int is_unk = t->type[id] == PIECE_UNKNOWN;
    if (t->type[id] == PIECE_CONTROL) {
        if (tok_emit(e->out, id)) return -1;
    } else if (is_unk && (t->flags & TOKF_BYTE_FALLBACK)) {
        for (uint32_t i = 0; i < n; i++) {
            int b = t->byte_token[s[i]];
            if (tok_emit(e->out, b >= 0 ? b : t->unk_id)) return -1;
        }
    } else if (!(is_unk && e->prev_unk)) {
        if (tok_emit(e->out, id)) return -1;
    }
    e->prev_unk = is_unk;
    return 0;
}

/* Returns 0, -1 when out of memory, -2 when out is full. */
static int sp_encode(const Tokenizer *t, const unsigned char *text, size_t len, TokOut *out) {
    if (len > TOK_MAX_TEXT) return -1;
    unsigned char *norm = malloc(3 * len + 3 + 1);
    if (!norm) return -1;
    size_t n = sp_normalize(t, text, len, norm);
    int rc = 0;
    SpState st = {t, norm, NULL, {NULL, 0, 0}, NULL, NULL, 0};
    if (n == 0) goto done;
    st.sym = malloc(sizeof(SpSymbol) * n);
    if (!st.sym) {
        rc = -1;
        goto done;
    }
    /* split into characters, user-defined pieces whole */
    int count = 0;
    for (size_t p = 0; p < n;) {
        size_t m = tok_match_special(t, norm + p, n - p);
        int freeze = m > 0;
        if (!m) {
            static const unsigned char one_char_len[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
            m = one_char_len[norm[p] >> 4];
            if (m > n - p) m = n - p;
        }
        st.sym[count] = (SpSymbol){count - 1, -1, (uint32_t)p, (uint32_t)m, freeze};
        if (count) st.sym[count - 1].next = count;
        count++;
        p += m;
    }
    for (int i = 1; i < count; i++) sp_maybe_add_pair(&st, i - 1, i);
    /* merge the best pair until no adjacent pair forms a piece */
    while (st.heap.n && !st.oom) {
        SpPair top;
        tok_heap_pop(&st.heap, &top, sizeof(SpPair), sp_pair_before);
        SpSymbol *l = &st.sym[top.left], *r = &st.sym[top.right];
        if (l->len == 0 || r->len == 0 || l->len + r->len != top.size) continue;   // stale
        l->len += r->len;
        l->next = r->next;
        if (r->next >= 0) st.sym[r->next].prev = top.left;
        r->len = 0;
        sp_maybe_add_pair(&st, l->prev, top.left);
        sp_maybe_add_pair(&st, top.left, l->next);
    }
    if (st.oom) {
        rc = -1;
        goto done;
    }
    SpEmit e = {out, 0};
    for (int i = 0; i >= 0; i = st.sym[i].next) {
        if (sp_emit_piece(&st, &e, st.sym[i].start, st.sym[i].len)) {
            rc = -2;
            break;
        }
    }
done:
    free(norm);
    free(st.sym);
    free(st.heap.items);
    free(st.rev);
    free(st.rev_set);
    return rc;
}

/* ----------------------------------------------------------------------------
   Encoding: the API */

static int bl_encode(const Tokenizer *t, const unsigned char *text, size_t len, TokOut *out);

/* Most tokens encode(text of len bytes) can produce, BOS included.
   tokenizer_encode's len + 3 covers every tokenizer whose vocabulary has
   "▁" and U+FFFD (Llama 2's has both) and every byte-level one that does
   not normalize (NFC may lengthen text: U+1D160 is 3 characters). */
size_t tokenizer_max_tokens(const Tokenizer *t, size_t len) {
    size_t per_byte = 1, extra = 1;   // BOS
    if (t->kind == TOK_SENTENCEPIECE) {
        /* the dummy prefix; " " or a bad byte may become 3 byte tokens */
        if (t->fallback_ok) extra += 1;
        else per_byte = 3, extra += 3;
    } else {
        if (t->flags & TOKF_NFC) per_byte = UNI_NFC_MAX_GROWTH;   // NFC may lengthen the text
        if (t->flags & TOKF_DUMMY_PREFIX) per_byte += 1;         // a space before each segment
    }
    return per_byte * len + extra;
}

static int tok_encode_into(const Tokenizer *t, const char *text, size_t len, int add_bos, TokOut *o) {
    if (add_bos && t->bos_id >= 0 && tok_emit(o, t->bos_id)) return -2;
    if (t->kind == TOK_SENTENCEPIECE) return sp_encode(t, (const unsigned char *)text, len, o);
    return bl_encode(t, (const unsigned char *)text, len, o);
}

/* Encodes text[0..len) into tokens, which must hold len + 3 ints (see
   tokenizer_max_tokens). add_bos: put bos_id first, if there is one.
   Returns the number of tokens, or -1 if memory ran out (or, only with a
   vocabulary that lacks "▁" or U+FFFD, or text that NFC lengthens, if
   len + 3 tokens are too few). */
int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, int add_bos, int *tokens) {
    if (len > TOK_MAX_TEXT) return -1;
    size_t cap = len + 3;
    if (tokenizer_max_tokens(t, len) <= cap) {
        TokOut o = {tokens, 0, cap};
        int rc = tok_encode_into(t, text, len, add_bos, &o);
        return rc ? -1 : (int)o.n;
    }
    /* a vocabulary that may need more: encode aside, copy if it fits */
    size_t big = tokenizer_max_tokens(t, len);
    int *tmp = malloc(sizeof(int) * big);
    if (!tmp) return -1;
    TokOut o = {tmp, 0, big};
    int rc = tok_encode_into(t, text, len, add_bos, &o);
    if (rc || o.n > cap) {
        free(tmp);
        return -1;
    }
    memcpy(tokens, tmp, sizeof(int) * o.n);
    free(tmp);
    return (int)o.n;
}

/* As tokenizer_encode, into tokens[0..max_tokens). Returns the count, -1
   when out of memory, -2 when max_tokens is too few. */
int tokenizer_encode_n(const Tokenizer *t, const char *text, size_t len, int add_bos, int *tokens,
                       size_t max_tokens) {
    if (len > TOK_MAX_TEXT) return -1;
    TokOut o = {tokens, 0, max_tokens};
    int rc = tok_encode_into(t, text, len, add_bos, &o);
    return rc ? rc : (int)o.n;
}

/* ----------------------------------------------------------------------------
   Encoding: Unicode NFC (byte-level, when the source normalizes to it)

   As Rust's unicode-normalization crate inside tokenizers: decompose every
   character canonically, sort each run of combining marks by class
   (stably), then compose each mark with the last starter unless a mark of
   the same or a higher class, or a starter, stands between them. The tables
   are in unicode_tables.h; Hangul syllables are arithmetic. A byte that is
   not valid UTF-8 passes through as a starter that composes with nothing. */

enum {
    HANGUL_S = 0xAC00, HANGUL_L = 0x1100, HANGUL_V = 0x1161, HANGUL_T = 0x11A7,
    HANGUL_LN = 19, HANGUL_VN = 21, HANGUL_TN = 28, HANGUL_SN = 19 * 21 * 28
};
#define NFC_BAD_BYTE 0x110000u   // + the byte: a code point array's invalid byte
#define NFC_CP(v) ((v) & 0xFFFFFFu)   // entries are code point | class << 24
#define NFC_CCC(v) ((v) >> 24)
#define UNI_COUNT(table) (sizeof(table) / sizeof(table[0]))

/* 1 if c lies in one of the sorted ranges table[0..n). */
static int uni_in(const uint32_t (*table)[2], size_t n, uint32_t c) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < table[mid][0]) hi = mid;
        else if (c > table[mid][1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}

/* Canonical combining class of c (0 for a starter or an invalid byte). */
static uint32_t uni_ccc(uint32_t c) {
    size_t lo = 0, hi = UNI_COUNT(UNI_CCC);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < UNI_CCC[mid][0]) hi = mid;
        else if (c > UNI_CCC[mid][1]) lo = mid + 1;
        else return UNI_CCC[mid][2];
    }
    return 0;
}

/* Row of table (sorted by its first two columns) holding a, b; NULL: none. */
static const uint32_t *uni_row(const uint32_t (*table)[3], size_t n, uint32_t a, uint32_t b) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (a < table[mid][0] || (a == table[mid][0] && b < table[mid][1])) hi = mid;
        else if (a > table[mid][0] || b > table[mid][1]) lo = mid + 1;
        else return table[mid];
    }
    return NULL;
}

/* Writes c's full canonical decomposition (c itself if none, as for a bad
   byte) as entries at out, when out is not NULL; returns how many it has
   (at most 4). */
static size_t nfc_decompose(uint32_t *out, uint32_t c) {
    uint32_t parts[3];
    size_t n = 0;
    if (c >= HANGUL_S && c < HANGUL_S + HANGUL_SN) {
        uint32_t s = c - HANGUL_S;
        parts[n++] = HANGUL_L + s / (HANGUL_VN * HANGUL_TN);
        parts[n++] = HANGUL_V + s % (HANGUL_VN * HANGUL_TN) / HANGUL_TN;
        if (s % HANGUL_TN) parts[n++] = HANGUL_T + s % HANGUL_TN;
    } else {
        size_t lo = 0, hi = UNI_COUNT(UNI_DECOMP);
        while (lo < hi) {
            size_t mid = (lo + hi) / 2;
            const uint32_t *row = UNI_DECOMP[mid];
            if (c == row[0]) {
                size_t k = nfc_decompose(out, row[1]);
                return row[2] ? k + nfc_decompose(out ? out + k : NULL, row[2]) : k;
            }
            if (c < row[0]) hi = mid;
            else lo = mid + 1;
        }
        if (out) out[0] = c | uni_ccc(c) << 24;
        return 1;
    }
    for (size_t i = 0; out && i < n; i++) out[i] = parts[i];   // jamo: class 0
    return n;
}

/* The character NFC composes a then b into, or 0 if none. */
static uint32_t nfc_compose(uint32_t a, uint32_t b) {
    if (a >= HANGUL_L && a < HANGUL_L + HANGUL_LN && b >= HANGUL_V && b < HANGUL_V + HANGUL_VN)
        return HANGUL_S + ((a - HANGUL_L) * HANGUL_VN + (b - HANGUL_V)) * HANGUL_TN;
    if (a >= HANGUL_S && a < HANGUL_S + HANGUL_SN && (a - HANGUL_S) % HANGUL_TN == 0 &&
        b > HANGUL_T && b < HANGUL_T + HANGUL_TN)
        return a + (b - HANGUL_T);
    const uint32_t *row = uni_row(UNI_COMPOSE, UNI_COUNT(UNI_COMPOSE), a, b);
    return row ? row[2] : 0;
}

/* Sorts the marks run[0..n) stably by class (a counting sort: any run is
   linear); tmp holds n entries. */
static void nfc_sort_marks(uint32_t *run, uint32_t *tmp, size_t n) {
    size_t start[257] = {0};
    for (size_t i = 0; i < n; i++) start[NFC_CCC(run[i]) + 1]++;
    for (int c = 0; c < 256; c++) start[c + 1] += start[c];
    for (size_t i = 0; i < n; i++) tmp[start[NFC_CCC(run[i])]++] = run[i];
    memcpy(run, tmp, sizeof(uint32_t) * n);
}

/* Composes the canonically ordered entries v[0..n) in place; returns the
   count left. */
static size_t nfc_compose_all(uint32_t *v, size_t n) {
    size_t out = 0, starter = 0;
    int have_starter = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t cc = NFC_CCC(v[i]);
        /* blocked unless adjacent, or every mark between has a lower class */
        if (have_starter && (out == starter + 1 || (NFC_CCC(v[out - 1]) != 0 && NFC_CCC(v[out - 1]) < cc))) {
            uint32_t c = nfc_compose(NFC_CP(v[starter]), NFC_CP(v[i]));
            if (c) {
                v[starter] = c;   // every composite is a starter
                continue;
            }
        }
        if (cc == 0) starter = out, have_starter = 1;
        v[out++] = v[i];
    }
    return out;
}

/* Writes code point c (< 0x110000) as UTF-8 at out; returns its length. */
static size_t tok_utf8_encode(unsigned char *out, uint32_t c) {
    if (c < 0x80) return out[0] = (unsigned char)c, 1;
    if (c < 0x800) {
        out[0] = (unsigned char)(0xC0 | c >> 6), out[1] = (unsigned char)(0x80 | (c & 0x3F));
        return 2;
    }
    if (c < 0x10000) {
        out[0] = (unsigned char)(0xE0 | c >> 12), out[1] = (unsigned char)(0x80 | (c >> 6 & 0x3F));
        out[2] = (unsigned char)(0x80 | (c & 0x3F));
        return 3;
    }
    out[0] = (unsigned char)(0xF0 | c >> 18), out[1] = (unsigned char)(0x80 | (c >> 12 & 0x3F));
    out[2] = (unsigned char)(0x80 | (c >> 6 & 0x3F)), out[3] = (unsigned char)(0x80 | (c & 0x3F));
    return 4;
}

/* The character at s[i] of s[0..n), as a code point or NFC_BAD_BYTE + the
   byte; *len its length in bytes. */
static uint32_t nfc_char(const unsigned char *s, size_t n, size_t i, size_t *len) {
    int k = s[i] < 0x80 ? 1 : utf8_valid_len(s + i, n - i);
    *len = k ? (size_t)k : 1;
    return k ? tok_utf8_decode(s + i, k) : NFC_BAD_BYTE + s[i];
}

/* The NFC of s[0..n), bytes that are not UTF-8 kept as they are: *out = NULL
   when that is s itself, else a malloc'd *out_len bytes (at most
   UNI_NFC_MAX_GROWTH * n) the caller frees. Returns 0, or -1 out of memory. */
static int tok_nfc(unsigned char **out, size_t *out_len, const unsigned char *s, size_t n) {
    *out = NULL, *out_len = n;
    size_t i = 0, k, count = 0;
    for (; i < n; i += k) {   // the quick check: most text is its own NFC
        uint32_t c = nfc_char(s, n, i, &k);
        if (c >= 0x80 && uni_in(UNI_NFC_UNSTABLE, UNI_COUNT(UNI_NFC_UNSTABLE), c)) break;
    }
    if (i == n) return 0;
    for (i = 0; i < n; i += k) count += nfc_decompose(NULL, nfc_char(s, n, i, &k));
    uint32_t *v = malloc(sizeof(uint32_t) * count), *tmp = malloc(sizeof(uint32_t) * count);
    if (!v || !tmp) {
        free(v);
        free(tmp);
        return -1;
    }
    size_t m = 0;
    for (i = 0; i < n; i += k) m += nfc_decompose(v + m, nfc_char(s, n, i, &k));
    for (size_t a = 0; a < m;) {   // each run of marks, in class order
        size_t b = a;
        while (b < m && NFC_CCC(v[b])) b++;
        if (b - a > 1) nfc_sort_marks(v + a, tmp, b - a);
        a = b + 1;
    }
    m = nfc_compose_all(v, m);
    size_t bytes = 0;
    unsigned char utf8[4];
    for (size_t j = 0; j < m; j++)
        bytes += NFC_CP(v[j]) >= NFC_BAD_BYTE ? 1 : tok_utf8_encode(utf8, NFC_CP(v[j]));
    unsigned char *text = malloc(bytes ? bytes : 1);
    if (text) {
        size_t len = 0;
        for (size_t j = 0; j < m; j++)
            if (NFC_CP(v[j]) >= NFC_BAD_BYTE) text[len++] = (unsigned char)(NFC_CP(v[j]) - NFC_BAD_BYTE);
            else len += tok_utf8_encode(text + len, NFC_CP(v[j]));
        *out = text, *out_len = len;
    }
    free(v);
    free(tmp);
    return text ? 0 : -1;
}

/* ----------------------------------------------------------------------------
   Encoding: byte-level BPE */

/* The classes of the GPT-2 pre-tokenizer regex; their code points,
   UNI_LETTER, UNI_NUMBER, UNI_SPACE and UNI_NUMERIC, are in unicode_tables.h. */
enum { UC_OTHER = 0, UC_LETTER = 1, UC_NUMBER = 2, UC_SPACE = 3 };

/* Class of code point c for the regex: letter, number, white space, other. */
static int uni_class(uint32_t c) {
    if (c < 0x80) {
        if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') return UC_LETTER;
        if (c >= '0' && c <= '9') return UC_NUMBER;
        if (c == ' ' || (c >= 0x09 && c <= 0x0D)) return UC_SPACE;
        return UC_OTHER;
    }
    if (uni_in(UNI_LETTER, UNI_COUNT(UNI_LETTER), c)) return UC_LETTER;
    if (uni_in(UNI_NUMBER, UNI_COUNT(UNI_NUMBER), c)) return UC_NUMBER;
    if (uni_in(UNI_SPACE, UNI_COUNT(UNI_SPACE), c)) return UC_SPACE;
    return UC_OTHER;
}

/* One character of the text: its class and its length in bytes. A byte that
   does not start a valid UTF-8 character is a character of its own, "other". */
typedef struct {
    int cls, len;
    uint32_t cp;
} BlChar;

static BlChar bl_char(const unsigned char *s, size_t n, size_t i) {
    if (s[i] < 0x80) return (BlChar){uni_class(s[i]), 1, s[i]};
    int k = utf8_valid_len(s + i, n - i);
    if (!k) return (BlChar){UC_OTHER, 1, 0xFFFFFFFFu};
    uint32_t cp = tok_utf8_decode(s + i, k);
    return (BlChar){uni_class(cp), k, cp};
}

/* End of the run of characters of class cls that starts at i. */
static size_t bl_run_end(const unsigned char *s, size_t n, size_t i, int cls) {
    while (i < n) {
        BlChar c = bl_char(s, n, i);
        if (c.cls != cls) break;
        i += (size_t)c.len;
    }
    return i;
}

/* End of the white-space pre-token that starts at i: "\s+(?!\S)" takes the
   run but leaves its last character to a word that follows; "\s+" takes a
   lone one. With newlines (Llama 3's "\s*[\r\n]+" first), a run holding a
   CR or LF ends after the last of them. */
static size_t bl_space_end(const unsigned char *s, size_t n, size_t i, int newlines) {
    size_t j = i, last = i, after_newline = 0;
    int count = 0;
    while (j < n) {
        BlChar d = bl_char(s, n, j);
        if (d.cls != UC_SPACE) break;
        last = j;
        j += (size_t)d.len;
        if (newlines && (s[last] == '\r' || s[last] == '\n')) after_newline = j;
        count++;
    }
    if (after_newline) return after_newline;
    if (j == n || count == 1) return j;
    return last;
}

/* End of the pre-token that starts at i, by the GPT-2 pattern
     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
   written out: the alternatives are tried in order, as the regex does. */
static size_t bl_gpt2_next(const unsigned char *s, size_t n, size_t i) {
    if (s[i] == '\'' && i + 1 < n) {
        unsigned char a = s[i + 1], b = i + 2 < n ? s[i + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
    BlChar c = bl_char(s, n, i);
    if (s[i] == ' ' && i + 1 < n) {
        /* " ?X+": a space joins the run of letters, numbers or others after it */
        BlChar d = bl_char(s, n, i + 1);
        if (d.cls != UC_SPACE) return bl_run_end(s, n, i + 1, d.cls);
    }
    if (c.cls != UC_SPACE) return bl_run_end(s, n, i, c.cls);
    return bl_space_end(s, n, i, 0);
}

static int bl_is_newline(const unsigned char *s, size_t n, size_t i) {
    return i < n && (s[i] == '\r' || s[i] == '\n');
}

/* End of the pre-token that starts at i, by Llama 3's pattern
     (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
      ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
   with at most max_digits numbers in \p{N}{1,3} (3; Qwen2's \p{N} is 1). */
static size_t bl_llama3_next(const unsigned char *s, size_t n, size_t i, int max_digits) {
    if (s[i] == '\'' && i + 1 < n) {
        /* case-insensitive, as Oniguruma folds: "ſ" (U+017F) matches "s" too */
        unsigned char a = s[i + 1], b = i + 2 < n ? s[i + 2] : 0;
        unsigned char la = (unsigned char)(a | 0x20), lb = (unsigned char)(b | 0x20);
        int alpha_a = (a | 0x20) >= 'a' && (a | 0x20) <= 'z', alpha_b = (b | 0x20) >= 'a' && (b | 0x20) <= 'z';
        if (alpha_a && (la == 's' || la == 't' || la == 'm' || la == 'd')) return i + 2;
        if (a == 0xC5 && b == 0xBF) return i + 3;
        if (alpha_a && alpha_b && ((la == 'r' && lb == 'e') || (la == 'v' && lb == 'e') || (la == 'l' && lb == 'l')))
            return i + 3;
    }
    BlChar c = bl_char(s, n, i);
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (c.cls == UC_LETTER) return bl_run_end(s, n, i, UC_LETTER);
    if (c.cls != UC_NUMBER && !bl_is_newline(s, n, i) && i + (size_t)c.len < n &&
        bl_char(s, n, i + (size_t)c.len).cls == UC_LETTER)
        return bl_run_end(s, n, i + (size_t)c.len, UC_LETTER);
    /* \p{N}{1,max_digits} */
    if (c.cls == UC_NUMBER) {
        size_t j = i;
        for (int k = 0; k < max_digits && j < n; k++) {
            BlChar d = bl_char(s, n, j);
            if (d.cls != UC_NUMBER) break;
            j += (size_t)d.len;
        }
        return j;
    }
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    size_t o = s[i] == ' ' && i + 1 < n && bl_char(s, n, i + 1).cls == UC_OTHER ? i + 1 : i;
    if (bl_char(s, n, o).cls == UC_OTHER) {
        size_t j = bl_run_end(s, n, o, UC_OTHER);
        while (bl_is_newline(s, n, j)) j++;
        return j;
    }
    return bl_space_end(s, n, i, 1);
}

typedef struct {
    int32_t id;             // token
    int32_t prev, next;     // neighbours, -1 at the ends
    int32_t alive;          // 0: merged into its left neighbour
} BlSymbol;

typedef struct {
    int32_t rank, pos, result;   // lowest rank first, then leftmost
} BlMerge;

typedef struct {
    const Tokenizer *t;
    TokOut *out;
    unsigned char *scratch; // (len + 1) a piece with the prefix space
    BlSymbol *sym;          // (len + 1)
    TokHeap heap;           // of BlMerge, the current word's
    size_t room;            // bytes of text scratch and sym are sized for
} BlState;

/* The heap's order (a TokBefore): the lowest rank first, then the leftmost. */
static int bl_before(const void *a, const void *b) {
    const BlMerge *x = a, *y = b;
    return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

/* Pushes the merge of symbols a and b (a before b), if there is one. */
static int bl_maybe_push(BlState *st, int a, int b) {
    if (a < 0 || b < 0) return 0;
    const TokMerge *m = tok_merge_get(st->t, st->sym[a].id, st->sym[b].id);
    return m ? tok_heap_push(&st->heap, &(BlMerge){m->rank, a, m->result}, sizeof(BlMerge), bl_before) : 0;
}

/* BPE on one pre-token, as Hugging Face's Word::merge_all: start from its
   bytes' tokens, repeatedly apply the lowest-ranked merge (leftmost first).
   Returns 0, -1 out of memory, -2 output full. */
static int bl_word(BlState *st, const unsigned char *w, size_t n) {
    const Tokenizer *t = st->t;
    if (t->flags & TOKF_IGNORE_MERGES) {
        int id = tok_index_get(t, &t->all, w, n);
        if (id >= 0) return tok_emit(st->out, id) ? -2 : 0;
    }
    int count = 0;
    for (size_t i = 0; i < n; i++) {
        int id = t->byte_token[w[i]];
        if (id < 0) id = t->unk_id;
        if (id < 0) continue;   // a byte the vocabulary lacks, and no unk: dropped
        st->sym[count] = (BlSymbol){id, count - 1, -1, 1};
        if (count) st->sym[count - 1].next = count;
        count++;
    }
    st->heap.n = 0;
    for (int i = 0; i + 1 < count; i++)
        if (bl_maybe_push(st, i, i + 1)) return -1;
    while (st->heap.n) {
        BlMerge top;
        tok_heap_pop(&st->heap, &top, sizeof(BlMerge), bl_before);
        BlSymbol *a = &st->sym[top.pos];
        if (!a->alive || a->next < 0) continue;
        BlSymbol *b = &st->sym[a->next];
        /* stale unless the pair there still merges into the same token */
        const TokMerge *m = tok_merge_get(t, a->id, b->id);
        if (!m || m->result != top.result) continue;
        a->id = top.result;
        b->alive = 0;
        a->next = b->next;
        if (b->next >= 0) st->sym[b->next].prev = top.pos;
        if (bl_maybe_push(st, a->prev, top.pos) || bl_maybe_push(st, top.pos, a->next)) return -1;
    }
    for (int i = 0; i >= 0 && i < count; i = st->sym[i].next)
        if (tok_emit(st->out, st->sym[i].id)) return -2;
    return 0;
}

/* One piece of text between added tokens (and digits): prefix space, regex, BPE. */
static int bl_piece(BlState *st, const unsigned char *s, size_t n) {
    const Tokenizer *t = st->t;
    if (!n) return 0;
    if ((t->flags & TOKF_DUMMY_PREFIX) && s[0] != ' ') {
        st->scratch[0] = ' ';
        memcpy(st->scratch + 1, s, n);
        s = st->scratch;
        n++;
    }
    if (t->pretokenizer == PRETOK_NONE) return bl_word(st, s, n);
    for (size_t i = 0; i < n;) {
        size_t j = t->pretokenizer == PRETOK_LLAMA3 ? bl_llama3_next(s, n, i, 3)
                 : t->pretokenizer == PRETOK_QWEN2 ? bl_llama3_next(s, n, i, 1)
                 : bl_gpt2_next(s, n, i);
        int rc = bl_word(st, s + i, j - i);
        if (rc) return rc;
        i = j;
    }
    return 0;
}

/* Makes scratch and sym hold a text of n bytes. Returns 0, -1 out of memory. */
static int bl_make_room(BlState *st, size_t n) {
    if (n <= st->room) return 0;
    unsigned char *scratch = realloc(st->scratch, n + 1);
    if (scratch) st->scratch = scratch;
    BlSymbol *sym = realloc(st->sym, sizeof(BlSymbol) * (n + 1));
    if (sym) st->sym = sym;
    if (!scratch || !sym) return -1;
    st->room = n;
    return 0;
}

/* A stretch between added tokens: digits split off one by one if asked. */
static int bl_segment(BlState *st, const unsigned char *s, size_t n) {
    if (st->t->pretokenizer != PRETOK_DIGITS_GPT2) return bl_piece(st, s, n);
    size_t start = 0;
    for (size_t i = 0; i < n;) {
        BlChar c = bl_char(s, n, i);
        int numeric = c.cp < 0x80 ? (c.cp >= '0' && c.cp <= '9')
                                  : c.cp != 0xFFFFFFFFu && uni_in(UNI_NUMERIC, UNI_COUNT(UNI_NUMERIC), c.cp);
        if (numeric) {
            int rc = bl_piece(st, s + start, i - start);
            if (!rc) rc = bl_piece(st, s + i, (size_t)c.len);
            if (rc) return rc;
            start = i + (size_t)c.len;
        }
        i += (size_t)c.len;
    }
    return bl_piece(st, s + start, n - start);
}

/* A stretch between added tokens, first in NFC if the source normalizes:
   tokenizers normalizes the text around added tokens, not across them. */
static int bl_normalized_segment(BlState *st, const unsigned char *s, size_t n) {
    unsigned char *nfc = NULL;
    size_t len = n;
    if ((st->t->flags & TOKF_NFC) && tok_nfc(&nfc, &len, s, n)) return -1;
    if (!nfc) return bl_segment(st, s, n);
    int rc = bl_make_room(st, len) ? -1 : bl_segment(st, nfc, len);
    free(nfc);
    return rc;
}

static int bl_encode(const Tokenizer *t, const unsigned char *text, size_t len, TokOut *out) {
    BlState st = {t, out, malloc(len + 1), malloc(sizeof(BlSymbol) * (len + 1)), {NULL, 0, 0}, len};
    int rc = 0;
    if (!st.scratch || !st.sym) rc = -1;
    /* added tokens are matched first, longest at the leftmost place */
    size_t seg = 0;
    for (size_t i = 0; i < len && !rc;) {
        size_t m = tok_match_special(t, text + i, len - i);
        if (!m) {
            i++;
            continue;
        }
        rc = bl_normalized_segment(&st, text + seg, i - seg);
        if (!rc && tok_emit(out, tok_index_get(t, &t->special, text + i, m))) rc = -2;
        i += m;
        seg = i;
    }
    if (!rc) rc = bl_normalized_segment(&st, text + seg, len - seg);
    free(st.scratch);
    free(st.sym);
    free(st.heap.items);
    return rc;
}

/* ----------------------------------------------------------------------------
   Decoding */

void decoder_init(TokenDecoder *d) {
    memset(d, 0, sizeof(*d));
    d->bos_ws = 1;
}

/* Appends to out[0..size) what fits; counts what was written. */
typedef struct {
    char *out;
    size_t size, n;
} TokWriter;

/* The byte that GPT-2's byte alphabet writes as character c, or -1. */
static int bl_alphabet_byte(uint32_t c) {
    if ((c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE && c <= 0xFF)) return (int)c;
    if (c < 0x100 || c >= 0x144) return -1;
    /* the other bytes, in increasing order, are U+0100 onwards */
    int k = (int)(c - 0x100);
    for (int v = 0; v < 256; v++) {
        int printable = (v >= '!' && v <= '~') || (v >= 0xA1 && v <= 0xAC) || v >= 0xAE;
        if (!printable && k-- == 0) return v;
    }
    return -1;
}

/* Hugging Face's ByteLevel decoder reads every token as byte-alphabet
   characters when it can: an added token (stored as its text) made only of
   such characters decodes to the bytes they stand for, "été" to "\xE9t\xE9".
   Returns 1 (and feeds those bytes to the decoder when w is not NULL) if
   every character of s is in the alphabet, else 0. */
static void tok_feed_byte(const Tokenizer *t, TokenDecoder *d, unsigned char b, TokWriter *w);

static int bl_feed_alphabet(const Tokenizer *t, TokenDecoder *d, const unsigned char *s, size_t len,
                            TokWriter *w) {
    for (size_t i = 0; i < len;) {
        int k = utf8_valid_len(s + i, len - i);
        int b = k ? bl_alphabet_byte(tok_utf8_decode(s + i, k)) : -1;
        if (b < 0) return 0;
        if (w) tok_feed_byte(t, d, (unsigned char)b, w);
        i += (size_t)k;
    }
    return 1;
}


static void tok_put(TokWriter *w, const void *s, size_t n) {
    size_t room = w->size - w->n;
    if (n > room) n = room;
    memcpy(w->out + w->n, s, n);
    w->n += n;
}

/* Ends the pending bytes: sentencepiece turns each byte of an unfinished
   character into U+FFFD; Hugging Face (from_utf8_lossy) turns the whole
   unfinished character into one. */
static void tok_flush_pending(const Tokenizer *t, TokenDecoder *d, TokWriter *w) {
    if (!d->n_pending) return;
    int k = t->kind == TOK_SENTENCEPIECE ? d->n_pending : 1;
    for (int i = 0; i < k; i++) tok_put(w, TOK_REPLACEMENT, 3);
    d->n_pending = 0;
}

/* Feeds one byte of decoded output through the UTF-8 assembler. */
static void tok_feed_byte(const Tokenizer *t, TokenDecoder *d, unsigned char b, TokWriter *w) {
    d->pending[d->n_pending++] = b;
    while (d->n_pending) {
        int st = utf8_status(d->pending, d->n_pending);
        if (st == 0) {
            tok_put(w, d->pending, (size_t)d->n_pending);
            d->n_pending = 0;
        } else if (st > 0) {
            break;
        } else if (t->kind == TOK_SENTENCEPIECE || d->n_pending == 1) {
            /* sentencepiece: the first byte is U+FFFD, the rest is looked at again */
            tok_put(w, TOK_REPLACEMENT, 3);
            memmove(d->pending, d->pending + 1, (size_t)--d->n_pending);
        } else {
            /* from_utf8_lossy: the unfinished character is one U+FFFD,
               and the byte that broke it starts afresh */
            tok_put(w, TOK_REPLACEMENT, 3);
            d->pending[0] = b;
            d->n_pending = 1;
        }
    }
}

/* Bytes of out that tokenizer_decode may need for one token: max_token_length
   + 16 for sentencepiece; for byte-level 3 * max_token_length + 16, since a
   token that is not valid UTF-8 decodes to a U+FFFD (3 bytes) per bad byte
   (real vocabularies stay far below: their tokens are mostly valid text). */
size_t tokenizer_decode_size(const Tokenizer *t) {
    size_t m = (size_t)t->max_token_length;
    return (t->kind == TOK_BYTELEVEL ? 3 * m : m) + 16;
}

/* The text that token adds to the decoded string, written to out (at most
   out_size bytes, tokenizer_decode_size(t) always suffices; what does not fit
   is dropped). Returns the bytes written. Bytes of an unfinished UTF-8
   character wait in d. */
size_t tokenizer_decode(const Tokenizer *t, TokenDecoder *d, int token, char *out, size_t out_size) {
    TokWriter w = {out, out_size, 0};
    if (token < 0 || token >= t->vocab_size) return 0;
    size_t len;
    const unsigned char *s = tok_piece(t, token, &len);
    int ty = t->type[token];
    if (t->kind == TOK_BYTELEVEL) {
        /* special tokens are skipped (skip_special_tokens=True); the rest is bytes */
        if (ty == PIECE_CONTROL) return 0;
        if (ty == PIECE_USER && bl_feed_alphabet(t, d, s, len, NULL)) {
            bl_feed_alphabet(t, d, s, len, &w);
            return w.n;
        }
        for (size_t i = 0; i < len; i++) tok_feed_byte(t, d, s[i], &w);
        return w.n;
    }
    /* sentencepiece */
    if (ty == PIECE_BYTE) {
        tok_feed_byte(t, d, (unsigned char)tok_byte_piece_value(s, len), &w);
        if (w.n) d->emitted = 1;
        return w.n;
    }
    tok_flush_pending(t, d, &w);
    if (w.n) d->emitted = 1;
    if (d->bos_ws_seen || d->emitted) d->bos_ws = 0;
    d->bos_ws_seen = 0;
    if (ty == PIECE_CONTROL) return w.n;
    if (ty == PIECE_UNKNOWN) {
        tok_put(&w, " \xE2\x81\x87 ", 5);   // sentencepiece's unk_surface " ⁇ "
        d->emitted = 1;
        return w.n;
    }
    if (d->bos_ws && (t->flags & (TOKF_DUMMY_PREFIX | TOKF_REMOVE_EXTRA_WS)) && len >= 3 &&
        memcmp(s, TOK_SPACE, 3) == 0) {
        s += 3;
        len -= 3;
        d->bos_ws_seen = !(t->flags & TOKF_REMOVE_EXTRA_WS);
    }
    size_t before = w.n;
    for (size_t i = 0; i < len;) {
        if (len - i >= 3 && memcmp(s + i, TOK_SPACE, 3) == 0) {
            tok_put(&w, " ", 1);
            i += 3;
        } else {
            size_t j = i + 1;
            while (j < len && !(len - j >= 3 && memcmp(s + j, TOK_SPACE, 3) == 0)) j++;
            tok_put(&w, s + i, j - i);
            i = j;
        }
    }
    if (w.n > before) d->emitted = 1;
    return w.n;
}

/* What is still pending at the end of the text. */
size_t tokenizer_decode_flush(const Tokenizer *t, TokenDecoder *d, char *out, size_t out_size) {
    TokWriter w = {out, out_size, 0};
    tok_flush_pending(t, d, &w);
    if (w.n) d->emitted = 1;
    return w.n;
}
