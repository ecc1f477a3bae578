"""Token shards on disk: the file format, atomic writes, the manifest and its verification.

A shard is a 32-byte header followed by the token ids, little-endian:

    magic "SMOLTOKS" | version u32 | bytes per token u32 (2 or 4) | token count u64 | largest token id u32 | 4 pad

so a file is self-describing: a truncated file, a file of another format or a shard made with a bigger tokenizer is
caught when it is opened, by name, before any training step. Ids are uint16 while the vocabulary fits (<= 65536
entries), else uint32. `manifest.jsonl` lists every shard with its token count and sha256; `verify` re-checks them.
`state.json` records how far `python data.py prepare` got, so a killed run can continue.

Every file is written to a temporary name and renamed into place, so a killed process never leaves a torn file under
a real name. prepare.py decides what goes into the shards; this file knows how a split's token stream is cut into
shards and how they are stored.
"""

import contextlib
import hashlib
import json
import os
import struct
from typing import Callable, Optional

import numpy as np

from smollm2.errors import DataError

try:
    import fcntl
except ImportError:   # Windows: no file locks, so run one process per data folder
    fcntl = None

MAGIC = b"SMOLTOKS"
VERSION = 1
HEADER = struct.Struct("<8sIIQI4x")
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}   # by bytes per token; little-endian on every machine
MANIFEST = "manifest.jsonl"
STATE = "state.json"
CHECKED = "checked.json"   # shards whose sha256 matched the manifest, by the file's identity (see check_shards)


def token_dtype(vocab_size: int) -> np.dtype:
    return DTYPES[2 if vocab_size <= 2**16 else 4]


def atomic_write(path: str, *chunks) -> None:
    """Write bytes-like chunks to `path` via a temporary file, fsync'ed, then renamed over the final name. A write
    the disk refuses (full, ...) is a DataError naming the reason, with the temporary file removed."""
    tmp = path + ".tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)   # whatever was left there, a link included, is never written through
        with open(tmp, "xb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise DataError(f"{path}: could not be written ({e.strerror or e}); nothing was replaced and no partial file "
                        "is left") from None


@contextlib.contextmanager
def exclusive(lock_path: str, needed: bool = True):
    """Hold a file lock: under torchrun every rank asks for the same tokenizer and shards; the first one makes them
    while the others wait, then find them made. A lock that is not `needed` is skipped where it cannot be made (a
    read-only data folder)."""
    try:
        os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
        f = open(lock_path, "a")
    except OSError:
        if needed:
            raise
        yield
        return
    with f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def write_shard(directory: str, name: str, split: str, tokens: np.ndarray, dtype: np.dtype) -> dict:
    """Write one shard; return its manifest row."""
    tokens = np.ascontiguousarray(tokens, dtype=dtype)
    header = HEADER.pack(MAGIC, VERSION, dtype.itemsize, len(tokens), int(tokens.max(initial=0)))
    atomic_write(os.path.join(directory, name), header, memoryview(tokens))
    sha = hashlib.sha256(header)
    sha.update(memoryview(tokens))
    return {"file": name, "split": split, "tokens": len(tokens), "sha256": sha.hexdigest()}


def _header(path: str) -> tuple[np.dtype, int, int]:
    """(dtype, token count, largest id) from a shard's header, checked against the file's size."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise DataError(f"{path}: not a token shard (bad magic number); re-run `python data.py prepare`")
    _, version, itemsize, count, max_id = HEADER.unpack(raw)
    if version != VERSION or itemsize not in DTYPES:
        raise DataError(f"{path}: shard format version {version}, {itemsize}-byte tokens; this code reads version "
                        f"{VERSION} with 2- or 4-byte tokens: re-run `python data.py prepare`")
    if size != HEADER.size + count * itemsize:
        raise DataError(f"{path}: {size} bytes, but its header promises {count} tokens "
                        f"({HEADER.size + count * itemsize} bytes): the file is truncated or damaged")
    return DTYPES[itemsize], count, max_id


def open_shard(path: str, vocab_size: int) -> np.ndarray:
    """Memory-map a shard's tokens, refusing one whose ids do not fit a `vocab_size` embedding."""
    dtype, count, max_id = _header(path)
    if max_id >= vocab_size:
        raise DataError(f"{path}: holds token id {max_id}, outside the model's vocabulary (vocab_size {vocab_size}): "
                        "it was made with a bigger tokenizer; prepare the data again with this model's tokenizer")
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))


class ShardWriter:
    """Cuts one split's token stream into shards of exactly shard_tokens tokens; the split's last one may be short."""

    def __init__(self, out: str, split: str, shard_tokens: int, dtype: np.dtype, index: int, carry: np.ndarray):
        self.out, self.split, self.shard_tokens, self.dtype, self.index = out, split, shard_tokens, dtype, index
        self.parts, self.count = [carry], len(carry)

    def carry(self) -> np.ndarray:
        """Tokens not yet in a shard."""
        self.parts = [np.concatenate(self.parts)]
        return self.parts[0]

    def _write(self, tokens: np.ndarray) -> dict:
        row = write_shard(self.out, f"{self.split}_{self.index:06d}.bin", self.split, tokens, self.dtype)
        self.index += 1
        return row

    def add(self, doc: np.ndarray) -> list[dict]:
        """Append a document; return the manifest rows of the shards this completed."""
        self.parts.append(doc)
        self.count += len(doc)
        rows = []
        while self.count >= self.shard_tokens:
            tokens = self.carry()
            rows.append(self._write(tokens[:self.shard_tokens]))
            self.parts, self.count = [tokens[self.shard_tokens:]], self.count - self.shard_tokens
        return rows

    def flush(self) -> list[dict]:
        rows = [self._write(self.carry())] if self.count else []
        self.parts, self.count = [np.zeros(0, np.uint32)], 0
        return rows


def read_state(directory: str, fingerprint: str) -> Optional[dict]:
    """The progress of prepare in `directory` (None before it started), refused if other settings made it."""
    path = os.path.join(directory, STATE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise DataError(f"{path}: unreadable ({e}); delete {directory} to prepare again") from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: damaged (not a JSON object); delete {directory} to prepare again")
    if state.get("fingerprint") != fingerprint:
        raise DataError(f"{directory} holds shards made with other data settings or another tokenizer; delete it to "
                        "prepare again, or set data_prep.output_dir to another folder")
    if not isinstance(state.get("shards"), list) or not isinstance(state.get("done"), bool):
        raise DataError(f"{path}: damaged (no list of shards or no done flag); delete {directory} to prepare again")
    _check_rows(state["shards"], f"{path}: damaged: shards")
    return state


ROW = {"file": str, "split": str, "tokens": int, "sha256": str}   # a manifest row's keys and types


def _check_rows(rows: list, where: str) -> list[dict]:
    """Rows of a manifest or state.json, each refused unless it has ROW's keys and names a file of the folder
    itself (no path: a damaged or crafted manifest must not send a reader elsewhere)."""
    for i, row in enumerate(rows, 1):
        ok = isinstance(row, dict) and all(isinstance(row.get(k), t) for k, t in ROW.items())
        if not ok or row["file"] != os.path.basename(row["file"]) or row["file"] in ("", ".", ".."):
            raise DataError(f"{where} {i}: not a shard row ({str(row)[:80]}); prepare the data again")
    return rows


def write_state(directory: str, state: dict) -> None:
    """Commit the progress: state.json first, then the manifest derived from it."""
    atomic_write(os.path.join(directory, STATE), json.dumps(state).encode())
    write_manifest(directory, state["shards"])


def write_manifest(directory: str, rows: list[dict]) -> None:
    atomic_write(os.path.join(directory, MANIFEST), "".join(json.dumps(r) + "\n" for r in rows).encode())


def read_manifest(directory: str) -> list[dict]:
    path = os.path.join(directory, MANIFEST)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise DataError(f"{directory}: not a folder of shards; give the folder `data.py prepare` wrote")
    try:
        with open(path, encoding="utf-8") as f:
            return _check_rows([json.loads(line) for line in f if line.strip()], f"{path} line")
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest; run `python data.py prepare --config CFG` first") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _identity(path: str) -> list[int]:
    """What changes whenever a file's bytes may have: size, mtime, ctime (which no tool can set back: a rename or a
    copy made with `cp -p` changes it) and inode."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def check_shards(directory: str, rows: list[dict], log: Callable[[str], None] = print) -> None:
    """Check the shards of `rows` (manifest rows) against the manifest before training reads them: the header, the
    size it implies, the token count and the sha256, so that a shard damaged after prepare, or swapped in from
    another tokenizer, is refused by name instead of trained on.

    Hashing reads every byte (0.3 to 1.2 s per 100 MB shard on one shared core), so a shard whose sha256 matched is
    remembered in checked.json with its identity (size, mtime, ctime, inode) and hashed again only once that
    changes; prepare remembers the shards it writes. Only a folder copied from elsewhere is read once, at its first
    start; every other start costs a stat per shard. Under torchrun the first rank hashes while the others wait.
    """
    with exclusive(os.path.join(directory, ".lock"), needed=False):
        checked = _read_checked(directory)
        todo = [r for r in rows if not _remembered(checked, directory, r)]
        if sum(r["tokens"] for r in todo) > 50_000_000:
            log(f"data: checking {len(todo)} shard(s) of {directory} against {MANIFEST} (sha256, once per change)")
        bad = []
        for row in todo:
            file = os.path.join(directory, row["file"])
            try:
                _, count, _ = _header(file)
                identity = _identity(file)
            except (DataError, OSError) as e:
                bad.append(str(e))
                continue
            if count != row["tokens"]:
                bad.append(f"{file}: holds {count} tokens, {MANIFEST} says {row['tokens']}")
            elif file_sha256(file) != row["sha256"]:
                bad.append(f"{file}: sha256 differs from {MANIFEST}: the file changed after it was written")
            else:
                checked[row["file"]] = {"identity": identity, "sha256": row["sha256"]}
        if todo:
            _write_checked(directory, checked)
    if bad:
        raise DataError(f"{len(bad)} shard(s) of {directory} do not match {MANIFEST}: " + "; ".join(bad)
                        + "; prepare the data again (`python data.py prepare`) or restore the files")


def remember_written(directory: str, rows: list[dict]) -> None:
    """Remember shards prepare has just written as checked (their sha256 is that of the bytes it wrote), so the
    first training start does not read them all again. The caller holds the folder's lock."""
    checked = _read_checked(directory)
    for row in rows:
        checked[row["file"]] = {"identity": _identity(os.path.join(directory, row["file"])), "sha256": row["sha256"]}
    _write_checked(directory, checked)


def _read_checked(directory: str) -> dict:
    try:
        with open(os.path.join(directory, CHECKED), encoding="utf-8") as f:
            checked = json.load(f)
    except (OSError, ValueError):   # none yet, or unreadable: every shard is checked again
        return {}
    return checked if isinstance(checked, dict) else {}


def _write_checked(directory: str, checked: dict) -> None:
    try:
        atomic_write(os.path.join(directory, CHECKED), json.dumps(checked).encode())
    except (OSError, DataError):   # a read-only data folder: checked again next time
        pass


def _remembered(checked: dict, directory: str, row: dict) -> bool:
    try:
        identity = _identity(os.path.join(directory, row["file"]))
    except OSError:
        return False
    return checked.get(row["file"]) == {"identity": identity, "sha256": row["sha256"]}


def verify(directory: str) -> str:
    """Re-check every shard of the manifest (header, size, largest id, sha256); one line per bad shard in the error."""
    rows = read_manifest(directory)
    bad = []
    for row in rows:
        path = os.path.join(directory, row["file"])
        try:
            dtype, count, max_id = _header(path)
        except DataError as e:
            bad.append(str(e))
            continue
        tokens = np.memmap(path, dtype, mode="r", offset=HEADER.size, shape=(count,)) if count else np.zeros(0, dtype)
        if file_sha256(path) != row["sha256"]:
            bad.append(f"{path}: sha256 differs from {MANIFEST}: the file changed after it was written")
        elif count != row["tokens"] or int(tokens.max(initial=0)) != max_id:
            bad.append(f"{path}: header disagrees with its contents or with {MANIFEST}")
    if bad:
        raise DataError(f"{len(bad)} bad shard(s) of {len(rows)} in {directory}: " + "; ".join(bad))
    splits = {r["split"] for r in rows}
    return f"{directory}: {len(rows)} shards ok, " + ", ".join(
        f"{s} {sum(r['tokens'] for r in rows if r['split'] == s):,} tokens" for s in sorted(splits))
