"""Text files of a dataset (manifests, list files, PLINK tables, JSON): UTF-8 or a clear error.

`read_text(path, what)` returns the decoded text (a leading UTF-8 byte-order mark is dropped, as Excel
writes one). A file in another encoding (Latin-1, UTF-16, a binary file given by mistake) is a
`DataError` naming the file, the line and column of the first byte that is not UTF-8, and what was
expected, instead of a `UnicodeDecodeError` traceback from deep inside the csv or json module (issue #15).
`open_text` wraps the text in a file object for `csv` / line-by-line readers.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

from medjax.data.errors import DataError, DataFileNotFoundError


def read_text(path: str | os.PathLike, what: str = "text file") -> str:
    """The UTF-8 text of `path` (BOM dropped); DataError naming line and column of a non-UTF-8 byte."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataFileNotFoundError(f"{path}: {what} not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        start = error.start
        line = raw.count(b"\n", 0, start) + 1
        column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
        hint = (" (it looks like UTF-16: save it as UTF-8)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff")
                else " (e.g. Latin-1 or Windows-1252 text: re-save it as UTF-8, `iconv -f latin1 -t utf-8`)")
        raise DataError(f"{path}: line {line}: column {column}: byte 0x{raw[start]:02x} is not UTF-8; expected a "
                        f"UTF-8 {what}{hint}") from None


def open_text(path: str | os.PathLike, what: str = "text file") -> io.StringIO:
    """`read_text` as a file object (universal newlines off, as the csv module wants)."""
    return io.StringIO(read_text(path, what), newline="")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed JSON of a UTF-8 file; DataError naming file, line and column of a syntax error."""
    path = os.fspath(path)
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: line {error.lineno}: column {error.colno}: not valid JSON ({error.msg}); "
                        f"expected a {what}") from None
