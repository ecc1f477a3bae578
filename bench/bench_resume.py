"""Time to the first batch of a resumed streamed run, near the start of the stream and far into it.

Two sources streamed through `datasets` (local folders of JSON-lines files, loaded with streaming=True exactly as a
hub dataset; one file is one shard) are mixed 3:1. A loader reads N micro-batches and saves its position; a new
loader restores it and takes one batch. The resume reads only the tokenizer's read-ahead (and, inside `datasets`,
the rest of the file it stopped in), so its time should not grow with N; the last line shows what reading the stream
again up to the position costs, which is what a re-reading resume pays.

    python bench/bench_resume.py [--files 100] [--rows 300] [--far 1000] [--repeats 5]
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
from smollm2.config_load import config_from_dict  # noqa: E402
from smollm2.tokenizer import load_tokenizer

WORDS = ("the of model token data shard rank block loss step and to in for is on that with résumé learning rate "
         "def return class import self value list dict").split()


def write_source(folder: str, tag: str, files: int, rows: int) -> None:
    os.makedirs(folder)
    rng = random.Random(tag)
    for f in range(files):
        with open(os.path.join(folder, f"train-{f:05d}.jsonl"), "w", encoding="utf-8") as out:
            for r in range(rows):
                out.write(json.dumps({"text": f"{tag}{f}.{r} " + " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))})
                          + "\n")


def timed_first_batch(cfg, state: dict) -> float:
    t0 = time.perf_counter()
    loader = data.train_loader(cfg)
    loader.load_state_dict(state)
    loader.next_batch()
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100, help="files of the larger source (the other has half)")
    parser.add_argument("--rows", type=int, default=300, help="rows per file")
    parser.add_argument("--far", type=int, default=1000, help="micro-batches before the far checkpoint")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        web, code = os.path.join(tmp, "web"), os.path.join(tmp, "code")
        write_source(web, "W", args.files, args.rows)
        write_source(code, "C", args.files // 2, args.rows)
        cfg = config_from_dict({
            "data_stages": [{"data": {"dataset": {"hf_dataset_or_datasets": {web: 3.0, code: 1.0}}}}],
            "model": {"model_config": {"vocab_size": 2048, "max_position_embeddings": 256}},
            "tokenizer": {"tokenizer_name_or_path": os.path.join(tmp, "tokenizer.json")},
            "tokens": {"sequence_length": 255, "micro_batch_size": 8},
            "data_prep": {"output_dir": os.path.join(tmp, "shards"), "val_tokens": 10_000,
                          "tokenizer_vocab_size": 2048, "tokenizer_train_chars": 2_000_000}})
        load_tokenizer(cfg)   # trains it on the first 2M characters
        per_batch = cfg.tokens.micro_batch_size * (cfg.tokens.sequence_length + 1)
        saved = []
        for position in (0, args.far):
            loader = data.train_loader(cfg)
            t0 = time.perf_counter()
            for _ in range(position):
                loader.next_batch()
            reread = time.perf_counter() - t0
            state = loader.state_dict()
            where = [p["state"]["examples_iterable"]["examples_iterable"]["shard_idx"] if p else 0
                     for p in (state["stream"]["mixer"] or {}).get("positions", [None, None])]
            saved.append((position, state, reread, where))
        times = [[] for _ in saved]
        for _ in range(args.repeats):   # interleaved, so a busy spell on the machine hits both alike
            for i, (_, state, _, _) in enumerate(saved):
                times[i].append(timed_first_batch(cfg, state))
        results = [(position, min(t), reread, where) for (position, _, reread, where), t in zip(saved, times)]
        print(f"two streamed sources, {args.files} + {args.files // 2} files of {args.rows} rows, mixed 3:1; "
              f"micro-batch {per_batch:,} tokens")
        for position, seconds, _, where in results:
            print(f"resume at micro-batch {position:5d} ({position * per_batch / 1e6:5.2f}M tokens in, files "
                  f"{where[0]} and {where[1]}): first batch after {seconds:.2f} s")
        far = results[-1]
        print(f"ratio far / start: {far[1] / results[0][1]:.2f} (goal: about 1); reading the stream again up to "
              f"micro-batch {far[0]} instead takes {far[2]:.1f} s")


if __name__ == "__main__":
    main()
