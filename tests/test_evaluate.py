"""evaluation.py scores a checkpoint as lm-evaluation-harness's own `hf` model scores its export, item by item, on local
tasks of hand-made items (multiple choice, rolling log-likelihood, generation); perplexity on a file equals
transformers'; a missing harness is one line; benchmarks during training land in metrics.jsonl at their steps."""

import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ENV, make_config, make_run, run_train
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

import convert_hf
import evaluation
from smollm2 import chat, evals
from smollm2.config import EvalArgs
from smollm2.loading import load_model
from smollm2.scoring import perplexity, rolling_windows, score

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 64   # short, so few-shot prompts and long texts go past it: truncation and rolling windows are exercised
FILLER = "The quick brown fox jumps over the lazy dog while the model reads a long question. "


def write_tasks(folder: Path) -> Path:
    """Three tasks in lm-eval's --include_path format over local JSONL files: one per kind of request."""
    folder.mkdir(parents=True)
    mc = [{"question": f"{FILLER * (i % 3 == 0) * (1 + i // 6)}What does def add(a, b) return for {i} and {i + 1}?",
           "choices": [str(2 * i + 1), f"{i} + {i + 1}", "a + b", "None of these"], "answer": i % 4}
          for i in range(12)]
    ppl = [{"text": FILLER * n + f"def add(a, b):\n    return a + b  # {n}\n"} for n in (0, 1, 3, 6)]
    gen = [{"prompt": f"{FILLER * (i % 2) * 2}def add(a, b):\n    return", "target": " a + b"} for i in range(5)]
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
{common}dataset_kwargs: {{data_files: {{test: {folder / 'mc.jsonl'}}}}}
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}},
              {{metric: acc_norm, aggregation: mean, higher_is_better: true}}]
""")
    (folder / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
{common}dataset_kwargs: {{data_files: {{test: {folder / 'ppl.jsonl'}}}}}
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
""")
    (folder / "tiny_gen.yaml").write_text(f"""task: tiny_gen
{common}dataset_kwargs: {{data_files: {{test: {folder / 'gen.jsonl'}}}}}
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 12, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
""")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(run directory, its Hugging Face export, the task folder)."""
    root = tmp_path_factory.mktemp("evaluate")
    make_run(root / "run", context=CONTEXT)
    convert_hf.export_hf(str(root / "run"), str(root / "hf"))
    return root / "run", root / "hf", write_tasks(root / "tasks")


def assert_same_items(ours: dict, theirs: dict, task: str) -> None:
    """Every item's responses (log-likelihoods, greedy flags, generated text) and per-item metrics agree."""
    mine = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
    hf = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in hf] and mine
    for a, b in zip(mine, hf):
        assert a["arguments"] == b["arguments"], "both sides must be asked the same thing"
        for ra, rb in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
            if isinstance(rb, str):       # a generated text
                assert ra == rb
            elif isinstance(rb, float):   # a rolling log-likelihood
                assert ra == pytest.approx(rb, rel=1e-5, abs=1e-4)
            else:                         # (log-likelihood, is it the greedy continuation)
                assert ra[0] == pytest.approx(rb[0], rel=1e-5, abs=1e-4) and ra[1] == rb[1]
        for metric in a["metrics"]:
            assert a[metric] == pytest.approx(b[metric], rel=1e-5), (task, a["doc_id"], metric)


def test_scores_equal_lm_eval_hf_model_item_by_item(setup):
    import lm_eval
    run_dir, hf_dir, tasks = setup
    names = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    manager = evals.task_manager(names, str(tasks))
    theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(hf_dir), "device": "cpu"},
                                     tasks=names, num_fewshot=2, batch_size=3, task_manager=manager,
                                     log_samples=True)
    model, cfg, info = load_model(run_dir)
    tokenizer = Tokenizer.from_file(info["tokenizer"])
    ours = evals.run_tasks(model, tokenizer, 0, names, num_fewshot=2, include_path=str(tasks), batch_size=3,
                              log_samples=True)
    for task in names:
        assert_same_items(ours, theirs, task)
    long_prompts = [s for s in ours["samples"]["tiny_mc"] if len(tokenizer.encode(s["arguments"][0][0]).ids) > CONTEXT]
    assert long_prompts, "some few-shot prompts must be longer than the context, so truncation is compared too"
    assert len(rolling_windows(tokenizer.encode(FILLER * 6).ids, 0, CONTEXT)) > 2
    assert any(s["filtered_resps"][0].strip() for s in ours["samples"]["tiny_gen"]), "generation must say something"
    mine, hfs = evals.task_scores(ours), evals.task_scores(theirs)
    assert mine.keys() == hfs.keys() == set(names)
    for task in names:
        assert mine[task]["scores"] == pytest.approx(hfs[task]["scores"], rel=1e-5)


def test_chat_template_renders_each_request_through_the_one_template_as_lm_eval_asks(setup, capsys):
    run_dir, _, tasks = setup
    model, _, info = load_model(run_dir)
    tokenizer = Tokenizer.from_file(info["tokenizer"])
    chat.add_chat_tokens(tokenizer)   # ids 300 and 301 of the model's 320
    docs = [json.loads(line) for line in (tasks / "mc.jsonl").read_text().splitlines()]
    turn = [lambda d: {"role": "user", "content": f"Question: {d['question']}\nAnswer:"},
            lambda d: {"role": "assistant", "content": d["choices"][d["answer"]]}]
    for shots in (0, 1):   # one shot: the solved example is an earlier user turn and the assistant's answer
        out = evals.run_tasks(model, tokenizer, chat.end_id(tokenizer), ["tiny_mc"], limit=3, num_fewshot=shots,
                              include_path=str(tasks), log_samples=True, chat_template=True)
        for sample in out["samples"]["tiny_mc"]:
            item = sample["doc"]
            contexts = {context for context, _ in sample["arguments"]}
            # the solved example is drawn from the test split (lm-eval may even draw the item itself)
            examples = [[]] if shots == 0 else [[turn[0](d), turn[1](d)] for d in docs]
            assert any(contexts == {chat.render(e + [turn[0](item)], add_generation_prompt=True)} for e in examples)
            assert [c for _, c in sample["arguments"]] == item["choices"]   # no space before an answer in a chat
    assert evaluation.main(["--checkpoint_path", str(run_dir), "--tasks", "tiny_mc", "--include_path", str(tasks),
                            "--chat_template"]) == 2   # the run's own tokenizer has no chat tokens
    assert "this tokenizer has no <|im_start|> / <|im_end|> tokens" in capsys.readouterr().err


def test_rolling_windows_are_lm_eval_s(setup):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    for n in (1, 5, 63, 64, 65, 128, 129, 300):
        tokens = list(range(1, n + 1))
        theirs = [(ctx + cont, len(cont)) for ctx, cont in
                  map(make_disjoint_window, get_rolling_token_windows(tokens, 0, CONTEXT, 1))]
        assert rolling_windows(tokens, 0, CONTEXT) == theirs
        assert sum(k for _, k in theirs) == n


def test_batched_scores_equal_one_by_one(setup):
    model, _, _ = load_model(setup[0])
    g = torch.Generator().manual_seed(0)
    requests = [(torch.randint(1, 320, (length,), generator=g).tolist(), k)
                for length, k in ((65, 10), (5, 1), (30, 29), (12, 4), (2, 1))]
    batched = score(model, requests, batch_size=4)
    for request, (logprob, greedy) in zip(requests, batched):
        alone = score(model, [request], batch_size=1)[0]
        assert logprob == pytest.approx(alone[0], rel=1e-5) and greedy == alone[1]
    with pytest.raises(ValueError, match="does not fit a context"):
        score(model, [(list(range(CONTEXT + 2)), 1)], batch_size=1)


def hf_nll(hf, windows) -> float:
    """Minus the log-likelihood transformers gives the scored tokens of each window, summed."""
    total = 0.0
    for tokens, k in windows:
        with torch.no_grad():
            logp = hf(torch.tensor([tokens[:-1]])).logits[0].float().log_softmax(-1)
        total -= logp[-k:].gather(-1, torch.tensor(tokens[-k:])[:, None]).sum().item()
    return total


def test_perplexity_equals_transformers(setup, tmp_path):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    run_dir, hf_dir, _ = setup
    model, _, info = load_model(run_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = Tokenizer.from_file(info["tokenizer"])
    short = "def add(a, b):\n    return a + b\n"
    ids = tokenizer.encode(short).ids
    with torch.no_grad():   # transformers' own loss: the mean NLL of every token after the prefix
        loss = hf(torch.tensor([[0] + ids]), labels=torch.tensor([[0] + ids])).loss.item()
    ours = perplexity(model, ids, len(short.encode()), 0, batch_size=2)
    assert ours["token_perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)

    text = FILLER * 8 + "naïve café 数据\n"   # several windows, and multi-byte characters: bytes != characters
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    ids = tokenizer.encode(text).ids
    windows = [(c + t, len(t)) for c, t in map(make_disjoint_window, get_rolling_token_windows(ids, 0, CONTEXT, 1))]
    nll, n_bytes = hf_nll(hf, windows), len(text.encode("utf-8"))
    assert len(windows) > 3 and n_bytes > len(text)
    out = tmp_path / "ppl.json"
    assert evaluation.main(["--checkpoint_path", str(run_dir), "--text_file", str(tmp_path / "text.txt"),
                          "--output", str(out), "--batch_size", "3"]) == 0
    got = json.loads(out.read_text())["perplexity"]
    assert got["tokens"] == len(ids) and got["bytes"] == n_bytes
    assert got["token_perplexity"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-5)
    assert got["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)


def test_cli_prints_the_table_and_writes_json_beside_the_checkpoint(setup, capsys):
    run_dir, _, tasks = setup
    assert evaluation.main(["--checkpoint_path", str(run_dir), "--tasks", "tiny_mc,tiny_gen", "--include_path",
                          str(tasks), "--limit", "4", "--batch_size", "2"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run_dir / "checkpoints" / "step_00000100.eval.json").read_text())
    assert report["step"] == 100 and set(report["tasks"]) == {"tiny_mc", "tiny_gen"}
    assert report["tasks"]["tiny_mc"]["items"] == 4
    for task, t in report["tasks"].items():
        for metric, value in t["scores"].items():
            row = next(line for line in out.splitlines() if line.startswith(f"| {task} ") and f" {metric} " in line)
            assert f"{value:.4f}" in row
    assert out.splitlines()[2].startswith("| Task") and "step 100" in out.splitlines()[0]


def test_unknown_task_missing_folder_empty_file_and_foreign_tokenizer_are_one_line(setup, tmp_path, capsys):
    run_dir, _, tasks = setup
    (tmp_path / "empty.txt").write_text("")
    assert evaluation.main(["--checkpoint_path", str(run_dir), "--text_file", str(tmp_path / "empty.txt")]) == 2
    assert capsys.readouterr().err == f"error: --text_file {tmp_path / 'empty.txt'}: the file is empty, there is " \
                                      "nothing to score\n"
    big = tmp_path / "big.json"
    Tokenizer.from_file(str(run_dir / "tokenizer.json")).save(str(big))
    data = json.loads(big.read_text())
    data["model"]["vocab"].update({f"extra{i}": 1000 + i for i in range(8)})   # ids 1000+: past the model's 320
    big.write_text(json.dumps(data))
    (tmp_path / "t.txt").write_text("def f")
    assert evaluation.main(["--checkpoint_path", str(run_dir), "--text_file", str(tmp_path / "t.txt"), "--tokenizer",
                          str(big)]) == 2
    assert "token ids up to 1007 but the model 320 tokens; is --tokenizer the one this model was trained with?" in \
        capsys.readouterr().err
    assert evaluation.main(["--checkpoint_path", str(run_dir), "--tasks", "tiny_nope", "--include_path",
                          str(tasks)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown task tiny_nope") and "lm-eval ls tasks" in err and "\n" not in err
    assert evaluation.main(["--checkpoint_path", str(run_dir), "--tasks", "x", "--include_path", "/no/such"]) == 2
    assert capsys.readouterr().err.strip() == "error: --include_path /no/such: no such folder"


def test_missing_harness_is_one_clear_line(setup, monkeypatch, tmp_path, capsys):
    run_dir = setup[0]
    monkeypatch.setitem(sys.modules, "lm_eval", None)   # what `import lm_eval` meets when it is not installed
    assert evaluation.main(["--checkpoint_path", str(tmp_path / "not-loaded"), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {evals.HARNESS_MISSING}\n" and "pip install lm_eval" in err
    (tmp_path / "t.txt").write_text("def add(a, b):\n    return a + b\n")
    assert evaluation.main(["--checkpoint_path", str(run_dir), "--text_file", str(tmp_path / "t.txt"),
                          "--output", str(tmp_path / "r.json")]) == 0, "perplexity needs no harness"


def test_harness_imports_of_evaluate_find_the_library_not_a_file_here():
    """Harness tasks and metrics `import evaluate`, meaning Hugging Face's library: no file here takes that name."""
    import importlib.util
    spec = importlib.util.find_spec("evaluate")
    assert spec is not None and ROOT not in Path(spec.origin).resolve().parents
    assert Path(spec.origin).parent.name == "evaluate"   # Hugging Face's package: evaluate/__init__.py


def test_group_stands_for_its_members_in_the_table():
    results = {"results": {"a": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": " - a"},
                           "b": {"acc,none": 0.7, "acc_stderr,none": "N/A", "exact_match,strict": 0.25}},
               "groups": {"g": {"acc,none": 0.6, "acc_stderr,none": 0.05}}, "group_subtasks": {"g": ["a", "b"]},
               "n-shot": {"a": 0, "b": 0, "g": 0}, "n-samples": {"a": {"effective": 10}, "b": {"effective": 10}}}
    assert evals.task_scores(results) == {"g": {"scores": {"acc": 0.6}, "stderr": {"acc": 0.05}, "n_shot": 0,
                                                   "items": None}}
    results.pop("groups")
    scores = evals.task_scores(results)
    assert scores["b"]["scores"] == {"acc": 0.7, "exact_match (strict)": 0.25} and scores["b"]["stderr"] == {}


def test_eval_section_is_checked_by_name():
    from smollm2.config_load import config_from_dict
    from smollm2.errors import ConfigError
    cfg = config_from_dict({"checkpoints": {"checkpoint_interval": 50},
                            "eval": {"tasks": ["hellaswag"], "interval": 100, "limit": 20}})
    assert cfg.eval == EvalArgs(tasks=["hellaswag"], interval=100, limit=20)
    for bad, message in (({"interval": 75}, "eval.interval (75) must be a multiple of checkpoints.checkpoint_interval"),
                         ({"limit": 0}, "eval.limit: must be >= 1"), ({"num_fewshot": -1}, "eval.num_fewshot"),
                         ({"task": ["x"]}, "eval.task: unknown key; did you mean 'tasks'?")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_dict({"checkpoints": {"checkpoint_interval": 50}, "eval": {"tasks": ["hellaswag"], **bad}})


def test_135M_shape_scores_equal_lm_eval_hf_model_item_by_item(setup, tmp_path):
    """The real size: SmolLM2-135M's shape (49152-token vocabulary, 30 layers), random weights, a few items."""
    import lm_eval

    from model import SmolLM2
    from smollm2.checkpoint import checkpoint_name, save_atomic
    from smollm2.config_load import config_from_dict, config_to_dict
    from validate_params import parity_weights
    run_dir, _, tasks = setup
    cfg = config_from_dict({"tokenizer": {"tokenizer_name_or_path": str(tmp_path / "run" / "tokenizer.json")}})
    assert cfg.model.model_config.vocab_size == 49152 and cfg.model.model_config.num_hidden_layers == 30
    model = SmolLM2(cfg.model.model_config)
    parity_weights(model, 0.02, seed=0)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tokenizer.json").write_bytes((run_dir / "tokenizer.json").read_bytes())
    save_atomic({"model": model.state_dict(), "config": config_to_dict(cfg), "train_state": {"step": 0}},
                tmp_path / "run" / "checkpoints" / checkpoint_name(0))
    del model
    convert_hf.export_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
    theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "hf"), "device": "cpu"},
                                     tasks=["tiny_mc"], limit=4, batch_size=4, log_samples=True,
                                     task_manager=evals.task_manager(["tiny_mc"], str(tasks)))
    model, _, info = load_model(tmp_path / "run")
    ours = evals.run_tasks(model, Tokenizer.from_file(info["tokenizer"]), 0, ["tiny_mc"], limit=4,
                              include_path=str(tasks), batch_size=4, log_samples=True)
    assert len(ours["samples"]["tiny_mc"]) == 4
    assert_same_items(ours, theirs, "tiny_mc")


def test_eval_records_reach_metrics_jsonl_the_mirrors_and_the_plot(tmp_path):
    from types import SimpleNamespace

    import matplotlib.image

    from smollm2.metrics import MetricsLog, eval_series, plot_losses, read_metrics
    log = MetricsLog(tmp_path, None, False, None, "test", {})
    mirrored = []
    log.tb = SimpleNamespace(add_scalar=lambda key, value, step: mirrored.append((key, value, step)))
    for step in (4, 8):
        log.write({"kind": "train", "step": step, "loss": 5.0 - step / 4})
    assert plot_losses(log.path, tmp_path / "alone.png")
    report = {"tasks": {"tiny_mc": {"scores": {"acc": 0.5, "word_perplexity": 80.0}, "stderr": {"acc": 0.1},
                                    "n_shot": 0, "items": 12}}}
    for r in evals.eval_records(report, 8):
        log.write(r)
    assert read_metrics(log.path)[-1] == {"kind": "eval", "step": 8, "task": "tiny_mc", **report["tasks"]["tiny_mc"]}
    assert [m for m in mirrored if m[0].startswith("eval/")] == [("eval/tiny_mc/acc", 0.5, 8),
                                                                  ("eval/tiny_mc/word_perplexity", 80.0, 8)]
    assert eval_series(read_metrics(log.path)) == {"tiny_mc acc": [(8, 0.5)]}   # perplexity: another scale
    assert plot_losses(log.path, tmp_path / "both.png")
    alone, both = (matplotlib.image.imread(tmp_path / f"{n}.png").shape for n in ("alone", "both"))
    assert both[0] == alone[0] and both[1] > alone[1], "the scores get a panel of their own beside the loss"


def test_a_hugging_face_directory_scores_as_its_run_and_keeps_its_results_inside(setup, tmp_path):
    run_dir, hf_dir, _ = setup
    (tmp_path / "t.txt").write_text(FILLER * 3)
    assert evaluation.main(["--checkpoint_path", str(hf_dir), "--text_file", str(tmp_path / "t.txt")]) == 0
    assert evaluation.main(["--checkpoint_path", str(run_dir), "--text_file", str(tmp_path / "t.txt"),
                          "--output", str(tmp_path / "run.json")]) == 0
    from_hf = json.loads((hf_dir / "eval.json").read_text())["perplexity"]
    from_run = json.loads((tmp_path / "run.json").read_text())["perplexity"]
    assert from_hf["token_perplexity"] == pytest.approx(from_run["token_perplexity"], rel=1e-6)


def test_the_repository_s_own_task_folder_loads_and_scores(setup, monkeypatch):
    monkeypatch.chdir(ROOT)   # its data_files are relative to the repository's root, where the commands run
    model, _, info = load_model(setup[0])
    results = evals.run_tasks(model, Tokenizer.from_file(info["tokenizer"]), 0, ["python_code"], limit=5,
                              include_path="configs/eval_tasks")
    scores = evals.task_scores(results)["python_code"]
    assert scores["items"] == 5 and set(scores["scores"]) == {"acc", "acc_norm"}
    rows = [json.loads(line) for line in (ROOT / "configs" / "eval_tasks" / "python_code.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in rows)


def test_background_evals_run_one_at_a_time_keep_their_checkpoints_and_report_failures(setup, tmp_path, capsys):
    from smollm2.checkpoint import rotate_checkpoints
    run_dir, _, tasks = setup
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    good, bad = folder / "step_00000100.pt", folder / "step_00000200.pt"
    good.write_bytes((run_dir / "checkpoints" / "step_00000100.pt").read_bytes())
    bad.write_bytes(b"not a checkpoint")
    background = evals.BackgroundEvals(EvalArgs(tasks=["tiny_mc"], include_path=str(tasks), limit=3, device="cpu"),
                                     checkpoint_interval=100)
    assert background.due(200, final=False) and background.due(250, final=True) and not background.due(250, final=False)
    background.start(good, 100)
    background.start(bad, 200)
    assert "benchmarks of step 200 wait for those of step 100" in capsys.readouterr().err
    assert background.is_pending(good) and background.is_pending(bad)
    assert rotate_checkpoints(tmp_path / "run", keep=1, spare=background.is_pending) == [], "step 100 waits for its eval"
    records = background.finish()
    assert [(r["step"], r["task"], r["items"]) for r in records] == [(100, "tiny_mc", 3)]
    assert records[0]["scores"] == json.loads((folder / "step_00000100.eval.json").read_text())["tasks"]["tiny_mc"][
        "scores"]
    err = capsys.readouterr().err
    assert "benchmarks of step 200 failed (error: " in err and "not a loadable checkpoint" in err
    assert str(folder / "step_00000200.eval.log") in err
    assert not background.is_pending(good)
    assert rotate_checkpoints(tmp_path / "run", keep=1, spare=background.is_pending) == [good]


def test_background_evals_run_off_the_training_gpu_unless_told_which_device(tmp_path, monkeypatch):
    """eval.device auto launches evaluation.py on the CPU: the training GPU's memory is planned for the run alone."""
    launched = []
    monkeypatch.setattr(evals.subprocess, "Popen", lambda cmd, **kw: launched.append(cmd) or SimpleNamespace(pid=1))
    for device in ("auto", "cuda:1"):
        evals.BackgroundEvals(EvalArgs(tasks=["hellaswag"], device=device), 100).start(tmp_path / "step_1.pt", 1)
    assert [cmd[cmd.index("--device") + 1] for cmd in launched] == ["cpu", "cuda:1"]


def test_evals_during_training_refuse_to_start_without_the_harness(monkeypatch):
    from smollm2.errors import ConfigError
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ConfigError, match="^eval.tasks: benchmarks need lm-evaluation-harness"):
        evals.BackgroundEvals(EvalArgs(tasks=["hellaswag"]), 100)


def test_evals_during_training_land_in_metrics_jsonl_at_their_steps(setup, code_corpus, tmp_path):
    from smollm2.metrics import read_metrics
    tasks = setup[2]
    config = make_config(tmp_path, code_corpus, **{
        "checkpoints.checkpoint_interval": 4, "tokens.train_steps": 10,
        "eval": {"tasks": ["tiny_mc"], "include_path": str(tasks), "interval": 8, "limit": 3, "device": "cpu"}})
    proc = run_train(config, env=ENV)   # one thread each, for train.py and the evals it starts beside it
    run_dir = tmp_path / "run"
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert [(r["step"], r["task"], r["items"]) for r in records] == [(8, "tiny_mc", 3), (10, "tiny_mc", 3)]
    for r in records:   # each record is what evaluate.py wrote for the checkpoint of its step
        report = json.loads((run_dir / "checkpoints" / f"step_{r['step']:08d}.eval.json").read_text())
        assert report["step"] == r["step"] and report["tasks"]["tiny_mc"]["scores"] == r["scores"]
    assert not (run_dir / "checkpoints" / "step_00000004.eval.json").exists(), "step 4 is no eval step"
    assert f"step 10 | eval tiny_mc acc {records[1]['scores']['acc']:.4f}" in proc.stderr
