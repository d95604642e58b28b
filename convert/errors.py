"""The one error class of the converters, and the third-party packages that
only some conversions need."""

import contextlib
import importlib

class ExportError(Exception):
    """Anything a user can get wrong: an input that cannot be read or used, an
    output that cannot be written, a package that is not installed. str() is
    the one line export.py prints after "export.py: ", 'WHICH: what is wrong'
    (WHICH names the file, or is left out when there is none)."""

    def __init__(self, which, what):
        message = str(what) if which is None else f"{which}: {what}"
        super().__init__(" ".join(message.splitlines()))


@contextlib.contextmanager
def blamed_on(path):
    """While what path holds is used: a library's error on it (a ValueError,
    an IndexError, ...) becomes an ExportError naming path. ExportError and
    OSError (an output that cannot be written) pass as they are."""
    try:
        yield
    except (ExportError, OSError):
        raise
    except Exception as e:
        raise ExportError(path, f"cannot be converted ({type(e).__name__}: {e})") from None


# Third-party packages. Each conversion needs only some of them (--help none,
# --gguf numpy and gguf, --hf torch and maybe safetensors and sentencepiece),
# so a missing one is reported when a conversion needs it, not on import.

PIP_NAMES = {"yaml": "pyyaml", "google": "protobuf"}     # where the import name is not the PyPI name


def missing_package(module):
    """The ExportError for a package that is not installed (module: its import name)."""
    name = PIP_NAMES.get(module.split(".")[0], module.split(".")[0])
    return ExportError(None, f"this conversion needs the Python package '{name}' (pip install {name})")


def need(module):
    """Import module, one that only some conversions use."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:     # the module, or one that it imports
        raise missing_package(e.name or module) from None


class _Missing:
    """Stands in for numpy, or for torch, nn and F, where it is not installed,
    so that this file still loads. Using it raises missing_package(). Module
    is there so that the reference model's classes (model.py) can be defined."""
    Module = object

    def __init__(self, module):
        self._module = module

    def __getattr__(self, attr):
        if attr.startswith("__"):      # Python's own probing (copy, pickle, ...)
            raise AttributeError(attr)
        raise missing_package(self._module)


try:
    import numpy as np
except ModuleNotFoundError as e:
    np = _Missing(e.name or "numpy")
try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ModuleNotFoundError as e:
    torch = nn = F = _Missing(e.name or "torch")
