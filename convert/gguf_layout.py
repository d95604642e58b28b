"""A GGUF file's layout, checked before the gguf package reads it.

gguf.GGUFReader trusts the counts and lengths of the file: an array that
claims 2^62 items is walked item by item past the end of the file, its
memory growing without end, and a tensor's offset is taken as it is. Here
the header is walked once, every count and length held to the bytes left in
the file, and each tensor's data to its place: a multiple of
general.alignment after the header, within the file, overlapping no other.

  u32 magic "GGUF", u32 version (2 or 3), u64 tensor_count, u64 kv_count
  kv_count times:     string key, u32 value type, value
  tensor_count times: string name, u32 n_dims, u64 dims[n_dims], u32 ggml type,
                      u64 offset (from the start of the data)
  padding to general.alignment (default 32), then the tensors' data

where a string is a u64 length and its bytes, and an array value a u32 item
type, a u64 count and the items. The byte order is the file's: a version
whose low half is zero is read big-endian, as the gguf package does."""

import mmap
import os
import struct

from convert.errors import ExportError, need

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # value type -> bytes
STRING, ARRAY, UINT32 = 8, 9, 4
SMALLEST = {**SCALAR_SIZES, STRING: 8, ARRAY: 12}   # the fewest bytes a value of each type takes
KV_SMALLEST = 8 + 4 + 1         # an empty key, its type, a one-byte value
TENSOR_INFO_SMALLEST = 8 + 4 + 8 + 4 + 8
MAX_DIMS = 4                    # GGML_MAX_DIMS
MAX_NESTING = 4                 # arrays of arrays; llama.cpp reads none
# The gguf package spends about 15 us and 700 bytes of memory on each item of
# a metadata array; four arrays of a vocabulary of a million tokens fit.
MAX_ARRAY_ITEMS = 1 << 22
DEFAULT_ALIGNMENT = 32


def _damaged(path, what):
    return ExportError(path, f"a damaged GGUF file: {what}")


class _Cursor:
    """Reads the header of the mapped file data from offset 0, refusing
    whatever reaches past its end."""

    def __init__(self, path, data, order):
        self.path, self.data, self.order, self.at = path, data, order, 0
        self.array_items = 0

    def left(self):
        return len(self.data) - self.at

    def take(self, n, what):
        if n > self.left():
            raise _damaged(self.path, f"{what}: {n} bytes at offset {self.at}, past the end of the file "
                           f"({len(self.data)} bytes)")
        self.at += n
        return self.data[self.at - n:self.at]

    def unpack(self, fmt, what):
        return struct.unpack(self.order + fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what, item_size):
        """A u64 count of items of at least item_size bytes each, checked to fit in the bytes left."""
        n = self.unpack("Q", what)
        if n * item_size > self.left():
            raise _damaged(self.path, f"{what} claims {n} items of at least {item_size} bytes, but only "
                           f"{self.left()} bytes are left in the file")
        return n

    def string(self, what):
        return self.take(self.count(f"{what} (its length)", 1), what)

    def skip_value(self, value_type, what, depth=0):
        """Step over one metadata value of value_type."""
        if value_type in SCALAR_SIZES:
            self.take(SCALAR_SIZES[value_type], what)
        elif value_type == STRING:
            self.string(what)
        elif value_type == ARRAY:
            if depth == MAX_NESTING:
                raise _damaged(self.path, f"{what}: arrays nested more than {MAX_NESTING} deep")
            item_type = self.unpack("I", what)
            if item_type not in SMALLEST:
                raise _damaged(self.path, f"{what}: unknown array item type {item_type}")
            n = self.count(what, SMALLEST[item_type])
            self.array_items += n
            if self.array_items > MAX_ARRAY_ITEMS:
                raise _damaged(self.path, f"{what}: the metadata arrays hold more than {MAX_ARRAY_ITEMS} "
                               "items")
            if item_type in SCALAR_SIZES:
                self.take(n * SCALAR_SIZES[item_type], what)
            else:
                for _ in range(n):
                    self.skip_value(item_type, what, depth + 1)
        else:
            raise _damaged(self.path, f"{what}: unknown value type {value_type}")


def check_gguf_layout(path):
    """Raise ExportError naming path unless the GGUF file's header holds
    within the file and every tensor's data lies, aligned, within it and
    apart from the others'. Reads the header alone."""
    gguf = need("gguf")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ExportError(path, f"not a GGUF file: {size} bytes, shorter than its 24-byte header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _check(path, data, gguf.GGML_QUANT_SIZES)


def _check(path, data, quant_sizes):
    """check_gguf_layout() of the mapped file data; quant_sizes: the gguf
    package's (elements, bytes) of a block of each ggml type."""
    if data[:4] != b"GGUF":
        raise ExportError(path, "not a GGUF file (no GGUF magic)")
    big_endian = struct.unpack_from("<I", data, 4)[0] & 0xFFFF == 0    # the gguf package's test
    cursor = _Cursor(path, data, ">" if big_endian else "<")
    cursor.take(4, "magic")
    version = cursor.unpack("I", "version")
    if version not in (2, 3):
        raise ExportError(path, f"not a GGUF file of version 2 or 3 (version {version})")
    tensor_count = cursor.unpack("Q", "tensor_count")
    kv_count = cursor.count("kv_count", KV_SMALLEST)
    alignment = DEFAULT_ALIGNMENT
    for k in range(kv_count):
        key = cursor.string(f"metadata key {k}").decode("utf-8", "replace")
        what = f"metadata {key[:80]}"
        value_type = cursor.unpack("I", what)
        start = cursor.at
        cursor.skip_value(value_type, what)
        if key == "general.alignment":
            alignment = struct.unpack(cursor.order + "I", data[start:cursor.at])[0] \
                if value_type == UINT32 else 0
            if alignment == 0 or alignment & (alignment - 1):
                raise _damaged(path, "general.alignment: expected a u32 power of two")
    if tensor_count * TENSOR_INFO_SMALLEST > cursor.left():
        raise _damaged(path, f"tensor_count claims {tensor_count} tensors, but only {cursor.left()} bytes "
                       "are left in the file")
    tensors = [_tensor_info(cursor, i, quant_sizes) for i in range(tensor_count)]
    data_start = cursor.at + -cursor.at % alignment
    for name, offset, n_bytes in tensors:
        if offset % alignment:
            raise _damaged(path, f"tensor {name}: offset {offset} is not a multiple of general.alignment "
                           f"{alignment}")
        if data_start + offset + n_bytes > len(data):
            raise _damaged(path, f"tensor {name}: {n_bytes} bytes at offset {offset} reach past the end of "
                           f"the file ({len(data)} bytes, data from {data_start})")
    furthest, reached = None, 0     # of the tensors placed so far, the one that ends last
    for name, offset, n_bytes in sorted((t for t in tensors if t[2]), key=lambda t: t[1]):
        if offset < reached:
            raise _damaged(path, f"tensors {furthest} and {name} overlap in the file")
        furthest, reached = name, offset + n_bytes


def _tensor_info(cursor, i, quant_sizes):
    """(name, offset, bytes) of the tensor info at the cursor, the i-th."""
    name = cursor.string(f"tensor {i}'s name").decode("utf-8", "replace")[:80]
    n_dims = cursor.unpack("I", f"tensor {name}")
    if n_dims > MAX_DIMS:
        raise _damaged(cursor.path, f"tensor {name}: {n_dims} dimensions, more than {MAX_DIMS}")
    dims = [cursor.unpack("Q", f"tensor {name}") for _ in range(n_dims)]
    ggml_type = cursor.unpack("I", f"tensor {name}")
    offset = cursor.unpack("Q", f"tensor {name}")
    sizes = next((s for t, s in quant_sizes.items() if int(t) == ggml_type), None)
    if sizes is None:
        raise _damaged(cursor.path, f"tensor {name}: unknown ggml type {ggml_type}")
    block_size, block_bytes = sizes
    if dims and dims[0] % block_size:
        raise _damaged(cursor.path, f"tensor {name}: {dims[0]} elements a row, not whole blocks of "
                       f"{block_size}")
    elements = 1
    for n in dims:
        elements *= n
    return name, offset, elements // block_size * block_bytes
