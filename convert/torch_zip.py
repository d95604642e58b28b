"""torch.save's files read lazily: the pickle gives each tensor's type, shape
and place in the file, and its bytes are read only when it is asked for.

torch 1.13's torch.load has no mmap and reads every tensor of a file; Meta's
Llama-2-7B is one 13.5 GB consolidated.00.pth. torch.save's format since
torch 1.6 is a zip archive whose members are stored, not compressed:

  PREFIX/data.pkl    the saved object, pickled; each storage (the memory that
                     tensors view) is a persistent id
                     ('storage', torch.<Type>Storage, KEY, location, numel)
  PREFIX/data/KEY    that storage's bytes, little-endian
  PREFIX/byteorder   "little" or "big" (newer torch only; absent: little)

A tensor is torch._utils._rebuild_tensor_v2(storage, offset, shape, stride,
...), maybe wrapped in _rebuild_parameter(). The unpickler here makes only
what a state dict holds (dicts, OrderedDicts, numbers, strings, tensors) and
refuses any other class before anything runs: torch.load can run code."""

import collections
import os
import pickle
import struct
import zipfile

from convert.errors import ExportError, np

# torch's storage types: the name of the element type, and its numpy type as
# stored (bfloat16: its bit patterns as uint16)
STORAGE_TYPES = {
    "DoubleStorage": ("float64", "<f8"), "FloatStorage": ("float32", "<f4"), "HalfStorage": ("float16", "<f2"),
    "BFloat16Storage": ("bfloat16", "<u2"), "LongStorage": ("int64", "<i8"), "IntStorage": ("int32", "<i4"),
    "ShortStorage": ("int16", "<i2"), "CharStorage": ("int8", "i1"), "ByteStorage": ("uint8", "u1"),
    "BoolStorage": ("bool", "?"),
}
FLOAT_TYPES = ("float64", "float32", "float16", "bfloat16")
LOCAL_HEADER = struct.Struct("<4s2xH18xHH")     # a zip member's local header: signature, flags, name and extra lengths
UTF8_NAME = 0x800                               # its flag: the name is UTF-8 (else code page 437)
MAX_DIM = 1 << 48                               # beyond any tensor a file can hold


class StoredTensor:
    """A tensor of a torch.save file, not read yet: dtype (a name, such as
    "bfloat16"), shape, and float32(), which reads its elements alone."""

    def __init__(self, path, storage, offset, shape, stride):
        self.path, self.storage, self.offset = path, storage, offset
        self.shape, self.stride = shape, stride
        self.dtype = storage.dtype

    def is_floating_point(self):
        return self.dtype in FLOAT_TYPES

    def float32(self):
        """The tensor as a C-contiguous float32 numpy array, read from the file."""
        item = np.dtype(self.storage.numpy_type)
        count = _span(self.shape, self.stride)
        with open(self.path, "rb") as f:
            f.seek(self.storage.file_offset + self.offset * item.itemsize)
            data = np.fromfile(f, dtype=item, count=count)
        if data.size != count:
            raise ExportError(self.path, "cut short: the file changed while it was read")
        if count == 0 or self.stride == _row_major(self.shape):
            data = data.reshape(self.shape)
        else:
            strides = tuple(s * item.itemsize for s in self.stride)
            data = np.lib.stride_tricks.as_strided(data, self.shape, strides, writeable=False)
        if self.dtype == "bfloat16":     # the high half of a float32
            return (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32, order="C", copy=False)


class _Storage:
    """One storage of a torch.save file: its element type and where its bytes are."""

    def __init__(self, type_name, file_offset, numel):
        self.dtype, self.numpy_type = STORAGE_TYPES[type_name]
        self.file_offset, self.numel = file_offset, numel


class _StorageType:
    """What the pickle's torch.<Type>Storage stands for here."""

    def __init__(self, name):
        self.name = name


def _span(shape, stride):
    """How many elements a view of shape and stride reaches from its first one."""
    if 0 in shape:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride))


def _row_major(shape):
    """The strides of a C-contiguous tensor of shape."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.insert(0, step)
        step *= n
    return tuple(strides)


def _dims(path, value, what):
    """value, a pickled tuple of sizes or strides, checked."""
    if not isinstance(value, tuple) or not all(type(n) is int and 0 <= n < MAX_DIM for n in value):
        raise ExportError(path, f"a tensor's {what} is not a tuple of sizes: {str(value)[:80]}")
    return value


def read_torch_zip(path):
    """The object that torch.save wrote to path, each tensor in it a
    StoredTensor; only the pickle is read. Raises ExportError naming path for
    a file that is not a torch.save zip file of tensors, a big-endian one, or
    one whose pickle names a class that a state dict does not hold."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise ExportError(path, "not a torch.save file: no one PREFIX/data.pkl in the zip archive")
            prefix = pickles[0][:-len("data.pkl")]
            compressed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
            if compressed:      # its size is then what the directory says: a small file could unpack to any
                raise ExportError(path, f"{compressed[0]} is compressed: torch.save stores its members as they "
                                        "are")
            if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder") != b"little":
                raise ExportError(path, "a big-endian torch.save file: re-save it on a little-endian machine")
            return _Unpickler(path, f, size, archive, prefix).load()
    except ExportError:
        raise
    except OSError as e:
        raise ExportError(path, e.strerror or str(e)) from None
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise ExportError(path, "not a torch.save file: a damaged or truncated zip archive") from None
        raise ExportError(path, "not a torch.save file (not a zip archive; torch.save's format before torch 1.6 "
                                "is not read: load and save it again with a newer torch)") from None
    except Exception as e:      # pickle, zipfile and struct have no one error for a damaged file
        raise ExportError(path, f"not a torch.save file of tensors ({type(e).__name__}: {str(e)[:80]})") from None


def _member_ends(archive):
    """{a member's local header offset: the offset where the member ends}:
    the next member's header, or the central directory after the last."""
    starts = sorted({info.header_offset for info in archive.infolist()})
    return dict(zip(starts, starts[1:] + [archive.start_dir]))


class _Unpickler(pickle.Unpickler):
    """Unpickles PREFIX/data.pkl of an open torch.save zip archive into
    containers and StoredTensors, and nothing else."""

    def __init__(self, path, file, size, archive, prefix):
        super().__init__(archive.open(f"{prefix}data.pkl"))
        self.path, self.file, self.size, self.archive, self.prefix = path, file, size, archive, prefix
        self.storages = {}      # by key: tensors share them
        self.member_end = _member_ends(archive)

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self.tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, backward_hooks: data
        if module == "torch" and name in STORAGE_TYPES:
            return _StorageType(name)
        raise ExportError(self.path, f"its pickle names {module}.{name}, which a file of tensors does not hold: "
                                     "refused, nothing of it run")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and type(pid[4]) is int and 0 <= pid[4] < MAX_DIM):
            raise ExportError(self.path, f"a storage that is not one: {str(pid)[:80]}")
        _, kind, key, _, numel = pid
        if key not in self.storages:
            self.storages[key] = self.storage(kind.name, key, numel)
        storage = self.storages[key]
        if storage.dtype != STORAGE_TYPES[kind.name][0] or storage.numel != numel:
            raise ExportError(self.path, f"storage {key} is read as two types or sizes")
        return storage

    def storage(self, type_name, key, numel):
        """The storage held by member data/key: where its bytes start in the file."""
        name = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise ExportError(self.path, f"no member {name} for a storage") from None
        start = self.data_start(info)
        nbytes = numel * np.dtype(STORAGE_TYPES[type_name][1]).itemsize
        if nbytes > info.file_size:
            raise ExportError(self.path, f"{name}: {info.file_size} bytes in the file, {nbytes} expected")
        return _Storage(type_name, start, numel)

    def data_start(self, info):
        """Where the bytes of member info start in the file, after its local
        header, checked as Python's zipfile checks it when it opens a member
        (the local header there, of the same name) and further: the data
        lies within the member, before the next one or the central directory."""
        self.file.seek(info.header_offset)
        header = self.file.read(LOCAL_HEADER.size)
        if len(header) < LOCAL_HEADER.size or LOCAL_HEADER.unpack(header)[0] != b"PK\x03\x04":
            raise ExportError(self.path, f"{info.filename}: no zip local header where the directory says")
        _, flags, name_size, extra_size = LOCAL_HEADER.unpack(header)
        name = self.file.read(name_size).decode("utf-8" if flags & UTF8_NAME else "cp437", "replace")
        if name != info.orig_filename:
            raise ExportError(self.path, f"{info.filename}: its local header names {name[:80]!r}; the zip "
                                         "archive is damaged")
        start = info.header_offset + LOCAL_HEADER.size + name_size + extra_size
        end = min(self.member_end[info.header_offset], self.size)
        if start + info.file_size > end:
            raise ExportError(self.path, f"{info.filename}: its {info.file_size} bytes at offset {start} reach "
                                         f"past the member's end at {end}")
        return start

    def tensor(self, storage, offset, shape, stride, requires_grad=False, backward_hooks=None, metadata=None):
        """_rebuild_tensor_v2 of torch._utils, lazily."""
        if not isinstance(storage, _Storage) or type(offset) is not int or not 0 <= offset < MAX_DIM:
            raise ExportError(self.path, "a tensor that is not a view of a storage")
        shape, stride = _dims(self.path, shape, "shape"), _dims(self.path, stride, "stride")
        if len(shape) != len(stride) or offset + _span(shape, stride) > storage.numel:
            raise ExportError(self.path, f"a tensor of shape {shape} reaches past its storage's {storage.numel} "
                                         "elements")
        return StoredTensor(self.path, storage, offset, shape, stride)
