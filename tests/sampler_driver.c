/* Test driver: run.c's sampler on logits given on stdin, so that
   tests/test_sampling.py can hold each step to its definition.

   stdin:  vocab n_history temperature top_k top_p min_p repeat_penalty
           frequency_penalty presence_penalty repeat_window
           n_history token ids
           vocab logits
           n_draws, then that many r in [0, 1)
   stdout: m, then m lines "index prob" (the distribution after steps 1-5),
           then one line per draw: the token sampler_draw() picks for r
           (-1 when m is 0: logits that are not finite give no distribution). */

#define TESTING
#include "../run.c"

int main(void) {
    int vocab, n_history;
    SamplerSettings o;
    if (scanf("%d %d %f %d %f %f %f %f %f %d", &vocab, &n_history, &o.temperature, &o.top_k, &o.top_p,
              &o.min_p, &o.repeat_penalty, &o.frequency_penalty, &o.presence_penalty, &o.repeat_window) != 10)
        return 2;
    int *history = xcalloc(n_history, sizeof(int), "history");
    float *logits = xcalloc(vocab, sizeof(float), "logits");
    for (int i = 0; i < n_history; i++) if (scanf("%d", &history[i]) != 1) return 2;
    for (int i = 0; i < vocab; i++) if (scanf("%f", &logits[i]) != 1) return 2;
    Sampler s;
    init_sampler(&s, vocab, &o, 1);
    int m = sampler_distribution(&s, logits, history, n_history);
    printf("%d\n", m);
    for (int i = 0; i < m; i++) printf("%d %.9g\n", s.candidates[i].index, s.candidates[i].prob);
    int n_draws;
    if (scanf("%d", &n_draws) != 1) return 2;
    for (int i = 0; i < n_draws; i++) {
        float r;
        if (scanf("%f", &r) != 1) return 2;
        printf("%d\n", m > 0 ? sampler_draw(&s, m, r) : -1);
    }
    free_sampler(&s);
    free(history);
    free(logits);
    return 0;
}
