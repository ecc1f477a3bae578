"""Shared fixtures: small text corpora, a small byte-level tokenizer trained on them, and configs reading them;
a recorder of the largest tensor an operation creates."""

import random
import resource
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils._python_dispatch import TorchDispatchMode

from smollm2.config_load import config_from_dict
from smollm2.tokenizer import train_tokenizer

WORDS = "the a of model token data shard rank block loss step and to in for is on that with résumé 数据".split()


def corpus(folder, tag: str, n: int, seed: int = 0) -> list[str]:
    """Write n documents as folder/<tag>_<i>.txt; each starts with its own '<tag>-<i>:' and ends without a newline."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{tag}{seed}")
    texts = []
    for i in range(n):
        text = f"{tag}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80)))
        (folder / f"{tag}_{i:04d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


def byte_bpe(texts: list[str], vocab_size: int, special: tuple = ("<|endoftext|>",)) -> Tokenizer:
    """A byte-level BPE with <|endoftext|> as id 0 (then any other special tokens), as data.py trains for real runs,
    in miniature."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.token_to_id("<|endoftext|>") == 0
    return tok


def build_config(tmp_path, tokenizer: str, dataset: dict, **data_prep):
    """A config whose data sections read `dataset` with `tokenizer`; everything else is small."""
    return config_from_dict({
        "data_stages": [{"data": {"dataset": dataset, "seed": 7}}],
        "general": {"run": "test"},
        "model": {"model_config": {"vocab_size": 512, "max_position_embeddings": 64, "hidden_size": 32,
                                   "num_attention_heads": 2, "num_key_value_heads": 1}},
        "tokenizer": {"tokenizer_name_or_path": tokenizer},
        "tokens": {"sequence_length": 15, "micro_batch_size": 2},
        "data_prep": {"output_dir": str(tmp_path / "shards"), "shard_tokens": 1000, "val_tokens": 300,
                      "tokenizer_vocab_size": 300, **data_prep},
    })


@pytest.fixture(scope="session")
def bpe_path(tmp_path_factory) -> str:
    """A 300-token byte-level BPE tokenizer trained by train_tokenizer on a corpus like the tests' ones."""
    root = tmp_path_factory.mktemp("bpe")
    corpus(root / "text", "doc", 200)
    path = str(root / "tokenizer.json")
    train_tokenizer(build_config(root, path, {"dataset_folder": str(root / "text")}))
    return path


class LargestTensor(TorchDispatchMode):
    """`with LargestTensor() as rec:` records in rec.numel the element count of the largest tensor any operation
    returns inside the block, backward included (on the CPU autograd runs the backward on the calling thread)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def can_mount_tmpfs() -> bool:
    """Whether a user namespace may mount a tmpfs here (util-linux's unshare; some containers forbid it)."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1M tmpfs /mnt"], capture_output=True).returncode == 0


def run_on_a_full_disk(folder: Path, argv: list[str], cwd, size_kb: int, file_limit_kb: int):
    """Run argv with `folder` on a file system of size_kb, which a user namespace may mount (a tmpfs) without root:
    its writes fail with ENOSPC once it is full. Where namespaces are forbidden, the kernel's file-size limit of
    file_limit_kb refuses writes instead (EFBIG). -> (exit code, stdout, stderr, files left in folder, the reason a
    refused write gives)."""
    folder.mkdir(parents=True, exist_ok=True)
    if can_mount_tmpfs():
        script = (f"mount -t tmpfs -o size={size_kb}k tmpfs {shlex.quote(str(folder))} && {shlex.join(map(str, argv))};"
                  f" echo \"--- $?\"; find {shlex.quote(str(folder))} -mindepth 1 -type f -printf '%P\\n'")
        proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, cwd=cwd,
                              timeout=600)
        out, _, tail = proc.stdout.rpartition("--- ")
        code, *files = tail.split("\n")
        return int(code), out, proc.stderr, sorted(f for f in files if f), "No space left on device"
    limit = file_limit_kb * 1024
    proc = subprocess.run(list(map(str, argv)), capture_output=True, text=True, cwd=cwd, timeout=600,
                          preexec_fn=lambda: (signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
                                              resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))))
    files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())
    return proc.returncode, proc.stdout, proc.stderr, files, "File too large"


# two conversations a tiny model learns by heart in seconds: enough to hold a chat that ends its replies itself
CHATS = [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there, friend"},
          {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "very well, thanks"}],
         [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you soon"}]]


def train_chat_model(run_dir, steps: int = 120):
    """A tiny SmolLM2 trained on CHATS in SmolLM2's chat format, saved as train.py lays a run out (a checkpoint with
    its config, tokenizer.json beside it); returns the model."""
    import numpy as np
    import torch

    from model import SmolLM2
    from smollm2 import chat, chat_data
    from smollm2.checkpoint import save_atomic
    from smollm2.config_load import config_to_dict
    # enough merges (356 tokens in all) that a two-turn prompt, default system turn included, is 45 tokens: it fits
    # the 64-token prompt limit of tests/test_app.py's server
    tok = byte_bpe([chat.render(c) for c in CHATS] * 20, 400, ("<|endoftext|>", *chat.CHAT_TOKENS))
    cfg = config_from_dict({"model": {"model_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 384, "max_position_embeddings": 128}},
        "tokens": {"sequence_length": 128}})
    rows, _ = chat_data.sft_rows([{"messages": c} for c in CHATS], tok, 128, packing=True, pad_id=0)
    x, y, seg = (torch.from_numpy(rows[:, c].astype(np.int64)) for c in range(3))
    torch.manual_seed(0)
    model = SmolLM2(cfg.model.model_config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        _, loss = model(x, y, segments=seg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_atomic({"model": model.state_dict(), "config": config_to_dict(cfg),
                 "train_state": {"step": steps, "tokens_seen": 0, "val_loss": loss.item()}},
                run_dir / "checkpoints" / f"step_{steps:08d}.pt")
    tok.save(str(run_dir / "tokenizer.json"))
    return model.eval()
