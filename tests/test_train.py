"""train.py behaves as a pretraining loop must: accumulation, LR, resume after SIGKILL, NaN handling, DDP, compile."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import train
from model import SmolLM2
from smollm2.checkpoint import list_checkpoints, load_checkpoint, save_atomic
from smollm2.config_load import load_config
from smollm2.errors import TrainingError
from smollm2.metrics import read_metrics
from smollm2.optimizer import lr_at

ROOT = Path(__file__).resolve().parent.parent


def write_corpus(folder: Path) -> None:
    """~150 KB of real text with structure a tiny model can learn: a few standard-library modules."""
    import inspect
    import json as json_mod
    import textwrap
    folder.mkdir(parents=True)
    for mod in (textwrap, json_mod.decoder, json_mod.encoder, inspect):
        (folder / f"{mod.__name__}.py").write_text(inspect.getsource(mod))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "text")
    return root


def make_config(tmp: Path, corpus: Path, **overrides) -> Path:
    """A tiny run (64-wide, 2 layers) on the corpus, with its own run dir, shard dir and tokenizer."""
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


def run_train(config: Path, *args, check=True, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(run_dir: Path, kind="train") -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind]


def final_weights(run_dir: Path) -> dict:
    return load_checkpoint(list_checkpoints(run_dir)[-1])["model"]


def assert_same_training(run: Path, reference: Path, steps: int) -> None:
    """Same losses at every step and same final weights, up to float summation order."""
    got, want = losses(run), losses(reference)
    assert [s for s, _ in got] == list(range(1, steps + 1))
    assert [x for _, x in got] == pytest.approx([x for _, x in want], abs=1e-5)
    w_got, w_want = final_weights(run), final_weights(reference)
    for key in w_want:
        torch.testing.assert_close(w_got[key], w_want[key], atol=1e-5, rtol=1e-4)


def test_k_micro_batches_of_b_equal_one_batch_of_k_times_b(tmp_path, corpus):
    a = make_config(tmp_path / "a", corpus, **{"tokens.micro_batch_size": 2,
                                               "tokens.batch_accumulation_per_replica": 4, "tokens.train_steps": 4})
    b = make_config(tmp_path / "b", corpus, **{"tokens.micro_batch_size": 8,
                                               "tokens.batch_accumulation_per_replica": 1, "tokens.train_steps": 4})
    run_train(a), run_train(b)
    assert_same_training(tmp_path / "a" / "run", tmp_path / "b" / "run", steps=4)


def test_lr_of_every_optimizer_step_equals_the_schedule_under_accumulation(tmp_path, corpus):
    cfg_path = make_config(tmp_path, corpus, **{"tokens.batch_accumulation_per_replica": 3})
    run_train(cfg_path)
    sched = load_config(str(cfg_path)).optimizer.learning_rate_scheduler
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:   # the update logged as step s is the one after s-1 completed steps
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, sched, 12), abs=1e-15)
    assert records[-1]["tokens_seen"] == 12 * 3 * 4 * 32


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(tmp_path, corpus):
    # long enough that the kill, sent as soon as step 8 is saved, always lands mid-run, even on a fast machine
    long_run = {"tokens.train_steps": 200, "checkpoints.checkpoint_interval": 8, "tokens.val_check_interval": 20}
    straight = make_config(tmp_path / "a", corpus, **long_run)
    run_train(straight)
    killed = make_config(tmp_path / "b", corpus, **long_run)
    run_dir = tmp_path / "b" / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step_00000008.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-8 checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(losses(run_dir)) < 200
    out = run_train(killed, "--resume")
    assert "resumed from" in out.stdout
    assert losses(run_dir) == losses(tmp_path / "a" / "run")                # bitwise equal, train and val
    assert losses(run_dir, "val") == losses(tmp_path / "a" / "run", "val")
    for key, value in final_weights(tmp_path / "a" / "run").items():
        assert torch.equal(value, final_weights(run_dir)[key])


def test_a_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "step_00000001.pt"
    save_atomic({"model": {"w": torch.zeros(3)}}, path)
    script = ("import sys, torch; sys.path.insert(0, %r); from smollm2.checkpoint import save_atomic\n"
              "big = {'model': {'w': torch.randn(40_000_000)}}\n"
              "while True: save_atomic(big, %r)\n") % (str(ROOT), str(path))
    for delay in (0.5, 1.0, 1.7):
        proc = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = load_checkpoint(path)                      # either the old or a complete new one, never torn
        assert ck["model"]["w"].numel() in (3, 40_000_000)
    assert list_checkpoints(tmp_path) == [path]          # a leftover .tmp is not mistaken for a checkpoint


def test_a_nan_loss_skips_that_update_and_too_many_stop_the_run(tmp_path, corpus, monkeypatch, capsys):
    calls = {"n": 0}
    forward = SmolLM2.forward

    def poisoned(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        if loss is not None and self.training:
            calls["n"] += 1
            if calls["n"] in poison:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(SmolLM2, "forward", poisoned)
    poison = {3}                                          # the 3rd optimizer step (k = 1) sees a NaN loss
    cfg = load_config(str(make_config(tmp_path / "a", corpus, **{"checkpoints.checkpoint_interval": 1,
                                                           "run.keep_last_checkpoints": 20})))
    result = train.train(cfg)
    assert result["step"] == 12
    assert "step 3: non-finite loss" in capsys.readouterr().err
    ckpts = {int(p.stem.split("_")[1]): load_checkpoint(p)["model"] for p in list_checkpoints(tmp_path / "a" / "run")}
    for key in ckpts[2]:
        assert torch.equal(ckpts[2][key], ckpts[3][key]), "the poisoned step changed the weights"
    assert not torch.equal(ckpts[3]["lm_head.weight"], ckpts[4]["lm_head.weight"]), "training did not go on"

    calls["n"] = 0
    poison = set(range(5, 100))                          # from step 5 on, every loss is NaN
    cfg = load_config(str(make_config(tmp_path / "b", corpus, **{"run.max_consecutive_bad_steps": 3})))
    with pytest.raises(TrainingError, match="3 consecutive steps"):
        train.train(cfg)
    for p in list_checkpoints(tmp_path / "b" / "run"):
        assert all(torch.isfinite(t).all() for t in load_checkpoint(p)["model"].values())


def torchrun(config: Path, *args, nproc: int = 2, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(ROOT / "train.py"), "--config", str(config), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


def test_torchrun_two_ranks_keep_the_global_batch_of_one_process_with_2k(tmp_path, corpus):
    # the same config (parallelism.dp=1, accumulation 4) on 1 and on 2 processes: the 2 ranks accumulate 2 each
    settings = {"tokens.batch_accumulation_per_replica": 4, "tokens.train_steps": 4}
    single = make_config(tmp_path / "single", corpus, **settings)
    ddp = make_config(tmp_path / "ddp", corpus, **settings)
    run_train(single)   # also prepares the shared shards before two ranks read them
    proc = torchrun(ddp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 x cpu | DDP over 2 processes" in proc.stdout and proc.stdout.count("| loss ") == 4   # rank 0 logs
    assert "x 2 accumulation x 2 = 512 tokens/step" in proc.stdout
    assert "accumulation 4 -> 2 keeps parallelism.dp=1's global batch" in proc.stdout
    assert_same_training(tmp_path / "ddp" / "run", tmp_path / "single" / "run", steps=4)
    sched = load_config(str(ddp)).optimizer.learning_rate_scheduler
    for r in read_metrics(tmp_path / "ddp" / "run" / "metrics.jsonl"):
        if r["kind"] == "train":
            assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, sched, 4), abs=1e-15)
    ck = load_checkpoint(list_checkpoints(tmp_path / "ddp" / "run")[-1])
    [position] = ck["data"]["stages"].values()   # the position of the one data stage
    assert position["consumed_micro_batches"] == 4 * 2 * 2 and len(ck["rng"]) == 2   # steps x k x ranks


def test_an_accumulation_given_on_the_command_line_wins_over_the_global_batch(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus, **{"tokens.batch_accumulation_per_replica": 4, "tokens.train_steps": 1})
    proc = torchrun(cfg, "tokens.batch_accumulation_per_replica=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 3 accumulation x 2 = 768 tokens/step" in proc.stdout and "keeps parallelism.dp" not in proc.stdout


def test_compiled_training_saves_plain_hf_parameter_names(tmp_path, corpus):
    cfg_path = make_config(tmp_path, corpus, **{"run.compile": True, "tokens.train_steps": 2,
                                               "tokens.val_check_interval": 2, "checkpoints.checkpoint_interval": 2})
    run_train(cfg_path)
    keys = set(final_weights(tmp_path / "run"))
    expected = set(SmolLM2(load_config(str(cfg_path)).model.model_config).state_dict())
    assert keys == expected and not any("_orig_mod" in k for k in keys)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu_keeps_fp32_master_weights(tmp_path, corpus, precision):
    cfg = load_config(str(make_config(tmp_path, corpus, **{"run.precision": precision, "tokens.train_steps": 3,
                                                          "checkpoints.checkpoint_interval": 3})))
    result = train.train(cfg)
    ck = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert result["step"] == 3
    assert all(t.dtype == torch.float32 for t in ck["model"].values())
    assert all(v.dtype == torch.float32 for s in ck["optimizer"]["state"].values() for k, v in s.items() if k != "step")
    assert bool(ck["scaler"]) == (precision == "fp16")   # GradScaler only for fp16


def test_activation_checkpointing_gives_the_same_losses(tmp_path, corpus):
    plain = make_config(tmp_path / "a", corpus, **{"tokens.train_steps": 3})
    recompute = make_config(tmp_path / "b", corpus, **{"tokens.train_steps": 3, "parallelism.recompute_layer": True})
    run_train(plain), run_train(recompute)
    assert [x for _, x in losses(tmp_path / "b" / "run")] == pytest.approx(
        [x for _, x in losses(tmp_path / "a" / "run")], abs=1e-6)


def test_validation_loss_falls_and_run_dir_has_every_output(tmp_path, corpus):
    cfg_path = make_config(tmp_path, corpus, **{"tokens.train_steps": 80, "tokens.micro_batch_size": 16,
                                               "tokens.val_check_interval": 20, "checkpoints.checkpoint_interval": 40,
                                               "sampling.interval": 40,
                                               "optimizer.learning_rate_scheduler.lr_warmup_steps": 5,
                                               "optimizer.learning_rate_scheduler.lr_decay_starting_step": 60,
                                               "optimizer.learning_rate_scheduler.lr_decay_steps": 20})
    out = run_train(cfg_path)
    val = losses(tmp_path / "run", "val")
    assert [s for s, _ in val] == [20, 40, 60, 80]
    assert val[-1][1] < val[0][1] - 0.3 and val[-1][1] < math.log(512) - 1.0, val   # uniform guessing: ln 512
    run = tmp_path / "run"
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000040.pt", "step_00000080.pt"]
    samples = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "sample"]
    assert len(samples) == 2 * len(load_config(str(cfg_path)).sampling.prompts)
    assert "sample @ 40" in out.stdout and "done: step 80" in out.stdout


def test_bad_config_and_restarting_a_finished_run_are_one_line_errors(tmp_path, corpus):
    bad = make_config(tmp_path, corpus)
    proc = run_train(bad, "tokens.micro_batch_sise=4", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: tokens.micro_batch_sise: unknown key; did you mean 'micro_batch_size'?"]
    proc = run_train(bad, "--resume", check=False)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    run_train(bad, "tokens.train_steps=4")
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    proc = run_train(bad, check=False)                     # same run dir, no --resume: refuse, touch nothing
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
