#!/usr/bin/env python3
"""export.py: the command line that writes run.c's files.

  export.py OUTPUT (--reference PT | --meta DIR | --hf DIR | --llama2c FILE
                    | --gguf FILE | --tokenizer-from SOURCE) [--verify]
  export.py MODEL (--to-gguf FILE | --to-hf DIR) [--tokenizer PATH] [--verify]

The work is done beside it:

  model.py                the plain PyTorch reference Llama that run.c is tested against
  convert/checkpoint.py   the checkpoint (model.bin): writer, reader, weight types
  convert/kquants.py      the K types (llama.cpp's Q4_K, Q5_K, Q6_K blocks) and its mixes of them
  convert/sources.py      readers of reference, Meta, Hugging Face, llama2.c and GGUF models
  convert/tokenizers.py   tokenizer.bin from sentencepiece, tokenizer.json or GGUF metadata
  convert/gguf_out.py     a checkpoint written back as a GGUF file
  convert/hf_out.py       a checkpoint written back as a Hugging Face directory
  convert/vocab_out.py    our tokenizer as GGUF and Hugging Face spell it (texts, chat template)
  convert/verify.py       --verify: ./run against the source model in its own ecosystem
  convert/files.py        reading the user's files, each checked
  convert/errors.py       ExportError, and the packages only some conversions need

Both file formats are drawn in docs/FORMATS.md (the checkpoint also at the top
of run.c, the tokenizer at the top of tokenizer.c).

The GGUF path needs numpy and gguf (with pyyaml, which gguf imports) only;
everything else needs torch too.
"""

import argparse
import contextlib
import dataclasses
import errno
import os
import shutil
import signal
import stat
import sys
import tempfile
import time

# model.py and convert/ sit beside this file; python -I leaves its directory off sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Beside what the command line uses, the names that the tests, bench/ and
# fuzz/make_seeds.py reach as export.X.
from convert.checkpoint import (BLOCK_TYPES, HEADER, MATRIX_TYPES, WEIGHT_TYPES, check_dtype,  # noqa: E402
                                check_matrix_types, check_max_seq_len, check_rope_frequencies, checkpoint_tensors,
                                decode_matrix, describe_types, encode_matrix, finite_tensors, read_checkpoint,
                                read_checkpoint_arrays, single_type, write_checkpoint)
from convert.errors import ExportError  # noqa: E402
from convert.files import read_json, regular_file  # noqa: E402
from convert.gguf_out import write_gguf  # noqa: E402
from convert.kquants import K_TYPES, MIXES, kquant_mix_types  # noqa: E402
from convert.hf_out import interleaved_to_hf, write_hf  # noqa: E402
from convert.sources import (GGUF_LAYER_NAMES, GGUF_NAMES, HF_LAYER_NAMES, HF_NAMES,  # noqa: E402
                             META_MAX_SEQ_LEN, _gguf_reader, gguf_dequantize, gguf_metadata,
                             gguf_quantized, hf_to_interleaved, load_gguf, load_hf, load_llama2c, load_meta,
                             load_reference, save_reference, write_llama2c)
from convert.tokenizers import (CHAT_CHATML, CHAT_LLAMA2, CHAT_LLAMA3, CHAT_LLAMA31,  # noqa: E402
                                CHAT_LLAMA32, CHAT_NONE, LLAMA3_PATTERN, PIECE_BYTE, PIECE_CONTROL,
                                PIECE_UNKNOWN, PRETOK_DIGITS_GPT2, PRETOK_GPT2, PRETOK_LLAMA3, PRETOK_QWEN2,
                                QWEN2_PATTERN, TOK_BYTELEVEL, TOK_SENTENCEPIECE,
                                TOKF_ADD_BOS, TOKF_ADD_EOS, TOKF_BYTE_FALLBACK, TOKF_DUMMY_PREFIX,
                                TOKF_IGNORE_MERGES, TOKF_NFC, gguf_chat_template, gpt2_bytes_to_unicode,
                                read_tokenizer, write_tokenizer, write_tokenizer_from, write_tokenizer_gguf,
                                write_tokenizer_hf_json, write_tokenizer_sentencepiece)
from convert.verify import THRESHOLDS, Transformers, VerificationFailed, source_model, verify  # noqa: E402
from convert.vocab_out import default_tokenizer  # noqa: E402
from model import (MAX_SEQ_LEN, Llama, ModelArgs, generate_greedy, random_model,  # noqa: E402
                   rope_inverse_frequencies, rope_scaling_of)

# ----------------------------------------------------------------------------
# Command line

EXAMPLES = """\
examples:
  export.py model.bin --hf ~/TinyLlama-1.1B      model.bin, and tokenizer.bin beside it
  export.py model.bin --llama2c stories15M.bin --max-seq-len 256
  export.py tokenizer.bin --tokenizer-from tokenizer.model
  export.py tokenizer.bin --tokenizer-from ~/Llama-3.2-1B-Instruct   its tokenizer.json
  export.py tokenizer.bin --tokenizer-from tinyllama.Q4_K_M.gguf     the tokenizer in its metadata
  export.py model.bin --gguf SmolLM2-135M-Instruct.Q4_1.gguf   as q8_0; tokenizer.bin beside it
  export.py model.bin --gguf Llama-3.2-1B-Instruct-Q4_K_M.gguf   its Q4_K and Q6_K blocks kept as they are
  export.py model.bin --hf ~/TinyLlama-1.1B --dtype q4_k_m     quantized as llama.cpp's Q4_K_M
  export.py model.bin --hf ~/TinyLlama-1.1B --verify           then ./run checked against transformers
  export.py model.bin --to-gguf model.gguf       for llama.cpp and ollama (tokenizer.bin beside model.bin)
  export.py model.bin --to-hf TinyLlama-out      for transformers and vLLM
"""


def _source_tokenizer(opts, gguf_reader):
    """The tokenizer file that comes with --meta, --hf or --gguf, or None.

    Meta ships tokenizer.model. Hugging Face Llama 2 repositories carry both
    files, and the sentencepiece model is the original; Llama 3 ones only
    tokenizer.json. A GGUF file carries its tokenizer in its metadata."""
    if opts.meta:
        candidates = [os.path.join(opts.meta, "tokenizer.model")]
    elif opts.hf:
        candidates = [os.path.join(opts.hf, "tokenizer.model"), os.path.join(opts.hf, "tokenizer.json")]
    elif opts.gguf:
        return opts.gguf if gguf_metadata(gguf_reader, "tokenizer.ggml.model") else None
    else:
        return None
    return next((path for path in candidates if os.path.exists(path)), None)


class Outputs:
    """The files one command writes, all or none. Each is written to a
    temporary file beside its target (.NAME.tmp-XXXXXXXX, in the same
    directory, so that a rename moves it) and renamed over the target only
    when every output has been written. If anything fails first, a
    KeyboardInterrupt included, the temporaries are removed and the targets
    are as they were.

        with Outputs() as outputs:
            with outputs.writing("model.bin") as tmp:
                write_checkpoint(tmp, ...)
    """

    def __init__(self):
        self.pending = {}           # target -> temporary file (or directory)
        self.directories = set()    # the targets that are directories
        self.empty_directories = set()  # those of them that exist, empty, and are to be replaced

    def add(self, target):
        """Claim target as an output (early, so that an output that cannot be
        written fails before a long conversion); returns its temporary file."""
        path = os.path.realpath(target)     # through a symlink, as open() would write
        if path in self.pending:
            raise ExportError(target, "named as two outputs")
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as e:
            raise ExportError(target, e.strerror) from None
        if mode is not None and stat.S_ISDIR(mode):
            raise ExportError(target, "is a directory")
        if mode is not None and not stat.S_ISREG(mode):     # a rename would replace /dev/null itself
            raise ExportError(target, "not a regular file")
        if mode is not None and not os.access(path, os.W_OK):
            raise ExportError(target, "Permission denied")
        directory, name = os.path.split(path)
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name[:200]}.tmp-")   # within NAME_MAX
        except OSError as e:
            raise ExportError(target, e.strerror) from None
        os.close(fd)
        self.pending[path] = tmp
        return tmp

    def add_directory(self, target):
        """Claim target as an output directory, written whole or not at all:
        it must not exist, or be empty (it is then replaced). Returns the
        temporary directory beside it to fill, renamed to target on commit."""
        path = os.path.realpath(target)
        if path in self.pending:
            raise ExportError(target, "named as two outputs")
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise ExportError(target, "exists and is not a directory")
            try:
                entries = os.listdir(path)
            except OSError as e:
                raise ExportError(target, e.strerror) from None
            if entries:
                raise ExportError(target, "exists and is not empty (export.py writes a new directory, "
                                          "or fills an empty one)")
            self.empty_directories.add(path)
        directory, name = os.path.split(path)
        try:
            tmp = tempfile.mkdtemp(dir=directory, prefix=f".{name[:200]}.tmp-")
        except OSError as e:
            raise ExportError(target, e.strerror) from None
        self.pending[path] = tmp
        self.directories.add(path)
        return tmp

    @contextlib.contextmanager
    def writing(self, target):
        """Write target: yields the temporary file to write; a failure to
        write it (a full disk, say) is an ExportError naming target."""
        tmp = self.pending.get(os.path.realpath(target)) or self.add(target)
        try:
            yield tmp
        except OSError as e:
            if e.filename not in (None, tmp):     # not the output's: an input's
                raise
            raise ExportError(target, e.strerror or str(e)) from None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if kind is None:
                self.commit()
        finally:
            self.discard()
        return False

    def commit(self):
        """Rename every temporary file over its target, all or none: each
        target that exists is first linked to a backup beside it (moved
        there where the file system has no hard links), and if a rename
        fails, KeyboardInterrupt included, the targets are put back as they
        were before any was renamed."""
        backups, renamed, path = {}, [], None
        try:
            for path, tmp in self.pending.items():
                _settle(tmp, path)
            for path in self.pending:
                backups[path] = None if path in self.directories else _backup(path)
            for path, tmp in self.pending.items():
                os.replace(tmp, path)
                renamed.append(path)
        except BaseException as e:
            self._roll_back(backups, renamed)
            if isinstance(e, OSError):
                raise ExportError(path, e.strerror) from None
            raise
        finally:
            for backup in filter(None, backups.values()):
                shutil.rmtree(os.path.dirname(backup), ignore_errors=True)
        self.pending.clear()

    def _roll_back(self, backups, renamed):
        """Put every target back as it was before the commit: from its backup,
        or, where there was none, the new one taken away (a directory back to
        its temporary name, which discard() removes, and the empty directory
        it replaced, if any, made again). Each step is tried whatever the
        others do: as much as can be is put back."""
        for path, backup in backups.items():
            with contextlib.suppress(OSError):
                if backup:
                    os.replace(backup, path)
                elif path in renamed and path in self.directories:
                    os.replace(path, self.pending[path])
                    if path in self.empty_directories:
                        os.mkdir(path)
                elif path in renamed:
                    os.unlink(path)

    def discard(self):
        """Remove the temporary files that are not renamed (all of them, after a failure)."""
        for path, tmp in self.pending.items():
            if path in self.directories:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        self.pending.clear()
        self.directories.clear()
        self.empty_directories.clear()


def _backup(target):
    """A hard link to the file target in a new directory beside it (or
    target moved there, on a file system without hard links); None where
    target is not a file (then nothing is there, or what is there, a
    directory, say, makes the rename over it fail)."""
    if not os.path.isfile(target):
        return None
    directory, name = os.path.split(target)
    holder = tempfile.mkdtemp(dir=directory, prefix=f".{name[:200]}.old-")
    backup = os.path.join(holder, name)
    try:
        try:
            os.link(target, backup)
        except OSError:
            os.replace(target, backup)
    except BaseException:
        os.rmdir(holder)
        raise
    return backup


def _settle(tmp, target):
    """Make a finished temporary file or directory ready to replace target:
    the target's mode, or the one a new one gets (mkstemp's is 0600,
    mkdtemp's 0700), and its contents on disk before the rename."""
    directory = os.path.isdir(tmp)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = (0o777 if directory else 0o666) & ~umask
    os.chmod(tmp, mode)
    if directory:
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
    _fsync(tmp)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _reading(path):
    """While path is read: an error that a malformed file can still raise
    from a library or from the checks' blind spots (a KeyError, a TypeError
    on a value of the wrong type) becomes an ExportError naming path. The
    readers check what they expect; this is the net under them."""
    try:
        yield
    except ExportError:
        raise
    except OSError as e:
        raise ExportError(e.filename or path, e.strerror or str(e)) from None
    except MemoryError:
        raise ExportError(path, "out of memory reading it") from None
    except Exception as e:
        raise ExportError(path, f"cannot be read ({type(e).__name__}: {e})") from None


class Progress:
    """The conversion's progress on stderr, where it is a terminal: one line,
    rewritten in place after each tensor, once the conversion has run for a
    moment (tensors written of all, bytes, time taken and left). Elsewhere
    nothing: the line on stdout that says what was written gives the time."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.start, self.shown = stream, time.monotonic(), False
        self.live = stream is not None and stream.isatty()

    def elapsed(self):
        return time.monotonic() - self.start

    def __call__(self, done, total, size, share):
        """After tensor done of total: size bytes written, share of the weights."""
        elapsed = self.elapsed()
        if not self.live or (elapsed < 1 and not self.shown):
            return
        left = elapsed * (1 - share) / share
        print(f"\rexport.py: {done}/{total} tensors, {size / 1e6:,.0f} MB, {elapsed:.0f} s, "
              f"{left:.0f} s left \033[K", end="" if done < total else "\n", file=self.stream, flush=True)
        self.shown = True


LOADERS = {"reference": load_reference, "meta": load_meta, "hf": load_hf, "llama2c": load_llama2c,
           "gguf": load_gguf}


def convert(opts):
    """Write what the command line asks, all of it or nothing; returns the
    lines that say what was written. With --verify, the files are checked
    once written; a failure raises VerificationFailed, the files staying."""
    if opts.to_gguf or opts.to_hf:
        return _convert_out(opts)
    with Outputs() as outputs:
        if opts.tokenizer_from:
            with _reading(opts.tokenizer_from), outputs.writing(opts.output) as tmp:
                source, size = write_tokenizer_from(opts.tokenizer_from, tmp)
            return [f"wrote {opts.output}: tokenizer of {source}, {size} bytes"]

        kind = next(k for k in LOADERS if getattr(opts, k))
        source = getattr(opts, kind)
        outputs.add(opts.output)
        with _reading(source):
            gguf_reader = _gguf_reader(source) if opts.gguf else None   # parsed once, for both
            tokenizer = _source_tokenizer(opts, gguf_reader)
        if opts.tokenizer_out and not tokenizer:
            raise ExportError(source, "no tokenizer here for --tokenizer-out")
        tokenizer_out = opts.tokenizer_out or os.path.join(os.path.dirname(opts.output), "tokenizer.bin")
        if tokenizer:
            outputs.add(tokenizer_out)

        with _reading(source):
            args, state_dict = LOADERS[kind](gguf_reader or source)
            if opts.max_seq_len:
                args = dataclasses.replace(args, max_seq_len=opts.max_seq_len)
            if args.scaled_rope:    # from the source's tensor, or computed from its configuration
                check_rope_frequencies(state_dict["rope_inv_freq"], source)
            state_dict = finite_tensors(state_dict, source)
            dtype = _weight_types(opts.dtype, args, state_dict, gguf_reader)
            if isinstance(dtype, str):
                check_dtype(args, dtype, source)
            else:
                check_matrix_types(args, dtype, source)
            check_max_seq_len(args, source)
        progress = Progress()
        # the tensors are read from the source as they are written
        with _reading(source), outputs.writing(opts.output) as tmp:
            size = write_checkpoint(tmp, args, state_dict, dtype, progress)
        report = [f"wrote {opts.output}: {args.describe()}, {describe_types(dtype)}, {size} bytes in "
                  f"{progress.elapsed():.1f} s"] + _type_changes(dtype, state_dict, opts.dtype)
        if tokenizer:
            with _reading(tokenizer), outputs.writing(tokenizer_out) as tmp:
                if opts.gguf:
                    size = write_tokenizer_gguf(gguf_reader, tmp, args.vocab_size)
                elif tokenizer.endswith(".json"):
                    size = write_tokenizer_hf_json(tokenizer, tmp)
                else:
                    size = write_tokenizer_sentencepiece(tokenizer, tmp)
            report.append(f"wrote {tokenizer_out}: tokenizer of {tokenizer}, {size} bytes")
    if opts.verify:
        written = [opts.output] + ([tokenizer_out] if tokenizer else [])
        report += _verify(report, written, lambda: source_model(kind, source, args, state_dict),
                          opts.output, args, dtype, tokenizer_out if tokenizer else None, opts.dtype)
    return report


def _weight_types(asked, args, state_dict, gguf_reader):
    """The weight types of the checkpoint's matrices: write_checkpoint()'s
    dtype, one type or {matrix name: type}. asked: --dtype, or None.
    A mix (q4_k_m, q5_k_m, q6_k) gives each matrix llama.cpp's type for it.
    With no --dtype: f32, but for a GGUF file with quantized tensors, its
    Q8_0, Q4_0, Q4_K, Q5_K and Q6_K matrices kept as they are (BLOCK_TYPES)
    and q8_0 for the others; one type when that is all of them. ./run maps
    a GGUF file by the same rule. (A GGUF matrix already in the type asked
    is copied, never requantized.)"""
    if asked in MIXES:
        return kquant_mix_types(args, asked)
    if asked:
        return asked
    if not (gguf_reader and gguf_quantized(gguf_reader)):
        return "f32"
    types = {name: state_dict.block_types.get(name, "q8_0")
             for name, shape in state_dict.shapes.items() if len(shape) == 2}
    return single_type(types) or types


def _type_changes(dtype, state_dict, asked):
    """The one line that says which matrices were not written in the type
    the user has: a GGUF's tensors written in another type ("12 Q5_0
    tensors written as q8_0"; F16 and BF16 written as f32 keep their
    numbers, and go unsaid), or the matrices of a K mix that fall back from
    a K type (width not a multiple of 256); [] if none."""
    types = dtype if isinstance(dtype, dict) else {name: dtype for name in state_dict.source_types}
    changed = {}
    for name, theirs in state_dict.source_types.items():
        if theirs.lower() != types[name] and not (theirs in ("F16", "BF16") and types[name] == "f32"):
            changed[theirs, types[name]] = changed.get((theirs, types[name]), 0) + 1
    parts = [f"{n} {theirs} tensors written as {ours}" for (theirs, ours), n in changed.items()]
    if asked in MIXES:
        fallen = [kind for kind in types.values() if kind not in K_TYPES]
        parts += [f"{fallen.count(kind)} matrices of width not a multiple of 256 written as {kind} "
                  "(where llama.cpp falls back to Q5_0, Q5_1 or Q8_0)" for kind in sorted(set(fallen))]
    return ["; ".join(parts)] if parts else []


def _tolerance_type(dtype, asked):
    """The weight type whose --verify bounds a checkpoint gets: its own, or,
    for a checkpoint of several types, the loosest of them. A GGUF's
    blocks kept as they are (no --dtype: Q4_0 and the K types too) count as
    q8_0: they lose only what ./run's int8 activations do, as q8_0 does."""
    types = set(dtype.values()) if isinstance(dtype, dict) else {dtype}
    if not asked:
        types = {"q8_0" if t in BLOCK_TYPES else t for t in types}
    return max(types, key=lambda t: THRESHOLDS[t][0])


def _verify(report, written, theirs, checkpoint, args, dtype, tokenizer, asked):
    """convert/verify.py's verify(), after report's files are written: any
    failure, a missing package included, is a VerificationFailed that says
    the files stay. theirs: makes the model on the other side; asked: --dtype."""
    what = ", ".join(map(str, written))
    try:
        return verify(checkpoint, args, _tolerance_type(dtype, asked), tokenizer, theirs(), what)
    except VerificationFailed as e:
        e.report = report + e.report
        raise
    except Exception as e:      # ExportError, or transformers or torch failing on a model
        problem = str(e) if isinstance(e, ExportError) else f"{type(e).__name__}: {e}"
        failure = VerificationFailed(None, f"verification failed: {problem}; the files are written ({what})")
        failure.report = report
        raise failure from None


def _convert_out(opts):
    """--to-gguf and --to-hf: the checkpoint OUTPUT names (ours) and its
    tokenizer, written for llama.cpp or transformers."""
    model = opts.output
    regular_file(model)
    tokenizer = opts.tokenizer or default_tokenizer(model)
    if not os.path.exists(tokenizer):
        raise ExportError(tokenizer, "no such tokenizer; a GGUF file or a Hugging Face directory needs one "
                                     "(give it with --tokenizer PATH)")
    target = opts.to_gguf or opts.to_hf
    if os.path.realpath(target) in (os.path.realpath(model), os.path.realpath(tokenizer)):
        raise ExportError(target, "is an input of this conversion")
    with Outputs() as outputs:
        if opts.to_gguf:
            with _reading(model), outputs.writing(target) as tmp:
                size = write_gguf(tmp, model, tokenizer)
                arch = gguf_metadata(tmp, "general.architecture")
            report = [f"wrote {target}: GGUF ({arch}) of {model} and {tokenizer}, {size} bytes"]
        else:
            tmp = outputs.add_directory(target)
            with _reading(model):
                try:
                    weights = write_hf(tmp, model, tokenizer)
                except OSError as e:
                    if not (e.filename or "").startswith(tmp):
                        raise
                    raise ExportError(target, e.strerror or str(e)) from None
            stored = (f"{weights} safetensors" if weights in ("f32", "bf16")
                      else f"f32 safetensors: its {describe_types(weights)} weights dequantized")
            arch = read_json(os.path.join(tmp, "config.json"))["architectures"][0]
            report = [f"wrote {target}: {arch} of {model} ({stored}) and {tokenizer}: "
                      f"{', '.join(sorted(os.listdir(tmp)))}"]
    if opts.verify:
        with _reading(model):
            args, dtype, _ = read_checkpoint_arrays(model)
        theirs = ((lambda: Transformers(os.path.dirname(os.path.abspath(target)), os.path.basename(target)))
                  if opts.to_gguf else (lambda: Transformers(target)))
        report += _verify(report, [target], theirs, model, args, dtype, tokenizer, None)
    return report


def _integer_up_to(most):
    """An argparse type: an integer from 1 to most."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= most:
            raise argparse.ArgumentTypeError(f"expected an integer from 1 to {most}, got {text!r}")
        return value
    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="export.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Write a run.c checkpoint (version 1; version 2 for q/k/v biases or scaled RoPE;\n"
                    "version 3 when the matrices' weight types differ, or are K types)\n"
                    "from one model source and, when the source comes with one, its tokenizer;\n"
                    "or write a tokenizer alone; or write a checkpoint and its tokenizer as a GGUF\n"
                    "file or a Hugging Face directory.")
    parser.add_argument("output", metavar="OUTPUT",
                        help="the file to write: the checkpoint, or the tokenizer with --tokenizer-from; "
                             "with --to-gguf or --to-hf, the checkpoint to read (MODEL)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--reference", metavar="PT", help="a file written by save_reference()")
    source.add_argument("--meta", metavar="DIR",
                        help="Meta's release: params.json, consolidated.*.pth and maybe tokenizer.model")
    source.add_argument("--hf", metavar="DIR",
                        help="a Hugging Face LlamaForCausalLM or Qwen2ForCausalLM (RoPE plain, or scaled as "
                             "Llama 3's or linearly): config.json, safetensors or pytorch_model.bin "
                             "weights, and maybe tokenizer.model or tokenizer.json")
    source.add_argument("--llama2c", metavar="FILE", help="a llama2.c legacy checkpoint")
    source.add_argument("--gguf", metavar="FILE",
                        help="a llama.cpp GGUF file of the llama or qwen2 architecture, with its tokenizer; "
                             "tensors of any type the gguf package dequantizes (F32, F16, BF16, Q4_0, Q8_0, "
                             "Q4_K, Q6_K, IQ4_NL, ...); needs numpy and gguf, not torch")
    source.add_argument("--tokenizer-from", metavar="SOURCE",
                        help="write only a tokenizer, as OUTPUT, from a sentencepiece tokenizer.model, a "
                             "Hugging Face tokenizer.json, a directory holding either (tokenizer.model "
                             "first), or a GGUF file")
    source.add_argument("--tokenizer-model", metavar="FILE", dest="tokenizer_from",
                        help="the same as --tokenizer-from (its older name)")
    source.add_argument("--to-gguf", metavar="FILE",
                        help="write the checkpoint MODEL and its tokenizer as a llama.cpp GGUF file (llama "
                             "architecture, qwen2 for a model with q/k/v biases; llama.cpp and ollama load it): the same numbers, f32 as F32, bf16 "
                             "as BF16, q8_0 as Q8_0, q4_0 as Q4_0, q4_k, q5_k and q6_k as Q4_K, Q5_K and "
                             "Q6_K, block for block; needs numpy and gguf")
    source.add_argument("--to-hf", metavar="DIR",
                        help="write the checkpoint MODEL and its tokenizer as a Hugging Face LlamaForCausalLM "
                             "(Qwen2ForCausalLM with q/k/v biases; scaled RoPE as config.json's rope_scaling) "
                             "directory (config.json, model.safetensors, tokenizer files) for transformers and "
                             "vLLM: f32 and bf16 weights as they are, the quantized types dequantized to f32. DIR must "
                             "not exist, or be empty; it appears whole or not at all. Needs torch, safetensors, "
                             "transformers and tokenizers (and sentencepiece for a sentencepiece tokenizer)")
    parser.add_argument("--max-seq-len", metavar="N", type=_integer_up_to(MAX_SEQ_LEN),
                        help=f"context length for the header, at most {MAX_SEQ_LEN} (default: the source's; "
                             f"{META_MAX_SEQ_LEN} for --meta, whose params.json has none)")
    parser.add_argument("--dtype", choices=list(WEIGHT_TYPES) + list(MIXES),
                        help="how the matrices are stored: f32, bf16, q8_0 (int8) or q4_0 (4-bit), the last "
                             "two with a float16 scale per 32 weights, every matrix alike; or q4_k_m, q5_k_m "
                             "or q6_k, llama.cpp's mixes of its K types (blocks of 256 weights: Q4_K 4.5 bits "
                             "a weight, Q5_K 5.5, Q6_K 6.56), each matrix in the type llama.cpp's quantizer "
                             "gives it (the classifier and, in Q4_K_M and Q5_K_M, the value and down "
                             "projections of some layers in Q6_K; q8_0 where a width is not a multiple of "
                             "256). Norms stay f32. Default: f32, which keeps every weight of the source "
                             "exactly; but for a GGUF file with quantized tensors, its Q8_0, Q4_0, Q4_K, "
                             "Q5_K and Q6_K tensors kept as they are, bit for bit (as q8_0, q4_0, q4_k, q5_k "
                             "and q6_k), and q8_0 for the others (Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, IQ4_NL, F16, "
                             "...: f32 would only make the file 4 to 8 times larger, and q8_0 keeps their "
                             "quality with half the bytes of bf16), with a line saying which; ./run runs the "
                             "GGUF file itself by the same rule. A GGUF's tensors already in the type asked "
                             "are copied as they are; --dtype q8_0 (or any other single type) converts every "
                             "other tensor to it")
    parser.add_argument("--tokenizer-out", metavar="PATH",
                        help="where the tokenizer of --meta, --hf or --gguf goes "
                             "(default: tokenizer.bin beside OUTPUT)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="with --to-gguf or --to-hf: the tokenizer.bin to write with the model "
                             "(default: tokenizer.bin beside MODEL)")
    thresholds = "; ".join(f"{dtype} {mean:g}, {p99:g}, {100 * top1:.0f}%%"    # argparse formats help with %
                           for dtype, (mean, p99, top1) in THRESHOLDS.items())
    parser.add_argument("--verify", action="store_true",
                        help="once written, run ./run (beside export.py) and the source model the way its own "
                             "ecosystem does (transformers for --hf and --gguf, and for the files --to-gguf and "
                             "--to-hf write; model.py's reference for --reference, --meta and --llama2c) over "
                             "the same fixed text (random token ids without a tokenizer), each position "
                             "predicting the next token; print the mean and 99th percentile over positions of "
                             "the KL divergence of the next-token distributions, KL(source || ours), and the "
                             "share of positions whose top token agrees. Exit 1 (the files stay) when one is "
                             "past what the checkpoint's weight type allows (mean KL, 99th percentile, top "
                             f"token share): {thresholds}")
    opts = parser.parse_args(argv)
    for name, value in vars(opts).items():
        if value == "":
            parser.error(f"{'OUTPUT' if name == 'output' else '--' + name.replace('_', '-')} is an empty path")
    if opts.tokenizer_out and not (opts.meta or opts.hf or opts.gguf):
        parser.error("--tokenizer-out goes with --meta, --hf or --gguf; "
                     "export a tokenizer alone with --tokenizer-from")
    writing_out = opts.to_gguf or opts.to_hf
    if writing_out and (opts.dtype or opts.max_seq_len):
        parser.error("--dtype and --max-seq-len do not go with --to-gguf or --to-hf, "
                     "which keep the checkpoint's weight type and context length")
    if opts.tokenizer and not writing_out:
        parser.error("--tokenizer goes with --to-gguf or --to-hf")
    if opts.verify and opts.tokenizer_from:
        parser.error("--verify checks a model's conversion, not a tokenizer's")

    try:
        report = convert(opts)
    except VerificationFailed as e:
        with contextlib.suppress(OSError, AttributeError):     # stdout closed: the error line still goes out
            print("\n".join(e.report), flush=True)
        print(f"export.py: {e}", file=sys.stderr)
        return 1
    except ExportError as e:
        print(f"export.py: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("export.py: out of memory; nothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    try:                        # > /dev/full, >&-: the files are written, but the user is not told
        if sys.stdout is None:  # closed when Python started
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        print("\n".join(report), flush=True)
    except OSError as e:
        if sys.stdout is not None:      # or the flush at exit fails again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"export.py: stdout: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    for signum in (signal.SIGTERM, signal.SIGHUP):      # end as Ctrl-C does, the temporary files removed
        signal.signal(signum, signal.default_int_handler)
    sys.exit(main())

