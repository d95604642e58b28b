"""Reading the user's files, each checked, with any failure an ExportError
naming the file."""

import json
import os
import stat

from convert.errors import ExportError



# Reading the user's files. Each reader checks what it reads and raises
# ExportError naming the file; the library errors (OSError, json, torch,
# safetensors, gguf, protobuf) are turned into one where the file is read.

def regular_file(path):
    """path, checked to name a regular file: a FIFO would block, /dev/zero never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ExportError(path, e.strerror) from None
    if stat.S_ISDIR(mode):
        raise ExportError(path, "is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise ExportError(path, "not a regular file")
    return path


def checked_directory(path):
    """path, checked to name a directory."""
    if not os.path.isdir(path):
        raise ExportError(path, "not a directory" if os.path.exists(path) else "No such directory")
    return path


def read_bytes(path):
    """The contents of the regular file path."""
    regular_file(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ExportError(path, e.strerror) from None


JSON_KINDS = {  # what a JSON field must hold, by the Python type asked for: (description, test)
    int: ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    dict: ("an object", lambda v: isinstance(v, dict)),
    list: ("an array", lambda v: isinstance(v, list)),
}
REQUIRED = object()


def read_json(path):
    """The JSON object (a dict) that the file path holds."""
    try:
        value = json.loads(read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ExportError(path, f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ExportError(path, f"expected a JSON object, not {json.dumps(value)[:40]}")
    return value


def json_field(obj, key, kind, path, default=REQUIRED):
    """obj[key], checked to be of kind (a key of JSON_KINDS), from a JSON object
    read from path; default where the key is absent or null."""
    value = obj.get(key)
    if value is None:
        if default is REQUIRED:
            raise ExportError(path, f"{key} is missing")
        return default
    description, test = JSON_KINDS[kind]
    if not test(value):
        raise ExportError(path, f"{key} = {json.dumps(value)[:60]}: expected {description}")
    return value


