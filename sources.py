"""Where the documents come from, and how several sources mix into one token stream.

Sources are read from data_stages[0].data.dataset (later stages are not read yet):
- `hf_dataset_or_datasets`: a name that `datasets.load_dataset(name, hf_dataset_config_name, split=..., streaming=True)`
  reads (a hub dataset such as HuggingFaceTB/smollm-corpus, or a local folder laid out like one), taking each row's
  `text_column_name`; or `builtin:python-stdlib`, the standard library's own .py files (code, docstrings and pydoc's
  topic documentation; its tests left out), present wherever Python is: the offline corpus of config_tiny.yaml.
- `dataset_folder` (weighted by `dataset_weights`): local files, folders or globs. A line of a .jsonl/.json file or a
  row of a .parquet file is one document (its `text_column_name`); any other file is one UTF-8 document.
A list of names mixes them equally, a {name: weight} mapping by weight. Files are read in an order shuffled by
data_stages[0].data.seed; hub rows in their published order (the big pretraining corpora come shuffled).

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
from typing import Callable, Iterator, Optional

import numpy as np
from tokenizers import Tokenizer

from config import Config, ConfigError
from shards import DataError

STDLIB = "builtin:python-stdlib"
# encodings/ is mostly generated codec tables ("LATIN CAPITAL LETTER A ..."), which a tiny model would learn to recite
STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings"}
TEXT_COLUMN_FIX = "set data_stages[0].data.dataset.text_column_name"


@dataclass(frozen=True)
class Source:
    name: str                # as written in the config; the key of data_prep.max_tokens
    weight: float
    cap: Optional[int]       # most tokens taken from it
    local: bool              # a dataset_folder entry (else a datasets name or a builtin: corpus)


def sources(cfg: Config) -> list[Source]:
    found = cfg.data_stages[0].data.dataset.sources()
    if not found:
        raise ConfigError("data_stages[0].data.dataset: no data source; set hf_dataset_or_datasets (a hub dataset, "
                          f"or {STDLIB} to work offline) or dataset_folder (local text files)")
    caps = cfg.data_prep.max_tokens or {}
    return [Source(name, weight, caps.get(name), local) for name, weight, local in found]


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


def _local_files(spec: str) -> list[str]:
    if os.path.isdir(spec):
        files = [f for f in _walk(spec, lambda d: d.startswith(".")) if not os.path.basename(f).startswith(".")]
    else:
        files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
    if not files:
        raise DataError(f"data_stages[0].data.dataset.dataset_folder: '{spec}' is no file or folder, and no file "
                        "matches it as a glob")
    return files


def _file_documents(path: str, column: str) -> Iterator[str]:
    """A .jsonl/.json line or a .parquet row is a document; any other file is one."""
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq   # installed with datasets; only parquet files need it
            table = pq.ParquetFile(path)
            if column not in table.schema_arrow.names:
                raise DataError(f"{path}: no column '{column}' (it has {', '.join(table.schema_arrow.names)}); "
                                f"{TEXT_COLUMN_FIX}")
            for batch in table.iter_batches(columns=[column]):
                yield from batch.column(0).to_pylist()
        elif path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict) or column not in row:
                            keys = ", ".join(row) if isinstance(row, dict) else "no fields"
                            raise DataError(f"{path} line {line_no}: no field '{column}' (it has {keys}); "
                                            f"{TEXT_COLUMN_FIX}")
                        yield row[column]
        else:
            with open(path, encoding="utf-8") as f:
                yield f.read()
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it or leave it out") from None
    except (OSError, ValueError) as e:   # unreadable, bad JSON, not parquet (pyarrow's errors subclass these)
        raise DataError(f"{path}: cannot read it ({e})") from None


def _hub_documents(name: str, cfg: Config) -> Iterator[str]:
    import datasets   # takes seconds to import, and only these sources need it
    ds = cfg.data_stages[0].data.dataset
    for split in [ds.hf_dataset_splits] if isinstance(ds.hf_dataset_splits, str) else ds.hf_dataset_splits:
        where = f"dataset '{name}' (config {ds.hf_dataset_config_name}, split {split})"
        try:
            for row in datasets.load_dataset(name, ds.hf_dataset_config_name, split=split, streaming=True):
                if ds.text_column_name not in row:
                    raise DataError(f"{where}: no column '{ds.text_column_name}' (it has {', '.join(row)}); "
                                    f"{TEXT_COLUMN_FIX}")
                yield row[ds.text_column_name]
        except DataError:
            raise
        except Exception as e:   # datasets raises many types: unknown name, config or split, no network, bad files
            raise DataError(f"{where}: datasets.load_dataset failed ({type(e).__name__}: {e})") from None


def documents(src: Source, cfg: Config) -> Iterator[str]:
    """The non-empty texts of one source, always in the same order."""
    column = cfg.data_stages[0].data.dataset.text_column_name
    if src.local or src.name.startswith("builtin:"):
        if not src.local and src.name != STDLIB:
            raise DataError(f"data_stages[0].data.dataset: unknown built-in corpus '{src.name}'; there is {STDLIB}")
        files = _local_files(src.name) if src.local else [
            f for f in _walk(sysconfig.get_paths()["stdlib"], STDLIB_SKIP.__contains__) if f.endswith(".py")]
        random.Random(cfg.data_stages[0].data.seed).shuffle(files)
        texts = itertools.chain.from_iterable(_file_documents(f, column) for f in files)
    else:
        texts = _hub_documents(src.name, cfg)
    for text in texts:
        if text is not None and not isinstance(text, str):
            raise DataError(f"source '{src.name}': column '{column}' holds {type(text).__name__}, not text")
        if text and not text.isspace():
            yield text


def tokenized(texts: Iterator[str], tok: Tokenizer, eos: int) -> Iterator[np.ndarray]:
    """Documents as uint32 token arrays ending in EOS, in order.

    Batches of 64 documents are encoded on four background threads, up to eight batches ahead. tokenizers releases
    the GIL and spreads a batch over all cores; with several small batches in flight, one long document no longer
    leaves the other cores idle, and reading, mixing and writing go on in this thread meanwhile."""
    def encode(batch: list[str]) -> list[np.ndarray]:
        docs = []
        for enc in tok.encode_batch_fast(batch, add_special_tokens=False):
            ids = enc.ids
            ids.append(eos)
            docs.append(np.array(ids, dtype=np.uint32))
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
    """Interleave document streams so that each gets a share of the output proportional to its source's weight.

    Shares count len(document): tokens for token arrays, characters for texts. The next document comes from the
    active stream with the smallest taken/weight (the first on ties). `docs` and `taken` per stream are the whole
    state: streams advanced past `docs` documents and the same `taken` continue exactly where another mixer stopped.
    """

    def __init__(self, streams: list[Iterator], srcs: list[Source], docs: Optional[list[int]] = None,
                 taken: Optional[list[int]] = None, use_caps: bool = True):
        self.streams, self.srcs = streams, srcs
        self.docs = list(docs or [0] * len(srcs))
        self.taken = list(taken or [0] * len(srcs))
        self.caps = [s.cap if use_caps else None for s in srcs]

    def __iter__(self):
        active = [i for i, cap in enumerate(self.caps) if cap is None or self.taken[i] < cap]
        while active:
            i = min(active, key=lambda j: self.taken[j] / self.srcs[j].weight)
            doc = next(self.streams[i], None)
            if doc is None:
                if self.docs[i] == 0:
                    raise DataError(f"source '{self.srcs[i].name}' has no text (empty files, or an empty column)")
                active.remove(i)
                continue
            self.docs[i] += 1
            self.taken[i] += len(doc)
            if self.caps[i] is not None and self.taken[i] >= self.caps[i]:
                active.remove(i)
            yield doc


def token_mixer(cfg: Config, tok: Tokenizer, eos: int, docs: Optional[list[int]] = None,
                taken: Optional[list[int]] = None) -> Mixer:
    """The mixed token stream of all sources. `docs`/`taken` (a Mixer's state) resume it: the documents already
    taken are skipped as text, without tokenizing them again."""
    srcs = sources(cfg)
    skips = docs or [0] * len(srcs)
    streams = [tokenized(itertools.islice(documents(s, cfg), n, None), tok, eos) for s, n in zip(srcs, skips)]
    return Mixer(streams, srcs, docs, taken)


def with_split(docs: Iterator[np.ndarray], val_tokens: int, val_taken: int = 0) -> Iterator[tuple[bool, np.ndarray]]:
    """(is_val, doc): documents go to validation until it holds val_tokens tokens, then all go to training."""
    for doc in docs:
        is_val = val_taken < val_tokens
        val_taken += len(doc) if is_val else 0
        yield is_val, doc
