"""Conversations and preference pairs as training rows: read, held out, tokenized with the chat template, packed.

Sources (`sft.dataset_name` / `dpo.dataset_name`): a .jsonl file (one example per line), a Hugging Face Hub dataset
streamed through `datasets` (e.g. HuggingFaceTB/smol-smoltalk), or `builtin:chat-tasks` (chat_tasks.py). Validation
reads `dataset_test_split` when there is one; otherwise the first `val_examples` of the shuffled examples are held out,
and training never sees them.

SFT rows. A conversation is tokenized once (chat.encode): inputs x = ids[:-1], targets y = ids[1:], a target kept only
where the next token is the assistant's (-100 elsewhere: no loss on system or user text). With packing, whole
conversations are laid one after another in rows of sequence_length tokens, each with its own segment id, which
model.py turns into positions restarting at 0 and attention kept inside the conversation; the positions left at a
row's end, too few for the next conversation, are padding without a target. Without packing each conversation has a
row of its own, padded at the end. DPO rows: the prompt with the chosen reply and with the rejected one, targets on the
reply only, each padded to a row. A conversation longer than a row keeps its first tokens (sft.truncation_mode
keep_start) or is left out (drop); a pair is cut as TRL cuts it (dpo.max_prompt_length, dpo.max_length). The log
counts each.

sft.py serves the rows through data.TokenLoader's rank split, in the interface of data.StagedLoader: rank r of W
reads micro-batches r, r+W, ...; its position goes into checkpoints.
"""

import json
import random
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from smollm2 import chat, chat_tasks
from smollm2.config import DPOArgs, SFTArgs
from smollm2.errors import DataError

BUILTIN = "builtin:chat-tasks"
IGNORE = -100   # the model's ignore_index: a position with no target


# ---------------------------------------------------------------- reading examples


def read(args: Union[SFTArgs, DPOArgs], split: str, limit: int, seed: int) -> Iterator[dict]:
    """Up to `limit` raw examples of one split of the configured source."""
    name = args.dataset_name
    if name == BUILTIN:
        convert = chat_tasks.as_pair if isinstance(args, DPOArgs) else chat_tasks.as_conversation
        # the built-in stream has no splits: a test split is another seed's prompts, minus those training reads
        rows = map(convert, chat_tasks.examples(seed + (split != args.dataset_train_split), builtin_tasks(args)))
    elif name.endswith(".jsonl"):
        rows = _jsonl(Path(name))
    else:
        rows = _hub(name, args.dataset_config, split)
    return (row for _, row in zip(range(limit), rows))


def builtin_tasks(args: Union[SFTArgs, DPOArgs]) -> Optional[list[str]]:
    """The built-in tasks dataset_config names ("reverse,add"; config_checks refuses an unknown one), None for all
    six."""
    return [n.strip() for n in args.dataset_config.split(",")] if args.dataset_config else None


def _jsonl(path: Path) -> Iterator[dict]:
    if not path.is_file():
        raise DataError(f"{path}: no such file (a .jsonl dataset_name is read from disk)")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not a JSON object ({e.msg})") from None


def _hub(name: str, config: Optional[str], split: str) -> Iterator[dict]:
    try:
        import datasets
        yield from datasets.load_dataset(name, config, split=split, streaming=True)
    except (OSError, ValueError, ConnectionError) as e:   # offline, unknown dataset or split
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"dataset_name '{name}' (split '{split}'): cannot be read ({first[:200]}); offline, give a "
                        f".jsonl file or {BUILTIN}") from None


def held_out(args: Union[SFTArgs, DPOArgs], seed: int) -> tuple[list[dict], list[dict]]:
    """(training examples, validation examples), disjoint, in a seeded random order."""
    budget = args.max_examples or 10 ** 12
    if args.dataset_test_split:
        train = list(read(args, args.dataset_train_split, budget, seed))
        val = list(read(args, args.dataset_test_split, args.val_examples, seed))
        if args.dataset_name == BUILTIN:   # two streams of new prompts: drop the few they share
            seen = {e["prompt"] if "prompt" in e else json.dumps(e["messages"]) for e in train}
            val = [e for e in val if (e["prompt"] if "prompt" in e else json.dumps(e["messages"])) not in seen]
    else:
        examples = list(read(args, args.dataset_train_split, budget + args.val_examples, seed))
        random.Random(seed).shuffle(examples)
        val, train = examples[:args.val_examples], examples[args.val_examples:]
    if not train or not val:
        raise DataError(f"dataset_name '{args.dataset_name}': {len(train)} training and {len(val)} validation "
                        "examples; both splits need at least one (lower val_examples or add examples)")
    return train, val


def pair_of(example: dict, where: str) -> tuple[list[dict], str, str]:
    """A preference example -> (prompt messages, chosen reply, rejected reply). Accepted: prompt as text or messages;
    chosen/rejected as the reply's text or as whole conversations ending with the reply (UltraFeedback's layout)."""
    replies = []
    for key in ("chosen", "rejected"):
        value = example.get(key)
        if isinstance(value, list):
            chat.check_messages(value, f"{where}.{key}")
            if value[-1]["role"] != "assistant":
                raise chat.ChatError(f"{where}.{key}: the last message must be the assistant's reply")
            replies.append((value[:-1], value[-1]["content"]))
        elif isinstance(value, str):
            replies.append((None, value))
        else:
            raise chat.ChatError(f"{where}: expected '{key}' as text or a list of messages, got {value!r:.60}")
    prompt = example.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    prompt = replies[0][0] or prompt   # a whole conversation carries its own prompt
    chat.check_messages(prompt, f"{where}.prompt")
    return prompt, replies[0][1], replies[1][1]


# ---------------------------------------------------------------- tokenized rows


def _inputs_and_targets(ids: list[int], mask: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """x = ids[:-1]; y = ids[1:] where the next token is a target, IGNORE elsewhere."""
    ids_a = np.asarray(ids, dtype=np.int64)
    y = np.where(np.asarray(mask[1:], dtype=bool), ids_a[1:], IGNORE)
    return ids_a[:-1], y


def _counts() -> dict:
    return {"examples": 0, "too_long": 0, "truncated": 0, "prompt_truncated": 0, "no_target": 0, "tokens": 0,
            "targets": 0}


def sft_rows(examples: list[dict], tokenizer, length: int, packing: bool, pad_id: int, *, assistant_only: bool = True,
             truncate: bool = True) -> tuple[np.ndarray, dict]:
    """Conversations -> rows (n, 3, length) of inputs, targets and segment ids (or (n, 2, length) without packing),
    and counts for the log. assistant_only: targets on the assistant's tokens alone (else on every token);
    truncate: a conversation over a row keeps its first tokens (else it is left out)."""
    rows, counts = [], _counts()
    row, used = None, length

    def new_row():
        r = np.full((3 if packing else 2, length), pad_id, dtype=np.int32)
        r[1] = IGNORE
        rows.append(r)
        return r

    for n, example in enumerate(examples):
        ids, mask = chat.encode(tokenizer, chat.check_messages(example.get("messages"), f"example {n}: messages"))
        if len(ids) > length + 1:
            if not truncate:
                counts["too_long"] += 1
                continue
            counts["truncated"] += 1
            ids, mask = ids[:length + 1], mask[:length + 1]
        x, y = _inputs_and_targets(ids, mask if assistant_only else [True] * len(ids))
        if not (y != IGNORE).any():
            counts["no_target"] += 1
            continue
        if not packing or used + len(x) > length:
            row, used = new_row(), 0
        row[0, used:used + len(x)], row[1, used:used + len(x)] = x, y
        if packing:   # segment ids count conversations within the row; the padding after them is one more
            segment = row[2, used - 1] + 1 if used else 0
            row[2, used:] = segment
            row[2, used + len(x):] = segment + 1
        used += len(x)
        counts["examples"] += 1
        counts["tokens"] += len(x)
        counts["targets"] += int((y != IGNORE).sum())
    return np.stack(rows) if rows else np.zeros((0, 3 if packing else 2, length), np.int32), counts


def pair_tokens(tokenizer, example: dict, where: str, max_length: int, max_prompt_length: Optional[int],
                counts: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """A preference pair -> (inputs, targets) of the prompt with the chosen reply and with the rejected one, cut in
    TRL's order: the prompt to its last max_prompt_length tokens first, then prompt and reply to their first
    max_length tokens (the reply loses its end)."""
    prompt, chosen, rejected = pair_of(example, where)
    parts = [chat.encode(tokenizer, prompt + [{"role": "assistant", "content": reply}], last_reply_only=True)
             for reply in (chosen, rejected)]
    start = parts[0][1].index(True)   # the prompt's tokens: the same before either reply
    if max_prompt_length is not None and start > max_prompt_length:
        counts["prompt_truncated"] += 1
        parts = [(ids[start - max_prompt_length:], mask[start - max_prompt_length:]) for ids, mask in parts]
    if max(len(ids) for ids, _ in parts) > max_length:
        counts["truncated"] += 1
        parts = [(ids[:max_length], mask[:max_length]) for ids, mask in parts]
    return [_inputs_and_targets(ids, mask) for ids, mask in parts]


def dpo_rows(examples: list[dict], tokenizer, length: int, pad_id: int, *, max_length: Optional[int] = None,
             max_prompt_length: Optional[int] = None) -> tuple[np.ndarray, dict]:
    """Preference pairs -> rows (n, 4, length): chosen inputs, chosen targets, rejected inputs, rejected targets.
    max_length (prompt and reply; at most length + 1, the default) and max_prompt_length: see pair_tokens."""
    rows, counts = [], _counts()
    for n, example in enumerate(examples):
        parts = pair_tokens(tokenizer, example, f"example {n}", min(max_length or length + 1, length + 1),
                            max_prompt_length, counts)
        if not all((y != IGNORE).any() for _, y in parts):   # the prompt alone fills max_length
            counts["no_target"] += 1
            continue
        row = np.full((4, length), pad_id, dtype=np.int32)
        row[1::2] = IGNORE
        for i, (x, y) in enumerate(parts):
            row[2 * i, :len(x)], row[2 * i + 1, :len(y)] = x, y
            counts["tokens"] += len(x)
            counts["targets"] += int((y != IGNORE).sum())
        rows.append(row)
        counts["examples"] += 1
    return np.stack(rows) if rows else np.zeros((0, 4, length), np.int32), counts
