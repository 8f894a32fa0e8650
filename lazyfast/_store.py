"""Integrity of stored work that a rerun reuses (docs/contracts.md, "Stored work").

One module for every artifact lazyfast writes and later trusts:

* :func:`atomic_write` — bytes to a temporary file in the same directory, fsync, then
  ``os.replace`` over the target and an fsync of the directory: a kill leaves the old file
  or the new one, never a mix.
* :func:`frame` / :func:`unframe` — a binary payload behind a header (magic, length,
  SHA-256): training checkpoints and ``lazyfast ntk`` block files. A truncated, padded or
  edited file is refused (:class:`IntegrityError`), never loaded.
* :class:`JsonlLog` — an append-only JSON-lines file of checksummed records (the experiment
  run store ``runs.jsonl``). Each line carries the SHA-256 of its own canonical JSON and the
  problem fingerprint it belongs to; an append is one ``write`` of a whole line followed by
  fsync. A torn last line (a kill mid-write) is detected on open, reported once on stderr
  and cut off, so records appended later stay readable; an edited record fails its
  checksum and is not reused; a file that is not UTF-8 raises naming the file and line.
* :func:`tensor_digest` — SHA-256 of tensors' shapes, dtypes and bytes (the data part of a
  problem fingerprint).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = ["IntegrityError", "atomic_write", "frame", "unframe", "write_framed", "read_framed", "tensor_digest",
           "file_digest", "check_writable", "JsonlLog"]


class IntegrityError(RuntimeError):
    """A stored file is truncated, corrupt, edited, or not the kind of file expected."""


# ----------------------------------------------------------------------------- atomic files
def _fsync_dir(path: str) -> None:
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write(path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file + fsync + ``os.replace`` +
    directory fsync). The temporary file is removed if anything fails."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path)


def check_writable(path, name: str) -> None:
    """Raises ``ValueError`` naming ``name`` unless a file can be created next to ``path``
    (its directory exists and is writable) and ``path`` is not a directory. Checked by
    creating and removing a temporary file, which also works for root (``os.access`` does not)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{name} {path!r} is a directory; give a file path")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise ValueError(f"{name} {path!r}: directory {d!r} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".lazyfast-write-test.", dir=d)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"{name} {path!r}: cannot write in {d!r} ({e.strerror})") from None


# ----------------------------------------------------------------------------- framed binary files
_HEADER = struct.Struct("<16sQ32s")  # magic, payload length, sha256(payload)


def frame(payload: bytes, magic: bytes) -> bytes:
    if len(magic) != 16:
        raise ValueError("magic must be 16 bytes")
    return _HEADER.pack(magic, len(payload), hashlib.sha256(payload).digest()) + payload


def unframe(data: bytes, magic: bytes, path: str = "<bytes>", what: str = "file",
            error=IntegrityError) -> bytes:
    """The payload of :func:`frame`'s output, verifying magic, length and SHA-256."""
    if len(data) < _HEADER.size:
        raise error(f"{what} {path!r} is truncated ({len(data)} bytes, header needs {_HEADER.size})")
    m, length, digest = _HEADER.unpack_from(data)
    if m != magic:
        raise error(f"{path!r} is not a lazyfast {what} (bad magic bytes)")
    payload = data[_HEADER.size:]
    if len(payload) != length:
        raise error(f"{what} {path!r} is truncated or padded: payload has {len(payload)} bytes, header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise error(f"{what} {path!r} is corrupt: SHA-256 checksum mismatch")
    return payload


def write_framed(path, payload: bytes, magic: bytes) -> None:
    atomic_write(path, frame(payload, magic))


def read_framed(path, magic: bytes, what: str = "file", error=IntegrityError) -> bytes:
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise error(f"{what} {path!r} does not exist") from None
    return unframe(data, magic, path, what, error)


# ----------------------------------------------------------------------------- fingerprints
def tensor_digest(*tensors: Optional[torch.Tensor], h=None) -> str:
    """SHA-256 (hex) over the shapes, dtypes and bytes of ``tensors`` (None entries count
    as a marker, so (x, None) and (None, x) differ)."""
    h = hashlib.sha256() if h is None else h
    for t in tensors:
        if t is None:
            h.update(b"<none>")
            continue
        t = t.detach()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(paths) -> str:
    """SHA-256 over the names and contents of ``paths`` (sorted)."""
    h = hashlib.sha256()
    for p in sorted(os.fspath(p) for p in paths):
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- checksummed JSONL
def _canonical(obj: Dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode()


def _seal(record: Dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "sha256"}
    return _canonical({**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}) + b"\n"


def _verify(record: Dict[str, Any]) -> bool:
    digest = record.get("sha256")
    body = {k: v for k, v in record.items() if k != "sha256"}
    return isinstance(digest, str) and hashlib.sha256(_canonical(body)).hexdigest() == digest


def _warn(msg: str) -> None:
    print(f"lazyfast: {msg}", file=sys.stderr)


class JsonlLog:
    """Append-only file of checksummed JSON records (one per line).

    ``records()`` yields the verified records in file order; lines that fail to parse or
    whose checksum does not match are skipped and reported once (on stderr) when the file
    is opened. A torn last line (no final newline) is cut off on open, so appends continue
    on a clean line. ``append(record)`` writes one whole line with a single ``write`` and
    fsyncs it: a kill at any moment leaves every earlier record intact and at most a torn
    last line, which the next open repairs.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._records: List[Dict[str, Any]] = []
        self.skipped: List[Tuple[int, str]] = []  # (line number, why) of records not trusted
        self.repaired_bytes = 0
        if os.path.exists(self.path):
            self._load()

    def _load(self) -> None:
        with open(self.path, "rb") as fh:
            data = fh.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # torn tail: a write killed before its newline
            torn = len(data) - end
            tail = data[end:]
            if not (tail.startswith(b"{") and tail.isascii()):  # records are ASCII JSON objects
                raise IntegrityError(f"{self.path}: the last line is not the start of a lazyfast record (not "
                                     "ASCII JSON); this is not a lazyfast run store, or it is damaged: move it away")
            try:
                with open(self.path, "r+b") as fh:
                    fh.truncate(end)
                    fh.flush()
                    os.fsync(fh.fileno())
                self.repaired_bytes = torn
                what = "it is removed"
            except OSError:  # a read-only store: skip it (an append would terminate it first)
                what = "it is skipped (the file is not writable)"
            _warn(f"{self.path}: the last line is incomplete ({torn} bytes, a run killed while writing?); "
                  f"{what} and that run will be recomputed")
            data = data[:end]
        for i, raw in enumerate(data.split(b"\n")[:-1] if data else []):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise IntegrityError(f"{self.path}: line {i + 1} is not UTF-8 text ({e.reason} at byte {e.start}); "
                                     "this is not a lazyfast run store, or it is damaged: move it away") from None
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                self.skipped.append((i + 1, "not valid JSON"))
                continue
            if not isinstance(rec, dict):
                self.skipped.append((i + 1, "not a JSON object"))
            elif not _verify(rec):
                self.skipped.append((i + 1, "checksum mismatch (edited, or written by an older lazyfast)"))
            else:
                self._records.append(rec)
        if self.skipped:
            lines = ", ".join(f"{n} ({why})" for n, why in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            _warn(f"{self.path}: ignoring {len(self.skipped)} untrusted record(s), line(s) {lines}{more}; "
                  "those runs will be recomputed")

    def records(self) -> Iterator[Dict[str, Any]]:
        return iter(self._records)

    def append(self, record: Dict[str, Any]) -> None:
        line = _seal(record)
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # another writer (or an earlier kill after this object was opened) may have left a torn tail
            size = os.fstat(fd).st_size
            if size:
                with open(self.path, "rb") as fh:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        line = b"\n" + line  # terminate the torn line: it stays unreadable, this one is not
            view = memoryview(line)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._records.append(json.loads(line.strip().split(b"\n")[-1]))
