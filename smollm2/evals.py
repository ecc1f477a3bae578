"""Benchmarks through lm-evaluation-harness, and the benchmarks a training run starts on its checkpoints.

`run_tasks` runs lm-eval's simple_evaluate with our model as its language model (harness.py); `task_scores` reads
the scores out of its results. `BackgroundEvals` runs evaluation.py on the checkpoints of a running training, each in a
process of its own, so training never waits for a benchmark.
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

from smollm2.checkpoint import is_hf_dir
from smollm2.config import EvalArgs
from smollm2.errors import ConfigError, InputError
from smollm2.loading import log

ROOT = Path(__file__).resolve().parent.parent   # where evaluation.py, the command BackgroundEvals runs, lives
HARNESS_MISSING = ("benchmarks need lm-evaluation-harness, which is not installed: pip install lm_eval==0.4.13 "
                   "(--text_file perplexity works without it)")


def require_harness() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise InputError(HARNESS_MISSING) from None


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
              log_samples: bool = False, chat_template: bool = False) -> dict:
    """lm-eval's simple_evaluate on our model; returns its results dict (per-item samples with log_samples).
    chat_template: each prompt rendered as a chat (lm-eval's apply_chat_template, the few-shot examples as earlier
    turns, its default with it), as instruct models are scored."""
    require_harness()
    import lm_eval

    from smollm2.harness import HarnessModel
    manager = task_manager(tasks, include_path)
    lm = HarnessModel(model, tokenizer, eos_id, model.config.bos_token_id, batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                   log_samples=log_samples, apply_chat_template=chat_template)


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


def results_path(source) -> Path:
    """Where a checkpoint's results go: step_N.pt (or a sharded step_N/) -> step_N.eval.json beside it, where rotation
    leaves it; a Hugging Face directory -> eval.json in it."""
    source = Path(source)
    return source / "eval.json" if is_hf_dir(source) else source.with_suffix(".eval.json")



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
        """evaluation.py's command line. eval.device auto is the CPU: on the training GPU the eval's weights and
        activations would take memory the planner gave the run, and an out-of-memory error would stop training."""
        c = self.cfg   # paths absolute: the trainer's working directory need not be the eval's
        flags = {"--tasks": ",".join(c.tasks), "--limit": c.limit, "--num_fewshot": c.num_fewshot, "--include_path":
                 c.include_path and Path(c.include_path).resolve(), "--batch_size": c.batch_size,
                 "--device": "cpu" if c.device == "auto" else c.device}
        return [sys.executable, str(ROOT / "evaluation.py"), "--checkpoint_path", str(checkpoint.resolve()),
                "--output", str(results_path(checkpoint).resolve()),
                *[str(x) for k, v in flags.items() if v is not None for x in (k, v)],
                *(["--chat_template"] if c.chat_template else [])]

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
                log(f"eval: benchmarks of step {self.running[1]} stopped; run evaluation.py on that checkpoint later")
                self.running = None
        records = []
        while self.running is not None:
            if self.running[2].poll() is None:
                log(f"eval: waiting for the benchmarks of step {self.running[1]} (log: "
                    f"{results_path(self.running[0]).with_suffix('.log')})")
                self.running[2].wait()
            records += self.poll()
        return records
