"""data.py prepare / verify and shards.py: the shard format, continuing after a kill, checksums, errors."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import build_config, run_at_once, run_on_a_full_disk, write_documents
from tokenizers import Tokenizer

import data
from smollm2 import prepare, shards
from smollm2.config_load import config_to_dict
from smollm2.errors import DataError
from smollm2.stages import stages_of

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "data.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))} | {
        "manifest.jsonl": (folder / "manifest.jsonl").read_bytes()}


def test_shards_store_uint16_while_the_vocab_fits_and_describe_themselves(tmp_path):
    for vocab, dtype in ((2**16, np.uint16), (2**16 + 1, np.uint32)):
        tokens = np.array([0, 5, vocab - 1], np.uint32)
        row = shards.write_shard(str(tmp_path), f"s{vocab}.bin", "train", tokens, shards.token_dtype(vocab))
        path = tmp_path / row["file"]
        assert path.stat().st_size == shards.HEADER.size + 3 * np.dtype(dtype).itemsize
        assert path.read_bytes()[:8] == b"SMOLTOKS"
        read = shards.open_shard(str(path), vocab)
        assert read.dtype == dtype and read.tolist() == tokens.tolist()


def test_a_shard_with_ids_outside_the_model_vocab_is_refused_by_name(tmp_path):
    shards.write_shard(str(tmp_path), "train_000000.bin", "train", np.array([1, 9000]), np.dtype(np.uint16))
    with pytest.raises(DataError, match=r"train_000000.bin: holds token id 9000, outside .*vocab_size 8192"):
        shards.open_shard(str(tmp_path / "train_000000.bin"), 8192)


def test_a_truncated_shard_is_refused_by_name(tmp_path):
    shards.write_shard(str(tmp_path), "a.bin", "train", np.arange(100), np.dtype(np.uint16))
    with open(tmp_path / "a.bin", "r+b") as f:
        f.truncate(shards.HEADER.size + 150)
    with pytest.raises(DataError, match=r"a.bin: 182 bytes, but its header promises 100 tokens"):
        shards.open_shard(str(tmp_path / "a.bin"), 512)


@pytest.fixture
def setup(tmp_path, bpe_path):
    write_documents(tmp_path / "text", "doc", 300)
    return build_config(tmp_path, bpe_path, {"dataset_folder": str(tmp_path / "text")}, shard_tokens=500)


def test_prepare_writes_manifest_and_state_and_a_second_run_changes_nothing(setup, tmp_path):
    [first] = prepare.prepare_stages(setup, log=lambda _: None)
    out = tmp_path / "shards"
    rows = [json.loads(line) for line in open(out / "manifest.jsonl")]
    assert rows == first["shards"] and first["done"]
    assert [r["split"] for r in rows] == ["val"] + ["train"] * (len(rows) - 1)
    assert all(r["tokens"] == 500 for r in rows[1:-1]), "every training shard but the last is full"
    assert not list(out.glob("*.tmp")), "no temporary file is left behind"
    before = snapshot(out)
    prepare.prepare_stages(setup, log=lambda _: None)
    assert snapshot(out) == before
    assert "shards ok" in shards.verify(str(out))


def test_a_one_stage_fingerprint_is_the_one_folders_were_prepared_with_before_stages_were_objects(setup, bpe_path):
    """The hash of the formula that read the whole config's data_stages[0], inputs and order as they were: shards
    prepared before are still found, not made again."""
    setup.data_prep.max_tokens = {setup.data_stages[0].data.dataset.dataset_folder: 4000}   # every input set
    data_args, prep, tok = setup.data_stages[0].data, setup.data_prep, Tokenizer.from_file(bpe_path)
    ds = data_args.dataset
    before = [shards.VERSION, ds.sources(), prep.max_tokens, data_args.seed, ds.text_column_name,
              ds.hf_dataset_config_name, ds.hf_dataset_splits, prep.shard_tokens, prep.val_tokens,
              hashlib.sha256(tok.to_str().encode()).hexdigest()]
    fingerprint = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert prepare.shards_fingerprint(stages_of(setup)[0], prep, tok) == fingerprint
    [state] = prepare.prepare_stages(setup, log=lambda _: None)
    assert state["fingerprint"] == fingerprint


def test_prepared_folder_of_other_settings_is_an_error_not_silently_reused(setup):
    prepare.prepare_stages(setup, log=lambda _: None)
    setup.data_prep.shard_tokens = 400
    with pytest.raises(DataError, match="made with other data settings or another tokenizer"):
        prepare.prepare_stages(setup, log=lambda _: None)
    with pytest.raises(DataError, match="made with other data settings"):
        data.train_loader(setup)


def test_prepare_killed_at_any_point_continues_to_byte_identical_shards(tmp_path, bpe_path):
    write_documents(tmp_path / "text", "doc", 2000)
    cfg = build_config(tmp_path, bpe_path, {"dataset_folder": str(tmp_path / "text")}, shard_tokens=1000,
                       output_dir=str(tmp_path / "killed"))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    state = tmp_path / "killed" / "state.json"
    kills = 0
    for at_least in (2, 30, 90):   # kill once it has committed this many shards (or later: wherever it is then)
        proc = subprocess.Popen([sys.executable, str(ROOT / "data.py"), "prepare", "--config", tmp_path / "cfg.yaml"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not (state.exists() and len(json.loads(state.read_text())["shards"]) >= at_least):
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        for p in (tmp_path / "killed").glob("*.bin"):   # what has a final name is never torn
            shards.open_shard(str(p), 512)
    assert kills == 3 and not json.loads(state.read_text())["done"], "the corpus must outlast the kills"
    assert run_cli("prepare", "--config", tmp_path / "cfg.yaml").returncode == 0

    cfg.data_prep.output_dir = str(tmp_path / "whole")
    prepare.prepare_stages(cfg, log=lambda _: None)
    assert snapshot(tmp_path / "killed") == snapshot(tmp_path / "whole")


def test_verify_names_the_shard_whose_checksum_is_wrong(setup, tmp_path):
    prepare.prepare_stages(setup, log=lambda _: None)
    out = tmp_path / "shards"
    assert run_cli("verify", out).returncode == 0
    victim = out / "train_000002.bin"
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(bytes(raw))
    result = run_cli("verify", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "train_000002.bin: sha256 differs" in result.stderr


def test_cli_prepares_with_overrides_and_reports_bad_input_in_one_line(setup, tmp_path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config_to_dict(setup)))
    bad = ((("prepare", "--config", tmp_path / "missing.yaml"), "config file not found"),
           (("prepare", "--config", tmp_path / "cfg.yaml", "data_prep.shard_tokens=0"),
            "data_prep.shard_tokens: must be >= 1"),
           (("train-tokenizer", "--config", tmp_path / "cfg.yaml"), "exists; delete it"),
           (("verify", tmp_path / "nowhere"), "no manifest"))
    ok, *results = run_at_once(   # all at once: none writes what another reads
        [sys.executable, ROOT / "data.py", "prepare", "--config", tmp_path / "cfg.yaml",
         f"data_prep.output_dir={tmp_path / 'cli'}"], *[[sys.executable, ROOT / "data.py", *args] for args, _ in bad],
        check=False)
    assert ok.returncode == 0 and "ready" in ok.stdout and (tmp_path / "cli" / "manifest.jsonl").exists()
    for result, (_, message) in zip(results, bad):
        assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


# ---------------------------------------------------------------- the loader checks each shard against the manifest


def flip_a_token(path: Path) -> None:
    """Change one token in place to another id that is still in the vocabulary: the header stays valid."""
    raw = bytearray(path.read_bytes())
    raw[shards.HEADER.size + 10] ^= 1
    path.write_bytes(bytes(raw))


def test_the_loader_refuses_a_shard_changed_after_prepare_even_with_ids_in_range(setup, tmp_path):
    prepare.prepare_stages(setup, log=lambda _: None)
    data.train_loader(setup)   # verified once, and remembered
    flip_a_token(tmp_path / "shards" / "train_000001.bin")
    with pytest.raises(DataError, match=r"train_000001.bin: sha256 differs from manifest.jsonl.*data.py prepare"):
        data.train_loader(setup)
    data.val_loaders(setup)   # the validation split does not read that shard


def test_the_loader_refuses_a_same_size_shard_from_another_tokenizer(setup, tmp_path, bpe_path):
    prepare.prepare_stages(setup, log=lambda _: None)
    other = tmp_path / "other_tok.json"
    setup.tokenizer.tokenizer_name_or_path = str(other)
    setup.data_prep.tokenizer_vocab_size = 280
    setup.data_prep.output_dir = str(tmp_path / "other")
    prepare.prepare_stages(setup, log=lambda _: None)   # trains the other tokenizer first
    mine, theirs = tmp_path / "shards" / "train_000001.bin", tmp_path / "other" / "train_000001.bin"
    assert mine.stat().st_size == theirs.stat().st_size and mine.read_bytes() != theirs.read_bytes()
    os.replace(theirs, mine)   # a rename keeps the file's own mtime
    setup.tokenizer.tokenizer_name_or_path = bpe_path
    setup.data_prep.output_dir = str(tmp_path / "shards")
    setup.data_prep.tokenizer_vocab_size = 300
    with pytest.raises(DataError, match=r"train_000001.bin: sha256 differs"):
        data.train_loader(setup)


def test_each_shard_is_hashed_only_when_it_changed_since_prepare_wrote_or_a_loader_checked_it(setup, tmp_path,
                                                                                              monkeypatch):
    hashed = []
    real = shards.file_sha256
    monkeypatch.setattr(shards, "file_sha256", lambda path: hashed.append(os.path.basename(path)) or real(path))
    prepare.prepare_stages(setup, log=lambda _: None)
    rows = [json.loads(line) for line in open(tmp_path / "shards" / "manifest.jsonl")]
    train = sorted(r["file"] for r in rows if r["split"] == "train")
    data.train_loader(setup)
    assert hashed == [], "prepare remembers what it wrote: the first start reads nothing again"
    (tmp_path / "shards" / shards.CHECKED).unlink()   # as in a folder copied from another machine
    data.train_loader(setup)
    assert sorted(hashed) == train
    hashed.clear()
    data.train_loader(setup)
    assert hashed == [], "a shard seen unchanged since its check is not read again"
    os.utime(tmp_path / "shards" / train[0])   # touched: its size may match, its bytes need a new look
    data.train_loader(setup)
    assert hashed == [train[0]]


def test_prepare_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(setup, tmp_path):
    setup.data_prep.shard_tokens = 20_000   # 40 KB shards
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config_to_dict(setup)))
    out = tmp_path / "shards"
    code, _, err, files, reason = run_on_a_full_disk(out, [sys.executable, ROOT / "data.py", "prepare", "--config",
                                                           tmp_path / "cfg.yaml"], ROOT, size_kb=64, file_limit_kb=16)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and f"could not be written ({reason}); nothing was replaced" in err
    assert not [f for f in files if f.endswith(".tmp")], files


@pytest.mark.parametrize("damage,message", [
    (lambda out: (out / "manifest.jsonl").write_text("{}\n"), r"manifest.jsonl line 1: not a shard row"),
    (lambda out: (out / "manifest.jsonl").write_text("[1, 2]\n"), r"manifest.jsonl line 1: not a shard row"),
    (lambda out: (out / "manifest.jsonl").write_text('{"file": "../../etc/hostname", "split": "train", "tokens": 1, '
                                                     '"sha256": "00"}\n'), r"line 1: not a shard row"),
    (lambda out: (out / "manifest.jsonl").write_bytes(b"\xff\xfe\n"), r"manifest.jsonl: unreadable manifest"),
])
def test_verify_names_a_damaged_manifest_in_one_line(setup, tmp_path, damage, message):
    prepare.prepare_stages(setup, log=lambda _: None)
    damage(tmp_path / "shards")
    result = run_cli("verify", tmp_path / "shards")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr


def test_verify_of_a_file_instead_of_a_folder_is_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\n")
    result = run_cli("verify", tmp_path / "a.yaml")
    assert result.returncode == 2 and "a.yaml: not a folder of shards" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("state", [[], {"done": True}, {"done": True, "fingerprint": "x", "shards": [{"file": 3}]},
                                   "not json"])
def test_a_damaged_state_file_is_one_error_naming_it(setup, tmp_path, state):
    prepare.prepare_stages(setup, log=lambda _: None)
    fingerprint = json.loads((tmp_path / "shards" / "state.json").read_text())["fingerprint"]
    if isinstance(state, dict):
        state = {**state, "fingerprint": fingerprint}
    (tmp_path / "shards" / "state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    with pytest.raises(DataError, match=r"state.json: (unreadable|damaged)"):
        data.train_loader(setup)


def test_a_damaged_record_of_checked_shards_means_checking_them_again(setup, tmp_path):
    prepare.prepare_stages(setup, log=lambda _: None)
    for junk in ("[1]", '{"train_000001.bin": 5}', "garbage"):
        (tmp_path / "shards" / shards.CHECKED).write_text(junk)
        data.train_loader(setup)
        assert json.loads((tmp_path / "shards" / shards.CHECKED).read_text())["train_000001.bin"]["sha256"]


def test_ctrl_c_during_prepare_is_one_line_and_the_same_command_continues(tmp_path, bpe_path):
    write_documents(tmp_path / "text", "doc", 2000)
    cfg = build_config(tmp_path, bpe_path, {"dataset_folder": str(tmp_path / "text")}, shard_tokens=1000)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    state = tmp_path / "shards" / "state.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "data.py"), "prepare", "--config", tmp_path / "cfg.yaml"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (state.exists() and len(json.loads(state.read_text())["shards"]) >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "interrupted: run the same command again to continue where it stopped"], err
    assert run_cli("prepare", "--config", tmp_path / "cfg.yaml").returncode == 0
    assert "shards ok" in shards.verify(str(tmp_path / "shards"))
