"""What checking token shards against their manifest costs at a training start: `python bench/bench_shard_check.py
[--shards N] [--tokens M]`.

Writes N shards of M random uint16 tokens (50M by default: data_prep.shard_tokens' default, 100 MB each) and times
smollm2/shards.py's check_shards three ways:
  first sight   a folder copied from elsewhere: every shard is read and hashed (sha256) once;
  remembered    any later start, or the first one after prepare wrote the shards: a stat per shard;
  sha256 only   hashlib over the same bytes already in memory, the floor of the first sight.
"""

import argparse
import hashlib
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smollm2 import shards  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=50_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows, rng = [], np.random.default_rng(0)
        for i in range(args.shards):
            tokens = rng.integers(0, 49152, args.tokens, dtype=np.uint16)
            rows.append(shards.write_shard(folder, f"train_{i:06d}.bin", "train", tokens, np.dtype("<u2")))
        megabytes = os.path.getsize(os.path.join(folder, rows[0]["file"])) / 1e6
        t = time.perf_counter()
        hashlib.sha256(tokens.tobytes()).hexdigest()
        floor = time.perf_counter() - t
        for label in ("first sight", "remembered"):
            t = time.perf_counter()
            shards.check_shards(folder, rows, log=lambda _: None)
            per_shard = (time.perf_counter() - t) / args.shards
            print(f"{label:12s} {per_shard * 1e3:9.1f} ms per {megabytes:.0f} MB shard")
        print(f"{'sha256 only':12s} {floor * 1e3:9.1f} ms per {megabytes:.0f} MB shard (in memory)")


if __name__ == "__main__":
    main()
