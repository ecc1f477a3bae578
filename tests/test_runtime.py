"""Precision choice: automatic by device, overridable, and a clear error for bf16 on a GPU without it."""

import pytest
import torch

from smollm2.errors import ConfigError, InputError
from smollm2.loading import pick_dtype
from smollm2.runtime import Runtime, resolve_precision, restore_rng, rng_state


def test_auto_precision_is_fp32_on_cpu_and_the_config_dtype_on_a_gpu(monkeypatch):
    assert resolve_precision("auto", "bfloat16", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "bfloat16", torch.device("cuda")) == "bf16"
    assert resolve_precision("auto", "float32", torch.device("cuda")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)   # e.g. a T4 or V100
    assert resolve_precision("auto", "bfloat16", torch.device("cuda")) == "fp16"
    with pytest.raises(ConfigError, match="run.precision: this GPU has no bf16 support"):
        resolve_precision("bf16", "bfloat16", torch.device("cuda"))


def test_a_gpu_with_emulated_bf16_only_trains_and_generates_in_fp16(monkeypatch):
    """A T4 or V100: torch counts its bf16 emulation as support unless asked for native support."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", "bfloat16", torch.device("cuda")) == "fp16"     # fp16 runs with a GradScaler
    with pytest.raises(ConfigError, match="run.precision: this GPU has no bf16 support"):
        resolve_precision("bf16", "bfloat16", torch.device("cuda"))
    assert pick_dtype(torch.device("cuda"), "auto") == torch.float16                  # generation, evaluation, app
    with pytest.raises(InputError, match="--dtype bf16: this GPU has no bf16 support"):
        pick_dtype(torch.device("cuda"), "bf16")


def test_an_explicit_precision_is_honoured_on_cpu_and_autocast_follows_it():
    assert resolve_precision("bf16", "float32", torch.device("cpu")) == "bf16"
    x = torch.randn(4, 4)
    with Runtime(torch.device("cpu"), "bf16").autocast():
        assert (x @ x).dtype == torch.bfloat16
    with Runtime(torch.device("cpu"), "fp32").autocast():
        assert (x @ x).dtype == torch.float32


class FakeGPUs:
    """torch.cuda's RNG functions on a machine with `n` GPUs, this process on GPU `current`: a device index past the
    last GPU raises IndexError, as torch.cuda.default_generators[idx] does."""

    def __init__(self, monkeypatch, n: int, current: int, seed: int = 0):
        self.states = [torch.tensor([seed * 10 + i], dtype=torch.uint8) for i in range(n)]
        self.current = current
        for module in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(module, "device_count", lambda: n, raising=False)
            monkeypatch.setattr(module, "current_device", lambda: self.current, raising=False)
            monkeypatch.setattr(module, "get_rng_state", self.get, raising=False)
            monkeypatch.setattr(module, "set_rng_state", self.set, raising=False)
        monkeypatch.setattr(torch.cuda, "manual_seed_all", self.seed_all)   # what torch.manual_seed calls
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def index(self, device) -> int:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        return self.current if device.index is None else device.index

    def get(self, device="cuda"):
        return self.states[self.index(device)].clone()

    def set(self, state, device="cuda"):
        self.states[self.index(device)] = state.clone()

    def seed_all(self, seed: int):
        self.states = [torch.tensor([seed % 256], dtype=torch.uint8) for _ in self.states]


def saved_by_ranks(monkeypatch, world: int) -> list:
    """The checkpoint's `rng` part of a run of `world` torchrun ranks on one machine: rank r on GPU r, seeing all."""
    states = []
    for rank in range(world):
        FakeGPUs(monkeypatch, world, current=rank, seed=rank + 1)
        states.append(rng_state())
    return states


def test_a_checkpoint_of_four_gpus_resumes_on_one_with_rank_0s_own_gpu_state(monkeypatch):
    states = saved_by_ranks(monkeypatch, 4)
    gpus = FakeGPUs(monkeypatch, 1, current=0, seed=9)
    restore_rng(states, rank=0, seed=42)
    assert gpus.states[0].tolist() == [10]      # rank 0 saved device 0's state: seed 1 * 10 + device 0


def test_a_checkpoint_of_one_gpu_resumes_on_four_and_the_new_ranks_are_seeded_repeatably(monkeypatch, capsys):
    states = saved_by_ranks(monkeypatch, 1)
    draws = []
    for rank in (0, 2, 2):
        gpus = FakeGPUs(monkeypatch, 4, current=rank, seed=9)
        restore_rng(states, rank=rank, seed=42)
        draws.append((gpus.states[rank].tolist(), torch.rand(3).tolist()))
    assert draws[0][0] == [10] and draws[1][0] == [44]    # rank 2 has no saved state: its GPU seeded 42 + 2
    assert draws[1] == draws[2] and draws[0][1] != draws[1][1]
    assert "rank 2: the checkpoint holds RNG states of 1 rank(s) only" in capsys.readouterr().out
