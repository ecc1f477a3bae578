"""metrics.py: what a run shows its user. The loss curve's train line is smoothed, so the trend shows through the
noise of single logging intervals, and drawn next to the raw points; validation is reported per data source in the
log line, the plot and the app."""

import json
import random
import statistics
from types import SimpleNamespace

from smollm2 import metrics
from smollm2.metrics import format_val_line, plot_losses, short_names, val_curves


def test_the_val_line_gives_each_sources_loss_by_a_short_name():
    record = {"step": 500, "loss": 3.2, "ppl": 24.53, "sources": {"data/web": 3.1, "HuggingFaceTB/stack-edu": 2.9}}
    assert format_val_line(record) == "step 500 | val loss 3.200 | ppl 24.5 | web 3.100 · stack-edu 2.900"
    assert format_val_line({**record, "sources": {"data/web": 3.2}}) == "step 500 | val loss 3.200 | ppl 24.5"
    assert short_names(["a/web", "b/web", "c/code/"]) == {"a/web": "a/web", "b/web": "b/web", "c/code/": "code"}


def test_each_source_gets_a_validation_curve_in_the_plot(tmp_path):
    records = [{"kind": "train", "step": s, "loss": 4.0 - s / 10} for s in range(1, 11)]
    records += [{"kind": "val", "step": s, "loss": 3.5 - s / 10, "sources": {"web": 3.4 - s / 10, "code": 3.6 - s / 10}}
                for s in (5, 10)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert val_curves(records) == {"web": [(5, 2.9), (10, 2.4)], "code": [(5, 3.1), (10, 2.6)]}
    assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png").stat().st_size > 10_000


def mean_jump(values: list[float]) -> float:
    return statistics.mean(abs(a - b) for a, b in zip(values, values[1:]))


def test_the_smoothed_train_curve_follows_the_trend_without_the_noise():
    rng = random.Random(0)
    trend = [4 - 2 * i / 1000 for i in range(1000)]
    raw = [t + rng.gauss(0, 0.5) for t in trend]
    smooth = metrics.smoothed(raw)
    assert len(smooth) == len(raw) and smooth[0] == raw[0]   # debiased: the first point is not pulled toward 0
    assert mean_jump(smooth) < mean_jump(raw) / 20
    assert max(abs(s - t) for s, t in zip(smooth[100:], trend[100:])) < 0.3
    assert metrics.smoothed([]) == [] and metrics.smoothed([2.5, 2.5, 2.5]) == [2.5, 2.5, 2.5]


def test_the_loss_plot_draws_raw_and_smoothed_train_loss_and_validation(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s, "loss": 5 - s / 100 + (0.5 if s % 2 else -0.5)} for s in range(1, 201)]
    rows += [{"kind": "val", "step": s, "loss": 5 - s / 100} for s in (100, 200)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    figure = metrics.loss_figure(metrics.read_metrics(log))
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == ["train", "train (smoothed)", "validation"]
    smooth = figure.axes[0].get_lines()[1].get_ydata()
    assert mean_jump(list(smooth)) < 0.1   # the raw line jumps by 1 at every step
    assert metrics.plot_losses(log, tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_the_plot_draws_post_trainings_statistics_beside_the_loss_and_pretraining_none(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s, "loss": -0.1, "reward": s / 20, "kl": 0.01 * s, "completion_length": 7.0}
            for s in range(1, 21)]
    rows += [{"kind": "val", "step": s, "loss": -s / 20, "reward": s / 20, "accuracy": s / 40, "accuracy_fact": s / 30}
             for s in (10, 20)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = metrics.read_metrics(log)
    series = metrics.statistic_series(records)
    assert set(series) == {"train reward", "train kl", "val reward", "val accuracy", "val accuracy_fact"}
    assert series["val accuracy_fact"] == [(10, 1 / 3), (20, 2 / 3)] and len(series["train kl"]) == 20
    figure = metrics.loss_figure(records)
    assert len(figure.axes) == 2 and figure.axes[1].get_ylabel() == "post-training statistic"
    assert {line.get_label() for line in figure.axes[1].get_lines()} == {
        "train reward (smoothed)", "train kl (smoothed)", "val reward", "val accuracy", "val accuracy_fact"}
    pretraining = [{"kind": "train", "step": 1, "loss": 5.0}, {"kind": "val", "step": 1, "loss": 5.1}]
    assert metrics.statistic_series(pretraining) == {} and len(metrics.loss_figure(pretraining).axes) == 1


def test_each_log_line_gives_the_gpu_peaks_allocated_and_reserved_of_its_own_interval(monkeypatch, capsys):
    """On a GPU (torch.cuda recorded here) each line reads both peaks, then resets them once, so the next line's
    figures are its own steps'."""
    import torch

    from smollm2 import progress
    from smollm2.config import Config
    calls, peaks = [], iter([(3 * 2 ** 30, 4 * 2 ** 30), (1 * 2 ** 30, 2 * 2 ** 30)])
    current = {}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: current["peaks"][0])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: current["peaks"][1])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    records = []
    run = SimpleNamespace(cfg=Config(), rt=SimpleNamespace(device=torch.device("cuda"), world=1), step=10,
                          tokens_per_step=1024, tokens_seen=0, train_data=SimpleNamespace(name="stable"),
                          log=SimpleNamespace(write=records.append))
    for _ in range(2):
        current["peaks"] = next(peaks)
        progress.log_progress(run, progress.Progress(0, steps_since_log=1), 1.0, 1e-3, {})
        assert calls.count("reset") == len(records)
    lines = capsys.readouterr().out.splitlines()
    assert "mem 3.0 allocated, 4.0 reserved GiB" in lines[0] and "mem 1.0 allocated, 2.0 reserved GiB" in lines[1]
    assert [(r["mem_gib"], r["mem_reserved_gib"]) for r in records] == [(3.0, 4.0), (1.0, 2.0)]
