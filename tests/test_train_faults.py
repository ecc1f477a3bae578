"""train.py as an unlucky or careless user meets it: Ctrl-C, a full disk, a finished run resumed, a bare state_dict
given to --resume; and what it says while it runs (the mean loss of each logging interval, a line now and then when
the output is not a terminal, the CPU threads it uses)."""

import signal
import sys

import pytest
import torch
from helpers import ROOT, losses, make_config, run_at_once, run_on_a_full_disk, run_train, signalled_at, train_command

import train
from smollm2 import progress, shards
from smollm2.checkpoint import list_checkpoints, load_checkpoint, save_atomic
from smollm2.config_load import load_config
from smollm2.metrics import read_metrics

# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_saves_says_how_to_resume_and_the_run_continues_from_there(tmp_path, code_corpus):
    config = make_config(tmp_path, code_corpus, **{"tokens.train_steps": 200, "checkpoints.checkpoint_interval": 8})
    # Ctrl-C as step 6 begins, between two checkpoints: the run finishes that step, saves it and stops
    [proc] = run_at_once(signalled_at(6, "SIGINT", "train.py", "--config", config), check=False)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 130 and "Traceback" not in err, err
    saved = list_checkpoints(tmp_path / "run")[-1]
    step = load_checkpoint(saved)["train_state"]["step"]
    assert step == 6 and f"saved {saved} (Ctrl-C)" in out
    assert err.strip().splitlines() == [f"stopped by Ctrl-C at step {step}; continue with: python train.py --config "
                                        f"{config} --resume"]
    resumed = run_train(config, "tokens.train_steps=12", "--resume")
    assert f"resumed from {saved} at step {step}" in resumed.stdout
    assert [s for s, _ in losses(tmp_path / "run")] == list(range(1, 13))


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, code_corpus, monkeypatch, capsys):
    config = make_config(tmp_path, code_corpus, **{"tokens.train_steps": 12})
    real_step = train.optimizer_step

    def step(run, progress):
        if run.step == 5:   # two Ctrl-C in the middle of the 6th step
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real_step(run, progress)

    monkeypatch.setattr(train, "optimizer_step", step)
    handler = signal.getsignal(signal.SIGINT)
    assert train.main(["--config", str(config)]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("stopped by a second Ctrl-C at step 5, without saving; the newest "
                                            f"checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step_00000004.pt'}")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000004.pt"]
    assert signal.getsignal(signal.SIGINT) is handler, "train() leaves the caller's Ctrl-C handler as it found it"


# ---------------------------------------------------------------- resuming what cannot be resumed as it is


def test_resuming_a_finished_run_says_it_is_complete_and_how_to_extend_it(tmp_path, code_corpus):
    config = make_config(tmp_path, code_corpus, **{"tokens.train_steps": 4})
    train.train(load_config(str(config)))
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    proc = run_train(config, "--resume")
    assert "nan" not in proc.stdout and "done:" not in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == (
        "the run is complete: step 4 of tokens.train_steps=4. To train further, resume with more steps, e.g. "
        f"python train.py --config {config} tokens.train_steps=8 --resume (the LR schedule follows the new length)")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    extended = run_train(config, "--resume", "tokens.train_steps=6")   # the override after --resume works too
    assert "resumed from" in extended.stdout and "done: step 6" in extended.stdout


def test_a_file_that_is_not_a_training_checkpoint_given_to_resume_is_one_line(tmp_path, code_corpus):
    config = make_config(tmp_path, code_corpus)
    files = {"state_dict": {"w": torch.zeros(2)}, "no_config": {"model": {}}, "list": [1, 2]}
    for name, content in files.items():
        save_atomic(content, tmp_path / f"{name}.pt")
    procs = run_at_once(*[train_command(config, "--resume", tmp_path / f"{name}.pt") for name in files], check=False)
    for name, proc in zip(files, procs):
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: {tmp_path / name}.pt: not a training checkpoint of this repository (it lacks its model, config "
            "and train_state parts; a bare state_dict cannot be resumed); give a step_*.pt that train.py or "
            "`convert_hf.py import` wrote"], (name, proc.stderr)


# ---------------------------------------------------------------- what the run says


def test_the_logged_loss_is_the_mean_over_its_interval_and_the_start_line_says_so(tmp_path, code_corpus, capsys):
    every = load_config(str(make_config(tmp_path / "a", code_corpus, **{"tokens.train_steps": 8})))
    train.train(every)
    per_step = [loss for _, loss in losses(tmp_path / "a" / "run")]
    fourth = load_config(str(make_config(tmp_path / "b", code_corpus, **{"tokens.train_steps": 8,
                                                                         "logging.iteration_step_info_interval": 4})))
    train.train(fourth)
    records = [r for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [4, 8] and [r["loss_steps"] for r in records] == [4, 4]
    assert [r["loss"] for r in records] == pytest.approx([sum(per_step[:4]) / 4, sum(per_step[4:]) / 4], abs=1e-6)
    assert "loss: mean of the 4 steps since the previous line" in capsys.readouterr().out


def test_without_a_terminal_a_long_logging_interval_still_shows_progress(tmp_path, code_corpus, monkeypatch, capsys):
    monkeypatch.setattr(progress, "QUIET_S", 0.0)   # a line as soon as nothing else was printed since the last
    config = load_config(str(make_config(tmp_path, code_corpus, **{"tokens.train_steps": 6,
                                                                   "logging.iteration_step_info_interval": 100})))
    train.train(config)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in out if "still running" in line][:3] == ["step 1/6", "step 2/6", "step 3/6"]


def test_a_sample_prompt_longer_than_the_context_keeps_its_newest_tokens(tmp_path, code_corpus, capsys):
    config = load_config(str(make_config(tmp_path, code_corpus, **{"tokens.train_steps": 2, "sampling.interval": 2,
                                                                   "sampling.prompts": ["def f(x): return x " * 40]})))
    train.train(config)   # the context is 64 tokens
    samples = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "sample"]
    assert len(samples) == 1 and samples[0]["text"]


def test_the_start_line_gives_the_cpu_threads_the_recompute_choice_and_document_masking(tmp_path, code_corpus,
                                                                                     capsys):
    config = load_config(str(make_config(tmp_path, code_corpus, **{"tokens.train_steps": 1,
                                                                   "run.document_masking": True})))
    run = train.train(config)   # a pretraining step through the document-masked loss
    start = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model "))
    assert f"{torch.get_num_threads()} CPU threads" in start
    assert "recompute: selective (auto, no device memory figure off a GPU)" in start and run["step"] == 1
    assert "document masking: a token sees only its own document (flash, shared k/v heads)" in start


# ---------------------------------------------------------------- the disk


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_temporary_file(tmp_path, code_corpus):
    run = tmp_path / "run"
    config = make_config(tmp_path, code_corpus, **{"tokens.train_steps": 12, "checkpoints.checkpoint_interval": 4})
    # a 2 MB disk holds the step-4 checkpoint (~1.3 MB with Adam's moments) but not the step-8 one beside it; a
    # 500 KB file-size limit holds the tokenizer and logs but no checkpoint
    code, _, err, files, reason = run_on_a_full_disk(run, [sys.executable, ROOT / "train.py", "--config", config],
                                                     ROOT, size_kb=2048, file_limit_kb=500)
    step = 8 if reason == "No space left on device" else 4
    assert code == 2 and err.strip().splitlines() == [
        f"error: {run}/checkpoints/step_{step:08d}.pt: could not be written ({reason}); nothing was replaced and no "
        "partial file is left"], err
    kept = [f"checkpoints/step_{s:08d}.pt" for s in range(4, step, 4)]
    assert [f for f in files if f.startswith("checkpoints/")] == kept


def test_a_link_left_at_the_temporary_name_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "step_00000001.pt.tmp").symlink_to(victim)
    save_atomic({"model": {"w": torch.zeros(3)}}, tmp_path / "step_00000001.pt")
    (tmp_path / "manifest.jsonl.tmp").symlink_to(victim)
    shards.atomic_write(str(tmp_path / "manifest.jsonl"), b"{}\n")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "step_00000001.pt").is_symlink() and not (tmp_path / "manifest.jsonl").is_symlink()
    assert load_checkpoint(tmp_path / "step_00000001.pt")["model"]["w"].tolist() == [0.0, 0.0, 0.0]
