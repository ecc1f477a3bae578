"""Supervised fine-tuning: `python sft.py --config config_sft_tiny.yaml [key=value ...] [--resume [PATH]]`.

Teaches a pretrained or imported checkpoint (`sft.model_name_or_path`) to answer in SmolLM2's chat format. It is
pretraining's loop (train.py: LR schedule, accumulation, validation, samples, checkpoints, exact resume, S3, DDP and
FSDP) with another task: the model starts from the checkpoint, with <|im_start|> and <|im_end|> added to its
tokenizer and embedding if it lacks them; the data are conversations (chat_data.py), packed; the loss is the
cross-entropy of the assistant's tokens only; samples are replies to `sampling.prompts` sent as user messages.

    python sft.py --config config_sft_tiny.yaml
    python sft.py --config config_sft_tiny.yaml --score runs/tiny runs/tiny-sft   # exact match before and after
"""

import copy
import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

import chat
import chat_data
import data
import train
from checkpoint import CheckpointError, is_hf_dir, load_model, resolve_checkpoint
from config import Config, ConfigError, ModelConfig, PosttrainArgs, load_config, validate
from model import SmolLM2
from sampling import SamplingParams, generate


def section(cfg: Config, name: str) -> PosttrainArgs:
    """The config's sft or dpo section, which the script of that name needs."""
    if getattr(cfg, name) is None:
        raise ConfigError(f"{name}: this config has no {name} section, which {name}.py needs; see "
                          f"config_{name}_tiny.yaml")
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
    validate(cfg)   # e.g. tokens.sequence_length against this model's context
    tokenizer = data.load_tokenizer(cfg)
    used = tokenizer.get_vocab_size()
    return model, tokenizer, chat.fit_embeddings(model, tokenizer, chat.add_chat_tokens(tokenizer), used)


class SFT(train.Pretraining):
    """The model starts from a checkpoint; batches are packed conversations; the loss covers the assistant's tokens."""
    section = "sft"

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

    def data(self, cfg: Config, rt, tokenizer) -> chat_data.ChatData:
        return chat_data.loaders(cfg, tokenizer, rt.rank, rt.world)

    def describe_data(self, cfg: Config, step: int) -> str:
        return f"{self.args.dataset_name} ({self.section}.dataset_name)"

    def model(self, cfg: Config, rt, resuming: Optional[dict]) -> SmolLM2:
        if resuming is not None:   # the same start as the run had: a run directory may have gained checkpoints
            before = (resuming["config"].get(self.section) or {}).get("model_name_or_path")
            if before != self.args.model_name_or_path:
                raise CheckpointError(f"this run started from {before}, but {self.section}.model_name_or_path now "
                                      f"gives {self.args.model_name_or_path}; resume with "
                                      f"{self.section}.model_name_or_path={before}")
        return self.start.to(rt.device)

    def loss(self, run, batch) -> tuple[torch.Tensor, dict]:
        x, y, *segments = (t.to(run.rt.device, non_blocking=True) for t in batch)   # segments only when packed
        return run.net(x, y, segments=segments[0] if segments else None)[1], {}

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
    tasks: dict[str, list[bool]] = {}
    for c, hit in zip(conversations, hits):
        tasks.setdefault(c.get("task", "all"), []).append(hit)
    return {"checkpoint": args.model_name_or_path, "exact_match": sum(hits) / len(hits), "n": len(hits),
            "tasks": {name: sum(h) / len(h) for name, h in tasks.items()}}


def command(argv, doc: str, task: type, score_help: str, report: Callable[[Config, str], str]) -> int:
    """sft.py's and dpo.py's command line: train.py's (--config, --resume, overrides) and --score CHECKPOINT...,
    which measures checkpoints on the config's held-out examples instead of training."""
    parser = train.arg_parser(doc, f"config_{task.section}_tiny.yaml")
    parser.add_argument("--score", nargs="+", metavar="CHECKPOINT", help=f"instead of training: {score_help}")
    args = parser.parse_args(argv)
    if not args.score:
        return train.run_command(args, task, f"{task.section}.py")
    try:
        cfg = load_config(args.config, args.overrides)
        section(cfg, task.section)
        for checkpoint in args.score:
            print(report(cfg, checkpoint), flush=True)
    except (ConfigError, CheckpointError, chat.ChatError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def report(cfg: Config, checkpoint: str) -> str:
    r = score(cfg, checkpoint)
    tasks = ", ".join(f"{name} {acc:.2f}" for name, acc in r["tasks"].items())
    return f"{r['checkpoint']}: exact match {r['exact_match']:.3f} on {r['n']} held-out conversations ({tasks})"


def main(argv=None) -> int:
    return command(argv, __doc__, SFT, "the exact match of each checkpoint's greedy replies on the config's "
                   "held-out conversations", report)


if __name__ == "__main__":
    sys.exit(main())
