"""Text in, training batches out: the tokenizer, `python data.py prepare`, and the loader the training loop reads.

The path of a token, file by file:
  sources.py   reads the configured sources (hub datasets, local files, the built-in offline corpus), tokenizes
               documents in batches on all cores, appends EOS to each, and mixes the sources by weight;
  shards.py    stores a split's token stream as shards with a self-describing header, a manifest and a state.json;
  data.py      (this file) trains or loads the tokenizer, runs prepare, and serves the blocks as batches.

Packing: documents are concatenated with no padding (EOS stays a training target, and the EOS positions give the
document boundaries); a split's stream is cut into blocks of sequence_length+1 tokens, x = block[:-1] and
y = block[1:]. The first documents, up to data_prep.val_tokens, are the validation split.

Each source's held-out documents are kept apart (val_<k>_*.bin), so validation reports a loss per source. Every data
stage has its own folder (config.stage_view); `prepare` prepares them all.

prepare commits its progress after every shard: a killed run continues where it stopped and ends with byte-identical
shards. The loader reads shards when they exist, prepares local and built-in sources at first use, and streams
`datasets` sources otherwise (streaming.py).

    python data.py prepare --config CFG [key=value ...]
    python data.py train-tokenizer --config CFG [key=value ...]
    python data.py verify DIR
"""

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from typing import Callable, Optional

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import chat
import shards
import sources
import streaming
from config import Config, ConfigError, data_dir, load_config, stage_view
from shards import DataError

EOS = "<|endoftext|>"
POOLED = "all sources"   # what a split of all sources together is called
EOS_SPELLINGS = (EOS, "</s>", "<|end_of_text|>", "<eos>")


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(cfg: Config) -> Tokenizer:
    """The configured tokenizer: a local tokenizer.json (trained on the sources first if it does not exist yet), a
    folder holding one, or a hub name. Its vocabulary must fit the model and its EOS must be the config's."""
    name = cfg.tokenizer.tokenizer_name_or_path
    path = os.path.join(name, "tokenizer.json") if os.path.isdir(name) else name
    if path.endswith(".json"):
        if not os.path.exists(path):
            with shards.exclusive(path + ".lock"):
                if not os.path.exists(path):
                    train_tokenizer(cfg)
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:   # tokenizers raises a plain Exception for a malformed file
            raise DataError(f"tokenizer.tokenizer_name_or_path: cannot read {path} ({e})") from None
    else:
        tok = _hub_tokenizer(cfg)
    m = cfg.model.model_config
    if tok.get_vocab_size() > m.vocab_size:
        raise DataError(f"tokenizer '{name}' has {tok.get_vocab_size()} tokens but model.model_config.vocab_size is "
                        f"{m.vocab_size}: ids past the embedding table would crash training; raise vocab_size or use "
                        "a smaller tokenizer")
    eos = eos_token_id(tok)
    if m.eos_token_id is not None and m.eos_token_id != eos:
        raise DataError(f"model.model_config.eos_token_id is {m.eos_token_id} but tokenizer '{name}' has EOS at id "
                        f"{eos}; set model.model_config.eos_token_id={eos}")
    return tok


def _hub_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer of a Hub repository. With the Hub unreachable, the copy in the Hugging Face cache, if any; when
    the tokenizer or a dataset the run would stream is missing, one error names both at once."""
    name, revision = cfg.tokenizer.tokenizer_name_or_path, cfg.tokenizer.tokenizer_revision or "main"
    if not sources.hub_reachable():
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(name, "tokenizer.json", revision=revision)
        needed = [] if isinstance(cached, str) else [f"the tokenizer '{name}' (tokenizer.tokenizer_name_or_path)"]
        for view in (stage_view(cfg, i) for i in range(len(cfg.data_stages))):
            if not _prepared(view):
                needed += [f"the dataset '{d}' ({sources.dataset_key(view)})" for d in
                           sources.hub_datasets(sources.sources(view))]
        if needed:
            raise sources.offline_error(needed)
        return Tokenizer.from_file(cached)
    try:
        return Tokenizer.from_pretrained(name, revision=revision)
    except Exception as e:
        raise DataError(f"tokenizer.tokenizer_name_or_path: cannot load '{name}' from the Hugging Face hub ({e}); "
                        "offline, give the path of a tokenizer.json") from None


def _prepared(cfg: Config) -> bool:
    """Whether prepare finished in the config's output folder (the loader then reads shards, no source)."""
    try:
        with open(os.path.join(data_dir(cfg), shards.STATE), encoding="utf-8") as f:
            return json.load(f).get("done") is True
    except (OSError, ValueError, AttributeError):
        return False


def eos_token_id(tokenizer: Tokenizer) -> int:
    """The id of the end-of-document token (SmolLM2's <|endoftext|>, or another usual spelling of EOS)."""
    for token in EOS_SPELLINGS:
        if (i := tokenizer.token_to_id(token)) is not None:
            return i
    raise DataError(f"the tokenizer has no end-of-document token (looked for {', '.join(EOS_SPELLINGS)})")


def train_tokenizer(cfg: Config) -> Tokenizer:
    """Train a byte-level BPE tokenizer of data_prep.tokenizer_vocab_size tokens on up to tokenizer_train_chars
    characters of the mixed sources and save it at tokenizer.tokenizer_name_or_path. The special tokens take the first
    ids, as in SmolLM2: EOS is 0 (bos_token_id = eos_token_id = 0), and the chat template's <|im_start|> and <|im_end|>
    are 1 and 2, reserved so that a model pretrained here can be fine-tuned to chat (sft.py) with its vocabulary as it
    is. Byte-level: any text encodes, nothing is <unk>."""
    path, size = cfg.tokenizer.tokenizer_name_or_path, cfg.data_prep.tokenizer_vocab_size
    if not path.endswith(".json"):
        raise DataError(f"tokenizer.tokenizer_name_or_path is '{path}': a trained tokenizer is saved to a local file, "
                        "so give a path ending in .json, e.g. data/my-run/tokenizer.json")
    if os.path.exists(path):
        raise DataError(f"{path} exists; delete it to train a new tokenizer (shards made with it become unusable)")
    if size > cfg.model.model_config.vocab_size:
        raise DataError(f"data_prep.tokenizer_vocab_size ({size}) exceeds model.model_config.vocab_size "
                        f"({cfg.model.model_config.vocab_size})")
    srcs = sources.sources(cfg)
    texts = sources.Mixer([sources.documents(s, cfg) for s in srcs], srcs, use_caps=False)   # caps count tokens
    budget = cfg.data_prep.tokenizer_train_chars
    print(f"data: training a {size}-token BPE tokenizer on up to {budget:,} characters of the sources "
          f"(first use; {path})", flush=True)
    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[EOS, *chat.CHAT_TOKENS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(itertools.takewhile(lambda _: sum(texts.taken) < budget, texts), trainer)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    shards.atomic_write(path, tok.to_str().encode())
    print(f"data: tokenizer trained in {time.time() - t0:.1f} s on {sum(texts.taken):,} characters", flush=True)
    return tok


# ---------------------------------------------------------------- prepare: the splits as token shards


def _fingerprint(cfg: Config, tok: Tokenizer) -> str:
    """A hash of every setting that changes the shards' bytes: shards made otherwise are never taken for these."""
    stage = cfg.data_stages[0].data
    ds = stage.dataset
    settings = [shards.VERSION, ds.sources(), cfg.data_prep.max_tokens, stage.seed, ds.text_column_name,
                ds.hf_dataset_config_name, ds.hf_dataset_splits, cfg.data_prep.shard_tokens, cfg.data_prep.val_tokens,
                hashlib.sha256(tok.to_str().encode()).hexdigest()]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def prepare(cfg: Config, tok: Optional[Tokenizer] = None, log: Callable[[str], None] = print) -> dict:
    """Write the validation and training shards to data_dir(cfg), continuing an interrupted run; return the state.

    The held-out documents are kept in memory until the validation split is complete, then written per source; from
    then on the state (committed after each shard, once the shard itself is in place) holds the mixer's position and
    the tokens not yet in a shard, so a continued run rebuilds exactly the stream an uninterrupted one would write."""
    tok = tok or load_tokenizer(cfg)
    out, fingerprint = data_dir(cfg), _fingerprint(cfg, tok)
    with shards.exclusive(os.path.join(out, ".lock")):   # the other ranks wait here, then find the work done
        state = shards.read_state(out, fingerprint) or {"fingerprint": fingerprint, "mixer": None, "split": "val",
                                                        "carry": [], "shards": [], "done": False}
        if state["done"]:
            log(f"data: {out} is already prepared: {_summary(state)}")
            return state
        if "mixer" not in state:
            raise DataError(f"{out} was left half-prepared by an older version of data.py; delete it to prepare again")
        mixer = sources.token_mixer(cfg, tok, eos_token_id(tok), state["mixer"])
        dtype = shards.token_dtype(tok.get_vocab_size())
        w, t0, taken0 = None, time.time(), sum(mixer.taken)
        if state["split"] == "train":
            index = sum(r["split"] == "train" for r in state["shards"])
            w = shards.ShardWriter(out, "train", cfg.data_prep.shard_tokens, dtype, index,
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
        val_tokens = cfg.data_prep.val_tokens
        for is_val, (k, doc) in sources.with_split(mixer.tagged(), val_tokens, 0 if w is None else val_tokens,
                                                   size=lambda item: len(item[1])):
            if is_val:
                held[k].append(doc)
                continue
            rows = []
            if w is None:
                rows = _write_held_out(out, held, mixer.srcs, cfg.data_prep.shard_tokens, dtype)
                w = shards.ShardWriter(out, "train", cfg.data_prep.shard_tokens, dtype, 0, np.zeros(0, np.uint32))
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
    return [prepare(stage_view(cfg, i), tok, log) for i in range(len(cfg.data_stages))]


def _summary(state: dict) -> str:
    return ", ".join(f"{split} {sum(r['tokens'] for r in state['shards'] if r['split'] == split):,} tokens in "
                     f"{sum(r['split'] == split for r in state['shards'])} shard(s)" for split in ("val", "train"))


# ---------------------------------------------------------------- loader


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

    def __init__(self, blocks, cfg: Config, rank: int = 0, world_size: int = 1):
        self.blocks, self.B, self.T = blocks, cfg.tokens.micro_batch_size, cfg.tokens.sequence_length
        self.vocab_size = cfg.model.model_config.vocab_size
        self.rank, self.world_size = rank, world_size
        self.step = 0   # micro-batches this rank has taken

    def next_batch(self):
        import torch   # here, not at the top: prepare and verify never need it, and it takes seconds to import
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


def train_loader(cfg: Config, rank: int = 0, world_size: int = 1,
                 tokenizer: Optional[Tokenizer] = None) -> TokenLoader:
    """The training split of the config's (first) data stage; stages.py serves every stage."""
    return TokenLoader(_split(cfg, "train", rank, tokenizer), cfg, rank, world_size)


def val_loaders(cfg: Config, rank: int = 0, world_size: int = 1,
                tokenizer: Optional[Tokenizer] = None) -> dict[str, TokenLoader]:
    """Each source's held-out documents, source name -> loader (none when data_prep.val_tokens is 0). Loaders cycle;
    call reset() before each evaluation so every evaluation sees the same batches."""
    return {name: TokenLoader(blocks, cfg, rank, world_size)
            for name, blocks in _split(cfg, "val", rank, tokenizer).items()}


def _split(cfg: Config, split: str, rank: int, tok: Optional[Tokenizer]):
    """The training blocks, or {source name: validation blocks}: from prepared shards, from shards prepared now
    (local sources), or streamed (datasets sources)."""
    log = print if rank == 0 else (lambda _: None)
    if tok is None:   # a caller that already holds the tokenizer passes it, so it is not read again
        tok = load_tokenizer(cfg)
    out, block = data_dir(cfg), cfg.tokens.sequence_length + 1
    state = shards.read_state(out, _fingerprint(cfg, tok))
    if not (state and state["done"]) and sources.all_local(sources.sources(cfg)):
        log(f"data: preparing {out} (first use of these sources)")
        state = prepare(cfg, tok, log)
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
    if (hub := sources.hub_datasets(sources.sources(cfg))) and not sources.hub_reachable():
        raise sources.offline_error([f"the dataset '{d}' ({sources.dataset_key(cfg)})" for d in hub])
    log(f"data: no prepared shards in {out}: streaming the {split} split from the sources")
    if split == "train":
        return streaming.StreamedBlocks(cfg, tok, eos_token_id(tok), block)
    return {name: _Blocks(docs, block, f"streamed validation split of '{name}'")
            for name, docs in streaming.held_out(cfg, tok, eos_token_id(tok)).items()}


# ---------------------------------------------------------------- command line


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
    try:
        if args.command == "verify":
            print(shards.verify(args.dir))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "prepare":
            prepare_stages(cfg)
        else:
            tok = train_tokenizer(cfg)
            print(f"data: saved {cfg.tokenizer.tokenizer_name_or_path} ({tok.get_vocab_size()} tokens, "
                  f"EOS {EOS} = {eos_token_id(tok)})")
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # prepare has committed every finished shard
        print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
