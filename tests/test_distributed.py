"""FSDP2 through torchrun (gloo, on the CPU) trains exactly as one process does; its sharded checkpoints resume on
any number of processes, load anywhere a checkpoint loads, and never unpickle anything but their own index."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distributed
from checkpoint import CheckpointError, is_sharded, list_checkpoints, load_model
from config import ConfigError, config_from_dict
from test_train import ROOT, corpus, losses, make_config, run_train, torchrun  # noqa: F401 (corpus: a fixture)

SMALL = {"tokens.batch_accumulation_per_replica": 2, "tokens.train_steps": 4, "checkpoints.checkpoint_interval": 2}


def assert_close_losses(got: list, want: list, tol: float) -> None:
    """The same steps, and losses within tol."""
    assert [step for step, _ in got] == [step for step, _ in want]
    assert [x for _, x in got] == pytest.approx([x for _, x in want], abs=tol)


def consolidated(checkpoint: Path) -> dict:
    return load_model(checkpoint)[0].state_dict()


@pytest.mark.parametrize("zero_stage,accumulation,recompute", [(1, 1, False), (3, 2, True)])
def test_fsdp_on_two_ranks_equals_one_process(tmp_path, corpus, zero_stage, accumulation, recompute):
    settings = {**SMALL, "tokens.batch_accumulation_per_replica": 2 * accumulation,
                "parallelism.recompute_layer": recompute}
    single = make_config(tmp_path / "single", corpus, **settings)
    fsdp = make_config(tmp_path / "fsdp", corpus, **settings, **{"optimizer.zero_stage": zero_stage})
    run_train(single)
    proc = torchrun(fsdp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = "ZeRO-3" if zero_stage == 3 else "ZeRO-2"
    assert f"FSDP2 over 2 processes ({stage}" in proc.stdout
    assert f"x {accumulation} accumulation x 2" in proc.stdout
    assert_close_losses(losses(tmp_path / "fsdp" / "run"), losses(tmp_path / "single" / "run"), 1e-5)
    sharded = list_checkpoints(tmp_path / "fsdp" / "run")
    assert [p.name for p in sharded] == ["step_00000002", "step_00000004"] and all(map(is_sharded, sharded))
    plain = list_checkpoints(tmp_path / "single" / "run")[-1]
    for key, value in consolidated(plain).items():
        torch.testing.assert_close(consolidated(sharded[-1])[key], value, atol=1e-5, rtol=1e-4)


def test_a_sharded_run_killed_mid_run_resumes_with_the_uninterrupted_losses(tmp_path, corpus):
    settings = {"optimizer.zero_stage": 1, "tokens.batch_accumulation_per_replica": 2, "tokens.train_steps": 60,
                "checkpoints.checkpoint_interval": 8, "tokens.val_check_interval": 20}
    straight = make_config(tmp_path / "a", corpus, **settings)
    assert torchrun(straight).returncode == 0
    killed = make_config(tmp_path / "b", corpus, **settings)
    run_dir = tmp_path / "b" / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), "--config", str(killed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step_00000016").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-16 checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)   # the launcher and both ranks, at once
    proc.wait()
    assert len(losses(run_dir)) < 60
    out = torchrun(killed, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout
    assert_close_losses(losses(run_dir), losses(tmp_path / "a" / "run"), 1e-6)
    assert_close_losses(losses(run_dir, "val"), losses(tmp_path / "a" / "run", "val"), 1e-6)


def test_a_checkpoint_of_two_ranks_resumes_on_one_process(tmp_path, corpus):
    settings = {**SMALL, "tokens.batch_accumulation_per_replica": 4, "tokens.train_steps": 6}
    fsdp = make_config(tmp_path / "fsdp", corpus, **settings, **{"optimizer.zero_stage": 1})
    assert torchrun(fsdp).returncode == 0
    one = make_config(tmp_path / "one", corpus, **settings)
    out = run_train(one, "--resume", str(tmp_path / "fsdp" / "run" / "checkpoints" / "step_00000004"))
    assert "resumed from" in out.stdout and "at step 4" in out.stdout
    assert_close_losses(losses(tmp_path / "one" / "run"), losses(tmp_path / "fsdp" / "run")[4:], 1e-5)
    # and back: the single process's file checkpoint resumes on two sharded ranks
    back = make_config(tmp_path / "back", corpus, **{**settings, "tokens.train_steps": 8}, **{"optimizer.zero_stage": 3})
    out = torchrun(back, "--resume", str(tmp_path / "one" / "run" / "checkpoints" / "step_00000006.pt"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert [s for s, _ in losses(tmp_path / "back" / "run")] == [7, 8]


def test_a_sharded_checkpoint_generates_and_exports_like_the_model_it_holds(tmp_path, corpus):
    from transformers import AutoModelForCausalLM
    fsdp = make_config(tmp_path, corpus, **SMALL, **{"optimizer.zero_stage": 1})
    assert torchrun(fsdp).returncode == 0
    run_dir = tmp_path / "run"
    model, _, info = load_model(run_dir)                      # the run dir -> its newest (sharded) checkpoint
    assert info["step"] == 4 and info["source"].endswith("step_00000004")
    out = subprocess.run([sys.executable, str(ROOT / "convert_hf.py"), "export", "--checkpoint_path", str(run_dir),
                          "--out", str(tmp_path / "hf")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens)[0], atol=1e-5, rtol=1e-5)
    gen = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(run_dir), "--prompt",
                          "def ", "--temperature", "0", "--max_new_tokens", "8"], capture_output=True, text=True,
                         cwd=ROOT)
    assert gen.returncode == 0 and "step 4" in gen.stderr and "8 tokens in" in gen.stderr, gen.stderr


def test_a_crafted_sharded_checkpoint_runs_no_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    tiny = {"model": {"model_config": {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
                                       "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 64}}}
    torch.save({"config": tiny, "train_state": {"step": 1}}, folder / "train_state.pt")
    (folder / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="refused, nothing was run"):
        load_model(folder)
    assert not (tmp_path / "pwned").exists()


def test_the_global_batch_of_parallelism_dp_is_kept_on_fewer_processes():
    cfg = config_from_dict({"parallelism": {"dp": 64}, "tokens": {"micro_batch_size": 8,
                                                                  "batch_accumulation_per_replica": 1}})
    assert distributed.accumulation(cfg, world=1, explicit=False)[0] == 64   # 64 x 8 x 2048 = 1M tokens per step
    assert distributed.accumulation(cfg, world=4, explicit=False)[0] == 16
    assert distributed.accumulation(cfg, world=64, explicit=False) == (1, "")
    assert distributed.accumulation(cfg, world=4, explicit=True) == (1, "")   # the command line's choice wins
    with pytest.raises(ConfigError, match="cannot be split evenly over 3 processes"):
        distributed.accumulation(cfg, world=3, explicit=False)
