"""Long contexts: a prompt of 1100 tokens and greedy generation after it,
so that attention runs over many of run.c's chunks of positions (128 each,
merged by an online softmax), in the prompt's batches and token by token.

The model is small and random (dim 64, 2 layers, GQA 4 query heads on 2 kv
heads), with the query and key projections scaled up so that attention is
sharp: each row's scores then spread over several units and their max moves
from chunk to chunk, which a merge that forgets to rescale gets wrong.
f32 weights: teacher-forced logits against model.py's PyTorch reference,
within 3e-5 of each row's largest logit (measured: 2.7e-6, with the AVX-512
kernels and with RUN_AVX512=0 alike). q8_0 weights
(an f16 KV cache, which the fast kernel reads directly): ./run against
./run-plain on the same file, within the 2e-3 relative rms per row that
test_weight_types allows the two for q8_0."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import export  # noqa: E402
from test_all import RUN_PLAIN, assert_logits_close, generate_ids, read_logits, reference_logits  # noqa: E402
from tests.test_weight_types import TWO_PART_TOL, relative_rms  # noqa: E402

PROMPT, GENERATED = 1100, 8
ARGS = export.ModelArgs(dim=64, hidden_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=97,
                        max_seq_len=1200)


@pytest.fixture(scope="module")
def sharp_model():
    model = export.random_model(ARGS, seed=3)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.mul_(12)
            layer.attention.wk.weight.mul_(12)
    return model


def prompt():
    return [1] + np.random.default_rng(5).integers(3, ARGS.vocab_size, PROMPT - 1).tolist()


def test_f32_matches_reference_past_many_chunks(sharp_model, tmp_path):
    path = tmp_path / "long-f32.bin"
    export.write_checkpoint(path, ARGS, sharp_model.state_dict(), "f32")
    ids = prompt()
    generated, logits_path = generate_ids(path, ids, GENERATED, tmp_path)
    ours = read_logits(logits_path, ARGS.vocab_size)
    assert ours.shape == (PROMPT + GENERATED - 1, ARGS.vocab_size)
    theirs = reference_logits(sharp_model, ids + generated[:-1])
    assert_logits_close(ours, theirs, tol=3e-5)


def test_f16_cache_fast_matches_plain(sharp_model, tmp_path):
    path = tmp_path / "long-q8_0.bin"
    export.write_checkpoint(path, ARGS, sharp_model.state_dict(), "q8_0")
    rows = []
    for binary in (None, RUN_PLAIN):
        extra = {} if binary is None else {"binary": binary}
        _, logits_path = generate_ids(path, prompt(), GENERATED, tmp_path, **extra)
        rows.append(read_logits(logits_path, ARGS.vocab_size))
    fast, plain = rows
    assert fast.shape == plain.shape == (PROMPT + GENERATED - 1, ARGS.vocab_size)
    assert relative_rms(fast, plain).max() <= TWO_PART_TOL
