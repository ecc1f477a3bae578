"""How fast text becomes tokens and tokens become batches: `python bench/bench_data.py [--repeats N]`.

On the same text (the built-in offline corpus, the Python standard library) and with the same tokenizer (trained on
it, as config_tiny.yaml does), it prints:
  raw encode   tokenizers' encode_batch over all documents at once, text already in memory (the ceiling);
  prepare      smollm2/prepare.py's `prepare` end to end: read files, tokenize, mix, write and hash shards, commit
               its state;
  ratio        prepare / raw (goal >= 0.8: packing and writing cost little beyond tokenization);
  loader       next_batch() of the training loader over the shards, for the tiny and the 135M batch shapes
               (goal >= 100x the ~40k tokens/s that SmolLM2-135M trains at on an A10G, i.e. >= 4M tokens/s).
Each figure is the best of --repeats runs, so other work on the machine disturbs it less; the CPU-time ratio is
printed too, as it barely depends on that other work.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
from smollm2 import prepare, sources  # noqa: E402
from smollm2.config_load import load_config  # noqa: E402
from smollm2.stages import stages_of  # noqa: E402
from smollm2.tokenizer import load_tokenizer


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config_tiny.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(root, [f"tokenizer.tokenizer_name_or_path={tmp}/tokenizer.json", "data_prep.val_tokens=0"])
        tok = load_tokenizer(cfg)   # trains it: a few seconds
        stage = stages_of(cfg)[0]
        texts = [text for text, _ in sources.documents(sources.sources(stage, cfg.data_prep.max_tokens)[0], stage)]
        print(f"corpus: {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f}M characters; "
              f"tokenizer: {tok.get_vocab_size()} tokens; {os.cpu_count()} CPU cores")

        raw, ours = [], []
        for run in range(args.repeats):   # interleaved, so a busy spell on the machine hits both alike
            wall, cpu, encodings = timed(lambda: tok.encode_batch(texts, add_special_tokens=False))
            raw.append((wall, cpu))
            cfg.data_prep.output_dir = os.path.join(tmp, f"shards{run}")
            stage = stages_of(cfg)[0]   # its folder follows data_prep.output_dir
            wall, cpu, state = timed(lambda: prepare.prepare(stage, cfg.data_prep, cfg.tokenizer.tokenizer_name_or_path,
                                                             tok, log=lambda _: None))
            ours.append((wall, cpu))
        n_tokens = sum(len(e.ids) + 1 for e in encodings)   # + EOS per document, as prepare writes
        assert sum(r["tokens"] for r in state["shards"]) == n_tokens
        (raw_wall, raw_cpu), (our_wall, our_cpu) = [[min(column) for column in zip(*runs)] for runs in (raw, ours)]
        for name, wall, cpu in (("raw encode", raw_wall, raw_cpu), ("prepare", our_wall, our_cpu)):
            print(f"{name:12s} {n_tokens / wall / 1e6:6.2f}M tokens/s   ({n_tokens:,} tokens in {wall:.2f} s, "
                  f"{cpu:.2f} CPU s)")
        print(f"ratio        {raw_wall / our_wall:6.2f}          (goal >= 0.8; in CPU time: {raw_cpu / our_cpu:.2f})")

        for batch, seq in ((16, 256), (8, 2048)):
            cfg.tokens.micro_batch_size, cfg.tokens.sequence_length = batch, seq
            loader = data.train_loader(cfg)
            steps = 2000
            seconds = min(timed(lambda: [loader.next_batch() for _ in range(steps)])[0] for _ in range(args.repeats))
            rate = steps * batch * seq / seconds
            print(f"loader {batch:2d}x{seq:<4d} {rate / 1e6:6.1f}M tokens/s   ({rate / 40e3:,.0f}x of 40k tokens/s, "
                  "goal >= 100x)")


if __name__ == "__main__":
    main()
