"""A data stage read straight from its sources, without `prepare`: how a run on hub datasets trains as they stream.

The validation split (the first data_prep.val_tokens tokens of the mixed stream) is small: it is held in memory per
source. The training split is cut into blocks as documents arrive, the same blocks prepared shards would hold; every
rank reads the whole stream and keeps its own blocks.

A resumed run must not read the stream again up to where it stopped: at 2.6B tokens that is hours of download and
tokenization before step 1. snapshot() records, at a block boundary, the mixer's position (for a hub source, the
`datasets` library's own state of its streamed IterableDataset; for files, the file and row), the tokens already
read into the next block, and the block count; restore() continues from there, reading at most the rest of the
dataset file it stopped in. The position of each document travels with it through the tokenizer's read-ahead, so a
snapshot holds what the blocks consumed, not what was prefetched.
"""

import itertools
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from smollm2 import sources
from smollm2.config import DataPrepArgs
from smollm2.errors import DataError
from smollm2.stages import Stage


def held_out(stage: Stage, prep: DataPrepArgs, tokenizer_name: str, tok: Tokenizer,
             eos: int) -> dict[str, list[np.ndarray]]:
    """Each source's validation documents, read from the start of the stage's mixed stream."""
    mixer = sources.token_mixer(stage, prep.max_tokens, tokenizer_name, tok, eos)
    docs = {}
    labelled = sources.with_split(mixer.tagged(), prep.val_tokens, size=lambda item: len(item[1]))
    for _, (k, doc) in itertools.takewhile(lambda pair: pair[0], labelled):
        docs.setdefault(mixer.srcs[k].name, []).append(doc)
    return docs


class StreamedBlocks:
    """Block i = tokens [i*L, (i+1)*L) of the training stream (L = sequence_length+1), read forward only. When the
    stream ends, the tail shorter than a block is dropped and the next epoch starts the stream again; asking for an
    earlier block starts it again too (slow, and never needed by training)."""

    def __init__(self, stage: Stage, prep: DataPrepArgs, tokenizer_name: str, tok: Tokenizer, eos: int, block: int):
        self.stage, self.prep, self.tokenizer_name = stage, prep, tokenizer_name
        self.tok, self.eos, self.block = tok, eos, block
        self.restore(None)

    def restore(self, snapshot: Optional[dict]) -> None:
        """Continue from a snapshot() (None: from the start)."""
        snap = snapshot or {"pos": 0, "buf": [], "mixer": None, "epoch_blocks": 0}
        self.pos, self.epoch_blocks = snap["pos"], snap["epoch_blocks"]
        self.buf = np.array(snap["buf"], np.uint32)
        self.mixer = sources.token_mixer(self.stage, self.prep.max_tokens, self.tokenizer_name, self.tok, self.eos,
                                         snap["mixer"])
        # a mixer state is saved once the epoch reached its training documents: validation is behind it then
        val = self.prep.val_tokens
        split = sources.with_split(iter(self.mixer), val, val if snap["mixer"] else 0)
        self.docs = (doc for is_val, doc in split if not is_val)
        self.in_training = snap["mixer"] is not None

    def snapshot(self, at: int) -> dict:
        """The position of block `at`, which must not be behind the blocks read already (a rank's next block is
        never behind the global position): the blocks between are read now, as they would be next."""
        if at < self.pos:
            raise ValueError(f"cannot snapshot block {at}: block {self.pos} was read already")
        while self.pos < at:
            self._next_block()
        return {"pos": self.pos, "buf": self.buf.tolist(), "epoch_blocks": self.epoch_blocks,
                "mixer": self.mixer.state() if self.in_training else None}

    def _next_block(self) -> np.ndarray:
        while len(self.buf) < self.block:
            doc = next(self.docs, None)
            if doc is None:   # the end of the stream: the next epoch reads it again from its start
                if self.epoch_blocks == 0:
                    raise DataError(f"the streamed training split is shorter than one block of sequence_length+1 = "
                                    f"{self.block} tokens: add text or lower tokens.sequence_length")
                self.restore({"pos": self.pos, "buf": [], "mixer": None, "epoch_blocks": 0})
                continue
            self.in_training = True
            self.buf = np.concatenate([self.buf, doc])
        out, self.buf = self.buf[:self.block], self.buf[self.block:]
        self.pos, self.epoch_blocks = self.pos + 1, self.epoch_blocks + 1
        return out

    def read(self, first: int, count: int) -> np.ndarray:
        if first < self.pos:
            self.restore(None)
        while self.pos < first:
            self._next_block()
        return np.stack([self._next_block() for _ in range(count)])
