"""app.py as a user meets it: a real server on a loopback port, driven over HTTP with gradio_client and in Chromium
with Playwright. The model is a tiny SmolLM2 trained here for a few seconds, saved as a run directory (two training
checkpoints, tokenizer.json, metrics.jsonl) and exported by convert_hf.py as a Hugging Face directory; what the app
generates must equal what generate.generate gives for the same checkpoint and settings.
"""

import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import gradio as gr
import pytest
import torch
from helpers import CHATS, byte_bpe
from tokenizers import Tokenizer

import app
from convert_hf import export_hf
from model import SmolLM2
from smollm2.app_handlers import Handlers, as_messages, eval_curves, loss_curves
from smollm2.app_models import ModelCache, find_checkpoints
from smollm2.checkpoint import save_atomic
from smollm2.config_load import config_from_dict, config_to_dict
from smollm2.confine import resolve_under
from smollm2.errors import CheckpointError
from smollm2.loading import load_model
from smollm2.sampling import SamplingParams, generate

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
PROMPT = "The little robot"
MAX_PROMPT_TOKENS, MAX_NEW_TOKENS = 64, 48   # the caps the test server runs with
TEXT = """The little robot walked to the river every morning. It counted the stones on the bank, one by one, and
wrote the number in its notebook. The river sang a quiet song and the robot listened. When the sun was high, the
robot went home to the old mill, where the miller gave it oil and a kind word. In the evening the little robot sat by
the window and read its notebook again. Tomorrow, it said, there will be more stones to count, and more songs to hear.
"""


# ---------------------------------------------------------------- fixtures: a trained tiny model, a running app


def train_tiny_model(tok: Tokenizer, run_dir: Path) -> None:
    """120 AdamW steps on TEXT (enough to recite some of it), checkpointed at steps 60 and 120 the way train.py lays a run out."""
    torch.manual_seed(0)
    cfg = config_from_dict({"model": {"model_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": tok.get_vocab_size(), "max_position_embeddings": 128}},
        "tokens": {"sequence_length": 32}})
    model = SmolLM2(cfg.model.model_config)
    ids = torch.tensor(tok.encode(TEXT * 4).ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    metrics = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a model this small gains nothing from two threads and loses 10x on a busy machine
    try:
        for step in range(1, 121):
            starts = torch.randint(0, len(ids) - 33, (16,))
            batch = torch.stack([ids[s:s + 33] for s in starts])
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            # with statistics a GRPO run logs beside the loss (grpo.py), for the compare tab's third plot
            metrics.append({"kind": "train", "step": step, "loss": loss.item(), "reward": step / 120, "kl": 0.01})
            if step % 60 == 0:
                val = loss.item() + 0.05   # a stand-in: the fixture has no held-out text
                metrics.append({"kind": "val", "step": step, "loss": val, "stage": "stable",
                                "sources": {"data/web": val - 0.1, "data/code": val + 0.1},
                                "accuracy": step / 120, "accuracy_fact": step / 240})
                metrics.append({"kind": "eval", "step": step, "task": "tiny_mc", "n_shot": 0, "items": 12,
                                "scores": {"acc": step / 240, "word_perplexity": 900.0 / step}, "stderr": {}})
                save_atomic({"model": model.state_dict(), "config": config_to_dict(cfg),
                             "train_state": {"step": step, "tokens_seen": step * 16 * 32, "val_loss": val}},
                            run_dir / "checkpoints" / f"step_{step:08d}.pt")
    finally:
        torch.set_num_threads(threads)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    tok.save(str(run_dir / "tokenizer.json"))


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):   # a plain torch.load would call open(marker, "w") while reading the file
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, chat_model_run) -> Path:
    """tmp/runs: run1 (steps 60, 120), chat (a model that holds CHATS' conversations), broken (a corrupt checkpoint), evil (a pickle that runs code), export (HF);
    tmp/outside: a valid checkpoint that must stay out of reach, also linked from runs/escape."""
    tmp = tmp_path_factory.mktemp("app")
    root = tmp / "runs"
    tok = byte_bpe([TEXT] * 4, 320)
    train_tiny_model(tok, root / "run1")
    shutil.copytree(chat_model_run, root / "chat")
    export_hf(str(root / "run1"), str(root / "export"))
    (root / "broken" / "checkpoints").mkdir(parents=True)
    (root / "broken" / "checkpoints" / "step_00000010.pt").write_bytes(b"PK\x03\x04 not really a zip" * 10)
    (root / "evil").mkdir()
    torch.save({"model": RunsCodeWhenUnpickled(tmp / "pwned")}, root / "evil" / "step_00000001.pt")
    shutil.copytree(root / "run1", tmp / "outside")
    (root / "escape").symlink_to(tmp / "outside")
    lay_traps(root, tmp / "outside")
    return root


def lay_traps(root: Path, outside: Path) -> None:
    """Folders inside root that lead outside it through a link on the way to a file the app would open."""
    run1, export = root / "run1", root / "export"
    shutil.copytree(export, outside.parent / "outside_export")
    # a run whose newest checkpoint is a link to a checkpoint outside (its older one is a real file)
    (root / "linked" / "checkpoints").mkdir(parents=True)
    shutil.copy(run1 / "checkpoints" / "step_00000060.pt", root / "linked" / "checkpoints")
    shutil.copy(run1 / "tokenizer.json", root / "linked")
    (root / "linked" / "checkpoints" / "step_00000500.pt").symlink_to(outside / "checkpoints" / "step_00000120.pt")
    # a run whose checkpoints/ folder is a link to a folder outside
    (root / "dirlink").mkdir()
    shutil.copy(run1 / "tokenizer.json", root / "dirlink")
    (root / "dirlink" / "checkpoints").symlink_to(outside / "checkpoints")
    # Hugging Face folders whose weights, or whose config.json, is a link out
    for name, linked in (("hf_weights_link", "model.safetensors"), ("hf_config_link", "config.json")):
        (root / name).mkdir()
        for f in export.iterdir():
            if f.name == linked:
                (root / name / f.name).symlink_to(outside.parent / "outside_export" / f.name)
            else:
                shutil.copy(f, root / name)
    # a run whose tokenizer.json is a link out, and one whose config names a tokenizer outside (none beside it)
    for name in ("toklink", "cfgtok"):
        (root / name / "checkpoints").mkdir(parents=True)
    shutil.copy(run1 / "checkpoints" / "step_00000060.pt", root / "toklink" / "checkpoints")
    (root / "toklink" / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    ckpt = torch.load(run1 / "checkpoints" / "step_00000060.pt", weights_only=True)
    ckpt["config"]["tokenizer"]["tokenizer_name_or_path"] = str(outside / "tokenizer.json")
    save_atomic(ckpt, root / "cfgtok" / "checkpoints" / "step_00000060.pt")
    # a loadable run whose metrics.jsonl is a link out: its checkpoint loads, its loss curve is not read
    shutil.copytree(run1, root / "metlink")
    (root / "metlink" / "metrics.jsonl").unlink()
    (root / "metlink" / "metrics.jsonl").symlink_to(outside / "metrics.jsonl")
    # a link to itself: resolving it loops
    (root / "loop").symlink_to(root / "loop")
    # sharded checkpoints (torch.distributed.checkpoint folders): one whole, one whose shard file is a link out, one
    # whose index names a shard file outside
    step60 = torch.load(run1 / "checkpoints" / "step_00000060.pt", weights_only=True)
    for name in ("sharded", "sharded_link", "sharded_index"):
        save_sharded_checkpoint(step60, root / name / "checkpoints" / "step_00000060")
        shutil.copy(run1 / "tokenizer.json", root / name)
    shard = root / "sharded_link" / "checkpoints" / "step_00000060" / "__0_0.distcp"
    shutil.move(shard, outside / "__0_0.distcp")
    shard.symlink_to(outside / "__0_0.distcp")
    index = root / "sharded_index" / "checkpoints" / "step_00000060" / ".metadata"
    metadata = pickle.loads(index.read_bytes())
    shutil.move(index.parent / "__0_0.distcp", outside / "index_target.distcp")
    for info in metadata.storage_data.values():
        info.relative_path = "../../../../outside/index_target.distcp"
    index.write_bytes(pickle.dumps(metadata))


def save_sharded_checkpoint(ckpt: dict, folder: Path) -> None:
    """A checkpoint as distributed.py writes it, from one process: the model's shards by torch.distributed.checkpoint
    beside train_state.pt, which holds the other parts."""
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # no process group: DCP says it assumes one process, which is the intent
        dcp.save({"model": ckpt["model"]}, checkpoint_id=str(folder))
    torch.save({k: v for k, v in ckpt.items() if k != "model"}, folder / "train_state.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs):
    """`python app.py` on a free loopback port; yields its URL and stops it afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = runs.parent / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--checkpoint_dir", str(runs), "--port", str(port),
                                 "--max_prompt_tokens", str(MAX_PROMPT_TOKENS),
                                 "--max_new_tokens", str(MAX_NEW_TOKENS)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"app.py did not start serving {url}:\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.5)
            yield url
        finally:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client
    return Client(server, verbose=False)


def expected_text(checkpoint: Path, prompt: str, params: SamplingParams, seed: int = 0, quantize=None) -> str:
    """What generate.py's own functions produce for this checkpoint: the app must show exactly this."""
    model, _, info = load_model(checkpoint, quantize=quantize)
    tok = Tokenizer.from_file(info["tokenizer"])
    out = generate(model, [tok.encode(prompt).ids], params, eos_id=tok.token_to_id("<|endoftext|>"), seed=seed)
    return tok.decode(out[0])


def sampling(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=40, repetition_penalty=1.0, seed=0) -> list:
    """The app's sampling controls in its API order."""
    return [temperature, top_k, top_p, max_new_tokens, repetition_penalty, seed]


# ---------------------------------------------------------------- in-process: listing, path containment, cache


def test_listing_names_runs_their_checkpoints_and_hf_exports_but_not_what_lies_outside(runs):
    names = [value for _, value in find_checkpoints(runs)]
    assert names == ["broken", "broken/checkpoints/step_00000010.pt", "cfgtok", "cfgtok/checkpoints/step_00000060.pt",
                     "chat", "chat/checkpoints/step_00000120.pt",
                     "evil", "evil/step_00000001.pt", "linked/checkpoints/step_00000060.pt",   # not its linked newest
                     "metlink", "metlink/checkpoints/step_00000120.pt", "metlink/checkpoints/step_00000060.pt",
                     "run1", "run1/checkpoints/step_00000120.pt", "run1/checkpoints/step_00000060.pt",
                     "sharded", "sharded/checkpoints/step_00000060",
                     "toklink", "toklink/checkpoints/step_00000060.pt", "export"]


@pytest.mark.parametrize("name", ["../../etc/passwd", "../outside/checkpoints/step_00000120.pt", "/etc/passwd",
                                  "escape/checkpoints/step_00000120.pt", "run1/../../outside"])
def test_paths_that_resolve_outside_the_checkpoint_dir_are_refused(runs, name):
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        resolve_under(runs.resolve(), name)


# every name here lies inside the folder, but a file its load would open lies outside, through a link
LINKED_OUT = ["linked", "linked/checkpoints/step_00000500.pt", "dirlink", "dirlink/checkpoints/step_00000120.pt",
              "hf_weights_link", "hf_config_link", "toklink", "cfgtok", "sharded_link", "sharded_index"]


@pytest.mark.parametrize("name", LINKED_OUT)
def test_a_load_that_would_open_a_file_outside_through_a_link_is_refused(runs, name):
    cache = ModelCache(runs.resolve(), size=1, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        cache.get(name)


def test_a_sharded_checkpoint_inside_loads_and_generates_what_its_file_twin_does(runs):
    cache = ModelCache(runs.resolve(), size=2, device=torch.device("cpu"), dtype=torch.float32)
    sharded, twin = cache.get("sharded"), cache.get("run1/checkpoints/step_00000060.pt")
    assert sharded.info["step"] == 60
    ids = twin.tokenizer.encode(PROMPT).ids
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    assert generate(sharded.model, [ids], params) == generate(twin.model, [ids], params)


def test_a_run_whose_metrics_file_links_outside_loads_but_its_curve_is_not_read(runs):
    cache = ModelCache(runs.resolve(), size=1, device=torch.device("cpu"), dtype=torch.float32)
    loaded = cache.get("metlink")
    assert loaded.info["step"] == 120
    curves = loss_curves(runs.resolve(), {"metlink": loaded.run_dir, "run1": runs.resolve() / "run1"})
    assert {s.split(" · ")[0] for s in curves["series"]} == {"run1"}   # nothing of metlink's
    assert eval_curves(runs.resolve(), {"metlink": loaded.run_dir})["series"].empty


@pytest.mark.parametrize("name,message", [("run1\x00", "NUL"), ("loop", "loop"), ("x" * 5000, "too long")],
                         ids=["nul", "loop", "long"])
def test_names_that_cannot_be_paths_are_refused_in_one_message(runs, name, message):
    with pytest.raises(CheckpointError, match=message):
        resolve_under(runs.resolve(), name)


def test_switching_back_to_a_checkpoint_reuses_the_loaded_model_and_the_oldest_is_evicted(runs):
    cache = ModelCache(runs.resolve(), size=2, device=torch.device("cpu"), dtype=torch.float32)
    a = cache.get("run1/checkpoints/step_00000060.pt")
    b = cache.get("run1")                       # the newest checkpoint, step 120
    assert cache.get("run1/checkpoints/step_00000060.pt") is a
    assert cache.get("run1/checkpoints/step_00000120.pt") is b   # the same file under another name
    cache.get("export")                         # a third model evicts the least recently used (step 60)
    assert cache.get("run1/checkpoints/step_00000060.pt") is not a
    assert b.info["step"] == 120 and b.info["val_loss"] is not None
    quantized = cache.get("run1", "int8")       # the same file quantized is another model
    assert quantized is not cache.get("run1") and quantized.model.lm_head.weight.dtype == torch.int8


# ---------------------------------------------------------------- in-process: the handlers, as the page calls them


@pytest.fixture(scope="module")
def handlers(runs) -> Handlers:
    """What the server's page and API call, under the test server's caps, with no server."""
    cache = ModelCache(runs.resolve(), size=3, device=torch.device("cpu"), dtype=torch.float32)
    return Handlers(cache, MAX_PROMPT_TOKENS, MAX_NEW_TOKENS)


def test_the_page_wires_every_api_endpoint_without_a_server(handlers):
    endpoints = app.build_app(handlers).get_api_info()["named_endpoints"]
    assert set(endpoints) == {"/list_checkpoints", "/load", "/generate", "/chat", "/compare"}


def test_generate_streams_the_text_that_sampling_generate_gives_for_the_seed(handlers, runs):
    params = SamplingParams(max_new_tokens=30, temperature=1.2, top_k=20, top_p=0.9, repetition_penalty=1.3)
    seen = list(handlers.generate("run1", PROMPT, *sampling(1.2, 20, 0.9, 30, 1.3, seed=7), "none"))
    assert seen[-1] == expected_text(runs / "run1", PROMPT, params, seed=7)
    assert len(seen) > 5 and all(seen[-1].startswith(part) for part in seen)   # streamed, each extending the last
    other = list(handlers.generate("run1", PROMPT, *sampling(1.2, 20, 0.9, 30, 1.3, seed=8), "none"))[-1]
    assert other == expected_text(runs / "run1", PROMPT, params, seed=8) != seen[-1]


def test_compare_gives_each_checkpoint_picked_its_own_header_and_text(handlers, runs):
    names = ["run1/checkpoints/step_00000060.pt", "export", "run1/checkpoints/step_00000060.pt"]   # a repeat is one
    updates = list(handlers.compare(names, PROMPT, *sampling(max_new_tokens=12), "none"))
    assert updates[0][1] == [""] * 4   # the headers and curves come before any text
    heads, texts, plot, scores, stats = updates[-1]
    assert "step 60" in heads[0] and "step unknown" in heads[1] and heads[2] == heads[3] == ""
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    assert texts == [expected_text(runs / names[0], PROMPT, params), expected_text(runs / "export", PROMPT, params),
                     "", ""]
    # the export has no metrics.jsonl: the curves are run1's alone
    assert {"run1 · train", "run1 · validation"} <= set(plot["series"])
    assert {series.split(" · ")[0] for series in [*plot["series"], *scores["series"], *stats["series"]]} == {"run1"}


def test_a_chat_turn_is_answered_by_the_trained_chat_model(handlers):
    replies = list(handlers.converse("chat", "hello", [], "", *sampling(), "none"))
    assert replies[-1] == CHATS[0][:2] and len(replies) > 2
    # the history as Gradio sends it back: each message's content a list of parts
    history = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in replies[-1]]
    assert list(handlers.converse("chat", "how are you?", history, "", *sampling(), "none"))[-1] == CHATS[0]


def test_loading_reports_the_checkpoint_or_why_it_could_not_be_loaded(handlers):
    assert "step 60" in handlers.status("run1/checkpoints/step_00000060.pt")
    assert "in int8" in handlers.status("run1", "int8")
    assert handlers.status("broken").startswith("⚠️ **could not load this checkpoint**")
    assert "outside the checkpoint directory" in handlers.status("escape/checkpoints/step_00000120.pt")
    assert handlers.checkpoint_names() == [name for _, name in find_checkpoints(handlers.root)]


def page_error(request) -> str:
    """The message of the PageError that a handler's request (a generator's first step) raises; it asks the server
    to log no traceback."""
    with pytest.raises(gr.Error) as refused:
        list(request)
    assert refused.value.print_exception is False
    return refused.value.message


@pytest.mark.parametrize("name", ["../../etc/passwd", "escape/checkpoints/step_00000120.pt", "linked", "toklink"])
def test_the_handlers_refuse_a_checkpoint_outside_the_checkpoint_dir(handlers, name):
    assert "outside the checkpoint directory" in page_error(handlers.generate(name, PROMPT, *sampling(), "none"))
    assert "outside the checkpoint directory" in page_error(handlers.converse(name, "hello", [], "", *sampling(),
                                                                                "none"))


def test_compare_and_chat_refuse_what_they_cannot_use(handlers):
    controls = [*sampling(), "none"]
    for names in ("run1", ["run1", 7], None):
        assert page_error(handlers.compare(names, PROMPT, *controls)) == "compare takes a list of checkpoint names"
    assert page_error(handlers.compare(["run1", "run1"], PROMPT, *controls)) == \
        "pick between 2 and 4 checkpoints to compare"
    assert page_error(handlers.compare(["run1", "export"], PROMPT, *sampling(seed=2**64), "none")).startswith("Seed:")
    assert page_error(handlers.converse("chat", " ", [], "", *controls)) == \
        "the message is empty: type something to say"
    assert "list of {role, content}" in page_error(handlers.converse("chat", "hello", "hi", "", *controls))
    assert page_error(handlers.converse("chat", "hello", [], 7, *controls)) == "the system message must be text"
    assert "fine-tune the checkpoint with sft.py" in page_error(handlers.converse("run1", "hello", [], "", *controls))


# ---------------------------------------------------------------- over HTTP, against the real server


def test_the_server_lists_the_checkpoints_under_its_directory(client):
    names = client.predict(api_name="/list_checkpoints")
    assert "run1" in names and "run1/checkpoints/step_00000060.pt" in names and "export" in names
    assert not any("outside" in n or "escape" in n for n in names)


@pytest.mark.parametrize("name", ["run1", "run1/checkpoints/step_00000060.pt", "export"])
def test_greedy_text_from_the_server_equals_generate_for_the_same_checkpoint(client, runs, name):
    want = expected_text(runs / name, PROMPT, SamplingParams(max_new_tokens=40, temperature=0.0))
    assert len(want.strip()) > 20   # the trained model says something, so equality means something
    assert client.predict(name, PROMPT, *sampling(), api_name="/generate") == want


def test_sampled_text_follows_the_seed_and_the_controls(client, runs):
    params = SamplingParams(max_new_tokens=30, temperature=1.2, top_k=20, top_p=0.9, repetition_penalty=1.3)
    controls = sampling(1.2, 20, 0.9, 30, 1.3, seed=7)
    assert client.predict("run1", PROMPT, *controls, api_name="/generate") == \
        expected_text(runs / "run1", PROMPT, params, seed=7)


def test_the_int8_switch_generates_with_the_checkpoint_quantized_at_load(client, runs):
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    want = expected_text(runs / "run1", PROMPT, params, quantize="int8")
    assert len(want.strip()) > 20
    assert client.predict("run1", PROMPT, *sampling(), "int8", api_name="/generate") == want
    assert "in int8" in client.predict("run1", "int8", api_name="/load")
    assert "int8" not in client.predict("run1", api_name="/load")   # the switch's default: weights as stored
    with pytest.raises(Exception, match=r"Weights: 'int4' refused; give one of none, int8"):
        client.predict("run1", PROMPT, *sampling(), "int4", api_name="/generate")


def test_text_streams_in_token_by_token(client):
    job = client.submit("run1", PROMPT, *sampling(max_new_tokens=20), api_name="/generate")
    final = job.result()
    seen = job.outputs()
    assert len(seen) > 5 and seen[-1] == final
    assert all(final.startswith(part) for part in seen)


def test_loading_shows_step_and_validation_loss(client):
    status = client.predict("run1/checkpoints/step_00000060.pt", api_name="/load")
    assert "step 60" in status and "val loss" in status


@pytest.mark.parametrize("name", ["../../etc/passwd", "escape/checkpoints/step_00000120.pt", "linked",
                                  "dirlink", "hf_weights_link", "toklink"])
def test_the_server_refuses_paths_outside_its_directory(client, name):
    with pytest.raises(Exception, match="outside the checkpoint directory"):
        client.predict(name, PROMPT, *sampling(), api_name="/generate")
    assert "outside the checkpoint directory" in client.predict(name, api_name="/load")


def test_oversized_or_empty_prompts_and_too_many_new_tokens_are_refused_with_the_limit(client):
    with pytest.raises(Exception, match=f"at most {MAX_PROMPT_TOKENS}"):
        client.predict("run1", "stones " * 200, *sampling(), api_name="/generate")
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("run1", "", *sampling(), api_name="/generate")
    with pytest.raises(Exception, match=f"from 1 to {MAX_NEW_TOKENS}"):
        client.predict("run1", PROMPT, *sampling(max_new_tokens=10_000), api_name="/generate")


def call_raw(server: str, api: str, data: list) -> str:
    """POST a request as any HTTP client may (JSON with NaN, wrong types), return the event stream's text."""
    body = json.dumps({"data": data}).encode()   # allow_nan: Python writes NaN, and the server's parser reads it
    request = urllib.request.Request(f"{server}gradio_api/call/{api}", body, {"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    return urllib.request.urlopen(f"{server}gradio_api/call/{api}/{event}", timeout=60).read().decode()


# what a careless or hostile client may send to /generate: (checkpoint, prompt, sampling controls, weights switch)
# -> the refusal
REFUSED = [
    (["run1", PROMPT, *sampling(temperature=1.0, seed=2**70)], "Seed: .* refused"),
    (["run1", PROMPT, *sampling(temperature=1.0, seed=-5)], "Seed: .* refused"),
    (["run1", PROMPT, *sampling(temperature=1.0, seed=1.5)], "Seed: .* refused; give a whole number"),
    (["run1", PROMPT, *sampling(temperature=float("nan"))], "Temperature: 'nan' refused"),
    (["run1", PROMPT, *sampling(repetition_penalty=float("inf"))], "Repetition penalty: 'inf' refused"),
    (["run1", PROMPT, *sampling(top_k=2.5)], "Top-k: .* refused"),
    (["run1", PROMPT, *sampling(max_new_tokens=0)], "Max new tokens: .* refused"),
    (["run1", PROMPT, *sampling(temperature="hot")], "Temperature: 'hot' refused"),
    (["run1", PROMPT, *sampling(seed=True)], "Seed: .* refused"),
    (["run1\x00", PROMPT, *sampling()], "NUL byte"),
    (["loop", PROMPT, *sampling()], "symbolic link loop"),
    ([["run1"], PROMPT, *sampling()], "no checkpoint picked"),
    (["run1", None, *sampling()], "the prompt must be text"),
    (["run1", ["a", "b"], *sampling()], "the prompt must be text"),
    (["run1", "The \ud800 robot", *sampling()], "not valid UTF-8"),
    (["run1\ud800", PROMPT, *sampling()], "not valid UTF-8"),
]
REFUSED = [(data + ["none"], message) for data, message in REFUSED]   # the weights switch: as stored
REFUSED += [(["run1", PROMPT, *sampling(), "int4"], "Weights: 'int4' refused"),
            (["run1", PROMPT, *sampling(), None], "Weights: 'None' refused")]


@pytest.mark.parametrize("data,message", REFUSED, ids=range(len(REFUSED)))
def test_bad_values_sent_over_http_are_refused_in_one_message(server, data, message):
    reply = call_raw(server, "generate", data)
    assert reply.startswith("event: error"), reply
    assert re.search(message, json.loads(reply.split("data: ", 1)[1])["error"]), reply


@pytest.mark.parametrize("data,message", REFUSED, ids=range(len(REFUSED)))
def test_bad_values_given_to_the_generate_handler_are_refused_with_the_same_message(handlers, data, message):
    assert re.search(message, page_error(handlers.generate(*data)))


def test_compare_refuses_what_is_not_a_list_of_names_and_a_huge_seed(server):
    for names in ("run1", ["run1", 7], None):
        assert "compare takes a list of checkpoint names" in call_raw(server, "compare", [names, PROMPT, *sampling(), "none"])
    assert "Seed" in call_raw(server, "compare", [["run1", "export"], PROMPT, *sampling(seed=2**64),
                                                                 "none"])


def test_refused_values_leave_no_traceback_in_the_server_log(server, runs):
    for data, _ in REFUSED:
        call_raw(server, "generate", data)
    call_raw(server, "load", [["not", "a", "name"], "none"])
    log = (runs.parent / "app.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def test_a_corrupt_checkpoint_shows_an_error_and_the_next_request_works(client, runs):
    assert "could not load" in client.predict("broken", api_name="/load")
    with pytest.raises(Exception, match="not a loadable checkpoint"):
        client.predict("broken", PROMPT, *sampling(), api_name="/generate")
    want = expected_text(runs / "run1", PROMPT, SamplingParams(max_new_tokens=10, temperature=0.0))
    assert client.predict("run1", PROMPT, *sampling(max_new_tokens=10), api_name="/generate") == want


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_without_running_it(client, runs):
    assert "could not load" in client.predict("evil", api_name="/load")
    assert not (runs.parent / "pwned").exists()


def test_compare_runs_one_prompt_through_each_checkpoint_with_its_step_loss_curve_and_scores(client, runs):
    names = ["run1/checkpoints/step_00000060.pt", "run1/checkpoints/step_00000120.pt", "broken"]
    out = client.predict(names, PROMPT, *sampling(max_new_tokens=12), api_name="/compare")
    heads, texts, plot, scores, stats = out[:4], out[4:8], out[8], out[9], out[10]   # 4 headers, 4 texts, 3 plots
    assert "step 60" in heads[0] and "step 120" in heads[1] and "not a loadable checkpoint" in heads[2]
    assert heads[3] == texts[2] == texts[3] == ""   # the fourth column stays hidden; the broken one says nothing
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    assert texts[0] == expected_text(runs / names[0], PROMPT, params)
    assert texts[1] == expected_text(runs / names[1], PROMPT, params)
    series = {row[2] for row in plot["data"]}   # each data source's validation loss too
    assert series == {"run1 · train", "run1 · validation", "run1 · validation · web", "run1 · validation · code"}
    # a score per step from the run's eval records; a perplexity, on another scale, stays off this plot
    assert sorted(tuple(row) for row in scores["data"]) == [(60, 0.25, "run1 · tiny_mc acc"),
                                                             (120, 0.5, "run1 · tiny_mc acc")]
    # post-training's statistics: each train record's, and the held-out ones per task at each validation
    rows = sorted(tuple(row) for row in stats["data"])
    assert {row[2] for row in rows} == {"run1 · train reward", "run1 · train kl", "run1 · val accuracy",
                                        "run1 · val accuracy_fact"}
    assert [row[:2] for row in rows if row[2] == "run1 · val accuracy_fact"] == [(60, 0.25), (120, 0.5)]
    assert len([row for row in rows if row[2] == "run1 · train reward"]) == 120


# ---------------------------------------------------------------- the command line


def run_app(*args: str) -> subprocess.CompletedProcess:
    """app.py as a user starts it; one that would serve instead of refusing its flags is stopped after a minute."""
    return subprocess.run([sys.executable, "app.py", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flag,value,message", [
    ("--port", "70000", "--port: must be a whole number from 1 to 65535, got '70000'"),
    ("--max_new_tokens", "0", "--max_new_tokens: must be a whole number from 1 to"),
    ("--max_prompt_tokens", "-5", "--max_prompt_tokens: must be a whole number from 1 to"),
    ("--cache_size", "0", "--cache_size: must be a whole number from 1 to"),
])
def test_bad_flags_are_one_line_before_anything_starts(runs, capsys, monkeypatch, flag, value, message):
    def launch(*args, **kwargs):
        raise AssertionError("the app started serving with a flag it should have refused")

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    with pytest.raises(SystemExit) as exit_:
        app.main(["--checkpoint_dir", str(runs), flag, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_port_already_in_use_is_one_line(runs):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_app("--checkpoint_dir", str(runs), "--port", str(port))
    assert proc.returncode == 2 and f"--port {port}: cannot listen there" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_chat_keeps_the_conversation_and_streams_each_reply_until_im_end(client, runs):
    job = client.submit("chat", "hello", [], "", *sampling(), api_name="/chat")
    history = job.result()
    first = as_messages(history)   # Gradio sends each message's content as a list of parts
    assert first == CHATS[0][:2]   # the reply stops at <|im_end|>, long before 40 new tokens
    seen = [as_messages(m)[-1]["content"] for m in job.outputs() if len(m) == 2]
    assert len(seen) > 2 and seen[-1] == CHATS[0][1]["content"]
    assert all(seen[-1].startswith(part) for part in seen)   # streamed: each update extends the one before
    second = client.submit("chat", "how are you?", history, "", *sampling(), api_name="/chat").result()
    assert as_messages(second) == CHATS[0]   # the reply to the second turn, with the first in context


def test_the_chat_refuses_a_checkpoint_whose_tokenizer_has_no_chat_tokens(client):
    with pytest.raises(Exception, match="fine-tune the checkpoint with sft.py"):
        client.predict("run1", "hello", [], "", *sampling(), api_name="/chat")


# ---------------------------------------------------------------- in a real browser


def test_in_chromium_typing_a_prompt_and_clicking_generate_shows_the_expected_text(server, runs, tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: the browser test needs Debian's Chromium "
                    "(apt-get install -y chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright's Python package: pip install -r requirements-dev.txt")
    want = expected_text(runs / "run1", PROMPT, SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server)
            page.get_by_label("Checkpoint").click()
            page.get_by_role("option", name="run1 · newest").click()
            expect(page.get_by_text("step 120")).to_be_visible(timeout=30_000)
            page.locator("#temperature input[type=number]").fill("0")
            page.locator("#max_new_tokens input[type=number]").fill(str(MAX_NEW_TOKENS))
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#generate").click()
            expect(page.locator("#output textarea")).to_have_value(want, timeout=30_000)
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
