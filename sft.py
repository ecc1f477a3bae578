"""Supervised fine-tuning: `python sft.py --config configs/config_sft_tiny.yaml [key=value ...] [--resume [PATH]]`.

Teaches a pretrained or imported checkpoint (`sft.model_name_or_path`) to answer in SmolLM2's chat format. It is
pretraining's loop (train.py: LR schedule, accumulation, validation, samples, checkpoints, exact resume, S3, DDP and
FSDP) with another task: the model starts from the checkpoint, with <|im_start|> and <|im_end|> added to its
tokenizer and embedding if it lacks them; the data are conversations (smollm2/chat_data.py), packed; the loss is the
cross-entropy of the assistant's tokens only; samples are replies to `sampling.prompts` sent as user messages.

    python sft.py --config configs/config_sft_tiny.yaml
    python sft.py --config configs/config_sft_tiny.yaml --score runs/tiny runs/tiny-sft   # exact match before and after

Read next: dpo.py, which starts from the SFT checkpoint. SFT builds on smollm2/chat.py (the template and the chat
tokens), chat_data.py (rows) and chat_tasks.py (the built-in tasks of the tiny configs).
"""

import copy
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

import data
import train
from model import ModelConfig, SmolLM2
from smollm2 import chat, chat_data, cli
from smollm2.checkpoint import is_hf_dir, resolve_checkpoint
from smollm2.config import Config, PosttrainArgs
from smollm2.config_checks import validate
from smollm2.config_load import load_config
from smollm2.errors import CheckpointError, ConfigError, DataError, UserError, say_error
from smollm2.loading import load_model
from smollm2.sampling import SamplingParams, generate
from smollm2.task import Task, to_device
from smollm2.tokenizer import eos_token_id, load_tokenizer


def section(cfg: Config, name: str) -> PosttrainArgs:
    """The config's sft or dpo section, which the script of that name needs."""
    if getattr(cfg, name) is None:
        raise ConfigError(f"{name}: this config has no {name} section, which {name}.py needs; see "
                          f"configs/config_{name}_tiny.yaml")
    return getattr(cfg, name)


def start_from(cfg: Config, args: PosttrainArgs) -> tuple[SmolLM2, object, Optional[str]]:
    """The checkpoint args.model_name_or_path names, on the CPU, with a tokenizer that has the chat tokens (added,
    with embedding rows, where missing) -> (model, tokenizer, what was added or None). cfg takes the model's
    architecture and tokenizer, and the checkpoint file a run directory stands for, so a resumed run can check it
    starts from the same one."""
    name = args.model_name_or_path
    if not name.startswith("s3://") and Path(name).is_dir() and not is_hf_dir(name):
        args.model_name_or_path = name = str(resolve_checkpoint(name))   # a run directory: its newest checkpoint
    model, start, info = load_model(name)
    tokenizer_name = info["tokenizer"]
    if not tokenizer_name or (tokenizer_name.endswith(".json") and not os.path.isfile(tokenizer_name)):
        raise CheckpointError(f"{name}: no tokenizer.json beside it, and its config names {tokenizer_name!r}, which "
                              "is not here; put the tokenizer.json it was trained with beside the checkpoint")
    cfg.model.model_config = model.config
    cfg.tokenizer = start.tokenizer
    cfg.tokenizer.tokenizer_name_or_path = tokenizer_name
    validate(cfg)
    if cfg.tokens.sequence_length > model.config.max_position_embeddings:
        raise ConfigError(f"tokens.sequence_length ({cfg.tokens.sequence_length}) exceeds the context of {name} "
                          f"({model.config.max_position_embeddings} tokens); lower tokens.sequence_length")
    tokenizer = load_tokenizer(cfg)
    used = tokenizer.get_vocab_size()
    return model, tokenizer, chat.fit_embeddings(model, tokenizer, chat.add_chat_tokens(tokenizer), used)


# ---------------------------------------------------------------- the rows as micro-batches


class Rows:
    """Row i of the array in data.TokenLoader's `read` interface, cycling: row i + n is row i of the next epoch. With
    a seed, each epoch reads the rows in its own order, a permutation drawn from (seed, epoch): the position alone
    says which row comes next, so a resumed run reads what the uninterrupted one would have. `scores`: floats per
    row (n, k) that travel with it (DPO's precomputed reference log-probs)."""

    def __init__(self, rows: np.ndarray, seed: Optional[int] = None, scores: Optional[np.ndarray] = None):
        self.rows, self.seed, self.scores, self._orders = rows, seed, scores, {}

    def order(self, epoch: int) -> np.ndarray:
        if self.seed is None:
            return np.arange(len(self.rows))
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}   # the one a batch may straddle
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        return self._orders[epoch]

    def indices(self, first: int, count: int) -> list[int]:
        epochs, at = np.divmod(np.arange(first, first + count), len(self.rows))
        return [self.order(int(e))[i] for e, i in zip(epochs, at)]

    def read(self, first: int, count: int) -> np.ndarray:
        return self.rows[self.indices(first, count)]


class RowLoader(data.TokenLoader):
    """TokenLoader's rank split and resumable position over tokenized rows: next_batch() -> one int64 tensor
    (micro_batch_size, sequence_length) per channel of the rows (inputs, targets, segments, ...), then the rows'
    scores (micro_batch_size, k) where they have some."""

    def next_batch(self):
        m = self.rank + self.step * self.world_size
        which = self.blocks.indices(m * self.B, self.B)
        batch = self.blocks.rows[which].astype(np.int64)   # (B, channels, T)
        self.step += 1
        channels = tuple(torch.from_numpy(np.ascontiguousarray(batch[:, c])) for c in range(batch.shape[1]))
        scores = self.blocks.scores
        return channels if scores is None else (*channels, torch.from_numpy(scores[which]))


class ChatData:
    """The training rows and the held-out ones in stages.StagedLoader's interface, which train.py's loop reads: one
    stage (the dataset), one validation source."""

    def __init__(self, name: str, train: RowLoader, val: RowLoader):
        self.name, self.train, self.val = name, train, val
        self.rows = len(train.blocks.rows)   # one epoch

    def begin_step(self, step: int) -> bool:
        return False   # one stage throughout

    def next_batch(self):
        return self.train.next_batch()

    def validation(self) -> list[tuple[str, float, RowLoader]]:
        return [(self.name, 1.0, self.val)]

    def state_dict(self) -> dict:
        return self.train.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.train.load_state_dict(state)


def tokenized(cfg: Config, tokenizer, examples: list[dict]) -> tuple[np.ndarray, dict]:
    """Examples -> (rows, counts) as the config's sft or dpo section has them tokenized, cut and packed."""
    T, pad = cfg.tokens.sequence_length, eos_token_id(tokenizer)
    if cfg.sft is not None:
        return chat_data.sft_rows(examples, tokenizer, T, cfg.sft.packing, pad,
                                  assistant_only=cfg.sft.assistant_only_loss,
                                  truncate=cfg.sft.truncation_mode == "keep_start")
    return chat_data.dpo_rows(examples, tokenizer, T, pad, max_length=cfg.dpo.max_length,
                              max_prompt_length=cfg.dpo.max_prompt_length)


def describe_rows(cfg: Config, counts: dict, rows: np.ndarray, held_out: int) -> str:
    """The start's data line: examples, rows, how full, what share are targets, and what was cut or left out."""
    args, T = cfg.sft or cfg.dpo, cfg.tokens.sequence_length
    what = "conversations" if cfg.sft is not None else "preference pairs"
    length = "a row" if cfg.sft is not None else f"dpo.max_length ({args.max_length or T + 1} tokens)"
    cut = [f"{counts[k]} {label}" for k, label in (
        ("truncated", f"cut to {length}, their start kept"),
        ("prompt_truncated", f"prompts cut to their last {getattr(args, 'max_prompt_length', 0)} tokens "
                             "(dpo.max_prompt_length)"),
        ("too_long", f"left out: longer than {T} tokens"),
        ("no_target", "left out: no reply token to learn")) if counts[k]]
    return (f"data: {counts['examples']:,} {what} from {args.dataset_name} -> {len(rows):,} rows of {T} tokens "
            f"({counts['tokens'] / (len(rows) * T * (rows.shape[1] // 2)):.0%} filled, "
            f"{counts['targets'] / max(counts['tokens'], 1):.0%} of the tokens are targets); {held_out:,} held out"
            + (f"; {', '.join(cut)}" if cut else ""))


def loaders(cfg: Config, tokenizer, rank: int, world: int) -> ChatData:
    """The training rows (in a seeded order, new each epoch) and the validation rows of an SFT or DPO config."""
    args, T = cfg.sft or cfg.dpo, cfg.tokens.sequence_length
    train, val = chat_data.held_out(args, cfg.general.seed)
    (train_rows, counts), (val_rows, _) = (tokenized(cfg, tokenizer, e) for e in (train, val))
    if len(train_rows) == 0 or len(val_rows) == 0:
        what = "conversations" if cfg.sft is not None else "preference pairs"
        raise DataError(f"{args.dataset_name}: no {what} fit in rows of tokens.sequence_length={T} tokens "
                        f"({counts['too_long']} too long); raise tokens.sequence_length")
    if rank == 0:
        print(describe_rows(cfg, counts, train_rows, len(val)), flush=True)
    vocab = cfg.model.model_config.vocab_size
    return ChatData(args.dataset_name, RowLoader(Rows(train_rows, cfg.general.seed), cfg.tokens, vocab, rank, world),
                    RowLoader(Rows(val_rows), cfg.tokens, vocab, rank, world))


# ---------------------------------------------------------------- the task


class SFT(Task):
    """The model starts from a checkpoint; batches are packed conversations; the loss covers the assistant's tokens."""
    section = "sft"
    weighs_by_targets = True   # the mean over every reply token of a step, as TRL and transformers take it

    def __init__(self, cfg: Config):
        self.args = section(cfg, self.section)
        if cfg.model.model_config != ModelConfig():
            raise ConfigError("model.model_config: a fine-tuned model keeps the architecture of its starting "
                              f"checkpoint ({self.section}.model_name_or_path); remove model_config from this config")
        self.start, self._tokenizer, note = start_from(cfg, self.args)
        if note and os.environ.get("RANK", "0") == "0":
            print(note, flush=True)

    def tokenizer(self, cfg: Config):
        return self._tokenizer

    def data(self, cfg: Config, rt, tokenizer) -> ChatData:
        chat_rows = loaders(cfg, tokenizer, rt.rank, rt.world)
        self.rows = chat_rows.rows
        return chat_rows

    def describe_data(self, cfg: Config, step: int) -> str:
        return f"{self.args.dataset_name} ({self.section}.dataset_name)"

    def fit_schedule(self, cfg: Config, rows_per_step: int) -> Optional[str]:
        """TRL's num_train_epochs and warmup_ratio, as the tokens.train_steps and lr_warmup_steps they come to."""
        args, lrs, said = self.args, cfg.optimizer.learning_rate_scheduler, []
        if args.num_train_epochs is not None:
            cfg.tokens.train_steps = max(1, math.ceil(args.num_train_epochs * self.rows / rows_per_step))
            said.append(f"{self.section}.num_train_epochs {args.num_train_epochs:g} over {self.rows:,} rows at "
                        f"{rows_per_step:,} a step: tokens.train_steps={cfg.tokens.train_steps}")
        if args.warmup_ratio is not None:
            lrs.lr_warmup_steps = math.ceil(args.warmup_ratio * cfg.tokens.train_steps)   # as transformers rounds
            said.append(f"{self.section}.warmup_ratio {args.warmup_ratio:g}: lr_warmup_steps={lrs.lr_warmup_steps}")
        return "schedule: " + "; ".join(said) if said else None

    def model(self, cfg: Config, rt, resuming: Optional[dict]) -> SmolLM2:
        if resuming is not None:   # the same start as the run had: a run directory may have gained checkpoints
            before = (resuming["config"].get(self.section) or {}).get("model_name_or_path")
            if before != self.args.model_name_or_path:
                raise CheckpointError(f"this run started from {before}, but {self.section}.model_name_or_path now "
                                      f"gives {self.args.model_name_or_path}; resume with "
                                      f"{self.section}.model_name_or_path={before}")
        return self.start.to(rt.device)

    def loss(self, run, batch) -> tuple[torch.Tensor, dict]:
        """The mean cross-entropy of the micro-batch's targets, and the token accuracy: the share of them the argmax
        of the logits predicts (TRL's mean_token_accuracy; weighed across micro-batches as the loss is)."""
        x, y, *segments = to_device(batch, run.rt.device)   # segments only when packed
        _, (loss, correct) = run.net(x, y, segments=segments[0] if segments else None, count_correct=True)
        return loss, {"token_accuracy": correct / (y != -100).sum().clamp(min=1)}

    def prompt(self, tokenizer, text: str) -> list[int]:
        return chat.prompt_ids(tokenizer, [{"role": "user", "content": text}])

    def stop_id(self, tokenizer) -> int:
        return chat.end_id(tokenizer)


# ---------------------------------------------------------------- measuring: exact match on held-out conversations


@torch.no_grad()
def exact_match(model: SmolLM2, tokenizer, conversations: list[dict], batch_size: int = 64) -> list[bool]:
    """For each conversation, whether the greedy reply to everything before its last message equals that message."""
    end = chat.end_id(tokenizer)
    prompts = [chat.prompt_ids(tokenizer, c["messages"][:-1]) for c in conversations]
    answers = [c["messages"][-1]["content"].strip() for c in conversations]
    longest = max(len(tokenizer.encode(a, add_special_tokens=False).ids) for a in answers)
    params = SamplingParams(max_new_tokens=longest + 2, temperature=0.0)
    hits = []
    for i in range(0, len(prompts), batch_size):
        for reply, answer in zip(generate(model, prompts[i:i + batch_size], params, eos_id=end), answers[i:]):
            hits.append(tokenizer.decode([t for t in reply if t != end]).strip() == answer)
    return hits


def held_out_conversations(cfg: Config) -> list[dict]:
    """The config's validation conversations that end with an assistant reply (the one a model must match)."""
    _, val = chat_data.held_out(cfg.sft, cfg.general.seed)
    return [c for c in val if chat.check_messages(c.get("messages"))[-1]["role"] == "assistant"]


def score(cfg: Config, checkpoint: str) -> dict:
    """Exact match of a checkpoint's greedy replies on the held-out conversations, overall and per task (the
    built-in tasks name theirs). A checkpoint without chat tokens is scored as sft.py would start from it."""
    conversations = held_out_conversations(cfg)
    args = dataclasses.replace(cfg.sft, model_name_or_path=checkpoint)
    model, tokenizer, _ = start_from(copy.deepcopy(cfg), args)
    hits = exact_match(model.eval(), tokenizer, conversations)
    return {"checkpoint": args.model_name_or_path, "exact_match": sum(hits) / len(hits), "n": len(hits),
            "tasks": per_task([c.get("task", "all") for c in conversations], hits)}


def per_task(names: list[str], hits: list) -> dict[str, float]:
    """The share of hits (bools, or 1.0/0.0) of each task, in the order the tasks first appear."""
    tasks: dict[str, list] = {}
    for name, hit in zip(names, hits):
        tasks.setdefault(name, []).append(hit)
    return {name: sum(h) / len(h) for name, h in tasks.items()}


def posttraining_command(argv, doc: str, task: type, score_help: str, report: Callable[[Config, str], str]) -> int:
    """sft.py's and dpo.py's command line: train.py's (--config, --resume, overrides) and --score CHECKPOINT...,
    which measures checkpoints on the config's held-out examples instead of training."""
    parser = cli.arg_parser(doc, f"configs/config_{task.section}_tiny.yaml")
    parser.add_argument("--score", nargs="+", metavar="CHECKPOINT", help=f"instead of training: {score_help}")
    args = parser.parse_args(argv)
    if not args.score:
        return cli.training_command(args, task, f"{task.section}.py", train.train)
    try:
        cfg = load_config(args.config, args.overrides)
        section(cfg, task.section)
        for checkpoint in args.score:
            print(report(cfg, checkpoint), flush=True)
    except UserError as e:
        return say_error(e)
    return 0


def report(cfg: Config, checkpoint: str) -> str:
    r = score(cfg, checkpoint)
    tasks = ", ".join(f"{name} {acc:.2f}" for name, acc in r["tasks"].items())
    return f"{r['checkpoint']}: exact match {r['exact_match']:.3f} on {r['n']} held-out conversations ({tasks})"


def main(argv=None) -> int:
    return posttraining_command(argv, __doc__, SFT, "the exact match of each checkpoint's greedy replies on the "
                                "config's held-out conversations", report)


if __name__ == "__main__":
    sys.exit(main())
