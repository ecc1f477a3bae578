"""Where a training run executes: the device, the autocast precision, the torchrun process group, RNG states.

`setup_runtime()` turns the config's `run.device` / `run.precision` (and torchrun's environment) into a `Runtime`;
the helpers below are the few collective operations train.py needs, written so they also work in a single process.
"""

import contextlib
import io
import os
import random
import signal
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from smollm2.config import Config
from smollm2.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str          # bf16 | fp16 | fp32: the autocast dtype; weights and optimizer state stay fp32
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])


def gpu_has_bf16() -> bool:
    """bf16 in hardware (Ampere and later). torch's plain is_bf16_supported() also counts the emulated bf16 of a T4 or
    V100, several times slower than their fp16 with a GradScaler."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(requested: str, model_dtype: str, device: torch.device) -> str:
    """`auto`: the config's model.dtype on a GPU (bf16 falls back to fp16 + GradScaler where unsupported), fp32
    elsewhere. An explicit choice is honoured, also on the CPU (bf16/fp16 autocast runs there, slowly)."""
    bf16_ok = device.type != "cuda" or gpu_has_bf16()
    if requested == "bf16" and not bf16_ok:
        raise ConfigError("run.precision: this GPU has no bf16 support; use run.precision=fp16 (or auto)")
    if requested != "auto":
        return requested
    if device.type != "cuda" or model_dtype in ("float32", "fp32"):
        return "fp32"
    return "bf16" if bf16_ok else "fp16"


def setup_runtime(cfg: Config) -> Runtime:
    """Device, precision and, under torchrun, the process group (NCCL on GPUs, gloo on the CPU)."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    want = cfg.run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: '{cfg.run.device}' asked for, but no CUDA GPU is visible; use run.device=cpu")
    device = torch.device(f"cuda:{local}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, resolve_precision(cfg.run.precision, cfg.model.dtype, device), rank, world)


def rng_state() -> dict:
    """This process's RNG states; on a GPU only its own device's (torchrun ranks see every GPU of the machine, and a
    run may resume on fewer of them)."""
    state = {"python": random.getstate(), "numpy": list(np.random.get_state()), "torch": torch.get_rng_state()}
    state["numpy"][1] = torch.from_numpy(state["numpy"][1].copy())   # plain tensors load under weights_only
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    np_state = list(state["numpy"])
    np_state[1] = np_state[1].numpy()
    np.random.set_state(tuple(np_state))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):   # older checkpoints hold every visible GPU's state: take this device's
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())


def restore_rng(states: list, rank: int, seed: int) -> None:
    """Rank r continues from the RNG state rank r saved. A rank the checkpoint has no state for (the run resumes on
    more processes than saved it) is seeded from (seed, rank) instead, so a resume is still repeatable."""
    if rank < len(states):
        set_rng_state(states[rank])
        return
    print(f"rank {rank}: the checkpoint holds RNG states of {len(states)} rank(s) only; this rank's RNGs are seeded "
          f"from general.seed {seed} + rank {rank}", flush=True)
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)   # and every GPU's generator


def gather(obj, rt: Runtime) -> list:
    """Every rank's object, in rank order (a one-element list without torchrun)."""
    if rt.world == 1:
        return [obj]
    # sent as torch.save bytes: all_gather_object's own pickling of tensors does not load back on every version
    buf = io.BytesIO()
    torch.save(obj, buf)
    out = [None] * rt.world
    dist.all_gather_object(out, buf.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out]


def mean_across_ranks(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world > 1:
        dist.all_reduce(x)        # SUM: gloo has no AVG
        x = x / rt.world
    return x


class StopSignals:
    """SIGTERM (schedulers, spot machines) and Ctrl-C while a run trains: the first asks the run to stop after its
    current step, and asked() says so on every rank at the same step; a second Ctrl-C raises KeyboardInterrupt at
    once. The handlers found on entry are put back on exit."""
    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self, rt: Runtime):
        self.rt, self.received, self.handlers = rt, [], {}

    def __enter__(self) -> "StopSignals":
        self.handlers = {signum: signal.signal(signum, self._receive) for signum in self.NAMES}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)

    def _receive(self, signum, frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt
        self.received.append(signum)

    def asked(self) -> Optional[str]:
        """The name of the signal that asked the run to stop (on any rank), or None."""
        if not any_across_ranks(bool(self.received), self.rt):
            return None
        return self.NAMES[self.received[0]] if self.received else "a signal to another rank"


def any_across_ranks(flag: bool, rt: Runtime) -> bool:
    """True on every rank when it is True on any: a signal may reach the ranks between two different steps."""
    if rt.world == 1:
        return flag
    x = torch.tensor(float(flag), device=rt.device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return bool(x.item())
