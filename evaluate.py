"""Benchmark scores and perplexity of any checkpoint: `python evaluate.py --checkpoint_path PATH --tasks hellaswag`.

    python evaluate.py --checkpoint_path runs/tiny --tasks hellaswag,arc_easy,piqa --limit 200
    python evaluate.py --checkpoint_path hf_export/ --tasks my_task --include_path my_tasks/
    python evaluate.py --checkpoint_path runs/tiny --text_file notes.txt

Benchmarks are lm-evaluation-harness's (an optional dependency: `pip install lm_eval`), with our model wrapped as
its language model (harness.py); perplexity on a text file needs nothing beyond the model (scoring.py). Anything
checkpoint.load_model reads can be scored. The table goes to stdout; the JSON goes beside the checkpoint (--output
to choose). During training, BackgroundEvals runs this command on saved checkpoints, in a process of its own.
"""

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from checkpoint import CheckpointError, is_hf_dir
from config import ConfigError, EvalArgs
from generate import InputError, eos_id_for, load, log, open_tokenizer, pick_device, pick_dtype
from metrics import human
from scoring import perplexity

HERE = Path(__file__).resolve().parent
HARNESS_MISSING = ("benchmarks need lm-evaluation-harness, which is not installed: pip install lm_eval==0.4.13 "
                   "(--text_file perplexity works without it)")


def require_harness() -> None:
    try:
        import lm_eval   # noqa: F401
    except ImportError:
        raise InputError(HARNESS_MISSING) from None


class _LibraryFinder(importlib.abc.MetaPathFinder):
    """Finds `evaluate` anywhere on sys.path but in this repository."""

    def find_spec(self, name, path=None, target=None):
        if name != "evaluate":
            return None
        elsewhere = [p for p in sys.path if Path(p or ".").resolve() != HERE]
        return importlib.machinery.PathFinder.find_spec(name, elsewhere)


@contextlib.contextmanager
def library_named_evaluate():
    """Some harness tasks and metrics `import evaluate`, meaning Hugging Face's library, whose name this file has too:
    while the harness runs, that import finds the library (loaded only if a task asks for it)."""
    ours = sys.modules.pop("evaluate", None)
    finder = _LibraryFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        if ours is not None:
            sys.modules["evaluate"] = ours


def task_manager(tasks: list[str], include_path: Optional[str]):
    """lm-eval's index of tasks: only the --include_path folder when it holds every task asked for (indexing the
    hundreds of built-in ones takes seconds), else the built-in tasks and that folder. Unknown names are refused."""
    from lm_eval.tasks import TaskManager
    if include_path and not Path(include_path).is_dir():
        raise InputError(f"--include_path {include_path}: no such folder")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or len(manager.match_tasks(tasks)) < len(tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise InputError(f"unknown task {', '.join(unknown)}: not an lm-eval task, group or tag, nor in --include_path "
                         "(list them with `lm-eval ls tasks`)")
    return manager


def run_tasks(model, tokenizer, eos_id: int, tasks: list[str], limit: Optional[int] = None,
              num_fewshot: Optional[int] = None, include_path: Optional[str] = None, batch_size: int = 8,
              log_samples: bool = False) -> dict:
    """lm-eval's simple_evaluate on our model; returns its results dict (per-item samples with log_samples)."""
    require_harness()
    import lm_eval
    from harness import HarnessModel
    manager = task_manager(tasks, include_path)
    lm = HarnessModel(model, tokenizer, eos_id, model.config.bos_token_id, batch_size)
    with library_named_evaluate():
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                       task_manager=manager, log_samples=log_samples)


def task_scores(results: dict) -> dict:
    """lm-eval's results -> {task: {scores, stderr, n_shot, items}}. A group with a score of its own (mmlu) stands
    for its members; a metric under a filter other than "none" is named `metric (filter)`."""
    groups = results.get("groups", {})
    hidden: set[str] = set()

    def hide_members(name):
        for child in results.get("group_subtasks", {}).get(name, []):
            hidden.add(child)
            hide_members(child)

    out = {}
    for name, entry in {**results["results"], **groups}.items():
        scores, stderr = {}, {}
        for key, value in entry.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue   # alias, name, sample_len, and a stderr lm-eval could not compute ("N/A")
            metric, filtered = key.split(",", 1)
            is_stderr = metric.endswith("_stderr")
            metric = metric.removesuffix("_stderr") + ("" if filtered == "none" else f" ({filtered})")
            (stderr if is_stderr else scores)[metric] = value
        if not scores:
            continue
        if name in groups:
            hide_members(name)
        samples = results.get("n-samples", {}).get(name, {})
        out[name] = {"scores": scores, "stderr": stderr, "n_shot": results.get("n-shot", {}).get(name),
                     "items": samples.get("effective", entry.get("sample_len"))}
    return {name: t for name, t in out.items() if name not in hidden}


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


def results_path(source) -> Path:
    """Where a checkpoint's results go: step_N.pt (or a sharded step_N/) -> step_N.eval.json beside it, where rotation
    leaves it; a Hugging Face directory -> eval.json in it."""
    source = Path(source)
    return source / "eval.json" if is_hf_dir(source) else source.with_suffix(".eval.json")


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
    model, cfg, info = load(args.checkpoint_path, device, pick_dtype(device, args.dtype))
    tokenizer = open_tokenizer(args.tokenizer or info["tokenizer"])
    top = max(tokenizer.get_vocab().values())
    if top >= model.config.vocab_size:
        raise InputError(f"the tokenizer has token ids up to {top} but the model {model.config.vocab_size} tokens; "
                         "is --tokenizer the one this model was trained with?")
    eos_id = eos_id_for(cfg, tokenizer)
    report = {"checkpoint": info["source"], "step": info["step"], "parameters": model.num_parameters(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": {k: getattr(args, k) for k in
                                                                       ("limit", "num_fewshot", "batch_size")}}
    if tasks:
        results = run_tasks(model, tokenizer, eos_id, tasks, args.limit, args.num_fewshot, args.include_path,
                            args.batch_size)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = evaluate_checkpoint(args)
    except (InputError, CheckpointError) as e:
        log(f"error: {e}")
        return 1
    out = Path(args.output) if args.output else results_path(report["checkpoint"])
    write_json(report, out)
    print(format_report(report), flush=True)
    log(f"results written to {out}")
    return 0


# ---------------------------------------------------------------- benchmarks during training


def eval_records(report: dict, step: int) -> list[dict]:
    """metrics.jsonl records of a report: one `eval` record per task, its scores apart from the facts about them."""
    return [{"kind": "eval", "step": step, "task": name, **t} for name, t in report.get("tasks", {}).items()]


class BackgroundEvals:
    """Benchmarks on the checkpoints of a running training, each in a process of its own, so training never waits.

    The trainer calls start(checkpoint, step) after a save at an eval step (due()). One eval process runs at a time;
    later checkpoints wait their turn, spared from rotation (is_pending). poll() returns the metrics.jsonl records of
    evals that have finished and starts the next; finish() waits for the rest at the end of the run, or stops them.
    """

    def __init__(self, cfg: EvalArgs, checkpoint_interval: int):
        """Checks what would make every eval fail, before step 1: the harness, the task folder."""
        try:
            require_harness()
        except InputError as e:
            raise ConfigError(f"eval.tasks: {e}") from None
        if cfg.include_path and not Path(cfg.include_path).is_dir():
            raise ConfigError(f"eval.include_path: {cfg.include_path}: no such folder")
        self.cfg, self.every = cfg, cfg.interval or checkpoint_interval
        self.waiting: list[tuple[Path, int]] = []
        self.running: Optional[tuple[Path, int, subprocess.Popen]] = None

    def due(self, step: int, final: bool) -> bool:
        return final or step % self.every == 0

    def command(self, checkpoint: Path) -> list[str]:
        c = self.cfg   # paths absolute: the trainer's working directory need not be the eval's
        flags = {"--tasks": ",".join(c.tasks), "--limit": c.limit, "--num_fewshot": c.num_fewshot, "--include_path":
                 c.include_path and Path(c.include_path).resolve(), "--batch_size": c.batch_size, "--device": c.device}
        return [sys.executable, str(HERE / "evaluate.py"), "--checkpoint_path", str(checkpoint.resolve()),
                "--output", str(results_path(checkpoint).resolve()),
                *[str(x) for k, v in flags.items() if v is not None for x in (k, v)]]

    def start(self, checkpoint: Path, step: int) -> None:
        self.waiting.append((Path(checkpoint), step))
        if self.running is None:
            self._launch()
        else:
            log(f"eval: benchmarks of step {step} wait for those of step {self.running[1]}")

    def _launch(self) -> None:
        checkpoint, step = self.waiting.pop(0)
        with open(results_path(checkpoint).with_suffix(".log"), "w") as out:   # the child keeps its own handle
            process = subprocess.Popen(self.command(checkpoint), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        self.running = (checkpoint, step, process)
        log(f"eval: benchmarks of step {step} started in the background (pid {process.pid})")

    def is_pending(self, path) -> bool:
        """A checkpoint still to be evaluated: rotation must keep it."""
        jobs = self.waiting + ([self.running[:2]] if self.running else [])
        return any(Path(path) == checkpoint for checkpoint, _ in jobs)

    def _collect(self) -> list[dict]:
        checkpoint, step, process = self.running
        self.running = None
        result, logfile = results_path(checkpoint), results_path(checkpoint).with_suffix(".log")
        if process.returncode != 0 or not result.is_file():
            lines = logfile.read_text(errors="replace").strip().splitlines() if logfile.is_file() else []
            log(f"warning: eval: benchmarks of step {step} failed ({lines[-1] if lines else 'no output'}); "
                f"the whole log is {logfile}")
            return []
        records = eval_records(json.loads(result.read_text()), step)
        for r in records:
            main_metric, value = next(iter(r["scores"].items()))
            log(f"step {step} | eval {r['task']} {main_metric} {value:.4f}")
        return records

    def poll(self) -> list[dict]:
        records = []
        if self.running is not None and self.running[2].poll() is not None:
            records = self._collect()
        if self.running is None and self.waiting:
            self._launch()
        return records

    def finish(self, wait: bool = True) -> list[dict]:
        """Wait for every eval still to run (wait=True), or stop the one running and drop the rest."""
        if not wait:
            self.waiting = []
            if self.running is not None and self.running[2].poll() is None:
                self.running[2].terminate()
                self.running[2].wait()
                log(f"eval: benchmarks of step {self.running[1]} stopped; run evaluate.py on that checkpoint later")
                self.running = None
        records = []
        while self.running is not None:
            if self.running[2].poll() is None:
                log(f"eval: waiting for the benchmarks of step {self.running[1]} (log: "
                    f"{results_path(self.running[0]).with_suffix('.log')})")
                self.running[2].wait()
            records += self.poll()
        return records


if __name__ == "__main__":
    sys.exit(main())
