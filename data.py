"""Text in, training batches out: how token streams become the micro-batches the training loop reads.

The path of a token, file by file:
  smollm2/sources.py    reads the configured sources (hub datasets, local files, the built-in offline corpus),
                        tokenizes documents in batches on all cores, appends EOS to each, mixes the sources by weight;
  smollm2/tokenizer.py  trains (at first use) or loads the tokenizer;
  smollm2/prepare.py    writes a split's token stream as shards (smollm2/shards.py: header, manifest, state.json);
  data.py               (this file) cuts the stream into blocks and serves them as micro-batches, stage by stage.

Packing: documents are concatenated with no padding (EOS stays a training target, and the EOS positions give the
document boundaries); a split's stream is cut into blocks of sequence_length+1 tokens, x = block[:-1] and
y = block[1:]. The first documents, up to data_prep.val_tokens, are the validation split, kept apart per source so
validation reports a loss per source. Every data stage has its own folder (smollm2/stages.py).

The loader reads shards when they exist, prepares local and built-in sources at first use, and streams `datasets`
sources otherwise (smollm2/streaming.py).

    python data.py prepare --config CFG [key=value ...]
    python data.py train-tokenizer --config CFG [key=value ...]
    python data.py verify DIR

Read next: train.py, the loop that consumes these batches.
"""

import argparse
import os
import sys
from typing import Callable, Optional

import numpy as np
from tokenizers import Tokenizer

from smollm2 import prepare, shards, sources, streaming
from smollm2.config import Config, TokensArgs
from smollm2.config_load import load_config
from smollm2.errors import DataError, command
from smollm2.stages import Stage, stage_at, stages_of
from smollm2.tokenizer import EOS, eos_token_id, load_tokenizer, train_tokenizer

POOLED = "all sources"   # what a split of all sources together is called


# ---------------------------------------------------------------- blocks and micro-batches


class _Blocks:
    """Random access to the blocks of a split held in arrays (memory-mapped shards, or tokens in memory).

    Block i is tokens [i*L, (i+1)*L) of the arrays' concatenation (L = sequence_length+1), so blocks run across
    shard boundaries; the tail shorter than a block is left out, and block n_blocks is block 0 again (next epoch)."""

    def __init__(self, arrays: list[np.ndarray], block: int, where: str):
        self.arrays = [a for a in arrays if len(a)]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.block, self.n_blocks = block, int(self.starts[-1]) // block
        if self.n_blocks == 0:
            raise DataError(f"{where}: {int(self.starts[-1]):,} tokens, fewer than one block of sequence_length+1 = "
                            f"{block}: add text or lower tokens.sequence_length (validation: raise "
                            "data_prep.val_tokens)")

    def _block(self, i: int) -> np.ndarray:
        lo, hi = i * self.block, (i + 1) * self.block
        k = int(np.searchsorted(self.starts, lo, side="right")) - 1
        pieces = []
        while lo < hi:   # more than once only when the block crosses into the next array
            end = min(hi, int(self.starts[k + 1]))
            pieces.append(self.arrays[k][lo - self.starts[k]:end - self.starts[k]])
            lo, k = end, k + 1
        return np.concatenate(pieces)

    def read(self, first: int, count: int) -> np.ndarray:
        return np.stack([self._block(i % self.n_blocks) for i in range(first, first + count)])


class TokenLoader:
    """One rank's micro-batches: next_batch() -> (x, y), int64 tensors of shape (micro_batch_size, sequence_length).

    Global micro-batch m is blocks [m*B, (m+1)*B) of the split; rank r of W takes m = r, r+W, r+2W, ...: ranks never
    share a block, and W ranks with accumulation k consume per optimizer step exactly the blocks of one process with
    accumulation W*k. The position is how many global micro-batches all ranks together have taken: the same number
    on every rank, so one rank's state_dict() resumes them all, even under another world size that divides it.
    """

    def __init__(self, blocks, tokens: TokensArgs, vocab_size: int, rank: int = 0, world_size: int = 1):
        self.blocks, self.B, self.T = blocks, tokens.micro_batch_size, tokens.sequence_length
        self.vocab_size = vocab_size
        self.rank, self.world_size = rank, world_size
        self.step = 0   # micro-batches this rank has taken

    def next_batch(self):
        import torch  # here, not at the top: prepare and verify never need it, and it takes seconds to import
        m = self.rank + self.step * self.world_size
        blocks = self.blocks.read(m * self.B, self.B)   # (B, T+1)
        if int(blocks.max()) >= self.vocab_size:   # inputs and targets: an embedding lookup past the table crashes
            raise DataError(f"micro-batch {m}: token id {int(blocks.max())} is outside the model's vocabulary "
                            f"({self.vocab_size}); the data was tokenized with another tokenizer")
        batch = torch.from_numpy(blocks.astype(np.int64))
        self.step += 1
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def reset(self) -> None:
        """Back to the first micro-batch (the validation loader, before each evaluation)."""
        self.step = 0

    def state_dict(self) -> dict:
        state = {"consumed_micro_batches": self.step * self.world_size, "micro_batch_size": self.B,
                 "sequence_length": self.T}
        if isinstance(self.blocks, streaming.StreamedBlocks):   # where its sources resume: nothing is read twice
            state["stream"] = self.blocks.snapshot(state["consumed_micro_batches"] * self.B)
        return state

    def load_state_dict(self, state: dict) -> None:
        if (state["micro_batch_size"], state["sequence_length"]) != (self.B, self.T):
            raise DataError(f"the data position was saved with micro_batch_size {state['micro_batch_size']} and "
                            f"sequence_length {state['sequence_length']}; resume with the same tokens section")
        if state["consumed_micro_batches"] % self.world_size:
            raise DataError(f"the data position ({state['consumed_micro_batches']} micro-batches) cannot be split "
                            f"evenly over {self.world_size} ranks; resume with a world size that divides it")
        self.step = state["consumed_micro_batches"] // self.world_size
        if "stream" in state and isinstance(self.blocks, streaming.StreamedBlocks):
            self.blocks.restore(state["stream"])


def train_loader(cfg: Config, rank: int = 0, world_size: int = 1, tokenizer: Optional[Tokenizer] = None,
                 stage: Optional[Stage] = None) -> TokenLoader:
    """The training split of one data stage (the first unless `stage` is given); StagedLoader serves every stage."""
    blocks = _split(cfg, stage, "train", rank, tokenizer)
    return TokenLoader(blocks, cfg.tokens, cfg.model.model_config.vocab_size, rank, world_size)


def val_loaders(cfg: Config, rank: int = 0, world_size: int = 1, tokenizer: Optional[Tokenizer] = None,
                stage: Optional[Stage] = None) -> dict[str, TokenLoader]:
    """Each source's held-out documents, source name -> loader (none when data_prep.val_tokens is 0), of one data
    stage (the first unless `stage` is given). Loaders cycle; call reset() before each evaluation so every evaluation
    sees the same batches."""
    return {name: TokenLoader(blocks, cfg.tokens, cfg.model.model_config.vocab_size, rank, world_size)
            for name, blocks in _split(cfg, stage, "val", rank, tokenizer).items()}


def _split(cfg: Config, stage: Optional[Stage], split: str, rank: int, tok: Optional[Tokenizer]):
    """The stage's training blocks, or {source name: validation blocks}: from prepared shards, from shards prepared
    now (local sources), or streamed (datasets sources). cfg gives the sections every stage shares: tokens, data_prep,
    the tokenizer and the model's vocabulary."""
    stage = stage or stages_of(cfg)[0]
    log = print if rank == 0 else (lambda _: None)
    if tok is None:   # a caller that already holds the tokenizer passes it, so it is not read again
        tok = load_tokenizer(cfg)
    prep, tokenizer_name = cfg.data_prep, cfg.tokenizer.tokenizer_name_or_path
    out, block = stage.folder, cfg.tokens.sequence_length + 1
    state = shards.read_state(out, prepare.shards_fingerprint(stage, prep, tok))
    if not (state and state["done"]) and sources.all_local(sources.sources(stage, prep.max_tokens)):
        log(f"data: preparing {out} (first use of these sources)")
        state = prepare.prepare(stage, prep, tokenizer_name, tok, log)
    if state and state["done"]:
        vocab = cfg.model.model_config.vocab_size
        rows = [r for r in state["shards"] if r["split"] == split]
        shards.check_shards(out, rows, log)
        groups = {}   # by source; the training split, and validation prepared before it was kept apart, pooled
        for r in rows:
            groups.setdefault(r.get("source", POOLED), []).append(shards.open_shard(os.path.join(out, r["file"]), vocab))
        if split == "train":
            return _Blocks(groups.get(POOLED, []), block, f"{out} train split")
        return {name: _Blocks(arrays, block, f"{out} validation split of '{name}'") for name, arrays in groups.items()}
    hub = sources.hub_datasets(sources.sources(stage, prep.max_tokens))
    if hub and not sources.hub_reachable():
        raise sources.offline_error([f"the dataset '{d}' ({stage.where})" for d in hub])
    log(f"data: no prepared shards in {out}: streaming the {split} split from the sources")
    if split == "train":
        return streaming.StreamedBlocks(stage, prep, tokenizer_name, tok, eos_token_id(tok), block)
    return {name: _Blocks(docs, block, f"streamed validation split of '{name}'")
            for name, docs in streaming.held_out(stage, prep, tokenizer_name, tok, eos_token_id(tok)).items()}



# ---------------------------------------------------------------- data stages


class StagedLoader:
    """One rank's micro-batches through every data stage, and the running stage's validation sources."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, tokenizer: Optional[Tokenizer] = None,
                 log: Callable[[str], None] = print):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.stages = stages_of(cfg)
        self.tokenizer = tokenizer or load_tokenizer(cfg)
        self.log = log if rank == 0 else (lambda _: None)
        self.index: Optional[int] = None
        self.loader: Optional[TokenLoader] = None
        self.positions: dict[str, dict] = {}   # by stage name: the saved position of each stage not running now
        self.validation_sets: dict[int, list] = {}

    @property
    def name(self) -> str:
        return self.stages[self.index or 0].name

    def begin_step(self, step: int) -> bool:
        """Select the stage of optimizer step `step` (1-based); True when it differs from the one running before."""
        index = stage_at(self.cfg, step)
        if index == self.index:
            return False
        if self.loader is not None:
            self.positions[self.name] = self.loader.state_dict()
        self.index = index
        self.loader = train_loader(self.cfg, self.rank, self.world_size, self.tokenizer, self.stages[index])
        if self.name in self.positions:
            self.loader.load_state_dict(self.positions.pop(self.name))
        self.validation_sets.pop(index - 1, None)   # the stage before is over: free its held-out data
        return True

    def next_batch(self):
        if self.loader is None:
            self.begin_step(1)
        return self.loader.next_batch()

    def validation(self) -> list[tuple[str, float, TokenLoader]]:
        """(source name, mixing weight, loader of its held-out blocks) for every source of the running stage."""
        index = self.index or 0
        if index not in self.validation_sets:
            stage = self.stages[index]
            weights = {name: weight for name, weight, _ in stage.dataset.sources(stage.where)}
            loaders = val_loaders(self.cfg, self.rank, self.world_size, self.tokenizer, stage)
            if not loaders:
                raise DataError(f"tokens.limit_val_batches is {self.cfg.tokens.limit_val_batches} but nothing is held "
                                "out for validation (data_prep.val_tokens is 0): raise data_prep.val_tokens or set "
                                "tokens.limit_val_batches=0")
            self.validation_sets[index] = [(name, weights.get(name, 1.0), loader) for name, loader in loaders.items()]
        return self.validation_sets[index]

    def state_dict(self) -> dict:
        positions = dict(self.positions)
        if self.loader is not None:
            positions[self.name] = self.loader.state_dict()
        return {"stages": positions}

    def load_state_dict(self, state: dict) -> None:
        """Every stage's position; a checkpoint from before stages were read holds the first stage's alone."""
        self.positions = dict(state["stages"]) if "stages" in state else {self.stages[0].name: state}
        unknown = set(self.positions) - {stage.name for stage in self.stages}
        if unknown:
            raise DataError(f"the checkpoint holds the data position of stage(s) {', '.join(sorted(unknown))}, which "
                            "data_stages no longer names; resume with the stages the run was started with")
        self.index, self.loader = None, None   # begin_step() opens the stage of the next step at its position


# ---------------------------------------------------------------- command line


@command
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="data.py", description="Tokenizer, token shards and their checks.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, what in (("prepare", "tokenize the configured sources into token shards (continues a killed run)"),
                       ("train-tokenizer", "train a byte-level BPE tokenizer on the first data stage's sources")):
        p = commands.add_parser(name, help=what)
        p.add_argument("--config", required=True)
        p.add_argument("overrides", nargs="*", help="key.path=value, e.g. data_prep.shard_tokens=1000000")
    commands.add_parser("verify", help="re-check every shard against manifest.jsonl").add_argument("dir")
    args = parser.parse_args(argv)
    if args.command == "verify":
        print(shards.verify(args.dir))
        return 0
    cfg = load_config(args.config, args.overrides)
    try:
        if args.command == "prepare":
            prepare.prepare_stages(cfg)
        else:
            tok = train_tokenizer(cfg)
            print(f"data: saved {cfg.tokenizer.tokenizer_name_or_path} ({tok.get_vocab_size()} tokens, "
                  f"EOS {EOS} = {eos_token_id(tok)})")
    except KeyboardInterrupt:   # prepare has committed every finished shard
        print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
