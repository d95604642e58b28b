"""export.py given what a user can get wrong, and when writing fails.

Every bad input ends with exit status 1 and one line on stderr,
"export.py: WHICH: what is wrong", where WHICH names the file at fault, and
leaves nothing behind: no output, no temporary file, and an existing file of
the output's name as it was. Most cases call export.main() in this process
(torch is imported once); an exception escaping it, the traceback a user
would see, fails the case. The cases that need a process of their own run
export.py as one: a missing package, a write that the file size limit cuts
off, a FIFO as the input.

The sources are built here, small and by hand (no transformers): a reference
file, a llama2.c file, a Hugging Face directory (safetensors, one file or two
shards), a Meta directory, a GGUF file and a byte-level tokenizer.json.
"""

import dataclasses
import io
import json
import os
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
EXPORT = ROOT / "export.py"
sys.path.insert(0, str(ROOT))
import export  # noqa: E402
import model  # noqa: E402
from convert import checkpoint  # noqa: E402

ARGS = export.ModelArgs(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        vocab_size=260, max_seq_len=64)


def shape(args):
    """The fields of args that every source holds exactly (Meta's has no max_seq_len)."""
    return (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim,
            args.vocab_size, args.tied)


def hf_state_dict(state_dict):
    """Our state_dict under Hugging Face's names (the q/k rows left as they are:
    these cases are about files, not about logits)."""
    theirs = {ours: hf for hf, ours in export.HF_NAMES.items()}
    for i in range(ARGS.n_layers):
        theirs.update({f"layers.{i}.{ours}.weight": f"model.layers.{i}.{hf}.weight"
                       for hf, ours in export.HF_LAYER_NAMES.items()})
    return {theirs[name]: tensor.contiguous() for name, tensor in state_dict.items()}


def tokenizer_json():
    """A byte-level BPE tokenizer.json that export.py converts: the 256 bytes
    in GPT-2's alphabet and four merges."""
    alphabet = export.gpt2_bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    merges = []
    for left, right in [("t", "h"), ("th", "e"), ("a", "b"), ("ab", "c")]:
        vocab[left + right] = len(vocab)
        merges.append(f"{left} {right}")
    return {"version": "1.0", "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "post_processor": {"type": "ByteLevel"}, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": vocab, "merges": merges}}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Valid sources of one small random model, never changed by the cases."""
    d = tmp_path_factory.mktemp("sources")
    state_dict = export.random_model(ARGS).state_dict()
    export.save_reference(d / "ref.pt", ARGS, state_dict)
    export.write_llama2c(d / "llama2c.bin", ARGS, state_dict)
    export.write_checkpoint(d / "model.bin", ARGS, state_dict)
    export.write_gguf(d / "model.gguf", d / "model.bin")

    hf = d / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": ARGS.dim, "intermediate_size": ARGS.hidden_dim,
        "num_hidden_layers": ARGS.n_layers, "num_attention_heads": ARGS.n_heads,
        "num_key_value_heads": ARGS.n_kv_heads, "vocab_size": ARGS.vocab_size,
        "max_position_embeddings": ARGS.max_seq_len, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False}))
    save_file(hf_state_dict(state_dict), hf / "model.safetensors")
    (hf / "tokenizer.json").write_text(json.dumps(tokenizer_json()))

    sharded = d / "hf-sharded"
    sharded.mkdir()
    shutil.copy(hf / "config.json", sharded)
    tensors = hf_state_dict(state_dict)
    names = sorted(tensors)
    weight_map = {}
    for k, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        file = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({name: tensors[name] for name in part}, sharded / file)
        weight_map.update({name: file for name in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    meta = d / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": ARGS.dim, "n_layers": ARGS.n_layers,
                                                  "n_heads": ARGS.n_heads, "n_kv_heads": ARGS.n_kv_heads,
                                                  "norm_eps": 1e-5, "vocab_size": -1}))
    torch.save(state_dict, meta / "consolidated.00.pth")
    return d


class Case:
    """A copy of the sources to damage, and an empty directory for the outputs."""

    def __init__(self, sources, tmp_path):
        self.src = tmp_path / "src"
        shutil.copytree(sources, self.src)
        self.out_dir = tmp_path / "out"
        self.out_dir.mkdir()
        self.out = self.out_dir / "model.bin"

    def edit_json(self, name, change):
        path = self.src / name
        value = json.loads(path.read_text())
        changed = change(value)
        path.write_text(json.dumps(value if changed is None else changed))
        return path


@pytest.fixture
def case(sources, tmp_path):
    return Case(sources, tmp_path)


def export_main(capsys, *argv):
    """export.main(argv) in this process: (status, stdout, stderr)."""
    status = export.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line(status, err, which, what, expected_status=1):
    assert status == expected_status, f"status {status}: {err}"
    assert err.startswith("export.py: ") and err.count("\n") == 1, f"expected one line: {err!r}"
    assert "Traceback" not in err, err
    assert str(which) in err, f"{which} not named in {err!r}"
    assert what in err, f"{what!r} not in {err!r}"


def assert_nothing_written(case):
    left = sorted(p.name for p in case.out_dir.iterdir())
    assert left == [], f"left behind: {left}"


# ----------------------------------------------------------------------------
# 1. The sources as built convert: the damage below is what the cases test.

@pytest.mark.parametrize("flag,source", [("--reference", "ref.pt"), ("--llama2c", "llama2c.bin"),
                                         ("--hf", "hf"), ("--hf", "hf-sharded"), ("--meta", "meta")])
def test_the_undamaged_sources_convert(case, capsys, flag, source):
    status, out, err = export_main(capsys, case.out, flag, case.src / source)
    assert status == 0, err
    assert shape(export.read_checkpoint(case.out)[0]) == shape(ARGS)
    written = sorted(p.name for p in case.out_dir.iterdir())
    assert written == (["model.bin", "tokenizer.bin"] if source == "hf" else ["model.bin"])
    assert out.count("\n") == len(written) and err == ""


# ----------------------------------------------------------------------------
# 2. Bad inputs (defect 8): one line naming the input, nothing written.
#
# Each entry: a name, a function that damages the case's sources and returns
# the source arguments, the file the message must name (relative to the
# sources) and a fragment of what it must say.

FLAGS = {"ref.pt": "--reference", "llama2c.bin": "--llama2c", "hf": "--hf", "hf-sharded": "--hf",
         "meta": "--meta", "model.gguf": "--gguf"}


def source_args(c, name):
    """The arguments that convert the source that the file name is part of."""
    top = name.split("/")[0]
    return [FLAGS[top], c.src / top]


def write(name, data):
    """Replace the file's contents with data (bytes, or a function of the old ones)."""
    def damage(c):
        path = c.src / name
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)
        return source_args(c, name)
    return damage


def edit_json(name, change):
    return lambda c: (c.edit_json(name, change), source_args(c, name))[1]


def hf_config(change):
    return edit_json("hf/config.json", change)


def hf_tokenizer(change):
    return edit_json("hf/tokenizer.json", change)


def meta_params(change):
    return edit_json("meta/params.json", change)


def hf_weights(change):
    def damage(c):
        path = c.src / "hf" / "model.safetensors"
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
        return source_args(c, "hf")
    return damage


def meta_shard(change):
    def damage(c):
        path = c.src / "meta" / "consolidated.00.pth"
        torch.save(change(torch.load(path)), path)
        return source_args(c, "meta")
    return damage


def meta_legacy_shard(c):
    path = c.src / "meta" / "consolidated.00.pth"
    torch.save(torch.load(path), path, _use_new_zipfile_serialization=False)
    return source_args(c, "meta")


def meta_shard_with(member, data):
    """Meta's shard with a member of the zip archive added or replaced."""
    def damage(c):
        path = c.src / "meta" / "consolidated.00.pth"
        with zipfile.ZipFile(path) as old:
            members = {info.filename: old.read(info) for info in old.infolist()}
        prefix = next(name for name in members if name.endswith("/data.pkl"))[:-len("data.pkl")]
        members[prefix + member] = data
        with zipfile.ZipFile(path, "w") as new:
            for name, contents in members.items():
                new.writestr(name, contents)
        return source_args(c, "meta")
    return damage


def reference(saved):
    def damage(c):
        torch.save(saved, c.src / "ref.pt")
        return source_args(c, "ref.pt")
    return damage


def llama2c_header(*fields):
    return write("llama2c.bin", lambda data: struct.pack("<7i", *fields) + data[28:])


def gguf_with(metadata):
    """A GGUF file of the llama architecture with these string metadata."""
    def damage(c):
        import gguf
        from tests.tiny_gguf import finish
        path = c.src / "bad.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        for key, value in metadata.items():
            writer.add_string(key, value)
        writer.add_tensor("token_embd.weight", np.zeros((ARGS.vocab_size, ARGS.dim), np.float32))
        finish(writer)
        return ["--gguf", path]
    return damage


def shard_removed(c):
    (c.src / "hf-sharded" / "model-00002-of-00002.safetensors").unlink()
    return source_args(c, "hf-sharded")


BAD_INPUTS = [
    # Hugging Face config.json
    ("config not an object", hf_config(lambda c: [1, 2]), "hf/config.json", "expected a JSON object"),
    ("config not JSON", write("hf/config.json", b"{\"model_type\": "), "hf/config.json", "not JSON"),
    ("config not UTF-8", write("hf/config.json", b"\xff\xfe{}"), "hf/config.json", "not JSON"),
    ("rope_scaling a string", hf_config(lambda c: c.update(rope_scaling="linear")), "hf/config.json",
     "rope_scaling"),
    ("hidden_size a string", hf_config(lambda c: c.update(hidden_size="32")), "hf/config.json", "hidden_size"),
    ("num_attention_heads 0", hf_config(lambda c: c.update(num_attention_heads=0)), "hf/config.json",
     "num_attention_heads"),
    ("rope_theta a string", hf_config(lambda c: c.update(rope_theta="1e4")), "hf/config.json", "rope_theta"),
    ("tie_word_embeddings a string", hf_config(lambda c: c.update(tie_word_embeddings="false")),
     "hf/config.json", "tie_word_embeddings"),
    ("rope_theta beyond float32", hf_config(lambda c: c.update(rope_theta=1e300)), "hf/config.json",
     "rope_theta"),
    ("more layers than run.c's", hf_config(lambda c: c.update(num_hidden_layers=1025)), "hf/config.json",
     "n_layers"),
    ("context beyond run.c's", hf_config(lambda c: c.update(max_position_embeddings=1 << 21)), "hf",
     "--max-seq-len"),
    # Hugging Face weights
    ("safetensors truncated", write("hf/model.safetensors", lambda data: data[:len(data) // 2]),
     "hf/model.safetensors", "not a safetensors file"),
    ("safetensors garbage", write("hf/model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" * 9),
     "hf/model.safetensors", "not a safetensors file"),
    ("safetensors empty", write("hf/model.safetensors", b""), "hf/model.safetensors", "not a safetensors file"),
    ("a tensor missing", hf_weights(lambda t: t.pop("model.norm.weight")), "hf", "norm.weight is missing"),
    ("a k_proj of the wrong shape", hf_weights(lambda t: t.update({
        "model.layers.0.self_attn.k_proj.weight": torch.zeros(3)})), "hf/model.safetensors", "expected shape"),
    ("an integer tensor", hf_weights(lambda t: t.update({"model.norm.weight": torch.zeros(32, dtype=torch.int32)})),
     "hf/model.safetensors", "not a floating-point type"),
    ("the index names a missing shard", shard_removed, "hf-sharded/model-00002-of-00002.safetensors",
     "No such file"),
    ("the index is not an object", write("hf-sharded/model.safetensors.index.json", b"[1]"),
     "hf-sharded/model.safetensors.index.json", "expected a JSON object"),
    ("the index names no files", edit_json("hf-sharded/model.safetensors.index.json",
                                           lambda index: {"weight_map": {"model.norm.weight": 3}}),
     "hf-sharded/model.safetensors.index.json", "weight_map"),
    # Hugging Face tokenizer.json (after the checkpoint is written: nothing may be left)
    ("tokenizer.json not JSON", write("hf/tokenizer.json", b"{nope"), "hf/tokenizer.json", "not JSON"),
    ("tokenizer.json a list", hf_tokenizer(lambda t: []), "hf/tokenizer.json", "expected a JSON object"),
    ("model a string", hf_tokenizer(lambda t: t.update(model="BPE")), "hf/tokenizer.json", "model"),
    ("a negative id", hf_tokenizer(lambda t: t["model"]["vocab"].update(zz=-5)), "hf/tokenizer.json", "'zz'"),
    ("a huge id", hf_tokenizer(lambda t: t["model"]["vocab"].update(zz=10**12)), "hf/tokenizer.json",
     "no token has id"),
    ("an id that is a string", hf_tokenizer(lambda t: t["model"]["vocab"].update(zz="3")),
     "hf/tokenizer.json", "'zz'"),
    ("a merge of one token", hf_tokenizer(lambda t: t["model"].update(merges=["abc"])), "hf/tokenizer.json",
     "merge 0"),
    ("an added token without content", hf_tokenizer(lambda t: t.update(added_tokens=[{"id": 1}])),
     "hf/tokenizer.json", "added token"),
    ("post_processor a string", hf_tokenizer(lambda t: t.update(post_processor="x")), "hf/tokenizer.json",
     "post_processor"),
    ("an empty vocabulary", hf_tokenizer(lambda t: t["model"].update(vocab={}, merges=[])),
     "hf/tokenizer.json", "no tokens"),
    ("tokenizer_config.json's bos_token a list", write("hf/tokenizer_config.json", b'{"bos_token": ["x"]}'),
     "hf/tokenizer_config.json", "bos_token"),
    ("tokenizer.model garbage", write("hf/tokenizer.model", b"\x0a\xff\xff"), "hf/tokenizer.model",
     "not a sentencepiece model"),
    # Meta
    ("params.json not an object", meta_params(lambda p: []), "meta/params.json", "expected a JSON object"),
    ("n_heads 0", meta_params(lambda p: p.update(n_heads=0)), "meta/params.json", "n_heads"),
    ("dim a string", meta_params(lambda p: p.update(dim="32")), "meta/params.json", "dim"),
    ("a shard that is a list", meta_shard(lambda sd: [1]), "meta/consolidated.00.pth", "dict of tensors"),
    ("a shard holding a number", meta_shard(lambda sd: {**sd, "norm.weight": 5}), "meta/consolidated.00.pth",
     "norm.weight is not a tensor"),
    ("a shard truncated", write("meta/consolidated.00.pth", lambda data: data[:len(data) // 2]),
     "meta/consolidated.00.pth", "not a torch.save file"),
    ("a shard cut before its storages", write("meta/consolidated.00.pth", lambda data: data[:200]),
     "meta/consolidated.00.pth", "not a torch.save file"),
    ("a shard in torch's legacy format", meta_legacy_shard, "meta/consolidated.00.pth", "before torch 1.6"),
    ("a shard of a big-endian machine", meta_shard_with("byteorder", b"big"), "meta/consolidated.00.pth",
     "big-endian"),
    # the reference file
    ("reference garbage", write("ref.pt", b"x" * 100), "ref.pt", "not a torch.save file"),
    ("reference args a list", reference({"args": "[1]", "state_dict": {}}), "ref.pt", '"args"'),
    ("reference state_dict a list", reference({"args": json.dumps(vars(ARGS)), "state_dict": [1]}), "ref.pt",
     "dict of tensors"),
    # llama2.c
    ("llama2.c header cut short", write("llama2c.bin", b"\1" * 20), "llama2c.bin", "too short"),
    ("llama2.c n_heads 0", llama2c_header(32, 64, 2, 0, 2, 260, 64), "llama2c.bin", "n_heads = 0"),
    ("llama2.c n_layers beyond run.c's", llama2c_header(32, 64, 1025, 4, 2, 260, 64), "llama2c.bin", "n_layers"),
    ("llama2.c vocab_size -2^31", llama2c_header(32, 64, 2, 4, 2, -2**31, 64), "llama2c.bin", "vocab_size"),
    ("llama2.c truncated", write("llama2c.bin", lambda data: data[:-4]), "llama2c.bin", "bytes: expected"),
    # GGUF
    ("GGUF truncated", write("model.gguf", lambda data: data[:len(data) // 2]), "model.gguf", "a damaged GGUF file"),
    ("GGUF header cut short", write("model.gguf", lambda data: data[:200]), "model.gguf", "a damaged GGUF file"),
    ("GGUF empty", write("model.gguf", b""), "model.gguf", "not a GGUF file"),
    ("GGUF counts that are strings", gguf_with({"llama.embedding_length": "32", "llama.attention.head_count": "x"}),
     "bad.gguf", "expected positive integers"),
    # a tokenizer alone
    ("--tokenizer-from a missing file", lambda c: ["--tokenizer-from", c.src / "nowhere.model"], "nowhere.model",
     "No such file"),
    ("--tokenizer-from a GGUF without a tokenizer", lambda c: ["--tokenizer-from", gguf_with({})(c)[1]],
     "bad.gguf", "holds no tokenizer"),
    ("--tokenizer-from a GGUF of another tokenizer",
     lambda c: ["--tokenizer-from", gguf_with({"tokenizer.ggml.model": "bert"})(c)[1]], "bad.gguf", "'bert'"),
    ("--tokenizer-from a directory without one", lambda c: ["--tokenizer-from", c.src / "meta"], "meta",
     "neither tokenizer.model nor tokenizer.json"),
    ("--tokenizer-from a directory whose tokenizer.json is not JSON",
     lambda c: (write("hf/tokenizer.json", b"{nope")(c), ["--tokenizer-from", c.src / "hf"])[1],
     "hf/tokenizer.json", "not JSON"),
    # files that are not files
    ("a directory as --llama2c", lambda c: ["--llama2c", c.src / "hf"], "hf", "is a directory"),
    ("/dev/zero as --llama2c", lambda c: ["--llama2c", "/dev/zero"], "/dev/zero", "not a regular file"),
    ("a file as --hf", lambda c: ["--hf", c.src / "ref.pt"], "ref.pt", "not a directory"),
    ("no such --meta", lambda c: ["--meta", c.src / "nowhere"], "nowhere", "No such"),
]


@pytest.mark.parametrize("damage,which,what", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(case, capsys, damage, which, what):
    source_args = damage(case)
    status, out, err = export_main(capsys, case.out, *source_args)
    which = which if which.startswith("/") else case.src / which
    assert_one_line(status, err, which, what)
    assert out == ""
    assert_nothing_written(case)


class RunsACommand:
    """Unpickled, os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_shard_whose_pickle_runs_code_is_refused_and_nothing_runs(case, capsys):
    """The pickle names os.system: refused before anything runs, as a class a file of tensors does not hold."""
    marker = case.out_dir.parent / "ran"
    shard = case.src / "meta" / "consolidated.00.pth"
    state_dict = torch.load(shard)
    state_dict["norm.weight"] = RunsACommand(f"touch {marker}")
    torch.save(state_dict, shard)
    status, out, err = export_main(capsys, case.out, "--meta", case.src / "meta")
    assert_one_line(status, err, shard, "names posix.system")
    assert out == "" and not marker.exists()
    assert_nothing_written(case)


@pytest.mark.parametrize("value", ["0", "-1", "abc", "", str(2**20 + 1), str(2**40)])
def test_max_seq_len_out_of_range_is_a_usage_error(case, capsys, value):
    with pytest.raises(SystemExit) as exit:
        export.main([str(case.out), "--llama2c", str(case.src / "llama2c.bin"), "--max-seq-len", value])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "--max-seq-len" in err and value in err and "Traceback" not in err
    assert_nothing_written(case)


@pytest.mark.parametrize("argv,which", [
    (lambda c: ["", "--llama2c", c.src / "llama2c.bin"], "OUTPUT"),
    (lambda c: [c.out, "--hf", ""], "--hf"),
    (lambda c: [c.out, "--hf", c.src / "hf", "--tokenizer-out", ""], "--tokenizer-out")],
    ids=["OUTPUT", "--hf", "--tokenizer-out"])
def test_an_empty_path_is_a_usage_error(case, capsys, argv, which):
    with pytest.raises(SystemExit) as exit:
        export.main([str(a) for a in argv(case)])
    assert exit.value.code == 2
    assert f"{which} is an empty path" in capsys.readouterr().err
    assert_nothing_written(case)


def test_max_seq_len_brings_a_long_context_within_run_c(case, capsys):
    case.edit_json("hf/config.json", lambda c: c.update(max_position_embeddings=1 << 21))
    status, _, err = export_main(capsys, case.out, "--hf", case.src / "hf", "--max-seq-len", 1 << 20)
    assert status == 0, err
    assert export.read_checkpoint(case.out)[0].max_seq_len == 1 << 20


def test_a_bad_input_through_the_command_line_is_one_line(case):
    """The same, from the outside: a process that exits 1 with one line, no traceback."""
    case.edit_json("hf/config.json", lambda c: c.update(rope_scaling="linear"))
    p = subprocess.run([sys.executable, EXPORT, case.out, "--hf", case.src / "hf"],
                       capture_output=True, text=True, timeout=120)
    assert_one_line(p.returncode, p.stderr, case.src / "hf" / "config.json", "rope_scaling")
    assert_nothing_written(case)


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_a_special_file_as_input_is_refused_not_read(case, special):
    """A FIFO would block export.py in open(), /dev/zero fill its memory: in a
    process of its own, with its memory limited, in case it is read."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    path = special
    if special == "fifo":
        path = case.src / "tokenizer.fifo"
        os.mkfifo(path)
    p = subprocess.run([sys.executable, EXPORT, case.out, "--tokenizer-model", path],
                       capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert_one_line(p.returncode, p.stderr, path, "not a regular file")
    assert_nothing_written(case)


# ----------------------------------------------------------------------------
# 3. All outputs or none (defect 9)

def test_a_tokenizer_that_fails_leaves_no_checkpoint(case, capsys):
    case.edit_json("hf/tokenizer.json", lambda t: t["model"].update(merges=["t x"]))
    status, _, err = export_main(capsys, case.out, "--hf", case.src / "hf")
    assert_one_line(status, err, case.src / "hf" / "tokenizer.json", "not in the vocab")
    assert_nothing_written(case)


def test_existing_outputs_are_untouched_when_the_command_fails(case, capsys):
    case.out.write_bytes(b"the model that was here")
    (case.out_dir / "tokenizer.bin").write_bytes(b"the tokenizer that was here")
    case.edit_json("hf/tokenizer.json", lambda t: t.update(decoder=None))
    status, _, err = export_main(capsys, case.out, "--hf", case.src / "hf")
    assert_one_line(status, err, case.src / "hf" / "tokenizer.json", "decoder")
    assert sorted(p.name for p in case.out_dir.iterdir()) == ["model.bin", "tokenizer.bin"]
    assert case.out.read_bytes() == b"the model that was here"
    assert (case.out_dir / "tokenizer.bin").read_bytes() == b"the tokenizer that was here"


def test_existing_outputs_are_replaced_when_the_command_succeeds(case, capsys):
    case.out.write_bytes(b"the model that was here")
    (case.out_dir / "tokenizer.bin").write_bytes(b"the tokenizer that was here")
    assert export_main(capsys, case.out, "--hf", case.src / "hf")[0] == 0
    assert shape(export.read_checkpoint(case.out)[0]) == shape(ARGS)
    assert export.read_tokenizer(case.out_dir / "tokenizer.bin")["kind"] == export.TOK_BYTELEVEL
    assert sorted(p.name for p in case.out_dir.iterdir()) == ["model.bin", "tokenizer.bin"]


def test_a_write_that_fails_part_way_leaves_no_partial_file(case, capsys, monkeypatch):
    """A disk that fills after the header and the first tensor: the error
    names the output, and neither it nor its temporary file is left."""
    encode = checkpoint.encode_matrix
    calls = []

    def encode_until_the_disk_is_full(w, dtype):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, os.strerror(28))
        return encode(w, dtype)

    monkeypatch.setattr(checkpoint, "encode_matrix", encode_until_the_disk_is_full)
    case.out.write_bytes(b"the model that was here")
    status, _, err = export_main(capsys, case.out, "--llama2c", case.src / "llama2c.bin")
    assert_one_line(status, err, case.out, "No space left on device")
    assert len(calls) == 2
    assert [p.name for p in case.out_dir.iterdir()] == ["model.bin"]
    assert case.out.read_bytes() == b"the model that was here"


def test_a_write_cut_off_by_the_file_size_limit_leaves_no_partial_file(case):
    """A real failing write(2): RLIMIT_FSIZE stops the checkpoint at 64 KiB
    (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    assert (case.src / "model.bin").stat().st_size > 1 << 16
    p = subprocess.run([sys.executable, EXPORT, case.out, "--llama2c", case.src / "llama2c.bin"],
                       capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert_one_line(p.returncode, p.stderr, case.out, "File too large")
    assert_nothing_written(case)


def test_an_interrupted_conversion_leaves_nothing(case, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_tokenizer_hf_json", interrupt)
    status, out, err = export_main(capsys, case.out, "--hf", case.src / "hf")
    assert status == 130 and err == "export.py: interrupted; nothing was written\n", err
    assert_nothing_written(case)


# Runs export.py (argv[1:]) as __main__, sending itself SIGTERM once the
# first output is written and synced, as the outputs are being committed.
TERMINATE_WHILE_COMMITTING = """
import os, runpy, signal, sys
fsync = os.fsync

def fsync_then_terminate(fd):
    fsync(fd)
    os.kill(os.getpid(), signal.SIGTERM)

os.fsync = fsync_then_terminate
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigterm_while_committing_leaves_nothing(case):
    case.out.write_bytes(b"the model that was here")
    p = subprocess.run([sys.executable, "-c", TERMINATE_WHILE_COMMITTING, EXPORT, case.out, "--hf", case.src / "hf"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 130 and p.stderr == "export.py: interrupted; nothing was written\n", p.stderr
    assert [p.name for p in case.out_dir.iterdir()] == ["model.bin"]
    assert case.out.read_bytes() == b"the model that was here"


@pytest.mark.parametrize("shell_redirect,error", [("> /dev/full", "No space left on device"),
                                                  (">&-", "Bad file descriptor")])
def test_a_report_that_stdout_cannot_take_is_an_error(case, shell_redirect, error):
    command = f'"$0" "$1" "$2" --llama2c "$3" {shell_redirect}'
    p = subprocess.run(["sh", "-c", command, sys.executable, EXPORT, case.out, case.src / "llama2c.bin"],
                       stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr == f"export.py: stdout: {error}\n", p.stderr


@pytest.mark.parametrize("output,what", [("missing/model.bin", "No such file or directory"),
                                         (".", "is a directory"), ("/dev/null", "not a regular file"),
                                         ("tokenizer.bin", "named as two outputs")])
def test_an_output_that_cannot_be_written_is_refused_first(case, capsys, output, what):
    out = output if output.startswith("/") else case.out_dir / output
    status, _, err = export_main(capsys, out, "--hf", case.src / "hf")
    assert_one_line(status, err, out, what)
    assert_nothing_written(case)


def test_new_files_get_the_usual_permissions(case, capsys):
    # written through a temporary file, which mkstemp creates 0600
    umask = os.umask(0o022)
    try:
        assert export_main(capsys, case.out, "--llama2c", case.src / "llama2c.bin")[0] == 0
    finally:
        os.umask(umask)
    assert case.out.stat().st_mode & 0o777 == 0o644


def test_an_output_through_a_symlink_is_written_where_it_points(case, capsys):
    target = case.out_dir / "real.bin"
    target.write_bytes(b"old")
    case.out.symlink_to(target.name)
    assert export_main(capsys, case.out, "--llama2c", case.src / "llama2c.bin")[0] == 0
    assert case.out.is_symlink()
    assert target.read_bytes() == (case.src / "model.bin").read_bytes()


# ----------------------------------------------------------------------------
# 4. Missing packages (defect 11)

# Runs export.py (argv[1:]) with the packages named in BLOCKED made unimportable.
HIDE_PACKAGES = """
import runpy, sys
BLOCKED = set(sys.argv[1].split(","))

class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Hide())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def export_without(packages, *argv):
    return subprocess.run([sys.executable, "-c", HIDE_PACKAGES, ",".join(packages), EXPORT, *map(str, argv)],
                          capture_output=True, text=True, timeout=120)


def assert_needs(p, package, case):
    assert p.returncode == 1, p.stderr
    assert p.stderr == (f"export.py: this conversion needs the Python package '{package}' "
                        f"(pip install {package})\n")
    assert_nothing_written(case)


def test_help_needs_no_third_party_package():
    # -I -S: no site-packages at all, so neither numpy nor torch
    bare = [sys.executable, "-I", "-S"]
    assert subprocess.run(bare + ["-c", "import numpy"], capture_output=True).returncode != 0
    p = subprocess.run(bare + [EXPORT, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout.startswith("usage: export.py") and "--gguf FILE" in p.stdout


def test_a_conversion_without_numpy_says_so(case):
    p = subprocess.run([sys.executable, "-I", "-S", EXPORT, case.out, "--llama2c", case.src / "llama2c.bin"],
                       capture_output=True, text=True, timeout=60)
    assert_needs(p, "numpy", case)


def test_hf_without_safetensors_says_so(case):
    assert_needs(export_without(["safetensors"], case.out, "--hf", case.src / "hf"), "safetensors", case)


def test_tokenizer_model_without_sentencepiece_or_protobuf_says_so(case):
    model = case.src / "tokenizer.model"
    model.write_bytes(b"")
    assert_needs(export_without(["torch", "sentencepiece"], case.out, "--tokenizer-model", model),
                 "sentencepiece", case)
    assert_needs(export_without(["torch", "google"], case.out, "--tokenizer-model", model), "protobuf", case)


def test_gguf_without_pyyaml_says_so(case):
    assert_needs(export_without(["torch", "yaml"], case.out, "--gguf", case.src / "model.gguf"), "pyyaml", case)


# ----------------------------------------------------------------------------
# 5. Counts, lengths and numbers that the files claim (issue 24)
#
# Each case is a file damaged where a reader trusted it: export.py must
# refuse it with one line naming the file, or (a long chat template) convert
# it at once. The cases that hung or grew without end run in a process of
# their own, with a time limit and its memory limited; the others run here.

def export_process(*argv, timeout=60):
    """export.py argv as a process, its memory limited to 4 GiB: (CompletedProcess, seconds)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    start = time.monotonic()
    p = subprocess.run([sys.executable, EXPORT, *map(str, argv)], capture_output=True, text=True,
                       timeout=timeout, preexec_fn=limit)
    return p, time.monotonic() - start


def assert_refused(status, err, which, what, case):
    assert status in (1, 2), f"status {status}: {err}"
    assert_one_line(status, err, which, what, expected_status=status)
    assert_nothing_written(case)


def part_offset(field, k):
    """Where part k of a field of gguf.GGUFReader (a metadata value or a tensor info) starts in the file."""
    return field.offset + sum(int(part.nbytes) for part in field.parts[:k])


def gguf_patched(patch):
    """model.gguf with bytes changed by patch(reader, data): where they are
    found by the gguf package's reader of the undamaged file."""
    import gguf

    def damage(c):
        path = c.src / "model.gguf"
        data = bytearray(path.read_bytes())
        patch(gguf.GGUFReader(str(path)), data)
        path.write_bytes(data)
        return path
    return damage


def put_u64(data, at, value):
    data[at:at + 8] = struct.pack("<Q", value)


def field_length(key, part):
    """Set part (a u64 count or length) of the metadata value key to 2^62."""
    return gguf_patched(lambda r, data: put_u64(data, part_offset(r.fields[key], part), 1 << 62))


def tensor_offset(i, offset):
    """Set tensor i's data offset to offset(reader)."""
    return gguf_patched(lambda r, data: put_u64(data, part_offset(r.tensors[i].field, 5), offset(r)))


HUGE_GGUF_HEADERS = [
    # what the header claims, the damage, what the message says
    ("an array of 2^62 tokens", field_length("tokenizer.ggml.tokens", 4), "tokenizer.ggml.tokens claims"),
    ("an array of 2^62 scores", field_length("tokenizer.ggml.scores", 4), "tokenizer.ggml.scores claims"),
    ("a string of 2^62 bytes", field_length("general.architecture", 3), "general.architecture (its length)"),
    ("a key of 2^62 bytes", field_length("general.architecture", 0), "metadata key"),
    ("a token of 2^62 bytes", field_length("tokenizer.ggml.tokens", 5), "tokenizer.ggml.tokens"),
    ("kv_count 2^62", gguf_patched(lambda r, data: put_u64(data, 16, 1 << 62)), "kv_count claims"),
    ("tensor_count 2^62", gguf_patched(lambda r, data: put_u64(data, 8, 1 << 62)), "tensor_count claims"),
    ("a tensor of 2^31 dimensions", gguf_patched(lambda r, data: data.__setitem__(
        slice(part_offset(r.tensors[0].field, 2), part_offset(r.tensors[0].field, 2) + 4),
        struct.pack("<I", 1 << 31))), "dimensions"),
    ("a dimension of 2^62", gguf_patched(lambda r, data: put_u64(data, part_offset(r.tensors[0].field, 3),
                                                                 1 << 62)), "past the end"),
]


@pytest.mark.parametrize("damage,what", [c[1:] for c in HUGE_GGUF_HEADERS], ids=[c[0] for c in HUGE_GGUF_HEADERS])
def test_a_gguf_header_that_claims_more_than_the_file_holds_is_refused_at_once(case, damage, what):
    """The gguf package's reader walked such an array item by item past the
    end of the file, its memory growing (730 MB in 10 s), and never ended."""
    path = damage(case)
    p, seconds = export_process(case.out, "--gguf", path, timeout=30)
    assert_refused(p.returncode, p.stderr, path, what, case)
    assert seconds < 20


def test_a_gguf_tokenizer_that_claims_more_than_the_file_holds_is_refused_at_once(case):
    path = HUGE_GGUF_HEADERS[0][1](case)
    p, seconds = export_process(case.out, "--tokenizer-from", path, timeout=30)
    assert_refused(p.returncode, p.stderr, path, "tokenizer.ggml.tokens claims", case)
    assert seconds < 20


TENSOR_PLACES = [
    ("misaligned", tensor_offset(1, lambda r: r.tensors[1].data_offset - r.data_offset + 4),
     "not a multiple of general.alignment"),
    ("overlapping the one before", tensor_offset(1, lambda r: r.tensors[0].data_offset - r.data_offset),
     "overlap"),
    ("past the end of the file", tensor_offset(1, lambda r: 1 << 40), "past the end of the file"),
]


@pytest.mark.parametrize("damage,what", [c[1:] for c in TENSOR_PLACES], ids=[c[0] for c in TENSOR_PLACES])
def test_a_gguf_tensor_out_of_place_is_refused(case, capsys, damage, what):
    path = damage(case)
    status, out, err = export_main(capsys, case.out, "--gguf", path)
    assert_refused(status, err, path, what, case)


# Chat templates: the recognizer of ChatML's default system turn searched
# with a regex that takes quadratic time on repeated <|im_start|>system
# (12 s on 152 KB). A megabyte of them must take well under a second.
HOSTILE_TEMPLATE = "<|im_start|>system\n" * ((1 << 20) // len("<|im_start|>system\n"))


@pytest.mark.parametrize("template", [HOSTILE_TEMPLATE, HOSTILE_TEMPLATE + "<|im_end|>",
                                      HOSTILE_TEMPLATE + "{{ x }}<|im_end|>", "<|im_start|>system\\n" * 50000])
def test_a_megabyte_chat_template_is_recognized_at_once(template):
    start = time.monotonic()
    kind, _ = export.gguf_chat_template(template)
    assert kind == export.CHAT_CHATML
    assert time.monotonic() - start < 0.5


def test_the_default_system_turn_is_what_the_regex_finds():
    """The linear recognizer against the regex it replaces (Python's re), on
    random ChatML templates made of the pieces that matter."""
    regex = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}+]*?)<\|im_end\|>")
    pieces = ["<|im_start|>system", "<|im_start|>", "<|im_end|>", "\n", "\\n", "\\", "'", "{", "+", "a b", "x"]
    rng = random.Random(24)
    for _ in range(20000):
        template = "<|im_start|>" + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        found = regex.search(template)
        expected = found.group(1) if found else ""
        if "\\" in expected.replace("\\n", ""):
            expected = ""
        assert export.gguf_chat_template(template) == (export.CHAT_CHATML, expected.replace("\\n", "\n")), \
            template


def gguf_copy(source, target, extra):
    """The GGUF file source written again as target, with the string metadata extra added."""
    import gguf
    from tests.tiny_gguf import finish
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type)
    for key, value in extra.items():
        writer.add_string(key, value)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    finish(writer)


def template_in_gguf(c):
    gguf_copy(c.src / "model.gguf", c.src / "chat.gguf", {"tokenizer.chat_template": HOSTILE_TEMPLATE})
    return ["--tokenizer-from", c.src / "chat.gguf"]


def template_in_config(c):
    (c.src / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": HOSTILE_TEMPLATE}))
    return ["--tokenizer-from", c.src / "hf" / "tokenizer.json"]


def template_in_jinja(c):
    (c.src / "hf" / "chat_template.jinja").write_text(HOSTILE_TEMPLATE)
    return ["--hf", c.src / "hf"]


@pytest.mark.parametrize("source", [template_in_gguf, template_in_config, template_in_jinja],
                         ids=["GGUF tokenizer.chat_template", "tokenizer_config.json", "chat_template.jinja"])
def test_a_megabyte_chat_template_converts_at_once(case, source):
    argv = source(case)
    p, seconds = export_process(case.out, *argv, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    tokenizer = case.out if argv[0] == "--tokenizer-from" else case.out_dir / "tokenizer.bin"
    assert export.read_tokenizer(tokenizer)["chat_template"] == export.CHAT_CHATML
    assert seconds < 30


# RoPE frequencies: each must be finite and positive. A rope_freqs.weight of
# zeros, NaN, inf or a denormal (its reciprocal inf), a linear factor of
# 1e-300 (its frequencies inf in float32) were written as they came, numpy's
# RuntimeWarning the only sign.

@pytest.fixture(scope="module")
def scaled_sources(sources, tmp_path_factory):
    """The model with Llama 3.1's RoPE scaling: our checkpoint (version 2),
    the GGUF file --to-gguf writes of it (rope_freqs.weight), a reference file."""
    d = tmp_path_factory.mktemp("scaled")
    args, state_dict = export.read_checkpoint(sources / "model.bin")
    args = dataclasses.replace(args, scaled_rope=True)
    state_dict["rope_inv_freq"] = torch.from_numpy(export.rope_inverse_frequencies(
        args.head_dim, args.rope_theta, model.META_LLAMA3_SCALING))
    export.write_checkpoint(d / "model.bin", args, state_dict)
    export.write_gguf(d / "scaled.gguf", d / "model.bin")
    export.save_reference(d / "scaled.pt", args, state_dict)
    return d


def rope_freqs(value):
    """scaled.gguf with every number of rope_freqs.weight value."""
    def damage(c, scaled):
        import gguf
        path = c.src / "scaled.gguf"
        data = bytearray((scaled / "scaled.gguf").read_bytes())
        t = next(t for t in gguf.GGUFReader(str(scaled / "scaled.gguf")).tensors if t.name == "rope_freqs.weight")
        data[t.data_offset:t.data_offset + t.n_bytes] = np.full(t.n_elements, value, np.float32).tobytes()
        path.write_bytes(data)
        return ["--gguf", path], path
    return damage


def hf_factor(c, scaled):
    path = c.edit_json("hf/config.json", lambda config: config.update(
        rope_scaling={"rope_type": "linear", "factor": 1e-300}))
    return ["--hf", c.src / "hf"], path


def reference_inv_freq(c, scaled):
    path = c.src / "scaled.pt"
    saved = torch.load(scaled / "scaled.pt")
    saved["state_dict"]["rope_inv_freq"][1] = float("nan")
    torch.save(saved, path)
    return ["--reference", path], path


BAD_ROPE = [
    ("rope_freqs.weight zeros", rope_freqs(0.0), "rope_freqs.weight"),
    ("rope_freqs.weight NaN", rope_freqs(np.nan), "rope_freqs.weight"),
    ("rope_freqs.weight inf", rope_freqs(np.inf), "rope_freqs.weight"),
    ("rope_freqs.weight negative", rope_freqs(-1.0), "rope_freqs.weight"),
    ("rope_freqs.weight a denormal", rope_freqs(1e-45), "RoPE frequencies divided by rope_freqs.weight"),
    ("a linear factor of 1e-300", hf_factor, "rope_scaling: factor"),
    ("a reference's rope_inv_freq NaN", reference_inv_freq, "rope_inv_freq"),
]


@pytest.mark.parametrize("damage,what", [c[1:] for c in BAD_ROPE], ids=[c[0] for c in BAD_ROPE])
def test_rope_frequencies_that_are_not_finite_and_positive_are_refused(case, capsys, scaled_sources, damage, what):
    argv, path = damage(case, scaled_sources)
    status, out, err = export_main(capsys, case.out, *argv)
    assert_refused(status, err, path, what, case)


@pytest.mark.parametrize("value", [0.0, np.nan, np.inf, -2.0])
@pytest.mark.parametrize("flag", ["--to-gguf", "--to-hf"])
def test_our_checkpoint_with_bad_rope_frequencies_is_not_written_out(case, capsys, scaled_sources, flag, value):
    model_bin = case.src / "scaled.bin"
    data = bytearray((scaled_sources / "model.bin").read_bytes())
    at = 256 + ARGS.vocab_size * ARGS.dim * 4      # rope_inv_freq follows the embedding, 64-byte aligned
    at += -at % 64
    assert np.frombuffer(data[at:at + 4], "<f4")[0] == 1.0     # theta^0, unscaled by any rule
    data[at:at + 4] = np.float32(value).tobytes()
    model_bin.write_bytes(data)
    tokenizer = case.src / "tokenizer.bin"
    export.write_tokenizer_hf_json(case.src / "hf" / "tokenizer.json", tokenizer)
    status, out, err = export_main(capsys, model_bin, flag, case.out_dir / "out", "--tokenizer", tokenizer)
    assert_refused(status, err, model_bin, "rope_inv_freq", case)


# Weights that are not finite: refused by name (run.c's logits would be NaN),
# with none of numpy's warnings on the way (a NaN scale of a Q8_0 block).

def gguf_tensor_bytes(name, change):
    """model.gguf (or, for a name ending in "@q8_0", the q8_0 one) with the bytes of tensor name changed."""
    def damage(c):
        import gguf
        path = c.src / "model.gguf"
        if name.endswith("@q8_0"):
            export.write_checkpoint(c.src / "q8_0.bin", *export.read_checkpoint(c.src / "model.bin"), "q8_0")
            export.write_gguf(path, c.src / "q8_0.bin")
        t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name.split("@")[0])
        data = bytearray(path.read_bytes())
        data[t.data_offset:t.data_offset + t.n_bytes] = change(data[t.data_offset:t.data_offset + t.n_bytes])
        path.write_bytes(data)
        return path
    return damage


NON_FINITE = [
    ("an F32 weight NaN", gguf_tensor_bytes("token_embd.weight", lambda b: np.float32(np.nan).tobytes() + b[4:]),
     "tok_embeddings.weight holds NaN"),
    ("an F32 norm inf", gguf_tensor_bytes("output_norm.weight", lambda b: b[:4] + np.float32(np.inf).tobytes() + b[8:]),
     "norm.weight holds NaN or infinite"),
    ("a Q8_0 block's scale NaN", gguf_tensor_bytes("blk.0.attn_q.weight@q8_0", lambda b: b"\x00\x7e" + b[2:]),
     "layers.0.attention.wq.weight holds NaN"),
    ("a Q8_0 block's scale inf", gguf_tensor_bytes("blk.1.ffn_down.weight@q8_0", lambda b: b"\x00\x7c" + b[2:]),
     "layers.1.feed_forward.w2.weight holds NaN"),
]


@pytest.mark.parametrize("damage,what", [c[1:] for c in NON_FINITE], ids=[c[0] for c in NON_FINITE])
def test_weights_that_are_not_finite_are_refused_without_warnings(case, damage, what):
    path = damage(case)
    p, _ = export_process(case.out, "--gguf", path, timeout=60)
    assert_refused(p.returncode, p.stderr, path, what, case)


def test_a_safetensors_weight_beyond_float32_is_refused(case, capsys):
    hf_weights(lambda t: t.update({"model.norm.weight": torch.full((ARGS.dim,), 1e300, dtype=torch.float64)}))(case)
    status, out, err = export_main(capsys, case.out, "--hf", case.src / "hf")
    assert_refused(status, err, case.src / "hf", "norm.weight holds NaN or infinite", case)


# torch.save's zip archive: where a storage's bytes are was taken from the
# central directory and the local header's lengths, neither checked; Meta's
# shard then converted with its embedding read from other bytes.

def zip_entries(data):
    """{member name: (offset of its central directory entry, of its local header)} of a zip archive."""
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        offsets = {info.filename: info.header_offset for info in archive.infolist()}
    entries, at = {}, data.find(b"PK\x01\x02")
    while at >= 0:
        name_size = struct.unpack_from("<H", data, at + 28)[0]
        name = bytes(data[at + 46:at + 46 + name_size]).decode()
        entries[name] = (at, offsets[name])
        at = data.find(b"PK\x01\x02", at + 46)
    return entries


def shard_storage(patch):
    """Meta's shard with the zip records of its first storage's member changed by patch(data, entry, header)."""
    def damage(c):
        path = c.src / "meta" / "consolidated.00.pth"
        data = bytearray(path.read_bytes())
        entries = zip_entries(data)
        member = min(name for name in entries if "/data/" in name)
        patch(data, *entries[member])
        path.write_bytes(data)
        return path
    return damage


ZIP_DAMAGE = [
    ("a directory entry at offset 0", shard_storage(lambda data, entry, header: data.__setitem__(
        slice(entry + 42, entry + 46), struct.pack("<I", 0))), "its local header names"),
    ("a local header's name length 65535", shard_storage(lambda data, entry, header: data.__setitem__(
        slice(header + 26, header + 28), struct.pack("<H", 0xFFFF))), "/data/"),
    ("a local header of another name", shard_storage(lambda data, entry, header: data.__setitem__(
        slice(header + 30, header + 31), b"X")), "its local header names"),
    ("a local header's extra field past the member", shard_storage(lambda data, entry, header: data.__setitem__(
        slice(header + 28, header + 30), struct.pack("<H", 0xFFFF))), "past the member's end"),
]


def shard_compressed(c):
    """Meta's shard with its pickle deflated: what it unpacks to is then only what the directory claims."""
    path = c.src / "meta" / "consolidated.00.pth"
    with zipfile.ZipFile(path) as old:
        members = {info.filename: old.read(info) for info in old.infolist()}
    with zipfile.ZipFile(path, "w") as new:
        for name, contents in members.items():
            new.writestr(name, contents, zipfile.ZIP_DEFLATED if name.endswith("data.pkl") else zipfile.ZIP_STORED)
    return path


ZIP_DAMAGE.append(("a pickle compressed", shard_compressed, "data.pkl is compressed"))


@pytest.mark.parametrize("damage,what", [c[1:] for c in ZIP_DAMAGE], ids=[c[0] for c in ZIP_DAMAGE])
def test_a_storage_misplaced_in_the_zip_archive_is_refused(case, capsys, damage, what):
    path = damage(case)
    status, out, err = export_main(capsys, case.out, "--meta", case.src / "meta")
    assert_refused(status, err, path, what, case)


# tokenizer.bin for --to-gguf and --to-hf: refused where ./run refuses it,
# by tokenizer.c's rules; tokenizer.c itself (tests/tokenizer_driver.c) is
# the reference that each damaged file is refused by.

@pytest.fixture(scope="module")
def tokenizer_driver(tmp_path_factory):
    out = tmp_path_factory.mktemp("driver") / "tokenizer_driver"
    subprocess.run([os.environ.get("CC", "cc"), "-std=c11", "-O1", "-o", out, ROOT / "tests" / "tokenizer_driver.c"],
                   check=True, timeout=120)
    return out


def ltok_field(offset, fmt, value):
    """A tokenizer.bin with the header field at offset set to value."""
    return lambda data: data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt):]


def ltok_merge(i, value):
    """A tokenizer.bin with field i (0 left, 1 right, 2 result) of its first merge set to value."""
    def damage(data):
        at = 64
        for _ in range(struct.unpack_from("<i", data, 12)[0]):     # the token records: u32 len, f32, u8, bytes
            at += 9 + struct.unpack_from("<I", data, at)[0]
        at += 4 * i
        return data[:at] + struct.pack("<i", value) + data[at + 4:]
    return damage


def ltok_first_token(change):
    """A tokenizer.bin with its first token record (len, score, type, bytes) replaced by change(record)."""
    def damage(data):
        length = struct.unpack_from("<I", data, 64)[0]
        return data[:64] + change(data[64:64 + 9 + length]) + data[64 + 9 + length:]
    return damage


BAD_TOKENIZERS = [
    ("a merge's left id out of range", ltok_merge(0, ARGS.vocab_size), "merge 0"),
    ("a merge's right id negative", ltok_merge(1, -1), "merge 0"),
    ("a merge's result id negative", ltok_merge(2, -3), "merge 0"),
    ("a merge whose result is another token", ltok_merge(2, 65), "merge 0"),
    ("bos_id 10^9", ltok_field(16, "<i", 10**9), "bos_id"),
    ("bos_id -5", ltok_field(16, "<i", -5), "bos_id"),
    ("unk_id 260", ltok_field(28, "<i", ARGS.vocab_size), "unk_id"),
    ("system_len past the end", ltok_field(52, "<I", 1000), "system_len"),
    ("chat template kind 99", ltok_field(40, "<I", 99), "chat_template 99"),
    ("tokenizer kind 7", ltok_field(8, "<I", 7), "kind 7"),
    ("pretokenizer 99", ltok_field(36, "<I", 99), "pretokenizer 99"),
    ("every flag bit", ltok_field(32, "<I", 0xFFFFFFFF), "flags"),
    ("max_token_length 0", ltok_field(48, "<I", 0), "max_token_length"),
    ("max_token_length above the longest token", ltok_field(48, "<I", 200), "max_token_length"),
    ("n_merges 2^31", ltok_field(44, "<I", 1 << 31), "merges do not fit"),
    ("vocab_size 0", ltok_field(12, "<i", 0), "vocab_size"),
    ("version 2", ltok_field(4, "<I", 2), "version 2"),
    ("token type 99", ltok_first_token(lambda r: r[:8] + b"\x63" + r[9:]), "unknown type 99"),
    ("an empty token", ltok_first_token(lambda r: struct.pack("<I", 0) + r[4:9]), "length 0"),
    ("a token past the end", ltok_first_token(lambda r: struct.pack("<I", 255) + r[4:]), "token 0"),
    ("a NUL in the system prompt", lambda data: ltok_field(52, "<I", 3)(data) + b"a\0b", "NUL"),
    ("cut short", lambda data: data[:100], "cut short"),
]


@pytest.mark.parametrize("flag", ["--to-gguf", "--to-hf"])
@pytest.mark.parametrize("damage,what", [c[1:] for c in BAD_TOKENIZERS], ids=[c[0] for c in BAD_TOKENIZERS])
def test_a_tokenizer_that_run_refuses_is_refused(case, capsys, tokenizer_driver, damage, what, flag):
    tokenizer = case.src / "tokenizer.bin"
    export.write_tokenizer_hf_json(case.src / "hf" / "tokenizer.json", tokenizer)
    tokenizer.write_bytes(damage(tokenizer.read_bytes()))
    p = subprocess.run([tokenizer_driver, f"{tokenizer}:{ARGS.vocab_size}", "info"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2, f"tokenizer.c loads it: {p.stdout}"
    status, out, err = export_main(capsys, case.src / "model.bin", flag, case.out_dir / "out",
                                   "--tokenizer", tokenizer)
    assert_refused(status, err, tokenizer, what, case)
    assert "model.bin" not in err


SENTENCEPIECE_DAMAGE = [
    ("a duplicate piece", [(b"<unk>", 0.0, 2), (b"a", 0.0, 1), (b"a", 0.0, 1)], 0, "token 2 is a duplicate"),
    ("a byte piece of another form", [(b"<unk>", 0.0, 2), (b"<0x0a>", 0.0, 6)], 0, "byte token 1"),
    ("unk_id a normal piece", [(b"<unk>", 0.0, 2), (b"a", 0.0, 1)], 1, "unk_id 1"),
    ("no unk_id", [(b"<unk>", 0.0, 2), (b"a", 0.0, 1)], -1, "unk_id -1"),
]


@pytest.mark.parametrize("pieces,unk_id,what", [c[1:] for c in SENTENCEPIECE_DAMAGE],
                         ids=[c[0] for c in SENTENCEPIECE_DAMAGE])
def test_a_sentencepiece_tokenizer_that_run_refuses_is_refused(case, capsys, tokenizer_driver, pieces, unk_id,
                                                                what):
    tokenizer = case.src / "sp.bin"
    export.write_tokenizer(tokenizer, export.TOK_SENTENCEPIECE, pieces, unk_id=unk_id)
    p = subprocess.run([tokenizer_driver, tokenizer, "info"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, f"tokenizer.c loads it: {p.stdout}"
    with pytest.raises(export.ExportError, match=re.escape(f"{tokenizer}: {what}")):
        export.read_tokenizer(tokenizer)


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_read_tokenizer_refuses_what_tokenizer_c_refuses(case, tokenizer_driver, kind):
    """Random damage to a tokenizer.bin, each file loaded by tokenizer.c and
    by export.read_tokenizer: both load it or both refuse it."""
    tokenizer = case.src / "tokenizer.bin"
    if kind == "byte-level":
        export.write_tokenizer_hf_json(case.src / "hf" / "tokenizer.json", tokenizer)
    else:
        pieces = [(b"<unk>", 0.0, 2), (b"<s>", 0.0, 3)] + [(f"<0x{b:02X}>".encode(), 0.0, 6) for b in range(256)]
        export.write_tokenizer(tokenizer, export.TOK_SENTENCEPIECE, pieces + [(b"\xe2\x96\x81a", -1.0, 1)],
                               bos_id=1, unk_id=0, flags=export.TOKF_ADD_BOS | export.TOKF_BYTE_FALLBACK,
                               chat_template=export.CHAT_LLAMA2, system_prompt="Be brief.")
    good, rng, verdicts = tokenizer.read_bytes(), random.Random(24), []
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(80) if rng.random() < 0.6 else rng.randrange(len(data))
            data[at] = rng.choice([0, 1, 0xFF, 0x80, rng.randrange(256)])
        tokenizer.write_bytes(data)
        c = subprocess.run([tokenizer_driver, tokenizer, "info"], capture_output=True, text=True, timeout=60)
        try:
            export.read_tokenizer(tokenizer)
            python = 0
        except export.ExportError:
            python = 2
        assert python == c.returncode, f"tokenizer.c {c.returncode} ({c.stderr.strip()}), export.py {python}: " \
                                       f"{bytes(data[:80])}"
        verdicts.append(python)
    assert 0 < verdicts.count(0) < len(verdicts)     # some damage is harmless (a score, say), most is not


def test_the_undamaged_tokenizer_loads_in_both(case, tokenizer_driver):
    """The damage above is what is refused: the tokenizer it starts from loads."""
    tokenizer = case.src / "tokenizer.bin"
    export.write_tokenizer_hf_json(case.src / "hf" / "tokenizer.json", tokenizer)
    p = subprocess.run([tokenizer_driver, f"{tokenizer}:{ARGS.vocab_size}", "info"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert len(export.read_tokenizer(tokenizer)["merges"]) == 4


# The outputs together or not at all: a rename that fails after another has
# been made puts the first back.

def test_a_failed_rename_puts_back_the_outputs_already_renamed(case, capsys, monkeypatch):
    """tokenizer.bin becomes a directory while the model converts: its
    rename fails after model.bin's, which is then put back as it was."""
    case.out.write_bytes(b"the model that was here")
    write = export.write_tokenizer_hf_json

    def write_then_block(source, tmp):
        (case.out_dir / "tokenizer.bin").mkdir()
        return write(source, tmp)

    monkeypatch.setattr(export, "write_tokenizer_hf_json", write_then_block)
    status, _, err = export_main(capsys, case.out, "--hf", case.src / "hf")
    assert_one_line(status, err, case.out_dir / "tokenizer.bin", "Is a directory")
    assert sorted(p.name for p in case.out_dir.iterdir()) == ["model.bin", "tokenizer.bin"]
    assert case.out.read_bytes() == b"the model that was here"


@pytest.mark.parametrize("existing", [True, False], ids=["replacing files", "new files"])
def test_an_interrupt_between_the_renames_puts_back_the_outputs(case, capsys, monkeypatch, existing):
    if existing:
        case.out.write_bytes(b"the model that was here")
        (case.out_dir / "tokenizer.bin").write_bytes(b"the tokenizer that was here")
    replace, calls = os.replace, []

    def replace_then_interrupt(source, target):
        if str(target).endswith("tokenizer.bin") and ".tmp-" in str(source):
            raise KeyboardInterrupt
        calls.append(target)
        return replace(source, target)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    status, _, err = export_main(capsys, case.out, "--hf", case.src / "hf")
    assert status == 130 and err == "export.py: interrupted; nothing was written\n", err
    assert calls, "model.bin was not renamed before the interrupt"
    if existing:
        assert sorted(p.name for p in case.out_dir.iterdir()) == ["model.bin", "tokenizer.bin"]
        assert case.out.read_bytes() == b"the model that was here"
        assert (case.out_dir / "tokenizer.bin").read_bytes() == b"the tokenizer that was here"
    else:
        assert_nothing_written(case)
