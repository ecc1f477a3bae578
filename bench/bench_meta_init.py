"""Host memory and time of each FSDP rank building its model: whole and then sharded, or on the meta device.

    flock /tmp/heavy.lock python bench/bench_meta_init.py                 # 135M and 360M on 2 CPU ranks (gloo)
    python bench/bench_meta_init.py --shapes 1.7B --ranks 2                # needs 2 x 7 GB free for `whole`

`whole` is what every rank did before models were built on the meta device (and what one process still does):
SmolLM2 built and initialised in full, then sharded by distributed.wrap. `meta` is train.py's way now: Task.model
on the meta device, wrap, then distributed.materialize, which draws each parameter whole and keeps the rank's
shard. `peak adds` is the rise of the rank's resident high-water mark over the build (glibc hands large frees back
to the OS, as in bench_memory.py, so the resident set follows the live tensors); `local` is what the rank keeps.
"""

import argparse
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))   # read by glibc in the spawned ranks

SHAPES = {"135M": "config_smollm2_135M.yaml", "360M": "configs/config_smollm2_360M.yaml",
          "1.7B": "configs/config_smollm2_1.7B.yaml"}


def resident_gb(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024 / 1e9


def build_on_rank(rank: int, ranks: int, store: str, shape: str, way: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    import train
    from model import SmolLM2
    from smollm2 import distributed
    from smollm2.config_load import load_config
    from smollm2.runtime import Runtime

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=ranks)
    cfg = load_config(os.path.join(ROOT, SHAPES[shape]), ["optimizer.zero_stage=1", "run.compile=false"])
    rt = Runtime(torch.device("cpu"), "fp32", rank=rank, world=ranks)
    before, start = resident_gb("VmRSS"), time.perf_counter()
    if way == "whole":
        torch.manual_seed(cfg.general.seed)
        model = SmolLM2(cfg.model.model_config, cfg.model.init_method.std)
        distributed.wrap(model, cfg, rt)
    else:
        model = train.pretraining(cfg).model(cfg, rt, None)
        distributed.wrap(model, cfg, rt)
        distributed.materialize(model, rt.device, cfg.general.seed)
    seconds = time.perf_counter() - start
    local = sum(p.to_local().numel() for p in model.parameters()) * 4 / 1e9
    with open(os.path.join(out, f"{way}{rank}"), "w") as f:
        f.write(f"{resident_gb('VmHWM') - before:.2f} {local:.2f} {seconds:.1f}")
    dist.destroy_process_group()


def main() -> None:
    import tempfile

    import torch.multiprocessing as mp
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["135M", "360M"], choices=list(SHAPES))
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    print(f"{'shape':>6} {'way':>6} {'rank':>4} {'peak adds GB':>12} {'local GB':>8} {'seconds':>7}")
    for shape in args.shapes:
        for way in ("whole", "meta"):
            with tempfile.TemporaryDirectory() as out:
                mp.start_processes(build_on_rank, (args.ranks, os.path.join(out, "store"), shape, way, out),
                                   nprocs=args.ranks, start_method="spawn")
                for rank in range(args.ranks):
                    peak, local, seconds = open(os.path.join(out, f"{way}{rank}")).read().split()
                    print(f"{shape:>6} {way:>6} {rank:>4} {peak:>12} {local:>8} {seconds:>7}")


if __name__ == "__main__":
    main()
