"""Write Arrow IPC files the way PTUnifier's `prepro/make_arrow.py` does
(`pa.Table.from_pandas(df)` + `pa.RecordBatchFileWriter`), without pyarrow: one record batch,
uncompressed, 8-byte aligned buffers, metadata version V5. Column types are inferred like pyarrow
infers them from Python objects: bytes -> binary, str -> utf8, int -> int64, float -> double,
bool -> bool, list -> list<inferred> (nested lists too), all None / empty -> null.
`medjax.data.readers.arrow_ipc.read_arrow` reads the result back (tests and the image-report demo use this).
"""
from __future__ import annotations

import struct
from typing import Any, Mapping, Sequence

import numpy as np

from medjax.data.readers import arrow_ipc

METADATA_V5 = 4


# ----------------------------------------------------------------------------- FlatBuffers writing
class _Obj:
    """A FlatBuffers object to serialise: a table, a string, a vector of tables or of structs."""

    def __init__(self, kind: str, value: Any, fmt: str = "", align: int = 4):
        self.kind, self.value, self.fmt, self.align = kind, value, fmt, align


def _table(fields: Sequence[tuple[str, Any] | None]) -> _Obj:
    """fields[i] = (struct format of a scalar, value) or ("off", child object) or None (absent)."""
    return _Obj("table", list(fields))


def _string(text: str) -> _Obj:
    return _Obj("string", text.encode("utf-8"))


def _tables(items: Sequence[_Obj]) -> _Obj:
    return _Obj("tables", list(items))


def _structs(fmt: str, rows: Sequence[tuple], align: int = 8) -> _Obj:
    return _Obj("structs", list(rows), fmt, align)


def _pad_to(buf: bytearray, align: int, remainder: int = 0) -> None:
    while len(buf) % align != remainder % align:
        buf.append(0)


def _write_obj(buf: bytearray, obj: _Obj, queue: list) -> int:
    """Append `obj` to `buf` (children go on `queue` as (slot position, child)); its position."""
    if obj.kind == "string":
        _pad_to(buf, 4)
        pos = len(buf)
        buf += struct.pack("<I", len(obj.value)) + obj.value + b"\0"
        return pos
    if obj.kind == "tables":
        _pad_to(buf, 4)
        pos = len(buf)
        buf += struct.pack("<I", len(obj.value)) + b"\0" * (4 * len(obj.value))
        queue.extend((pos + 4 + 4 * k, child) for k, child in enumerate(obj.value))
        return pos
    if obj.kind == "structs":
        _pad_to(buf, obj.align, 4)  # elements after the uint32 length start aligned
        pos = len(buf)
        buf += struct.pack("<I", len(obj.value))
        for row in obj.value:
            buf += struct.pack("<" + obj.fmt, *row)
        return pos
    # A table: its vtable right before it, fields laid out largest first, each aligned to its size.
    fields = obj.value
    sizes = [4 if f is not None and f[0] == "off" else (struct.calcsize("<" + f[0]) if f else 0) for f in fields]
    layout, offset = {}, 4
    for i in sorted(range(len(fields)), key=lambda i: -sizes[i]):
        if fields[i] is None:
            continue
        offset += -offset % sizes[i]
        layout[i] = offset
        offset += sizes[i]
    table_size = offset + (-offset % 4)
    table_align = max([4] + [s for s in sizes if s])
    vtable = struct.pack("<HH", 4 + 2 * len(fields), table_size) + b"".join(
        struct.pack("<H", layout.get(i, 0)) for i in range(len(fields)))
    _pad_to(buf, 2)
    while (len(buf) + len(vtable)) % table_align:
        buf += b"\0\0"
    vtable_pos = len(buf)
    buf += vtable
    pos = len(buf)
    body = bytearray(table_size)
    struct.pack_into("<i", body, 0, pos - vtable_pos)
    for i, at in layout.items():
        fmt, value = fields[i]
        if fmt == "off":
            queue.append((pos + at, value))
        else:
            struct.pack_into("<" + fmt, body, at, value)
    buf += body
    return pos


def flatbuffer(root: _Obj) -> bytes:
    """Serialise a FlatBuffers object graph (forward layout: every uoffset points ahead), 8-byte padded."""
    buf = bytearray(4)
    queue = [(0, root)]
    while queue:
        slot, obj = queue.pop(0)
        struct.pack_into("<I", buf, slot, _write_obj(buf, obj, queue) - slot)
    _pad_to(buf, 8)
    return bytes(buf)


# ----------------------------------------------------------------------------- Arrow types and arrays
def _infer(values: Sequence[Any], where: str) -> tuple[int, list]:
    """(type id, child types) for a column of Python values, as pyarrow infers them."""
    present = [v for v in values if v is not None]
    if not present:
        return arrow_ipc.NULL, []
    kinds = {type(v) for v in present}
    if kinds <= {bytes, bytearray}:
        return arrow_ipc.BINARY, []
    if kinds == {str}:
        return arrow_ipc.UTF8, []
    if kinds == {bool}:
        return arrow_ipc.BOOL, []
    if kinds <= {int, np.int64, np.int32}:
        return arrow_ipc.INT, []
    if kinds <= {int, float, np.float64, np.float32}:
        return arrow_ipc.FLOAT, []
    if kinds <= {list, tuple}:
        return arrow_ipc.LIST, [_infer([x for v in present for x in v], where + "[]")]
    raise TypeError(f"{where}: cannot store values of types {sorted(k.__name__ for k in kinds)} in an Arrow column")


def _field_obj(name: str, inferred: tuple[int, list]) -> _Obj:
    type_id, children = inferred
    if type_id == arrow_ipc.INT:
        type_table = _table([("i", 64), ("B", 1)])
    elif type_id == arrow_ipc.FLOAT:
        type_table = _table([("h", 2)])
    else:
        type_table = _table([])
    return _table([("off", _string(name)), ("B", 1), ("B", type_id), ("off", type_table), None,
                   ("off", _tables([_field_obj("item", c) for c in children]))])


def _encode(values: Sequence[Any], inferred: tuple[int, list], nodes: list, buffers: list) -> None:
    type_id, children = inferred
    n, null = len(values), [v is None for v in values]
    nodes.append((n, sum(null)))
    if type_id == arrow_ipc.NULL:
        return
    buffers.append(np.packbits(~np.array(null, bool), bitorder="little").tobytes() if any(null) else b"")
    if type_id == arrow_ipc.INT:
        buffers.append(np.array([0 if v is None else int(v) for v in values], "<i8").tobytes())
    elif type_id == arrow_ipc.FLOAT:
        buffers.append(np.array([0.0 if v is None else float(v) for v in values], "<f8").tobytes())
    elif type_id == arrow_ipc.BOOL:
        buffers.append(np.packbits(np.array([bool(v) for v in values], bool), bitorder="little").tobytes())
    elif type_id in (arrow_ipc.BINARY, arrow_ipc.UTF8):
        data = [b"" if v is None else (v.encode("utf-8") if isinstance(v, str) else bytes(v)) for v in values]
        buffers.append(np.cumsum([0] + [len(d) for d in data], dtype=np.int64).astype("<i4").tobytes())
        buffers.append(b"".join(data))
    elif type_id == arrow_ipc.LIST:
        items = [[] if v is None else list(v) for v in values]
        buffers.append(np.cumsum([0] + [len(x) for x in items], dtype=np.int64).astype("<i4").tobytes())
        _encode([x for v in items for x in v], children[0], nodes, buffers)


def _message(header_type: int, header: _Obj, body_length: int) -> bytes:
    """An encapsulated IPC message prefix: continuation, metadata length, the padded Message."""
    meta = flatbuffer(_table([("h", METADATA_V5), ("B", header_type), ("off", header), ("q", body_length)]))
    return struct.pack("<Ii", arrow_ipc.CONTINUATION, len(meta)) + meta


def write_arrow(path: str, columns: Mapping[str, Sequence[Any]]) -> None:
    """Write `columns` (name -> equal-length list of Python values) as an Arrow IPC file."""
    names = list(columns)
    lengths = {len(columns[n]) for n in names}
    if len(lengths) != 1:
        raise ValueError(f"{path}: columns have different lengths {[len(columns[n]) for n in names]}")
    num_rows = lengths.pop()
    types = [_infer(columns[n], f"{path}: column {n!r}") for n in names]
    schema = _table([("h", 0), ("off", _tables([_field_obj(n, t) for n, t in zip(names, types)]))])
    nodes, buffers = [], []
    for n, t in zip(names, types):
        _encode(columns[n], t, nodes, buffers)
    body, spans = bytearray(), []
    for b in buffers:
        spans.append((len(body), len(b)))
        body += b
        _pad_to(body, 8)
    batch = _table([("q", num_rows), ("off", _structs("qq", nodes)), ("off", _structs("qq", spans))])

    out = bytearray(arrow_ipc.MAGIC + b"\0\0")
    out += _message(arrow_ipc.SCHEMA_MESSAGE, schema, 0)
    batch_offset = len(out)
    batch_meta = _message(arrow_ipc.RECORD_BATCH_MESSAGE, batch, len(body))
    out += batch_meta + body
    out += struct.pack("<Ii", arrow_ipc.CONTINUATION, 0)  # end of stream
    footer = flatbuffer(_table([("h", METADATA_V5), ("off", schema), ("off", _structs("qi4xq", [])),
                                ("off", _structs("qi4xq", [(batch_offset, len(batch_meta), len(body))]))]))
    out += footer + struct.pack("<i", len(footer)) + arrow_ipc.MAGIC
    with open(path, "wb") as f:
        f.write(out)
