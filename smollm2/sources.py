"""Where the documents come from, and how several sources mix into one token stream.

Sources are read from a data stage's data.dataset (a stages.Stage holds it, with the stage's seed):
- `hf_dataset_or_datasets`: a name that `datasets.load_dataset(name, hf_dataset_config_name, split=..., streaming=True)`
  reads (a hub dataset such as HuggingFaceTB/smollm-corpus, or a local folder laid out like one), taking each row's
  `text_column_name`; or `builtin:python-stdlib`, the standard library's own .py files (code, docstrings and pydoc's
  topic documentation; its tests left out), present wherever Python is: the offline corpus of config_tiny.yaml.
- `dataset_folder` (weighted by `dataset_weights`): local files, folders or globs. A line of a .jsonl/.json file or a
  row of a .parquet file is one document (its `text_column_name`); any other file is one UTF-8 document. A folder
  tokenized by datatrove (nanotron's format) is read as tokens, never tokenized again (datatrove_folder.py).
A list of names mixes them equally, a {name: weight} mapping by weight. Files are read in an order shuffled by
the stage's data.seed; hub rows in their published order (the big pretraining corpora come shuffled).

Every document comes with its position, a small JSON-able value from which its source resumes right after it: the
file and row for local files, the `datasets` library's own iterable-dataset state for hub sources. A mixer's
position is its sources' positions, so a stream continues from a checkpoint without reading what came before.

Mixing counts tokens: the next document always comes from the source furthest below its weighted share, so the draw
is deterministic and the ratio exact up to one document. A source stops at its data_prep.max_tokens cap (after the
document that reaches it) or at its end. The first documents of the mixed stream, up to data_prep.val_tokens tokens,
are the validation split, the rest the training split: no document is in both.
"""

import collections
import functools
import glob
import itertools
import json
import os
import random
import sysconfig
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
from tokenizers import Tokenizer

from smollm2 import datatrove_folder
from smollm2.errors import ConfigError, DataError
from smollm2.stages import Stage

STDLIB = "builtin:python-stdlib"
# encodings/ is mostly generated codec tables ("LATIN CAPITAL LETTER A ..."), which a tiny model would learn to recite
STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings"}
Position = Any   # where a source resumes: JSON-able, opaque outside this file


@dataclass(frozen=True)
class Source:
    name: str                # as written in the config; the key of data_prep.max_tokens
    weight: float
    cap: Optional[int]       # most tokens taken from it
    local: bool              # a dataset_folder entry (else a datasets name or a builtin: corpus)
    tokens: bool = False     # a folder tokenized by datatrove: its documents are token ids already


def sources(stage: Stage, max_tokens: Optional[dict[str, int]]) -> list[Source]:
    """The stage's sources, each capped at its data_prep.max_tokens entry (`max_tokens`)."""
    found = stage.dataset.sources(stage.where)
    if not found:
        raise ConfigError(f"{stage.where}: no data source; set hf_dataset_or_datasets (a hub dataset, or "
                          f"{STDLIB} to work offline) or dataset_folder (local text files)")
    caps = max_tokens or {}
    return [Source(name, weight, caps.get(name), local, local and datatrove_folder.is_tokenized(name))
            for name, weight, local in found]


def all_local(srcs: list[Source]) -> bool:
    """True when every source is files on this machine that we list ourselves (no `datasets` source): quick to
    prepare, so the loader prepares them at first use."""
    return all(s.local or s.name.startswith("builtin:") for s in srcs)


def hub_datasets(srcs: list[Source]) -> list[str]:
    """The sources `datasets` would fetch from the Hugging Face Hub (a local folder laid out like one is not)."""
    return [s.name for s in srcs if not s.local and not s.name.startswith("builtin:") and not os.path.exists(s.name)]


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers: asked once per process, in at most 5 seconds (HF_HUB_OFFLINE=1: no).
    Without this, each library retries on its own with backoff, half a minute of noise per file before it gives up."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    try:   # urllib honours HTTPS_PROXY and friends, as the Hub libraries do
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=5)
    except urllib.error.HTTPError:   # an answer, even an error, means it is reachable
        return True
    except (OSError, ValueError):
        return False
    return True


def offline_error(needed: list[str]) -> DataError:
    """One error naming everything a config needs from the Hub, when the Hub is unreachable, with the ways round it."""
    from huggingface_hub import constants
    return DataError(f"the Hugging Face Hub ({constants.ENDPOINT}) is unreachable, and this config needs "
                     f"{' and '.join(needed)} from it. To work offline: prepare the shards where the Hub is reachable "
                     "(python data.py prepare --config CFG), copy data_prep.output_dir here and run with the tokenizer "
                     "in your Hugging Face cache and HF_HUB_OFFLINE=1; or use local files: "
                     "tokenizer.tokenizer_name_or_path=path/to/tokenizer.json, "
                     "data_stages.0.data.dataset.hf_dataset_or_datasets=null and "
                     "data_stages.0.data.dataset.dataset_folder=path/to/texts (config_tiny.yaml needs no network)")


# ---------------------------------------------------------------- reading one source


def _walk(root: str, skip_dir: Callable[[str], bool]) -> list[str]:
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not skip_dir(d)]
        files += [os.path.join(folder, n) for n in names]
    return sorted(files)


def _local_files(spec: str, where: str) -> list[str]:
    if os.path.isdir(spec):
        files = [f for f in _walk(spec, lambda d: d.startswith(".")) if not os.path.basename(f).startswith(".")]
    else:
        files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
    if not files:
        raise DataError(f"{where}.dataset_folder: '{spec}' is no file or folder, and no file matches it as a glob")
    return files


def _file_documents(path: str, column: str, fix: str) -> Iterator[str]:
    """A .jsonl/.json line or a .parquet row is a document; any other file is one."""
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq  # installed with datasets; only parquet files need it
            table = pq.ParquetFile(path)
            if column not in table.schema_arrow.names:
                raise DataError(f"{path}: no column '{column}' (it has {', '.join(table.schema_arrow.names)}); {fix}")
            for batch in table.iter_batches(columns=[column]):
                yield from batch.column(0).to_pylist()
        elif path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict) or column not in row:
                            keys = ", ".join(row) if isinstance(row, dict) else "no fields"
                            raise DataError(f"{path} line {line_no}: no field '{column}' (it has {keys}); {fix}")
                        yield row[column]
        else:
            with open(path, encoding="utf-8") as f:
                yield f.read()
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); dataset_folder takes text (.txt, "
                        ".jsonl/.json or .parquet rows, any UTF-8 file) or a folder tokenized by datatrove (.ds files "
                        "with their .ds.index and .ds.metadata): convert it or leave it out") from None
    except (OSError, ValueError) as e:   # unreadable, bad JSON, not parquet (pyarrow's errors subclass these)
        raise DataError(f"{path}: cannot read it ({e})") from None


def _hub_documents(name: str, stage: Stage, after: Optional[Position]) -> Iterator[tuple[str, Position]]:
    """(text, position) of each row, split after split. The position is the split's index and the datasets
    library's own state of its streamed IterableDataset after that row: load_state_dict() continues from there
    without reading the rows before (at most it re-reads the current file of the dataset)."""
    import datasets  # takes seconds to import, and only these sources need it
    ds = stage.dataset
    splits = [ds.hf_dataset_splits] if isinstance(ds.hf_dataset_splits, str) else ds.hf_dataset_splits
    first = after["split"] if after else 0
    for index in range(first, len(splits)):
        where = f"dataset '{name}' (config {ds.hf_dataset_config_name}, split {splits[index]})"
        try:
            rows = datasets.load_dataset(name, ds.hf_dataset_config_name, split=splits[index], streaming=True)
            if after and index == first:
                rows.load_state_dict(after["state"])
            for row in rows:
                if ds.text_column_name not in row:
                    raise DataError(f"{where}: no column '{ds.text_column_name}' (it has {', '.join(row)}); "
                                    f"set {stage.where}.text_column_name")
                yield row[ds.text_column_name], {"split": index, "state": rows.state_dict()}
        except DataError:
            raise
        except Exception as e:   # datasets raises many types: unknown name, config or split, no network, bad files
            raise DataError(f"{where}: datasets.load_dataset failed ({type(e).__name__}: {e})") from None


def _file_texts(src: Source, stage: Stage, after: Optional[Position]) -> Iterator[tuple[str, Position]]:
    """(text, [file index, row index]) of a local source's files, in the order the stage's seed shuffles them."""
    where, column = stage.where, stage.dataset.text_column_name
    if not src.local and src.name != STDLIB:
        raise DataError(f"{where}: unknown built-in corpus '{src.name}'; there is {STDLIB}")
    files = _local_files(src.name, where) if src.local else [
        f for f in _walk(sysconfig.get_paths()["stdlib"], STDLIB_SKIP.__contains__) if f.endswith(".py")]
    random.Random(stage.seed).shuffle(files)
    first_file, last_row = after or (0, -1)
    for f in range(first_file, len(files)):
        skip = last_row + 1 if f == first_file else 0
        rows = _file_documents(files[f], column, f"set {where}.text_column_name")
        for row, text in enumerate(itertools.islice(rows, skip, None), skip):
            yield text, [f, row]


def documents(src: Source, stage: Stage, after: Optional[Position] = None) -> Iterator[tuple[str, Position]]:
    """(text, position) for the non-empty texts of one source, always in the same order, from the start or from
    right after the document at position `after`."""
    if src.tokens:
        raise DataError(f"{src.name} is tokenized by datatrove already: it has token ids, not text (a tokenizer is "
                        "trained on text; give tokenizer.tokenizer_name_or_path the tokenizer it was made with)")
    column = stage.dataset.text_column_name
    texts = _file_texts(src, stage, after) if src.local or src.name.startswith("builtin:") else \
        _hub_documents(src.name, stage, after)
    for text, position in texts:
        if text is not None and not isinstance(text, str):
            raise DataError(f"source '{src.name}': column '{column}' holds {type(text).__name__}, not text")
        if text and not text.isspace():
            yield text, position


def tokenized(texts: Iterator[tuple[str, Position]], tok: Tokenizer, eos: int) -> Iterator[tuple[np.ndarray, Position]]:
    """(text, position) pairs -> (uint32 token array ending in EOS, the same position), in order.

    Batches of 64 documents are encoded on four background threads, up to eight batches ahead. tokenizers releases
    the GIL and spreads a batch over all cores; with several small batches in flight, one long document no longer
    leaves the other cores idle, and reading, mixing and writing go on in this thread meanwhile. The texts read
    ahead are not consumed yet: each position travels with its document, so a mixer records only what it took."""
    def encode(batch: list[tuple[str, Position]]) -> list[tuple[np.ndarray, Position]]:
        docs = []
        encodings = tok.encode_batch_fast([text for text, _ in batch], add_special_tokens=False)
        for enc, (_, position) in zip(encodings, batch):
            ids = enc.ids
            ids.append(eos)
            docs.append((np.array(ids, dtype=np.uint32), position))
        return docs

    with ThreadPoolExecutor(4) as pool:
        pending = collections.deque()
        while batch := list(itertools.islice(texts, 64)):
            pending.append(pool.submit(encode, batch))
            if len(pending) == 8:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


# ---------------------------------------------------------------- mixing and splitting


class Mixer:
    """Interleave streams of (document, position) so that each gets a share of the output proportional to its
    source's weight.

    Shares count len(document): tokens for token arrays, characters for texts. The next document comes from the
    active stream with the smallest taken/weight (the first on ties). state() (documents and length taken, and the
    position of the last document taken, per stream) is the whole state: streams resumed at those positions continue
    exactly where this mixer stopped. Iterating yields the documents; tagged() yields (stream index, document).
    """

    def __init__(self, streams: list[Iterator], srcs: list[Source], state: Optional[dict] = None,
                 use_caps: bool = True):
        self.streams, self.srcs = streams, srcs
        state = state or {}
        self.docs = list(state.get("docs") or [0] * len(srcs))
        self.taken = list(state.get("taken") or [0] * len(srcs))
        self.positions = list(state.get("positions") or [None] * len(srcs))
        self.caps = [s.cap if use_caps else None for s in srcs]

    def state(self) -> dict:
        return {"docs": list(self.docs), "taken": list(self.taken), "positions": list(self.positions)}

    def tagged(self) -> Iterator[tuple[int, Any]]:
        active = [i for i, cap in enumerate(self.caps) if cap is None or self.taken[i] < cap]
        while active:
            i = min(active, key=lambda j: self.taken[j] / self.srcs[j].weight)
            doc, position = next(self.streams[i], (None, None))
            if doc is None:
                if self.docs[i] == 0:
                    raise DataError(f"source '{self.srcs[i].name}' has no text (empty files, or an empty column)")
                active.remove(i)
                continue
            self.docs[i] += 1
            self.taken[i] += len(doc)
            self.positions[i] = position
            if self.caps[i] is not None and self.taken[i] >= self.caps[i]:
                active.remove(i)
            yield i, doc

    def __iter__(self):
        return (doc for _, doc in self.tagged())


def token_mixer(stage: Stage, max_tokens: Optional[dict[str, int]], tokenizer_name: str, tok: Tokenizer, eos: int,
                state: Optional[dict] = None) -> Mixer:
    """The mixed token stream of the stage's sources, from the start or from a Mixer's state(): every source resumes
    right after the last document taken from it, without reading or tokenizing what came before. Folders tokenized by
    datatrove must have been made with the configured tokenizer, `tokenizer_name`."""
    srcs = sources(stage, max_tokens)
    positions = (state or {}).get("positions") or [None] * len(srcs)
    streams = []
    for src, after in zip(srcs, positions):
        if src.tokens:
            streams.append(datatrove_folder.documents(src.name, stage.seed, tokenizer_name, tok, eos, after))
        else:
            streams.append(tokenized(documents(src, stage, after), tok, eos))
    return Mixer(streams, srcs, state)


def with_split(docs: Iterator, val_tokens: int, val_taken: int = 0,
               size: Callable[[Any], int] = len) -> Iterator[tuple[bool, Any]]:
    """(is_val, doc): documents go to validation until it holds val_tokens tokens, then all go to training."""
    for doc in docs:
        is_val = val_taken < val_tokens
        val_taken += size(doc) if is_val else 0
        yield is_val, doc
