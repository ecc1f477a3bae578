"""Benchmark scores and perplexity of any checkpoint: `python evaluation.py --checkpoint_path PATH --tasks hellaswag`.

    python evaluation.py --checkpoint_path runs/tiny --tasks hellaswag,arc_easy,piqa --limit 200
    python evaluation.py --checkpoint_path hf_export/ --tasks my_task --include_path my_tasks/
    python evaluation.py --checkpoint_path runs/tiny --text_file notes.txt
    python evaluation.py --checkpoint_path runs/tiny-dpo --tasks ifeval --chat_template   # as an instruct model

Benchmarks are lm-evaluation-harness's (an optional dependency: `pip install lm_eval`), with our model wrapped as its
language model (smollm2/harness.py); perplexity on a text file needs nothing beyond the model (smollm2/scoring.py).
Anything smollm2/loading.py's load_model reads can be scored. The table goes to stdout; the JSON goes beside the
checkpoint (--output to choose). A bad flag or input is one line, `error: ...`, and exit status 2. During training,
smollm2/evals.py's BackgroundEvals runs this command on saved checkpoints, in a process of its own.

Read next: convert_hf.py, which takes a checkpoint to Hugging Face's format and back.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from smollm2 import chat
from smollm2.errors import InputError, command
from smollm2.evals import require_harness, results_path, run_tasks, task_scores
from smollm2.loading import eos_id_for, load_model, log, open_tokenizer, pick_device, pick_dtype
from smollm2.metrics import human
from smollm2.scoring import perplexity


def markdown_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([lines[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|", *lines[1:]])


def format_report(report: dict) -> str:
    """The model card's table: one row per task and metric (score ± standard error), and the perplexity rows."""
    step = report.get("step")
    parts = [f"{report['checkpoint']}" + ("" if step is None else f" · step {step}")
             + f" · {human(report['parameters'])} parameters"]
    if report.get("tasks"):
        rows = [["Task", "Metric", "Shots", "Items", "Score"]]
        for name, t in report["tasks"].items():
            for metric, value in t["scores"].items():
                err = t["stderr"].get(metric)
                rows.append([name, metric, str(t["n_shot"]), str(t["items"]),
                             f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")])
        parts.append(markdown_table(rows))
    ppl = report.get("perplexity")
    if ppl:
        parts.append(markdown_table([["Text", "Tokens", "Bytes", "Token perplexity", "Byte perplexity", "Bits/byte"],
                                     [Path(ppl["file"]).name, f"{ppl['tokens']:,}", f"{ppl['bytes']:,}",
                                      f"{ppl['token_perplexity']:.3f}", f"{ppl['byte_perplexity']:.4f}",
                                      f"{ppl['bits_per_byte']:.4f}"]]))
    return "\n\n".join(parts)


def read_text(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--text_file {path}: cannot be read as UTF-8 text ({e})") from None
    if not text:
        raise InputError(f"--text_file {path}: the file is empty, there is nothing to score")
    return text


def evaluate_checkpoint(args) -> dict:
    """Load the checkpoint, run what the flags ask for, and return the report (written as JSON by main)."""
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if tasks:
        require_harness()   # before minutes of loading: a missing library is one line, at once
    text = read_text(args.text_file) if args.text_file else None
    device = pick_device(args.device)
    model, cfg, info = load_model(args.checkpoint_path, device, pick_dtype(device, args.dtype))
    tokenizer = open_tokenizer(args.tokenizer or info["tokenizer"])
    top = max(tokenizer.get_vocab().values())
    if top >= model.config.vocab_size:
        raise InputError(f"the tokenizer has token ids up to {top} but the model {model.config.vocab_size} tokens; "
                         "is --tokenizer the one this model was trained with?")
    # an instruct model's reply ends at <|im_end|> (a tokenizer without the chat tokens is refused here, in one line)
    eos_id = chat.end_id(tokenizer) if args.chat_template else eos_id_for(cfg, tokenizer)
    report = {"checkpoint": info["source"], "step": info["step"], "parameters": model.num_parameters(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": {k: getattr(args, k) for k in
                                                                       ("limit", "num_fewshot", "batch_size",
                                                                        "chat_template")}}
    if tasks:
        results = run_tasks(model, tokenizer, eos_id, tasks, args.limit, args.num_fewshot, args.include_path,
                            args.batch_size, chat_template=args.chat_template)
        report["tasks"] = task_scores(results)
        report["harness"] = {k: results.get(k) for k in ("results", "groups", "n-shot", "n-samples", "versions")}
    if text is not None:
        from tqdm import tqdm
        tokens = tokenizer.encode(text).ids
        windows = -(-len(tokens) // model.config.max_position_embeddings)   # scoring.rolling_windows' count
        with tqdm(total=windows, desc="perplexity", unit="window") as bar:
            prefix = cfg.model.model_config.bos_token_id
            result = perplexity(model, tokens, len(text.encode("utf-8")), eos_id if prefix is None else prefix,
                                args.batch_size, bar.update)
        report["perplexity"] = {"file": str(args.text_file), **result}
    return report


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)   # a reader (the training run's poll) never sees half a file


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint_path", required=True, help="a checkpoint (step_N.pt or a sharded step_N/), a run "
                    "directory (its newest), a Hugging Face model directory or an s3:// path")
    ap.add_argument("--tasks", help="comma-separated lm-eval tasks, groups or tags, e.g. hellaswag,arc_easy,piqa")
    ap.add_argument("--text_file", help="a UTF-8 text file: its token-level and byte-normalised perplexity")
    ap.add_argument("--limit", type=int, help="at most this many items per task (quick; not a comparable score)")
    ap.add_argument("--num_fewshot", type=int, help="solved examples shown before each item (default: the task's)")
    ap.add_argument("--include_path", help="a folder of your own task YAML files, in lm-eval's format")
    ap.add_argument("--batch_size", type=int, default=8, help="requests scored at once (default: 8)")
    ap.add_argument("--chat_template", action="store_true", help="render each prompt through SmolLM2's chat "
                    "template, the few-shot examples as earlier turns (lm-eval's --apply_chat_template): how an SFT or "
                    "DPO checkpoint is scored as an instruct model")
    ap.add_argument("--tokenizer", help="tokenizer.json file or hub name (default: the one found with the checkpoint)")
    ap.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="auto (default): bf16 (or fp16) on a GPU, fp32 on the CPU")
    ap.add_argument("--output", help="the JSON file to write (default: beside the checkpoint, step_N.eval.json)")
    args = ap.parse_args(argv)
    if not args.tasks and not args.text_file:
        ap.error("nothing to do: give --tasks NAMES, --text_file FILE, or both")
    for key, least in (("limit", 1), ("num_fewshot", 0), ("batch_size", 1)):
        if getattr(args, key) is not None and getattr(args, key) < least:
            ap.error(f"--{key} must be >= {least}")
    return args


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    report = evaluate_checkpoint(args)
    out = Path(args.output) if args.output else results_path(report["checkpoint"])
    write_json(report, out)
    print(format_report(report), flush=True)
    log(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
