"""A dependency-free reader and writer for Apache Arrow IPC files (the `.arrow` files PTUnifier's
`prepro/make_arrow.py` writes with `pa.RecordBatchFileWriter`; ViLT/METER lineage).

The format (arrow.apache.org/docs/format/Columnar.html, "IPC File Format"): `ARROW1\\0\\0`, a stream
of encapsulated messages (0xFFFFFFFF, int32 metadata length, a FlatBuffer `Message`, the body), a
FlatBuffer `Footer` listing the record-batch blocks, int32 footer length, `ARROW1`. Streams (no
magic, no footer) are read too. Supported column types: null, bool, int8..64 / uint8..64, float32 /
float64, binary / utf8 (and their large variants), list / large list / fixed-size list and struct of
those - everything `pa.Table.from_pandas` makes from the originals' DataFrames (bytes, str, ints,
floats, lists of them, lists of lists). Compressed bodies and dictionary-encoded columns raise
`ArrowFormatError`. Values are decoded on access from a memory map, so a multi-gigabyte image
table is not loaded into memory; the table re-opens its map after unpickling.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Any, Sequence

import numpy as np

from medjax.errors import MedjaxInputError

MAGIC = b"ARROW1"
CONTINUATION = 0xFFFFFFFF
# Type union tags of Schema.fbs.
NULL, INT, FLOAT, BINARY, UTF8, BOOL = 1, 2, 3, 4, 5, 6
LIST, STRUCT, FIXED_SIZE_BINARY, FIXED_SIZE_LIST, LARGE_BINARY, LARGE_UTF8, LARGE_LIST = 12, 13, 15, 16, 19, 20, 21
_NAMES = {NULL: "null", INT: "int", FLOAT: "floatingpoint", BINARY: "binary", UTF8: "utf8", BOOL: "bool",
          LIST: "list", STRUCT: "struct", FIXED_SIZE_BINARY: "fixedsizebinary", FIXED_SIZE_LIST: "fixedsizelist",
          LARGE_BINARY: "largebinary", LARGE_UTF8: "largeutf8", LARGE_LIST: "largelist"}
SCHEMA_MESSAGE, DICTIONARY_MESSAGE, RECORD_BATCH_MESSAGE = 1, 2, 3


class ArrowFormatError(MedjaxInputError):
    """The file is not an Arrow IPC file/stream this reader handles; the message names the file."""


# ----------------------------------------------------------------------------- FlatBuffers reading
class _Table:
    """A FlatBuffers table at `pos` of `buf`: fields by index through its vtable."""

    def __init__(self, buf, pos: int):
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vtable_size = struct.unpack_from("<H", buf, self.vtable)[0]

    def _field(self, index: int) -> int:
        entry = 4 + 2 * index
        if entry >= self.vtable_size:
            return 0
        offset = struct.unpack_from("<H", self.buf, self.vtable + entry)[0]
        return self.pos + offset if offset else 0

    def scalar(self, index: int, fmt: str, default=0):
        at = self._field(index)
        return struct.unpack_from("<" + fmt, self.buf, at)[0] if at else default

    def _target(self, index: int) -> int:
        at = self._field(index)
        return at + struct.unpack_from("<I", self.buf, at)[0] if at else 0

    def table(self, index: int) -> "_Table | None":
        at = self._target(index)
        return _Table(self.buf, at) if at else None

    def string(self, index: int) -> str:
        at = self._target(index)
        if not at:
            return ""
        n = struct.unpack_from("<I", self.buf, at)[0]
        return bytes(self.buf[at + 4:at + 4 + n]).decode("utf-8")

    def tables(self, index: int) -> list["_Table"]:
        at = self._target(index)
        if not at:
            return []
        n = struct.unpack_from("<I", self.buf, at)[0]
        out = []
        for k in range(n):
            slot = at + 4 + 4 * k
            out.append(_Table(self.buf, slot + struct.unpack_from("<I", self.buf, slot)[0]))
        return out

    def structs(self, index: int, fmt: str) -> list[tuple]:
        at = self._target(index)
        if not at:
            return []
        n, size = struct.unpack_from("<I", self.buf, at)[0], struct.calcsize("<" + fmt)
        return [struct.unpack_from("<" + fmt, self.buf, at + 4 + k * size) for k in range(n)]


def _root(buf, pos: int = 0) -> _Table:
    return _Table(buf, pos + struct.unpack_from("<I", buf, pos)[0])


# ----------------------------------------------------------------------------- schema and columns
class Field:
    """A column's name, type tag, type parameters and children (Schema.fbs `Field`)."""

    def __init__(self, name: str, type_id: int, params: dict, children: list["Field"]):
        self.name, self.type_id, self.params, self.children = name, type_id, params, children

    def __repr__(self) -> str:
        inner = ", ".join(map(repr, self.children))
        return f"{self.name}: {_NAMES.get(self.type_id, self.type_id)}{self.params or ''}" + (f"<{inner}>" if inner else "")


def _parse_field(t: _Table, where: str) -> Field:
    name, type_id, type_table = t.string(0), t.scalar(2, "B"), t.table(3)
    if t.table(4) is not None:
        raise ArrowFormatError(f"{where}: column {name!r} is dictionary-encoded; write it plain "
                               "(e.g. pa.Table.from_pandas without categoricals)")
    params = {}
    if type_id == INT:
        params = {"bits": type_table.scalar(0, "i"), "signed": bool(type_table.scalar(1, "B"))}
    elif type_id == FLOAT:
        params = {"precision": type_table.scalar(0, "h")}
    elif type_id in (FIXED_SIZE_BINARY, FIXED_SIZE_LIST):
        params = {"size": type_table.scalar(0, "i")}
    elif type_id not in (NULL, BINARY, UTF8, BOOL, LIST, STRUCT, LARGE_BINARY, LARGE_UTF8, LARGE_LIST):
        raise ArrowFormatError(f"{where}: column {name!r} has Arrow type id {type_id}, which this reader "
                               f"does not handle (supported: {sorted(_NAMES.values())})")
    return Field(name, type_id, params, [_parse_field(c, where) for c in t.tables(5)])


def _parse_schema(t: _Table, where: str) -> list[Field]:
    if t.scalar(0, "h") != 0:
        raise ArrowFormatError(f"{where}: big-endian Arrow data is not supported")
    return [_parse_field(f, where) for f in t.tables(1)]


class _Array:
    """One decoded-on-access array of a record batch (validity bitmap + offsets/values + children)."""

    def __init__(self, field: Field, length: int, null_count: int, buffers: list, children: list["_Array"]):
        self.field, self.length, self.children = field, length, children
        self.valid = buffers[0] if null_count and buffers and len(buffers[0]) else None
        self.buffers = buffers

    def is_null(self, i: int) -> bool:
        return self.valid is not None and not (self.valid[i >> 3] >> (i & 7)) & 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        f, t = self.field, self.field.type_id
        if t == NULL or self.is_null(i):
            return None
        if t in (INT, FLOAT):
            return self.buffers[1][i].item()
        if t == BOOL:
            return bool((self.buffers[1][i >> 3] >> (i & 7)) & 1)
        if t in (BINARY, UTF8, LARGE_BINARY, LARGE_UTF8):
            offsets, data = self.buffers[1], self.buffers[2]
            raw = bytes(data[int(offsets[i]):int(offsets[i + 1])])
            return raw.decode("utf-8") if t in (UTF8, LARGE_UTF8) else raw
        if t == FIXED_SIZE_BINARY:
            n = f.params["size"]
            return bytes(self.buffers[1][i * n:(i + 1) * n])
        if t in (LIST, LARGE_LIST):
            offsets, child = self.buffers[1], self.children[0]
            return [child[j] for j in range(int(offsets[i]), int(offsets[i + 1]))]
        if t == FIXED_SIZE_LIST:
            n, child = f.params["size"], self.children[0]
            return [child[j] for j in range(i * n, (i + 1) * n)]
        if t == STRUCT:
            return {c.field.name: c[i] for c in self.children}
        raise ArrowFormatError(f"unsupported Arrow type id {t}")


def _value_dtype(field: Field):
    if field.type_id == INT:
        return np.dtype(f"<{'i' if field.params['signed'] else 'u'}{field.params['bits'] // 8}")
    if field.type_id == FLOAT:
        if field.params["precision"] == 0:
            return np.dtype("<f2")
        return np.dtype("<f4") if field.params["precision"] == 1 else np.dtype("<f8")
    return np.dtype("u1")


def _buffer_count(field: Field) -> int:
    return {NULL: 0, STRUCT: 1, LIST: 2, LARGE_LIST: 2, FIXED_SIZE_LIST: 1, BINARY: 3, UTF8: 3,
            LARGE_BINARY: 3, LARGE_UTF8: 3}.get(field.type_id, 2)


def _read_batch(buf, meta: _Table, body_start: int, fields: list[Field], where: str) -> tuple[int, list[_Array]]:
    if meta.table(3) is not None:
        raise ArrowFormatError(f"{where}: compressed record batches are not supported; write the file uncompressed")
    length = meta.scalar(0, "q")
    nodes = iter(meta.structs(1, "qq"))
    buffers = iter(meta.structs(2, "qq"))

    def build(field: Field) -> _Array:
        node_length, null_count = next(nodes)
        views = []
        for k in range(_buffer_count(field)):
            offset, size = next(buffers)
            raw = memoryview(buf)[body_start + offset:body_start + offset + size]
            if k == 0 or field.type_id == BOOL or field.type_id == FIXED_SIZE_BINARY:
                views.append(np.frombuffer(raw, np.uint8))
            elif k == 1 and field.type_id in (BINARY, UTF8, LIST):
                views.append(np.frombuffer(raw, "<i4"))
            elif k == 1 and field.type_id in (LARGE_BINARY, LARGE_UTF8, LARGE_LIST):
                views.append(np.frombuffer(raw, "<i8"))
            elif k == 1:
                views.append(np.frombuffer(raw, _value_dtype(field)))
            else:
                views.append(np.frombuffer(raw, np.uint8))
        return _Array(field, node_length, null_count, views, [build(c) for c in field.children])

    try:
        return length, [build(f) for f in fields]
    except StopIteration:
        raise ArrowFormatError(f"{where}: a record batch lists fewer nodes/buffers than its schema needs") from None


def _read_message(buf, pos: int, where: str) -> tuple[_Table | None, int, int]:
    """(Message table or None at end of stream, body start, position after the body)."""
    if pos + 4 > len(buf):
        return None, pos, pos
    size = struct.unpack_from("<I", buf, pos)[0]
    if size == CONTINUATION:
        pos += 4
        size = struct.unpack_from("<I", buf, pos)[0] if pos + 4 <= len(buf) else 0
    if size == 0:
        return None, pos, pos
    meta_start = pos + 4
    if meta_start + size > len(buf):
        raise ArrowFormatError(f"{where}: truncated message at byte {pos}")
    message = _root(buf, meta_start)
    body_start = meta_start + size
    return message, body_start, body_start + message.scalar(3, "q")


class ArrowTable:
    """Columns of an Arrow IPC file or stream. `table[name]` is a random-access sequence of Python
    values (bytes, str, int, float, bool, None, lists, dicts); `table.num_rows`, `table.column_names`."""

    def __init__(self, path: str):
        self.path = path
        self._open()

    def _open(self) -> None:
        where = self.path
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except OSError as e:
            raise ArrowFormatError(f"{where}: cannot open ({e})") from e
        buf = self._buf
        self._batches: list[tuple[int, list[_Array]]] = []
        try:
            if buf[:6] == MAGIC and buf[-6:] == MAGIC and len(buf) >= 20:
                footer_size = struct.unpack_from("<i", buf, len(buf) - 10)[0]
                footer = _root(buf, len(buf) - 10 - footer_size)
                self.fields = _parse_schema(footer.table(1), where)
                for offset, meta_length, body_length in footer.structs(3, "qi4xq"):
                    message, body_start, _ = _read_message(buf, offset, where)
                    if message is None or message.scalar(1, "B") != RECORD_BATCH_MESSAGE:
                        raise ArrowFormatError(f"{where}: footer block at byte {offset} is not a record batch")
                    self._batches.append(_read_batch(buf, message.table(2), body_start, self.fields, where))
            else:
                message, _, pos = _read_message(buf, 0, where)
                if message is None or message.scalar(1, "B") != SCHEMA_MESSAGE:
                    raise ArrowFormatError(f"{where}: not an Arrow IPC file or stream (no ARROW1 magic, no schema message)")
                self.fields = _parse_schema(message.table(2), where)
                while True:
                    message, body_start, end = _read_message(buf, pos, where)
                    if message is None:
                        break
                    kind = message.scalar(1, "B")
                    if kind == DICTIONARY_MESSAGE:
                        raise ArrowFormatError(f"{where}: dictionary batches are not supported")
                    if kind == RECORD_BATCH_MESSAGE:
                        self._batches.append(_read_batch(buf, message.table(2), body_start, self.fields, where))
                    pos = end
        except (struct.error, IndexError) as e:
            raise ArrowFormatError(f"{where}: corrupt or truncated Arrow data ({e})") from e
        self._starts = np.cumsum([0] + [n for n, _ in self._batches])

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._open()

    @property
    def num_rows(self) -> int:
        return int(self._starts[-1])

    @property
    def column_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, name: str) -> "_Column":
        if name not in self.column_names:
            raise KeyError(f"{self.path}: no column {name!r}; columns: {self.column_names}")
        return _Column(self, self.column_names.index(name))

    def to_pylist(self) -> list[dict]:
        return [{n: self[n][i] for n in self.column_names} for i in range(self.num_rows)]


class _Column(Sequence):
    def __init__(self, table: ArrowTable, index: int):
        self.table, self.index = table, index

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        b = int(np.searchsorted(self.table._starts, i, side="right")) - 1
        return self.table._batches[b][1][self.index][i - int(self.table._starts[b])]


def read_arrow(path: str) -> ArrowTable:
    """The table in an Arrow IPC file (`pa.RecordBatchFileWriter`) or stream (`pa.RecordBatchStreamWriter`)."""
    return ArrowTable(path)
