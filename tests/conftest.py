"""Fixtures several test files share, each made once per session and only read by the tests: a small byte-level
tokenizer, a code corpus with its tokenizer and shards ready for train.py, and a run directory of two random tiny
models for generation, and for sft.py/dpo.py a fresh small chat base and an SFT run of a 4-layer model on the
built-in tasks. Plain helpers are in helpers.py."""

from pathlib import Path

import pytest
from helpers import (build_config, byte_bpe, make_base, make_config, run_script, save_checkpoint, tiny_model,
                     write_code_corpus, write_config, write_documents)

from smollm2.config_load import load_config
from smollm2.prepare import prepare_stages
from smollm2.tokenizer import train_tokenizer

# the text of tiny_tokenizer_file: Latin, accented, code, CJK and emoji, so streaming meets multi-byte characters
GENERATION_TEXT = ("The quick brown fox jumps over the lazy dog. Café déjà vu, naïve façade; Grüße aus Köln. "
                   "def main():\n    return 0\n\nimport os\nprint(os.getcwd())\n"
                   "日本語のテキスト、中文文本。🙂 🚀\n") * 40


@pytest.fixture(scope="session")
def bpe_path(tmp_path_factory) -> str:
    """A 300-token byte-level BPE tokenizer trained by train_tokenizer on a corpus like the tests' ones."""
    root = tmp_path_factory.mktemp("bpe")
    write_documents(root / "text", "doc", 200)
    path = str(root / "tokenizer.json")
    train_tokenizer(build_config(root, path, {"dataset_folder": str(root / "text")}))
    return path


@pytest.fixture(scope="session")
def code_corpus(tmp_path_factory) -> Path:
    """The folder helpers.make_config reads: text/ (write_code_corpus), the tokenizer.json trained on it and the
    shards/ of its tokens, all made here, before any test (two torchrun ranks included) reads them."""
    root = tmp_path_factory.mktemp("code_corpus")
    write_code_corpus(root / "text")
    prepare_stages(load_config(str(make_config(root / "prepare", root))), log=lambda _: None)
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer_file(tmp_path_factory) -> Path:
    """A 300-token byte-level BPE with <|endoftext|> as id 0, trained on GENERATION_TEXT."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    byte_bpe([GENERATION_TEXT], 300).save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_tokenizer_file) -> Path:
    """A run directory of two random helpers.tiny_model checkpoints, seed 1 at step 100 (val loss 4.5) and seed 2 at
    step 200 (3.25), with tiny_tokenizer_file as its tokenizer.json."""
    run = tmp_path_factory.mktemp("run")
    (run / "tokenizer.json").write_bytes(tiny_tokenizer_file.read_bytes())
    save_checkpoint(run, tiny_model(seed=1), 100, 4.5)
    save_checkpoint(run, tiny_model(seed=2), 200, 3.25)
    return run


@pytest.fixture(scope="session")
def small_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("small") / "base", hidden=64, layers=2)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(config, starting checkpoint, run dir) of an 800-step SFT of a fresh 4-layer model on the built-in tasks,
    checkpointed at steps 400 and 800. The first skill (count) is whole by step 200 under every seed; the second
    (fact) grows steadily, and where it ends depends on the seed and on the CPU's floating-point order: held-out fact
    0.73-0.97 at step 800 over seeds 1-3 and two machines (seed 2: 0.97 here, 0.73 on CI), 0.33 at step 200 and
    0.27-0.66 at step 400 (seed 2: 0.27 here), where GRPO's learning test starts."""
    tmp = tmp_path_factory.mktemp("sft")
    base = make_base(tmp / "base", hidden=128, layers=4)
    config = write_config(tmp, "sft", base, **{
        "sft.max_examples": 8000, "sft.val_examples": 200, "tokens.micro_batch_size": 16, "tokens.train_steps": 800,
        "tokens.val_check_interval": 200, "checkpoints.checkpoint_interval": 400, "tokens.limit_val_batches": 4,
        "general.seed": 2,
        "optimizer.learning_rate_scheduler.learning_rate": 5e-3, "optimizer.learning_rate_scheduler.min_decay_lr": 5e-4,
        "sampling.interval": 800, "sampling.prompts": ["How many items are in this list?\nowl,sun,tree"]})
    out = run_script("sft.py", "--config", config, threads=2).stdout
    assert "chat: the tokenizer had no <|im_start|>, <|im_end|>: added as ids 512, 513" in out
    assert "sample @ 800 | 'How many items are in this list?\\nowl,sun,tree' -> '3'" in out   # ended by <|im_end|>
    return config, base, tmp / "run"


@pytest.fixture(scope="session")
def chat_model_run(tmp_path_factory) -> Path:
    """A run directory of helpers.train_chat_model's model, which holds CHATS' conversations: trained once, on one
    thread, for test_chat.py and test_app.py."""
    from helpers import torch_threads, train_chat_model
    run = tmp_path_factory.mktemp("chat_model") / "run"
    with torch_threads(1):
        train_chat_model(run)
    return run
