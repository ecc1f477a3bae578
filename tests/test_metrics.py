"""What a run reports about validation per data source: the log line, the curves of the plot and the app."""

import json

from metrics import format_val_line, plot_losses, short_names, val_curves


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
