"""`python data.py prepare`: the configured sources tokenized into token shards, resumable after a kill.

The first documents of the mixed stream, up to data_prep.val_tokens, are the validation split, kept apart per source
(val_<k>_*.bin) so validation reports a loss per source; the rest is the training split. Progress is committed after
every shard: a killed prepare continues where it stopped and ends with byte-identical shards.
"""

import hashlib
import json
import os
import time
from typing import Callable

import numpy as np
from tokenizers import Tokenizer

from smollm2 import shards, sources
from smollm2.config import Config, DataPrepArgs
from smollm2.errors import DataError
from smollm2.stages import Stage, stages_of
from smollm2.tokenizer import eos_token_id, load_tokenizer


def shards_fingerprint(stage: Stage, prep: DataPrepArgs, tok: Tokenizer) -> str:
    """A hash of every setting that changes the stage's shards' bytes: shards made otherwise are never taken for
    these. Folders prepared before are found by this hash, so its inputs and their order stay as they are."""
    ds = stage.dataset
    settings = [shards.VERSION, ds.sources(stage.where), prep.max_tokens, stage.seed, ds.text_column_name,
                ds.hf_dataset_config_name, ds.hf_dataset_splits, prep.shard_tokens, prep.val_tokens,
                hashlib.sha256(tok.to_str().encode()).hexdigest()]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def prepare(stage: Stage, prep: DataPrepArgs, tokenizer_name: str, tok: Tokenizer,
            log: Callable[[str], None] = print) -> dict:
    """Write the stage's validation and training shards to its folder, continuing an interrupted run; return the
    state. `tokenizer_name` is tokenizer.tokenizer_name_or_path, of which tok is the loaded tokenizer.

    The held-out documents are kept in memory until the validation split is complete, then written per source; from
    then on the state (committed after each shard, once the shard itself is in place) holds the mixer's position and
    the tokens not yet in a shard, so a continued run rebuilds exactly the stream an uninterrupted one would write."""
    out, fingerprint = stage.folder, shards_fingerprint(stage, prep, tok)
    with shards.exclusive(os.path.join(out, ".lock")):   # the other ranks wait here, then find the work done
        state = shards.read_state(out, fingerprint) or {"fingerprint": fingerprint, "mixer": None, "split": "val",
                                                        "carry": [], "shards": [], "done": False}
        if state["done"]:
            log(f"data: {out} is already prepared: {_summary(state)}")
            return state
        if "mixer" not in state:
            raise DataError(f"{out} was left half-prepared by an older version of data.py; delete it to prepare again")
        mixer = sources.token_mixer(stage, prep.max_tokens, tokenizer_name, tok, eos_token_id(tok), state["mixer"])
        dtype = shards.token_dtype(tok.get_vocab_size())
        w, t0, taken0 = None, time.time(), sum(mixer.taken)
        if state["split"] == "train":
            index = sum(r["split"] == "train" for r in state["shards"])
            w = shards.ShardWriter(out, "train", prep.shard_tokens, dtype, index,
                                   np.array(state["carry"], np.uint32))

        def commit(rows: list[dict], done: bool = False) -> None:
            state["shards"] += rows
            state.update(mixer=mixer.state(), split="train", carry=w.carry().tolist(), done=done)
            shards.write_state(out, state)
            shards.remember_written(out, rows)
            for row in rows:
                log(f"data: wrote {os.path.join(out, row['file'])}  {row['tokens']:,} tokens  "
                    f"({(sum(mixer.taken) - taken0) / (time.time() - t0):,.0f} tokens/s)")

        held = [[] for _ in mixer.srcs]   # each source's validation documents, until the split is complete
        val_tokens = prep.val_tokens
        for is_val, (k, doc) in sources.with_split(mixer.tagged(), val_tokens, 0 if w is None else val_tokens,
                                                   size=lambda item: len(item[1])):
            if is_val:
                held[k].append(doc)
                continue
            rows = []
            if w is None:
                rows = _write_held_out(out, held, mixer.srcs, prep.shard_tokens, dtype)
                w = shards.ShardWriter(out, "train", prep.shard_tokens, dtype, 0, np.zeros(0, np.uint32))
            rows += w.add(doc)
            if rows:
                commit(rows)
        if w is None:
            raise DataError(f"all {sum(mixer.taken):,} tokens of the corpus went to the validation split: lower "
                            "data_prep.val_tokens or add text")
        commit(w.flush(), done=True)
        log(f"data: {out} ready in {time.time() - t0:.1f} s: {_summary(state)}")
        return state


def _write_held_out(out: str, held: list[list[np.ndarray]], srcs: list[sources.Source], shard_tokens: int,
                    dtype: np.dtype) -> list[dict]:
    """Each source's validation documents as shards val_<k>_<i>.bin, their manifest rows naming the source."""
    rows = []
    for k, docs in enumerate(held):
        tokens = np.concatenate(docs) if docs else np.zeros(0, np.uint32)
        for i, lo in enumerate(range(0, len(tokens), shard_tokens)):
            row = shards.write_shard(out, f"val_{k}_{i:06d}.bin", "val", tokens[lo:lo + shard_tokens], dtype)
            rows.append({**row, "source": srcs[k].name})
    return rows


def prepare_stages(cfg: Config, log: Callable[[str], None] = print) -> list[dict]:
    """prepare() every data stage, each into its own folder."""
    tok = load_tokenizer(cfg)
    return [prepare(stage, cfg.data_prep, cfg.tokenizer.tokenizer_name_or_path, tok, log) for stage in stages_of(cfg)]


def _summary(state: dict) -> str:
    return ", ".join(f"{split} {sum(r['tokens'] for r in state['shards'] if r['split'] == split):,} tokens in "
                     f"{sum(r['split'] == split for r in state['shards'])} shard(s)" for split in ("val", "train"))
