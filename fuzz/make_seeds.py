"""Writes seed inputs for the fuzzers into DIR/<target>/: small valid files
that the fuzzer then mutates, so it starts deep inside the formats instead
of at the magic bytes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import export  # noqa: E402


def checkpoint_seeds(out):
    for tied in (True, False):
        args = export.ModelArgs(dim=8, hidden_dim=12, n_layers=1, n_heads=2, n_kv_heads=1,
                                head_dim=4, vocab_size=10, max_seq_len=4, rope_theta=10000.0,
                                norm_eps=1e-5, tied=tied)
        state = export.random_model(args, 0).state_dict()
        export.write_checkpoint(out / f"ours-tied{int(tied)}.bin", args, state)
        args.head_dim = args.dim // args.n_heads
        export.write_llama2c(out / f"legacy-tied{int(tied)}.bin", args, state)


if __name__ == "__main__":
    root = Path(sys.argv[1])
    (root / "checkpoint").mkdir(parents=True, exist_ok=True)
    checkpoint_seeds(root / "checkpoint")
