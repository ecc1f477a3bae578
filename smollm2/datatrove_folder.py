"""Folders tokenized by datatrove: the format nanotron's Nanoset reads and the official SmolLM2 configs point to.

datatrove's tokenizer step (`DocumentTokenizer`, and its merger) writes, per file:
    NAME.ds           the token ids, little-endian, 2 bytes each (4 for vocabularies past 65,536)
    NAME.ds.index     where each document ends, in tokens, as little-endian uint64
    NAME.ds.metadata  "tokenizer name|bytes per token", then the token count
A `dataset_folder` entry holding .ds files (at its top level, as nanotron reads it) is such a folder. Its documents
are read as token arrays, never tokenized again: the index gives the document boundaries, so each document ends
with EOS here as it does in our own packing (datatrove adds one when asked; where it was not, we do), and the held-out
split, the mixing and the shards see documents as they would from text. The tokenizer that made the folder must be
the config's: the names match, or the named tokenizer is a local file with the same vocabulary.
"""

import os
import random
from typing import Iterator, Optional

import numpy as np
from tokenizers import Tokenizer

from smollm2.errors import DataError

DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}   # by bytes per token
EXPECTED = ("a datatrove-tokenized folder holds NAME.ds files, each with NAME.ds.index (document ends) and "
            "NAME.ds.metadata (its tokenizer); datatrove's DocumentTokenizer writes them with its defaults")


def is_tokenized(folder: str) -> bool:
    """True for a folder with .ds files at its top level."""
    return os.path.isdir(folder) and any(name.endswith(".ds") for name in os.listdir(folder))


def _metadata(path: str) -> tuple[str, np.dtype]:
    """(tokenizer name, token dtype) from NAME.ds.metadata."""
    try:
        with open(path + ".metadata", encoding="utf-8") as f:
            name, _, size = f.readline().strip().rpartition("|")
    except FileNotFoundError:
        raise DataError(f"{path}: no {os.path.basename(path)}.metadata beside it; {EXPECTED}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}.metadata: unreadable ({e})") from None
    if not name or size not in ("2", "4"):
        raise DataError(f"{path}.metadata: its first line should be 'tokenizer name|2' or '...|4'; {EXPECTED}")
    return name, DTYPES[int(size)]


def _same_tokenizer(name: str, tokenizer_name: str, tok: Tokenizer) -> bool:
    """Whether the tokenizer `name` that made a folder is the configured one (named `tokenizer_name`, loaded as tok)."""
    if name == tokenizer_name:
        return True
    path = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
    if not os.path.isfile(path):
        return False
    try:
        return Tokenizer.from_file(path).get_vocab() == tok.get_vocab()
    except Exception:   # tokenizers raises a plain Exception for a file it cannot read
        return False


def files(folder: str, tokenizer_name: str, tok: Tokenizer) -> list[tuple[str, np.dtype]]:
    """(path, dtype) of every non-empty .ds file of the folder, sorted by name, each checked against the configured
    tokenizer (tokenizer.tokenizer_name_or_path, loaded as tok); the seed's shuffle is documents()' business."""
    found = []
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".ds")):
        path = os.path.join(folder, name)
        made_with, dtype = _metadata(path)
        if not _same_tokenizer(made_with, tokenizer_name, tok):
            raise DataError(f"{path} was tokenized with '{made_with}' but tokenizer.tokenizer_name_or_path is "
                            f"'{tokenizer_name}'; set it to '{made_with}' (or to a local copy "
                            "of that tokenizer)")
        if os.path.exists(path + ".loss"):
            raise DataError(f"{path}.loss: loss masks are not supported; tokenize without save_loss_metadata")
        if not os.path.exists(path + ".index"):
            raise DataError(f"{path}: no {name}.index beside it, so its document boundaries are unknown; {EXPECTED}")
        size = os.path.getsize(path)
        if size % dtype.itemsize:
            raise DataError(f"{path}: {size} bytes is not a whole number of {dtype.itemsize}-byte tokens: truncated?")
        if size:
            found.append((path, dtype))
    if not found:
        raise DataError(f"{folder}: its .ds files hold no tokens")
    return found


def _ends(path: str, n_tokens: int) -> np.ndarray:
    ends = np.fromfile(path + ".index", dtype="<u8")
    if len(ends) == 0 or ends[-1] != n_tokens or np.any(np.diff(ends.astype(np.int64)) < 0):
        raise DataError(f"{path}.index does not match {os.path.basename(path)} ({n_tokens} tokens): the files are "
                        "damaged or from different runs")
    return ends


def documents(folder: str, seed: int, tokenizer_name: str, tok: Tokenizer, eos: int,
              after: Optional[list[int]] = None) -> Iterator[tuple[np.ndarray, list[int]]]:
    """(uint32 tokens ending in EOS, [file index, document index]) for every document of the folder, files in the
    order the stage's seed shuffles them, from the start or from right after the document at `after`."""
    paths = files(folder, tokenizer_name, tok)
    random.Random(seed).shuffle(paths)
    first_file, last_doc = after or (0, -1)
    for f in range(first_file, len(paths)):
        path, dtype = paths[f]
        tokens = np.memmap(path, dtype=dtype, mode="r")
        ends = _ends(path, len(tokens))
        first_doc = last_doc + 1 if f == first_file else 0
        for d in range(first_doc, len(ends)):
            start, end = (int(ends[d - 1]) if d else 0), int(ends[d])
            if end == start:
                continue
            doc = tokens[start:end].astype(np.uint32)
            yield (doc if doc[-1] == eos else np.append(doc, np.uint32(eos))), [f, d]
