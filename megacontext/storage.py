"""
Storage for the MegaContext tree: one append-only array per level, in RAM or on disk.

Both backends share one two-phase interface so the tree can make an ingest atomic:
    write(rows)  stage rows after the committed ones (on disk: payload bytes written at their offset)
    commit()     make the staged rows part of the count (on disk: rewrite the header's count)
    discard()    forget staged rows
    read(start, end) -> torch tensor in the storage dtype (CPU for disk, the store's device for RAM)

Disk format, one file per level (`L0.ctx` token ids as uint32, `L{n}.ctx` gist rows as fp16/bf16,
bf16 stored through a uint16 view), little endian:

    offset  0  magic   8s  b"MCTREE\\x00\\x01"
            8  version u32
           12  level   u32
           16  K       u32   (block size)
           20  dim     u32   (1 for tokens)
           24  dtype   u32   (1 uint32, 2 float16, 3 bfloat16)
           28  (zero)  u32
           32  count   u64   committed rows
           40  zero padding up to HEADER_SIZE = 64
    row i lives at 64 + i * dim * itemsize: offsets are deterministic.

Crash safety: payload bytes are written (and optionally fsynced) before the 8-byte count is
rewritten in place; on open, any bytes past the committed count are discarded. So a kill -9 at
any moment leaves the committed rows intact. Reads go through np.memmap (remapped lazily as the
file grows) and return copies, so RSS does not grow with the size of the file.
"""
import json
import os
import struct

import numpy as np
import torch

from nanochat.common import UserError

MAGIC = b"MCTREE\x00\x01"
VERSION = 1
HEADER_SIZE = 64
_HEAD = struct.Struct("<8sIIIIII")  # magic, version, level, K, dim, dtype, reserved
_COUNT = struct.Struct("<Q")
COUNT_OFFSET = 32
DTYPE_CODES = {"uint32": 1, "float16": 2, "bfloat16": 3}
_CODE_NAMES = {v: k for k, v in DTYPE_CODES.items()}
# storage dtype -> (numpy dtype on disk, torch dtype in RAM)
_NP = {"uint32": np.uint32, "float16": np.float16, "bfloat16": np.uint16}
_TORCH = {"uint32": torch.int32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TreeError(UserError, ValueError):
    """A bad input to the tree or a file that is not (or no longer) a valid tree file."""


def storage_torch_dtype(dtype):
    return _TORCH[dtype]


def _check_rows(rows, level, dim, dtype):
    if level == 0:
        if rows.dim() != 1:
            raise TreeError(f"level 0 rows must be a 1-D tensor of token ids, got shape {tuple(rows.shape)}")
    elif rows.dim() != 2 or rows.size(1) != dim:
        raise TreeError(f"gist rows for level {level} must have shape (n, {dim}), got {tuple(rows.shape)}")
    if rows.dtype != _TORCH[dtype]:
        raise TreeError(f"level {level} rows must be {_TORCH[dtype]}, got {rows.dtype}")


class RamLevel:
    """A growable tensor (capacity doubles), on any device."""

    def __init__(self, level, dim, dtype, device=None):
        self.level, self.dim, self.dtype = level, dim, dtype
        shape = (1024,) if level == 0 else (64, dim)
        self._data = torch.empty(shape, dtype=_TORCH[dtype], device=device)
        self.count = 0
        self._staged = 0

    def write(self, rows):
        _check_rows(rows, self.level, self.dim, self.dtype)
        end = self.count + self._staged + rows.size(0)
        if end > self._data.size(0):
            grown = self._data.new_empty((max(end, 2 * self._data.size(0)),) + tuple(self._data.shape[1:]))
            grown[:self.count + self._staged] = self._data[:self.count + self._staged]
            self._data = grown
        self._data[self.count + self._staged:end] = rows.to(self._data.device)
        self._staged += rows.size(0)

    def commit(self):
        self.count += self._staged
        self._staged = 0

    def discard(self):
        self._staged = 0

    def truncate(self, n):
        self.count = min(self.count, n)
        self._staged = 0

    def read(self, start, end):
        return self._data[start:end].clone()

    def sync(self):
        pass

    def close(self):
        pass


class DiskLevel:
    """One level file: header + rows appended at deterministic offsets, read through np.memmap."""

    def __init__(self, path, fd, level, K, dim, dtype, count, fsync):
        self.path, self._fd, self.level, self.K, self.dim, self.dtype = path, fd, level, K, dim, dtype
        self.count, self._staged, self.fsync = count, 0, fsync
        self._row_bytes = dim * np.dtype(_NP[dtype]).itemsize
        self._map, self._mapped = None, 0

    @classmethod
    def create(cls, path, level, K, dim, dtype, fsync=False):
        if os.path.exists(path):
            raise TreeError(f"{path}: already exists; open the tree instead of creating it")
        head = _HEAD.pack(MAGIC, VERSION, level, K, dim, DTYPE_CODES[dtype], 0) + _COUNT.pack(0)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.pwrite(fd, head.ljust(HEADER_SIZE, b"\0"), 0)
        if fsync:
            os.fsync(fd)
        return cls(path, fd, level, K, dim, dtype, 0, fsync)

    @classmethod
    def open(cls, path, level, fsync=False):
        """Open and validate a level file; bytes past the committed count are discarded."""
        if not os.path.isfile(path):
            raise TreeError(f"{path}: missing level file")
        fd = os.open(path, os.O_RDWR)
        try:
            head = os.pread(fd, HEADER_SIZE, 0)
            if len(head) < HEADER_SIZE:
                raise TreeError(f"{path}: truncated header ({len(head)} of {HEADER_SIZE} bytes)")
            magic, version, lvl, K, dim, code, _ = _HEAD.unpack_from(head)
            (count,) = _COUNT.unpack_from(head, COUNT_OFFSET)
            if magic != MAGIC:
                raise TreeError(f"{path}: not a MegaContext level file (bad magic {magic!r})")
            if version != VERSION:
                raise TreeError(f"{path}: unsupported format version {version} (this code reads {VERSION})")
            if lvl != level:
                raise TreeError(f"{path}: header says level {lvl}, expected level {level}")
            if code not in _CODE_NAMES:
                raise TreeError(f"{path}: unknown dtype code {code}")
            dtype = _CODE_NAMES[code]
            if (level == 0) != (dtype == "uint32") or (level == 0 and dim != 1) or dim < 1 or K < 2:
                raise TreeError(f"{path}: inconsistent header (level {level}, dtype {dtype}, dim {dim}, K {K})")
            store = cls(path, fd, level, K, dim, dtype, count, fsync)
            size = os.fstat(fd).st_size
            need = HEADER_SIZE + count * store._row_bytes
            if size < need:
                raise TreeError(f"{path}: corrupt, header commits {count} rows ({need} bytes) "
                                f"but the file has only {size} bytes")
            if size > need:
                os.ftruncate(fd, need)  # uncommitted bytes from an interrupted append
            return store
        except BaseException:
            os.close(fd)
            raise

    def _offset(self, row):
        return HEADER_SIZE + row * self._row_bytes

    def _to_numpy(self, rows):
        rows = rows.detach().cpu().contiguous()
        if self.dtype == "bfloat16":
            rows = rows.view(torch.uint16)
        a = rows.numpy()
        return a.astype(np.uint32) if self.level == 0 else a

    def write(self, rows):
        _check_rows(rows, self.level, self.dim, self.dtype)
        buf = self._to_numpy(rows).tobytes()
        off = self._offset(self.count + self._staged)
        while buf:  # pwrite may write less than asked
            n = os.pwrite(self._fd, buf, off)
            buf, off = buf[n:], off + n
        self._staged += rows.size(0)

    def commit(self):
        if not self._staged:
            return
        if self.fsync:
            os.fsync(self._fd)  # payload durable before the count that makes it visible
        os.pwrite(self._fd, _COUNT.pack(self.count + self._staged), COUNT_OFFSET)
        if self.fsync:
            os.fsync(self._fd)
        self.count += self._staged
        self._staged = 0

    def discard(self):
        self._staged = 0  # the staged bytes lie past the count: ignored, truncated on next open

    def truncate(self, n):
        """Shrink the committed count to n (count first, then the bytes: crash-safe in that order)."""
        if n < self.count:
            os.pwrite(self._fd, _COUNT.pack(n), COUNT_OFFSET)
            if self.fsync:
                os.fsync(self._fd)
            self.count = n
        self._staged = 0
        self._map, self._mapped = None, 0
        os.ftruncate(self._fd, self._offset(self.count))

    def read(self, start, end):
        if end > self._mapped:  # the file grew since the last mapping
            self._map = None
            if self.count:
                shape = (self.count,) if self.level == 0 else (self.count, self.dim)
                self._map = np.memmap(self.path, dtype=_NP[self.dtype], mode="r", offset=HEADER_SIZE, shape=shape)
            self._mapped = self.count
        if end <= start:
            a = np.zeros((0,) if self.level == 0 else (0, self.dim), dtype=_NP[self.dtype])
        else:
            a = np.array(self._map[start:end])  # a copy: nothing keeps the mapping alive
        if self.level == 0:
            return torch.from_numpy(a.astype(np.int64))
        t = torch.from_numpy(a)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def sync(self):
        os.fsync(self._fd)

    def close(self):
        if self._fd is not None:
            self._map = None
            os.ftruncate(self._fd, self._offset(self.count))  # drop staged bytes that were never committed
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------------------------
# meta.json: identity of what built the gists, and informational counts (the headers are authoritative)

META_NAME = "meta.json"
META_FORMAT = "megacontext-tree"


def level_path(dirpath, level):
    return os.path.join(dirpath, f"L{level}.ctx")


def write_meta(dirpath, meta):
    """Atomic replace, so a crash leaves either the old or the new meta.json."""
    path = os.path.join(dirpath, META_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": META_FORMAT, "version": VERSION, **meta}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_meta(dirpath):
    path = os.path.join(dirpath, META_NAME)
    if not os.path.isdir(dirpath):
        raise TreeError(f"{dirpath}: no such tree directory")
    if not os.path.isfile(path):
        raise TreeError(f"{path}: missing; {dirpath} is not a MegaContext tree")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TreeError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise TreeError(f"{path}: not a MegaContext tree meta file (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise TreeError(f"{path}: unsupported tree version {meta.get('version')} (this code reads {VERSION})")
    for key in ("mc_config", "dim", "gistnet", "model_id"):
        if key not in meta:
            raise TreeError(f"{path}: missing field {key!r}")
    return meta
