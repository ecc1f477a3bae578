"""train.py behaves as a pretraining loop must: accumulation, LR, resume after SIGKILL, NaN handling, DDP, compile."""

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ENV, ROOT, losses, make_config, run_at_once, run_train, signalled_at, train_command

import train
from model import SmolLM2
from smollm2.checkpoint import list_checkpoints, load_checkpoint, save_atomic
from smollm2.config_load import load_config
from smollm2.errors import TrainingError
from smollm2.metrics import read_metrics
from smollm2.optimizer import lr_at


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


def test_k_micro_batches_of_b_equal_one_batch_of_k_times_b(tmp_path, code_corpus):
    a = make_config(tmp_path / "a", code_corpus, **{"tokens.micro_batch_size": 2, "tokens.train_steps": 4,
                                                    "tokens.batch_accumulation_per_replica": 4})
    b = make_config(tmp_path / "b", code_corpus, **{"tokens.micro_batch_size": 8, "tokens.train_steps": 4,
                                                    "tokens.batch_accumulation_per_replica": 1})
    run_at_once(train_command(a), train_command(b))
    assert_same_training(tmp_path / "a" / "run", tmp_path / "b" / "run", steps=4)


def test_lr_of_every_optimizer_step_equals_the_schedule_under_accumulation(tmp_path, code_corpus):
    cfg_path = make_config(tmp_path, code_corpus, **{"tokens.batch_accumulation_per_replica": 3})
    run_train(cfg_path, env=ENV)
    sched = load_config(str(cfg_path)).optimizer.learning_rate_scheduler
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 13))
    for r in records:   # the update logged as step s is the one after s-1 completed steps
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, sched, 12), abs=1e-15)
    assert records[-1]["tokens_seen"] == 12 * 3 * 4 * 32


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(tmp_path, code_corpus):
    run = {"tokens.train_steps": 16, "checkpoints.checkpoint_interval": 8}
    straight, killed = (make_config(tmp_path / name, code_corpus, **run) for name in "ab")
    run_dir = tmp_path / "b" / "run"
    # the kill lands as step 11 begins: steps 9 and 10 are logged but not saved, and the resumed run redoes them
    done, kill = run_at_once(train_command(straight), signalled_at(11, "SIGKILL", "train.py", "--config", killed),
                             check=False)
    assert done.returncode == 0 and kill.returncode == -signal.SIGKILL, (done.stderr[-3000:], kill.stderr[-3000:])
    assert [s for s, _ in losses(run_dir)] == list(range(1, 11))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000008.pt"]
    out = run_at_once(train_command(killed, "--resume"))[0]   # one thread, as the uninterrupted run had
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


def test_a_nan_loss_skips_that_update_and_too_many_stop_the_run(tmp_path, code_corpus, monkeypatch, capsys):
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
    cfg = load_config(str(make_config(tmp_path / "a", code_corpus, **{"checkpoints.checkpoint_interval": 1,
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
    cfg = load_config(str(make_config(tmp_path / "b", code_corpus, **{"run.max_consecutive_bad_steps": 3})))
    with pytest.raises(TrainingError, match="3 consecutive steps"):
        train.train(cfg)
    for p in list_checkpoints(tmp_path / "b" / "run"):
        assert all(torch.isfinite(t).all() for t in load_checkpoint(p)["model"].values())


def test_torchrun_two_ranks_keep_the_global_batch_of_one_process_with_2k(tmp_path, code_corpus):
    # the same config (parallelism.dp=1, accumulation 4) on 1 and on 2 processes: the 2 ranks accumulate 2 each
    settings = {"tokens.batch_accumulation_per_replica": 4, "tokens.train_steps": 4}
    single = make_config(tmp_path / "single", code_corpus, **settings)
    ddp = make_config(tmp_path / "ddp", code_corpus, **settings)
    _, proc = run_at_once(train_command(single), train_command(ddp, ranks=2))
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


def test_an_accumulation_given_on_the_command_line_wins_over_the_global_batch(tmp_path, code_corpus, capsys):
    # one process of a parallelism.dp=2 config accumulates twice as much, to keep dp's global batch (two ranks of a
    # dp=1 config halve it: above); which decision the command line overrides depends on no number of processes
    for name, given in (("kept", []), ("given", ["tokens.batch_accumulation_per_replica=3"])):
        cfg = make_config(tmp_path / name, code_corpus, **{"parallelism.dp": 2, "tokens.train_steps": 1,
                                                           "tokens.batch_accumulation_per_replica": 4})
        assert train.main(["--config", str(cfg), *given]) == 0
        out = capsys.readouterr().out
        if given:
            assert "x 3 accumulation x 1 = 384 tokens/step" in out and "keeps parallelism.dp" not in out
        else:
            assert "x 8 accumulation x 1 = 1,024 tokens/step" in out
            assert "accumulation 4 -> 8 keeps parallelism.dp=2's global batch" in out


def test_compiled_training_saves_plain_hf_parameter_names(tmp_path, code_corpus):
    cfg_path = make_config(tmp_path, code_corpus, **{"run.compile": True, "tokens.train_steps": 2,
                                                     "tokens.val_check_interval": 2,
                                                     "checkpoints.checkpoint_interval": 2})
    run_train(cfg_path, env=ENV)
    keys = set(final_weights(tmp_path / "run"))
    expected = set(SmolLM2(load_config(str(cfg_path)).model.model_config).state_dict())
    assert keys == expected and not any("_orig_mod" in k for k in keys)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu_keeps_fp32_master_weights_and_samples_under_autocast(tmp_path, code_corpus,
                                                                                      precision):
    cfg = load_config(str(make_config(tmp_path, code_corpus, **{"run.precision": precision, "tokens.train_steps": 3,
                                                                "checkpoints.checkpoint_interval": 3,
                                                                "sampling.interval": 3})))
    result = train.train(cfg)
    # the samples decode under the run's autocast: the KV cache takes the dtype the keys come out in
    samples = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "sample"]
    assert len(samples) == len(cfg.sampling.prompts) and all(r["text"] for r in samples)
    ck = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert result["step"] == 3
    assert all(t.dtype == torch.float32 for t in ck["model"].values())
    assert all(v.dtype == torch.float32 for s in ck["optimizer"]["state"].values() for k, v in s.items() if k != "step")
    assert bool(ck["scaler"]) == (precision == "fp16")   # GradScaler only for fp16


def test_activation_checkpointing_gives_the_same_losses(tmp_path, code_corpus):
    plain = make_config(tmp_path / "a", code_corpus, **{"tokens.train_steps": 3})
    recompute = make_config(tmp_path / "b", code_corpus, **{"tokens.train_steps": 3,
                                                            "parallelism.recompute_layer": True})
    run_at_once(train_command(plain), train_command(recompute))
    assert [x for _, x in losses(tmp_path / "b" / "run")] == pytest.approx(
        [x for _, x in losses(tmp_path / "a" / "run")], abs=1e-6)


def test_validation_loss_falls_and_run_dir_has_every_output(tmp_path, code_corpus):
    cfg_path = make_config(tmp_path, code_corpus, **{"tokens.train_steps": 80, "tokens.micro_batch_size": 16,
                                                     "tokens.val_check_interval": 20, "sampling.interval": 40,
                                                     "checkpoints.checkpoint_interval": 40,
                                                     "optimizer.learning_rate_scheduler.lr_warmup_steps": 5,
                                                     "optimizer.learning_rate_scheduler.lr_decay_starting_step": 60,
                                                     "optimizer.learning_rate_scheduler.lr_decay_steps": 20})
    out = run_train(cfg_path, env=ENV)   # one thread: 4x less wall time than two on a busy 2-core machine
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


def test_bad_config_and_restarting_a_finished_run_are_one_line_errors(tmp_path, code_corpus):
    # the refusals of a fresh run dir and the run that finishes another one, all at once: each is mostly start-up
    bad, done = make_config(tmp_path / "bad", code_corpus), make_config(tmp_path / "done", code_corpus)
    proc, resume, finished = run_at_once(train_command(bad, "tokens.micro_batch_sise=4"),
                                         train_command(bad, "--resume"), train_command(done, "tokens.train_steps=4"),
                                         check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: tokens.micro_batch_sise: unknown key; did you mean 'micro_batch_size'?"]
    assert resume.returncode == 2 and "no checkpoint" in resume.stderr and "Traceback" not in resume.stderr
    assert finished.returncode == 0, finished.stderr[-3000:]
    before = (tmp_path / "done" / "run" / "metrics.jsonl").read_text()
    proc = run_train(done, check=False, env=ENV)           # same run dir, no --resume: refuse, touch nothing
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr
    assert (tmp_path / "done" / "run" / "metrics.jsonl").read_text() == before


def test_each_micro_batch_reaches_a_cuda_device_in_one_copy_from_pinned_memory(tmp_path, code_corpus, monkeypatch):
    """The loop hands every micro-batch to the task's to_device once; on CUDA (torch's copies recorded here) that is
    one pin_memory and one non-blocking copy of the pinned tensor holding x and y together."""
    from smollm2 import task
    handed = []
    real = task.to_device
    monkeypatch.setattr(task, "to_device", lambda batch, device: handed.append(len(batch)) or real(batch, device))
    config = make_config(tmp_path, code_corpus, **{"tokens.train_steps": 2, "tokens.batch_accumulation_per_replica": 3,
                                                   "tokens.limit_val_batches": 0, "checkpoints.checkpoint_interval": 100,
                                                   "checkpoints.save_final_state": False})
    train.train(load_config(str(config)))
    assert handed == [2] * 6
    pinned, copies = [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t.clone()) or pinned[-1])
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: copies.append((t, a, k)) or t)
    x, y = torch.arange(12).view(3, 4), torch.arange(12, 24).view(3, 4)
    on_device = real((x, y), torch.device("cuda"))
    assert len(pinned) == 1 and len(copies) == 1
    source, args, kwargs = copies[0]
    assert source is pinned[0] and args == (torch.device("cuda"),) and kwargs == {"non_blocking": True}
    assert torch.equal(on_device[0], x) and torch.equal(on_device[1], y)
