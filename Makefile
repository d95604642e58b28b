# Builds ./run and runs the tests. `make` is all a user needs.

CC ?= cc
# -O3 -march=native: the kernels are plain C loops that the compiler
# vectorises for the processor it runs on; no -ffast-math, because the tests
# hold the logits to a PyTorch reference.
CFLAGS ?= -O3 -march=native
WARNINGS = -Wall -Wextra
# OpenMP spreads matrix rows and attention heads over the cores. It is
# optional: run-noomp is built without it and must give the same logits.
OPENMP ?= -fopenmp
# The tests' Python: the project-local environment that .ci/run sets up,
# else whatever python3 is on the PATH.
PYTHON ?= $(shell test -x .venv/bin/python && echo .venv/bin/python || echo python3)

.PHONY: all test clean

all: run

run: run.c tokenizer.c
	$(CC) $(CFLAGS) $(WARNINGS) $(OPENMP) -o $@ run.c -lm

# The same engine without OpenMP: the pragmas are ignored, so their warning is too.
run-noomp: run.c tokenizer.c
	$(CC) $(CFLAGS) $(WARNINGS) -Wno-unknown-pragmas -o $@ run.c -lm

test: run run-noomp
	$(PYTHON) -m pytest -q test_all.py tests

clean:
	rm -f run run-noomp tests/tokenizer_driver
