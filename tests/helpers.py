"""What several test files share that is not a fixture (those are in conftest.py): small corpora and tokenizers,
configs and runs of train.py, sft.py and dpo.py, a tiny model for generation, a recorder of tensor sizes, and ways to make a process
fail as users see processes fail (a full disk, a SIGKILL at a chosen step).

    from helpers import make_config, run_train
"""

import contextlib
import inspect
import itertools
import json
import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils._python_dispatch import TorchDispatchMode

from model import ModelConfig, SmolLM2
from smollm2 import chat, chat_data, chat_tasks
from smollm2.checkpoint import checkpoint_name, save_atomic
from smollm2.config_load import config_from_dict, config_to_dict
from smollm2.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- corpora and tokenizers

WORDS = "the a of model token data shard rank block loss step and to in for is on that with résumé 数据".split()


def write_documents(folder: Path, tag: str, n: int, seed: int = 0) -> list[str]:
    """Write n documents of random WORDS as folder/<tag>_<i>.txt; each starts with its own '<tag>-<i>:' and ends
    without a newline. Returns their texts."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{tag}{seed}")
    texts = []
    for i in range(n):
        text = f"{tag}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80)))
        (folder / f"{tag}_{i:04d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


def write_code_corpus(folder: Path) -> None:
    """~150 KB of real text with structure a tiny model can learn: a few standard-library modules."""
    folder.mkdir(parents=True)
    for mod in (textwrap, json.decoder, json.encoder, inspect):
        (folder / f"{mod.__name__}.py").write_text(inspect.getsource(mod))


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


def build_config(tmp_path: Path, tokenizer: str, dataset: dict, **data_prep):
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


def datatrove_tokenize(texts: list[str], out: Path, tokenizer: str, eos: bool = True, tasks: int = 2) -> None:
    """datatrove's own pipeline: a JSON-lines reader and DocumentTokenizer (which shuffles documents per file)."""
    # imported here, as validate_params below: each takes seconds, which only the tests that use them should pay
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    src = out.parent / f"{out.name}_input"
    src.mkdir()
    with open(src / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    LocalPipelineExecutor(pipeline=[JsonlReader(str(src)),
                                    DocumentTokenizer(str(out), tokenizer_name_or_path=tokenizer, seed=5,
                                                      eos_token="<|endoftext|>" if eos else None)],
                          tasks=tasks, workers=1, logging_dir=str(out.parent / f"{out.name}_logs")).run()


# ---------------------------------------------------------------- train.py runs


def make_config(tmp: Path, corpus: Path, **overrides) -> Path:
    """A tiny run (64-wide, 2 layers, 12 steps) of config_tiny.yaml on a code corpus (the folder `corpus`, whose text/
    write_code_corpus wrote; its tokenizer.json and shards/ are made there at first use), writing its run to
    tmp/run. overrides: dotted keys, e.g. **{"tokens.train_steps": 4}."""
    cfg = yaml.safe_load((ROOT / "config_tiny.yaml").read_text())
    cfg["data_stages"][0]["data"]["dataset"] = {"dataset_folder": [str(corpus / "text")]}
    cfg["model"]["model_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                        max_position_embeddings=64)
    cfg["tokenizer"]["tokenizer_name_or_path"] = str(corpus / "tokenizer.json")
    cfg["data_prep"].update(output_dir=str(corpus / "shards"), val_tokens=4000, shard_tokens=20000,
                            tokenizer_vocab_size=512)
    cfg["tokens"].update(sequence_length=32, micro_batch_size=4, batch_accumulation_per_replica=1, train_steps=12,
                         val_check_interval=4, limit_val_batches=2)
    cfg["optimizer"]["learning_rate_scheduler"].update(lr_warmup_steps=3, lr_decay_starting_step=6, lr_decay_steps=6)
    cfg["checkpoints"].update(checkpoints_path=str(tmp / "run"), checkpoint_interval=4)
    cfg["logging"]["iteration_step_info_interval"] = 1
    cfg["run"].update(keep_last_checkpoints=10)
    cfg["sampling"]["interval"] = 0
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_command(config: Path, *args, ranks: int = 1, script: str = "train.py") -> list[str]:
    """The command line of `python train.py --config config *args` (or sft.py, dpo.py), under torchrun where ranks
    is more than 1: that many processes of one machine, talking through gloo."""
    command = [str(ROOT / script), "--config", str(config), *map(str, args)]
    if ranks == 1:
        return [sys.executable, *command]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *command]


def run_at_once(*commands: list, check: bool = True, env=None) -> list[subprocess.CompletedProcess]:
    """Run the command lines at the same time, each on one OpenMP thread unless env says otherwise, and wait for all:
    two single-process runs share two cores, where one after the other would leave a core idle through each one's
    start-up. check: a non-zero exit fails the test, showing the end of that command's output."""
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    with contextlib.ExitStack() as stack:
        files = [[stack.enter_context(tempfile.TemporaryFile("w+")) for _ in "oe"] for _ in commands]
        procs = [subprocess.Popen(list(map(str, command)), cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
                 for command, (out, err) in zip(commands, files)]
        done = []
        for proc, (out, err) in zip(procs, files):
            proc.wait(timeout=600)
            out.seek(0), err.seek(0)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()))
    for proc in done:
        if check and proc.returncode != 0:
            raise AssertionError(f"{shlex.join(proc.args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")
    return done


def run_train(config: Path, *args, check=True, env=None) -> subprocess.CompletedProcess:
    """`python train.py --config config *args`; check: a non-zero exit fails the test, showing the output's end."""
    return run_at_once(train_command(config, *args), check=check, env=env or dict(os.environ))[0]


def torchrun(config: Path, *args, nproc: int = 2, env=None) -> subprocess.CompletedProcess:
    """train.py on nproc processes of one machine (gloo on the CPU), one OpenMP thread each."""
    return run_at_once(train_command(config, *args, ranks=nproc), check=False, env=env)[0]


def losses(run_dir: Path, kind="train") -> list[tuple[int, float]]:
    """(step, loss) of each record of that kind in the run's metrics.jsonl."""
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


# ---------------------------------------------------------------- processes that fail


# `python -c SIGNAL_AT NAME STEP SCRIPT ARGS...`: SCRIPT's main(ARGS), which sends itself the signal NAME as its
# optimizer step STEP begins: the signal lands mid-run, at a known step, on a machine of any speed. Under torchrun
# rank 0 sends it, and a SIGKILL takes the launcher and every rank down at once, as when the machine is lost.
SIGNAL_AT = """
import importlib, os, signal, sys
from pathlib import Path
import train
name, step, script, *argv = sys.argv[1:]
real_step = train.optimizer_step
def optimizer_step(run, progress):
    if run.step + 1 == int(step) and os.environ.get("RANK", "0") == "0":   # after rank 0 has logged the step before
        sig = getattr(signal, name)
        if sig == signal.SIGKILL and "TORCHELASTIC_RUN_ID" in os.environ:
            launcher = os.getppid()
            ranks = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
            for pid in [launcher, *(int(r) for r in ranks if int(r) != os.getpid())]:
                os.kill(pid, sig)
        os.kill(os.getpid(), sig)
    return real_step(run, progress)
train.optimizer_step = optimizer_step
sys.exit(importlib.import_module(script.removesuffix(".py")).main(argv))
"""


def signalled_at(step: int, name: str, script: str, *args, ranks: int = 1) -> list[str]:
    """The command line that runs `script *args` (train.py, sft.py or dpo.py), on one process or under torchrun on
    `ranks`, and sends it the signal `name` ("SIGKILL", "SIGINT") as its optimizer step `step` begins."""
    here = [sys.executable, "-c", SIGNAL_AT, name, str(step), script, *map(str, args)]
    if ranks == 1:
        return here
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            "--no-python", *here]


def can_mount_tmpfs() -> bool:
    """Whether a user namespace may mount a tmpfs here (util-linux's unshare; some containers forbid it)."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1M tmpfs /mnt"], capture_output=True).returncode == 0


def run_on_a_full_disk(folder: Path, argv: list, cwd, size_kb: int, file_limit_kb: int):
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


# ---------------------------------------------------------------- small models


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


def tiny_config(**overrides) -> ModelConfig:
    """The 2-layer, 64-wide model of the generation tests, with a 320-token vocabulary and a 128-token context."""
    return ModelConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=320, max_position_embeddings=128), **overrides})


def tiny_model(seed: int = 0, **overrides) -> SmolLM2:
    """A random tiny_config model in eval mode."""
    # a large init std makes the logits of a random model decisive, so greedy choices are not near-ties
    torch.manual_seed(seed)
    return SmolLM2(tiny_config(**overrides), init_std=0.3).eval()


def save_checkpoint(run_dir: Path, model: SmolLM2, step: int, val_loss) -> Path:
    """A training checkpoint of `model` in train.py's format, as run_dir/checkpoints/step_<step>.pt."""
    cfg = config_from_dict({"model": {"model_config": asdict(model.config)},
                            "tokens": {"sequence_length": model.config.max_position_embeddings}})
    path = run_dir / "checkpoints" / f"step_{step:08d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg),
                "train_state": {"step": step, "tokens_seen": step * 1000, "val_loss": val_loss}}, path)
    return path


# the text a run made by make_run has its tokenizer trained on
RUN_TEXT = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. Once upon a time, 42."


def write_run_tokenizer(path: Path) -> Path:
    """A 300-token byte-level BPE trained on RUN_TEXT, saved as `path`."""
    byte_bpe([RUN_TEXT] * 20, 300).save(str(path))
    return path


def make_run(run_dir: Path, tied: bool = True, context: int = 128) -> SmolLM2:
    """A run directory as train.py leaves it: checkpoints/step_00000100.pt of a 2-layer model with
    validate_params.py's parity weights, and the run's tokenizer.json. Returns the model, in eval mode."""
    import validate_params
    cfg = config_from_dict({
        "model": {"init_method": {"std": 0.05},
                  "model_config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                   "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 320,
                                   "max_position_embeddings": context, "tie_word_embeddings": tied}},
        "tokens": {"sequence_length": context},
        "tokenizer": {"tokenizer_name_or_path": str(run_dir / "tokenizer.json")}})
    model = SmolLM2(cfg.model.model_config)
    validate_params.parity_weights(model, 0.05, seed=0)
    run_dir.mkdir(parents=True)
    write_run_tokenizer(run_dir / "tokenizer.json")
    save_atomic({"model": model.state_dict(), "config": config_to_dict(cfg),
                 "train_state": {"step": 100, "tokens_seen": 12800, "val_loss": 5.0}},
                run_dir / "checkpoints" / checkpoint_name(100))
    return model.eval()


# two conversations a tiny model learns by heart in seconds: enough to hold a chat that ends its replies itself
CHATS = [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there, friend"},
          {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "very well, thanks"}],
         [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you soon"}]]


def train_chat_model(run_dir: Path, steps: int = 120) -> SmolLM2:
    """A tiny SmolLM2 trained on CHATS in SmolLM2's chat format, saved as train.py lays a run out (a checkpoint with
    its config, tokenizer.json beside it); returns the model."""
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


# ---------------------------------------------------------------- sft.py and dpo.py runs

# one thread: the smallest models gain little from a second, and on a busy machine OpenMP's waiting threads make a run
# several times slower; the learning runs' wider model takes two (1.8x faster)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def make_base(run_dir: Path, hidden: int, layers: int) -> Path:
    """A freshly initialised model saved as a pretraining run (checkpoint + tokenizer.json without chat tokens)."""
    texts = [chat.render(chat_tasks.as_conversation(e)["messages"])
             for e in itertools.islice(chat_tasks.examples(seed=99), 3000)]
    tok = byte_bpe(texts, 512)
    run_dir.mkdir(parents=True)
    tok.save(str(run_dir / "tokenizer.json"))
    cfg = config_from_dict({"model": {"model_config": {
        "hidden_size": hidden, "intermediate_size": 2 * hidden + hidden // 2, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}},
        "tokens": {"sequence_length": 256}, "tokenizer": {"tokenizer_name_or_path": str(run_dir / "tokenizer.json")}})
    torch.manual_seed(0)
    save_atomic({"model": SmolLM2(cfg.model.model_config).state_dict(), "config": config_to_dict(cfg),
                 "train_state": {"step": 0}}, run_dir / "checkpoints" / "step_00000000.pt")
    return run_dir


def write_config(folder: Path, section: str, start: Path, **overrides) -> Path:
    """An sft/dpo config starting from `start` with the built-in tasks, writing its run to folder/run."""
    cfg = {section: {"model_name_or_path": str(start), "max_examples": 1000, "val_examples": 64},
           "tokens": {"sequence_length": 128, "micro_batch_size": 8, "train_steps": 12, "val_check_interval": 6,
                      "limit_val_batches": 2},
           "optimizer": {"learning_rate_scheduler": {"learning_rate": 3e-3, "lr_warmup_steps": 5,
                                                     "lr_decay_style": "cosine", "min_decay_lr": 3e-4},
                         "weight_decay": 0.01},
           "checkpoints": {"checkpoints_path": str(folder / "run"), "checkpoint_interval": 6},
           "logging": {"iteration_step_info_interval": 1}, "model": {"dtype": "float32"},
           "run": {"keep_last_checkpoints": 10}, "sampling": {"interval": 0},
           "general": {"seed": 1}}
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "config.yaml"


def run_script(script: str, *args, check: bool = True, threads: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": str(threads)}, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def scores(script: str, config: Path, *checkpoints, key: str) -> list[float]:
    """`sft.py/dpo.py --score`: the figure after `key` on each checkpoint's line."""
    out = run_script(script, "--config", config, "--score", *checkpoints).stdout.strip().splitlines()
    assert len(out) == len(checkpoints), out
    return [float(line.split(key, 1)[1].split()[0].rstrip(",")) for line in out]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n inside the block, as before after it: a tiny model trained in the test's
    own process gains nothing from a second thread and, on a busy machine, loses ~10x to OpenMP's waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
