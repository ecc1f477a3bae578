"""Data parallelism: what each of torchrun's processes holds and does, and how a sharded run is checkpointed.

`optimizer.zero_stage` (nanotron's key) picks the engine, both PyTorch's own:
  0      DDP: every rank holds the whole model, its gradients and both Adam moments in fp32 (16 bytes per
         parameter: 27 GB at 1.7B, before any activation); gradients are all-reduced once per optimizer step.
  1, 2   FSDP2 (`fully_shard` per decoder layer), parameters gathered for forward and kept until backward: ZeRO-2.
         fp32 weights, gradients and Adam moments are split over the ranks (16/N bytes per parameter at rest).
         nanotron's stage 1 shards the optimizer state only; FSDP always reduce-scatters gradients, which moves the
         same bytes as DDP's all-reduce, so stage 1 gets stage 2's saving at no extra cost.
  3      FSDP2, parameters freed again after each layer's forward and gathered anew for its backward: ZeRO-3.
         The least memory (about two layers' parameters gathered at a time), one more all-gather per step.
Under bf16 FSDP gathers bf16 copies of the weights for compute and reduces gradients in fp32 (MixedPrecisionPolicy);
the master weights and the optimizer stay fp32, as on one GPU. One process never shards: there is nothing to split.
A model FSDP shards is built on the meta device, with no storage, and filled once sharded (materialize): each rank
draws every parameter whole, as one process does, keeps its shard and drops the rest, so no rank ever holds the
whole model, and a run on N ranks starts from the weights of one process with the same seed.

The global batch is the config's: parallelism.dp x micro_batch_size x batch_accumulation_per_replica sequences, as in
nanotron. Run on fewer (or more) processes than dp, the accumulation is raised (or lowered) to keep it, so the
official LR schedule sees the batch it was tuned for; an accumulation given on the command line wins.

A sharded checkpoint is a directory `step_00001000/`: every rank writes its own shards of the model and optimizer
through torch.distributed.checkpoint, rank 0 adds `train_state.pt` (step, data position, every rank's RNG, config),
and the directory is written under a temporary name and renamed once complete. It loads on any number of
processes, one included: DCP re-shards on load.
"""

import contextlib
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     get_state_dict, set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

from smollm2.checkpoint import TRAIN_STATE, load_sharded_state, save_atomic, sync_dir
from smollm2.config import Config
from smollm2.errors import ConfigError
from smollm2.runtime import AUTOCAST_DTYPES, Runtime


def accumulation(cfg: Config, world: int, explicit: bool) -> tuple[int, str]:
    """(micro-batches per optimizer step on each rank, a note for the start line) that keep the config's global
    batch of parallelism.dp x micro_batch_size x batch_accumulation_per_replica sequences on `world` processes."""
    k, dp = cfg.tokens.batch_accumulation_per_replica, cfg.parallelism.dp
    if explicit or dp == world:
        return k, ""
    sequences = dp * k
    if sequences % world:
        raise ConfigError(f"parallelism.dp={dp} x tokens.batch_accumulation_per_replica={k} = {sequences} "
                          f"micro-batches per step cannot be split evenly over {world} processes; set parallelism.dp "
                          f"to {world} or pass tokens.batch_accumulation_per_replica=N to choose the accumulation")
    return sequences // world, f"accumulation {k} -> {sequences // world} keeps parallelism.dp={dp}'s global batch"


def sharded(cfg: Config, rt: Runtime) -> bool:
    return rt.world > 1 and cfg.optimizer.zero_stage >= 1


def wrap(model: torch.nn.Module, cfg: Config, rt: Runtime) -> torch.nn.Module:
    """The module forward/backward go through: `model` sharded in place (FSDP) or wrapped (DDP), then compiled.
    `model` itself keeps the plain parameter names that checkpoints hold."""
    if sharded(cfg, rt):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        if rt.precision == "fp16":
            raise ConfigError("optimizer.zero_stage >= 1 runs in bf16 or fp32; fp16 needs a loss scaler that works "
                              "across shards. Use run.precision=bf16 (or fp32), or optimizer.zero_stage=0")
        compute = AUTOCAST_DTYPES.get(rt.precision)
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
        keep_gathered = cfg.optimizer.zero_stage < 3
        layers = compiled_layers(model) if cfg.run.compile else model.model.layers
        for i, layer in enumerate(layers):
            model.model.layers[i] = fully_shard(layer, mp_policy=policy, reshard_after_forward=not keep_gathered)
        fully_shard(model, mp_policy=policy, reshard_after_forward=not keep_gathered)   # embedding, norm, head
        return model
    net = torch.compile(model) if cfg.run.compile else model
    if rt.world > 1 and not sharded(cfg, rt):
        net = DDP(net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                  bucket_cap_mb=cfg.model.ddp_bucket_cap_mb)
    return net


def compiled_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer in its own recompute checkpoint (when the model recomputes), compiled, as torchtitan does
    before `fully_shard`: compiled whole, a sharded model breaks its graph at the checkpointed layer loop and runs every
    layer eagerly. The model's own loop then checkpoints no more. One graph serves every layer (same code, same
    shapes); the embedding, final norm and loss run eagerly."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    recompute = model.gradient_checkpointing or model.selective_recompute
    model.layers_recompute_themselves = recompute
    layers = []
    for layer in model.model.layers:
        if recompute:
            layer = checkpoint_wrapper(layer, **model._recompute_policy())   # state_dict keys keep their plain names
        layer.compile()
        layers.append(layer)
    return layers


def materialize(model: torch.nn.Module, device: torch.device, seed: Optional[int]) -> None:
    """Storage for this rank's shards of a model built on the meta device and sharded by wrap(), and, given a seed,
    the weights one process starts from under that seed: each parameter drawn whole on the CPU by SmolLM2's own
    init_parameter, in its order, and only this rank's shard kept. No rank holds more than one whole parameter at a
    time (a 1.7B model built whole costs each rank 7 GB). seed None: a checkpoint fills them next."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
    from torch.distributed.tensor import distribute_tensor
    model.to_empty(device=device)   # SmolLM2's: the rotary frequencies computed again, the head tied again
    if seed is None:
        return
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            whole = torch.empty(p.shape, dtype=p.dtype)   # on the CPU, whose random stream one process draws from
            model.init_parameter(name.replace(_CHECKPOINT_PREFIX, ""), whole, generator)   # the plain name
            p.copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None))   # no collective


def gradient_sync(net: torch.nn.Module, last_micro_batch: bool):
    """DDP all-reduces gradients inside backward(); skipping that on every micro-batch but the last saves k-1
    all-reduces. FSDP reduce-scatters on every micro-batch instead: its gradients then stay sharded (fp32, 1/N),
    where skipping would keep a whole unsharded copy per rank, the memory ZeRO is there to save."""
    if isinstance(net, DDP) and not last_micro_batch:
        return net.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip by the norm of the whole gradient: under FSDP each rank holds a shard, and the norm is taken across all
    of them (clipping each shard by its own norm would be a different update from one process's)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):   # a DTensor: the partial norms of the shards, reduced here
        norm = norm.full_tensor()
    return norm.item()


def all_finite(model: torch.nn.Module, rt: Runtime) -> bool:
    """No NaN/Inf in any rank's weights (each checks its own shard or replica)."""
    ok = torch.tensor(float(all(torch.isfinite(_local(p)).all() for p in model.parameters())), device=rt.device)
    if rt.world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


# ---------------------------------------------------------------- checkpoints: model and optimizer state


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name (not by position), whole, on the CPU: what a single-file
    checkpoint holds, loadable on one process or sharded over many."""
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if all(isinstance(key, int) for key in state["state"]):   # keyed by position: written before names were used
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict,
                 rt: Runtime) -> None:
    """Every rank writes its shards of the model and of the optimizer state into path's temporary twin; rank 0
    adds train_state.pt and renames the directory into place. A kill at any moment leaves earlier checkpoints intact
    and no half-written `step_*` directory: only complete ones carry the final name."""
    tmp = path.with_name(path.name + ".tmp")
    if rt.main:
        shutil.rmtree(tmp, ignore_errors=True)   # the remains of a save that was killed
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    # tensors only: DCP would pickle anything else, and unpickling is what a safe loader must never do
    dcp.save({"model": model_state, "optimizer": {"state": optim_state["state"]}}, checkpoint_id=str(tmp))
    if rt.main:
        save_atomic({**train_state, "optimizer_param_groups": optim_state["param_groups"]}, tmp / TRAIN_STATE)
        shutil.rmtree(path, ignore_errors=True)   # the same step saved again (a run repeated from an older one)
        os.replace(tmp, path)
        sync_dir(path.parent)
    dist.barrier()


def load_sharded(path: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                 train_state: dict) -> None:
    """Fill the model (and the optimizer, unless None) from a sharded checkpoint, re-sharded for this run's world
    size, one plain process included. The files are read by a loader that unpickles nothing but DCP's own index."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = {"state": get_optimizer_state_dict(model, optimizer)["state"]}
    load_sharded_state(state, path)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, {"state": state["optimizer"]["state"],
                                                    "param_groups": train_state["optimizer_param_groups"]})


def describe(cfg: Config, rt: Runtime) -> str:
    """How the ranks split the work, for the start line."""
    if rt.world == 1:
        return "1 process"
    if not sharded(cfg, rt):
        return f"DDP over {rt.world} processes"
    stage = "ZeRO-3" if cfg.optimizer.zero_stage >= 3 else "ZeRO-2"
    return f"FSDP2 over {rt.world} processes ({stage}, optimizer.zero_stage={cfg.optimizer.zero_stage})"
