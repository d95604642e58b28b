"""atheris (libFuzzer for Python) target: export.py converting a GGUF file
or Meta's torch.save shard (a zip archive) made of the input.

  python fuzz/fuzz_export.py [libFuzzer flags] CORPUS...

The input's first byte picks the source: even, the rest of it is a GGUF
file for --gguf; odd, the rest is consolidated.00.pth beside a fixed
params.json for --meta. The contract checked is the command line's: main()
returns 0 with nothing on stderr, or 1 with one line there (a warning of
numpy's, shown every time, is a second line); an exception escaping it (a
traceback), a hang (-timeout) or memory without end (-rss_limit_mb) is a
finding. fuzz/make_seeds.py writes the seeds (DIR/export/)."""

import contextlib
import io
import json
import os
import shutil
import sys
import warnings

import atheris
import numpy  # noqa: F401  (imported before instrumentation: only our code and gguf's are)
import torch  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
with atheris.instrument_imports(include=["export", "convert", "model", "gguf"]):
    import export

PARAMS = {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "norm_eps": 1e-5, "vocab_size": -1}
# the files each input is written to (libFuzzer ends the process with exit(), so they stay until the next run)
WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "work", "export-files")
GGUF = os.path.join(WORK, "model.gguf")
META = os.path.join(WORK, "meta")
OUT = os.path.join(WORK, "out")


def convert(data):
    """export.main on data: (status, what it wrote on stderr)."""
    if data[:1] and data[0] % 2:
        with open(os.path.join(META, "consolidated.00.pth"), "wb") as f:
            f.write(data[1:])
        source = ["--meta", META]
    else:
        with open(GGUF, "wb") as f:
            f.write(data[1:])
        source = ["--gguf", GGUF]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = export.main([os.path.join(OUT, "model.bin"), *source])
    return status, err.getvalue()


def test_one_input(data):
    os.makedirs(OUT, exist_ok=True)
    try:
        status, err = convert(data)
    finally:
        shutil.rmtree(OUT)
    one_line = err.count("\n") == 1 and err.startswith("export.py: ")
    if not (status == 0 and err == "" or status == 1 and one_line):
        raise RuntimeError(f"export.py: status {status}, stderr {err[:2000]!r}")


if __name__ == "__main__":
    warnings.simplefilter("always")
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(META)
    with open(os.path.join(META, "params.json"), "w") as f:
        json.dump(PARAMS, f)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
