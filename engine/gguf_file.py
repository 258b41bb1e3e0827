"""A GGUF file's metadata and tensor index, read in milliseconds.

The ``gguf`` package's reader makes a numpy view for every part of every metadata field: the
tokenizer's vocabulary and merges (~100,000 strings for SmolLM2) took it ~10 s on a small CPU,
paid at each model load (a worker's start, ``lsa generate``, the demo). This reader walks the
same layout with ``struct`` over a memory map: scalars are decoded, numeric arrays are numpy
views, string arrays are skipped over and decoded only when asked for. Tensors are the same
numpy views over the file the package's reader gives (dequantized with ``gguf.quants``).

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64, field count
u64; each field a string key, a u32 value type and the value (an array: item type u32, count
u64, items); each tensor a string name, u32 dims, u64 sizes (fastest first), u32 ggml type and
u64 offset into the data section, which starts at the next multiple of ``general.alignment``.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# value types -> (struct format, numpy dtype); 8 (string) and 9 (array) are read apart
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}


class StringArray:
    """An array of strings in the file, decoded on first use (``len`` needs no decoding)."""

    def __init__(self, buf, offset: int, count: int):
        self._buf, self._offset, self._count = buf, offset, count
        self._items: list[str] | None = None

    def __len__(self) -> int:
        return self._count

    def tolist(self) -> list[str]:
        if self._items is None:
            items, off, buf = [], self._offset, self._buf
            for _ in range(self._count):
                (n,) = struct.unpack_from("<Q", buf, off)
                items.append(bytes(buf[off + 8: off + 8 + n]).decode("utf-8", errors="replace"))
                off += 8 + n
            self._items = items
        return self._items


@dataclass
class Tensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # as stored: the fastest dimension first
    data: np.ndarray  # a view of the file: the element type, or bytes per row for quantized types


class GGUFFile:
    """``fields`` (key -> value: int, float, bool, str, numpy array or StringArray) and ``tensors``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = memoryview(self._map)
        self.fields: dict[str, object] = {}
        self.tensors: list[Tensor] = []
        self._parse()

    def _parse(self) -> None:
        buf = self._buf
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic at the start")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in (2, 3):
            big = struct.unpack_from(">I", buf, 4)[0]
            raise ValueError("a big-endian GGUF file (not supported)" if big in (2, 3)
                             else f"GGUF version {version} (2 or 3 supported)")
        n_tensors, n_fields = struct.unpack_from("<QQ", buf, 8)
        off = 24
        for _ in range(n_fields):
            key, off = self._string(off)
            (kind,) = struct.unpack_from("<I", buf, off)
            self.fields[key], off = self._value(kind, off + 4)
        infos = []
        for _ in range(n_tensors):
            name, off = self._string(off)
            (dims,) = struct.unpack_from("<I", buf, off)
            shape = struct.unpack_from(f"<{dims}Q", buf, off + 4)
            kind, offset = struct.unpack_from("<IQ", buf, off + 4 + 8 * dims)
            off += 4 + 8 * dims + 12
            infos.append((name, shape, kind, offset))
        align = int(self.fields.get("general.alignment", 32))
        if align <= 0 or align & (align - 1):
            raise ValueError(f"general.alignment {align} is not a power of two")
        start = -(-off // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError("duplicated tensor names")

    def _string(self, off: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._buf, off)
        end = off + 8 + n
        if end > len(self._buf):
            raise ValueError("a string runs past the end of the file")
        return bytes(self._buf[off + 8: end]).decode("utf-8"), end

    def _value(self, kind: int, off: int) -> tuple[object, int]:
        if kind in _SCALARS:
            fmt, _ = _SCALARS[kind]
            (value,) = struct.unpack_from(fmt, self._buf, off)
            return value, off + struct.calcsize(fmt)
        if kind == _STRING:
            return self._string(off)
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = struct.unpack_from("<IQ", self._buf, off)
        off += 12
        if item in _SCALARS:
            dtype = np.dtype(_SCALARS[item][1]).newbyteorder("<")
            end = off + count * dtype.itemsize
            if end > len(self._buf):
                raise ValueError("an array runs past the end of the file")
            return np.frombuffer(self._buf, dtype=dtype, count=count, offset=off), end
        if item == _STRING:
            start, buf = off, self._buf
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", buf, off)
                off += 8 + n
            if off > len(buf):
                raise ValueError("an array runs past the end of the file")
            return StringArray(buf, start, count), off
        values = []  # arrays of arrays: rare, read one by one
        for _ in range(count):
            value, off = self._value(item, off)
            values.append(value)
        return values, off

    def _tensor(self, start: int, name: str, shape: tuple[int, ...], kind: int, offset: int) -> Tensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        qtype = GGMLQuantizationType(kind)
        block, size = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = n * size // block
        begin = start + offset
        if begin + nbytes > len(self._buf):
            raise ValueError(f"tensor {name} ends past the end of the file ({begin + nbytes} > {len(self._buf)} bytes)")
        dims = tuple(reversed(shape))
        if qtype.name in _PLAIN:
            data = np.frombuffer(self._buf, dtype=_PLAIN[qtype.name], count=n, offset=begin).reshape(dims)
        else:
            data = np.frombuffer(self._buf, dtype=np.uint8, count=nbytes, offset=begin)
            data = data.reshape(quant_shape_to_byte_shape(dims, qtype))
        return Tensor(name, qtype, tuple(shape), data)
