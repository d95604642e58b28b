/* libFuzzer target: the command line, then the sampler.

   Input layout: arguments separated by NUL bytes, up to a double NUL; what
   follows is logits, little-endian float32 (NaN and inf included), one per
   token of the vocabulary. The arguments go to parse_options(), which must
   accept them or refuse them with a message, never exit; --tokens goes to
   parse_token_ids(). Accepted sampling settings then draw from the logits,
   with a history of tokens taken from them: finite logits must give at
   least one candidate, probabilities that are finite and sum to 1, and
   draws inside the vocabulary; logits that are not all finite, none. */

#define TESTING
#include "../run.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_ARGS 256
#define MAX_VOCAB_FUZZED 4096

static void check(int ok) {
    if (!ok) __builtin_trap();
}

static float probability_sum(const Candidate *c, int m) {
    float sum = 0.0f;
    for (int i = 0; i < m; i++) sum += c[i].prob;
    return sum;
}

static void sample(const SamplerSettings *settings, uint64_t seed, const float *given, int vocab) {
    float *logits = xcalloc(vocab, sizeof(float), "logits");
    memcpy(logits, given, (size_t)vocab * sizeof(float));
    int history[64], n_history = vocab < 64 ? vocab : 64;
    for (int i = 0; i < n_history; i++) {
        uint32_t bits;
        memcpy(&bits, &given[i], 4);
        history[i] = (int)((bits >> 7) % (uint32_t)vocab);
    }
    Sampler s;
    init_sampler(&s, vocab, settings, seed);
    int finite = all_finite(given, vocab), m = sampler_distribution(&s, logits, history, n_history);
    check(finite ? m >= 1 && m <= vocab : m == 0);
    if (m > 0) {
        for (int i = 0; i < m; i++)
            check(s.candidates[i].index >= 0 && s.candidates[i].index < vocab && isfinite(s.candidates[i].prob) &&
                  s.candidates[i].prob >= 0.0f);
        check(fabsf(probability_sum(s.candidates, m) - 1.0f) < 1e-3f);
        float draws[] = {0.0f, random_f32(&s.rng_state), 0.99999994f};
        for (int i = 0; i < 3; i++) {
            int token = sampler_draw(&s, m, draws[i]);
            check(token >= 0 && token < vocab);
        }
        if (settings->temperature == 0.0f) { // --probs when greedy: the penalised logits at T = 1
            tempered_softmax(logits, vocab, 1.0f);
            float sum = 0.0f;
            for (int i = 0; i < vocab; i++) {
                check(isfinite(logits[i]));
                sum += logits[i];
            }
            check(fabsf(sum - 1.0f) < 1e-3f);
        }
    }
    free_sampler(&s);
    free(logits);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    size_t args_len = size;
    for (size_t i = 0; i + 1 < size; i++)
        if (data[i] == 0 && data[i + 1] == 0) { args_len = i; break; }
    char *text = xcalloc(args_len + 1, 1, "arguments");
    memcpy(text, data, args_len);
    char *argv[MAX_ARGS + 1] = {"run"};
    int argc = 1;
    for (size_t i = 0; i <= args_len && argc < MAX_ARGS; i += strlen(text + i) + 1) argv[argc++] = text + i;
    argv[argc] = NULL;

    Options o;
    char err[ERROR_SIZE];
    size_t logit_bytes = size - args_len > 2 ? size - args_len - 2 : 0;
    int vocab = (int)(logit_bytes / 4 < MAX_VOCAB_FUZZED ? logit_bytes / 4 : MAX_VOCAB_FUZZED);
    if (parse_options(&o, argc, argv, err) == 0) {
        if (o.prompt_ids) {
            TokenList ids = {0};
            if (parse_token_ids(o.prompt_ids, vocab > 0 ? vocab : 32000, &ids, err) >= 0)
                for (int i = 0; i < ids.n; i++) check(ids.ids[i] >= 0 && ids.ids[i] < (vocab > 0 ? vocab : 32000));
            free(ids.ids);
        }
        if (vocab > 0) {
            float *logits = xcalloc(vocab, sizeof(float), "logits");
            memcpy(logits, data + args_len + 2, (size_t)vocab * 4);
            sample(&o.sampling, o.seed, logits, vocab);
            free(logits);
        }
    }
    free(text);
    return 0;
}
