"""Show a model to people: `python app.py --checkpoint_dir runs/` serves a page to pick a checkpoint, type a prompt and
watch the text stream in, chat with a fine-tuned checkpoint, or run one prompt through several checkpoints side by side
next to their loss curves and benchmark scores.

It builds on smollm2/loading.py's load_model (tensors read with weights_only, so a crafted pickle runs no code) and
tokenizer opener, on smollm2/sampling.py's generate() with TextStream, and on smollm2/chat.py's template. Safe by
default: it listens on 127.0.0.1 unless --host or --share say otherwise, reads only what lies under --checkpoint_dir
(smollm2/confine.py: every file a load opens, symlinks resolved), checks every value a request sends, and caps the
prompt and the number of new tokens.

Read next: smollm2/__init__.py, the map of the package every root file builds on, one module per concern.
"""

import argparse
import functools
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import gradio as gr
import pandas as pd
import torch
from tokenizers import Tokenizer

from model import SmolLM2
from smollm2 import chat
from smollm2.checkpoint import (checkpoint_step, files_to_load, is_hf_dir, list_checkpoints, resolve_checkpoint,
                                run_dir_of)
from smollm2.confine import all_inside, files_inside, resolve_under
from smollm2.errors import CheckpointError, InputError, command
from smollm2.loading import eos_id_for, load_model, open_tokenizer, pick_device, pick_dtype, tokenizer_file
from smollm2.metrics import eval_series, read_metrics, short_names, val_curves
from smollm2.sampling import MAX_SEED, SamplingParams, TextStream, generate, use_decode_layout

COMPARE_SLOTS = 4   # columns of the compare view: Gradio needs its components declared up front
CHARS_PER_TOKEN = 16   # a prompt longer than 16 characters per allowed token is refused before it is tokenized
UserError = functools.partial(gr.Error, print_exception=False)   # shown in the page; not a server fault to log
LOAD_ERRORS = (CheckpointError, InputError, OSError)   # what loading a user's checkpoint may raise, with a message


# ---------------------------------------------------------------- finding and loading checkpoints under one folder


def find_checkpoints(root: Path) -> list[tuple[str, str]]:
    """Everything loadable under root, as (label, path relative to root): each run directory (meaning its newest
    checkpoint) followed by its checkpoints newest first, then each Hugging Face export (a folder with config.json).
    What would be read from outside root through a link is left out: a run whose newest checkpoint does so is listed
    by its other checkpoints only."""
    runs, exports = set(), []
    for dirpath, dirnames, filenames in os.walk(root):   # symlinked folders are listed but not entered
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if is_hf_dir(here):
            exports.append(here)
            dirnames.clear()
        elif any(checkpoint_step(name) is not None for name in filenames + dirnames):   # files, or sharded folders
            runs.add(here.parent if here.name == "checkpoints" else here)
            dirnames[:] = [d for d in dirnames if checkpoint_step(d) is None]
    found = []
    for run in sorted(runs):
        files = list_checkpoints(run)
        kept = [f for f in files if all_inside(root, files_to_load(f))]
        if files and kept and kept[-1] == files[-1]:
            found.append((f"{run.relative_to(root)} · newest", str(run.relative_to(root))))
        found += [(str(f.relative_to(root)),) * 2 for f in reversed(kept)]
    found += [(f"{e.relative_to(root)} · Hugging Face export", str(e.relative_to(root))) for e in sorted(exports)
              if all_inside(root, files_to_load(e))]
    return found


@dataclass
class Loaded:
    model: SmolLM2
    tokenizer: Tokenizer
    eos_id: Optional[int]
    info: dict          # step, val_loss, source: from checkpoint.load_model
    run_dir: Path

    def describe(self) -> str:
        """What to know at a glance: its step, validation loss, size and context (prompt + new tokens)."""
        step, val = self.info.get("step"), self.info.get("val_loss")
        return " · ".join(["step unknown" if step is None else f"step {step}",
                           "no val loss" if val is None else f"val loss {val:.3f}",
                           f"{self.model.num_parameters() / 1e6:.1f}M params"
                           + (f" in {self.info['quantized']}" if self.info.get("quantized") else ""),
                           f"context {self.model.config.max_position_embeddings} tokens"])


class ModelCache:
    """The most recently used models, so that switching back to a checkpoint is instant. Keyed by the file a name
    resolves to (two names of one checkpoint share it, and a run directory that gained a newer checkpoint loads it)
    and by the quantization asked for (None or "int8": quantize.py), which is applied as the file is loaded."""

    def __init__(self, root: Path, size: int, device: torch.device, dtype: torch.dtype,
                 tokenizer: Optional[str] = None):
        self.root, self.size, self.device, self.dtype, self.tokenizer = root, size, device, dtype, tokenizer
        self.models: OrderedDict[tuple[Path, Optional[str]], Loaded] = OrderedDict()
        self.lock = threading.Lock()   # two requests for one checkpoint load it once

    def get(self, name: str, quantize: Optional[str] = None) -> Loaded:
        """The loaded checkpoint; raises one of LOAD_ERRORS, whose message is meant for the page."""
        path = resolve_under(self.root, name)
        files_inside(self.root, files_to_load(path))   # every file the load opens, each checked, links followed
        file = path if is_hf_dir(path) else resolve_checkpoint(path).resolve()
        key = (file, quantize)
        with self.lock:
            if key in self.models:
                self.models.move_to_end(key)
                return self.models[key]
            model, cfg, info = load_model(file, self.device, self.dtype, quantize)
            use_decode_layout(model, 1)   # the app generates for one prompt at a time
            tok = self.tokenizer or info["tokenizer"]
            # --tokenizer is the operator's choice; the tokenizer a checkpoint brings must lie inside too
            if not self.tokenizer and tok and (local := tokenizer_file(tok)) is not None:
                tok = str(files_inside(self.root, [local])[0])
            tokenizer = open_tokenizer(tok)
            self.models[key] = Loaded(model, tokenizer, eos_id_for(cfg, tokenizer), {**info, "quantized": quantize},
                                      run_dir_of(file) if file.is_file() else file)   # an HF dir is its own
            while len(self.models) > self.size:
                self.models.popitem(last=False)
            return self.models[key]


# ---------------------------------------------------------------- generation, streamed


GENERATION_LOCK = threading.Lock()   # a model's KV cache serves one generation at a time


def stream_text(loaded: Loaded, prompt_ids: list[int], params: SamplingParams, seed: int,
                eos_id: Optional[int] = None) -> Iterator[str]:
    """Yield the continuation's text as it grows; it ends at eos_id (default: the checkpoint's EOS).

    generate() runs in a worker thread; TextStream, its on_tokens hook, decodes each step and hands over the text
    that can no longer change. When the consumer goes away (Stop pressed, page closed), the hook stops generate().
    """
    pieces: queue.Queue = queue.Queue()   # (text, done) from TextStream, or the worker's exception
    stop = threading.Event()
    eos_id = loaded.eos_id if eos_id is None else eos_id
    text_stream = TextStream(loaded.tokenizer, 1, eos_id=eos_id,
                             on_text=lambda row, text, done: pieces.put((text, done)))

    def work():
        try:
            with GENERATION_LOCK:
                generate(loaded.model, [prompt_ids], params, eos_id=eos_id, seed=seed,
                         on_tokens=lambda tok: text_stream(tok) or stop.is_set())
            text_stream.close()   # the length limit was reached: the row's last piece, done=True
        except Exception as e:   # raised again in the request's thread, where Gradio reports it
            pieces.put(e)

    threading.Thread(target=work, daemon=True).start()
    text = ""
    try:
        while True:
            item = pieces.get()
            if isinstance(item, Exception):
                raise item
            piece, done = item
            text += piece
            yield text
            if done:
                return
    finally:
        stop.set()


def as_messages(history) -> list[dict]:
    """The chat box's history as a request sent it -> [{"role", "content": text}]; Gradio may send a message's
    content as a list of parts. Anything else is refused."""
    if not isinstance(history, list) or not all(isinstance(m, dict) for m in history):
        raise UserError("the conversation must be a list of {role, content} messages")
    messages = []
    for m in history:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if m.get("role") in ("user", "assistant") and isinstance(content, str):
            messages.append({"role": m["role"], "content": content})
    return messages


def chat_prompt(loaded: Loaded, message, history, system, room: int) -> tuple[list[dict], list[int], int]:
    """A chat request's values, checked -> (the conversation with the new message, the prompt ids of at most `room`
    tokens, the id that ends the reply). The oldest turns are left out when the conversation outgrows the room."""
    if not isinstance(message, str) or not message.strip():
        raise UserError("the message is empty: type something to say")
    if len(message) > CHARS_PER_TOKEN * room:
        raise UserError(f"the message is {len(message):,} characters; this app accepts at most {room} tokens "
                        "(--max_prompt_tokens)")
    if system is not None and not isinstance(system, str):
        raise UserError("the system message must be text")
    messages = as_messages(history) + [{"role": "user", "content": message}]
    try:
        end = chat.end_id(loaded.tokenizer)
        ids, _ = chat.fit_context(loaded.tokenizer, ([{"role": "system", "content": system}] if system else [])
                                  + messages, room)
    except chat.ChatError as e:
        raise UserError(str(e)) from None
    return messages, ids, end


def run_metrics(root: Path, runs: dict[str, Path]) -> dict[str, list[dict]]:
    """Each run's metrics.jsonl records (label -> records); a metrics file that leads outside root through a link is
    not read."""
    files = {label: run_dir / "metrics.jsonl" for label, run_dir in runs.items()}
    return {label: read_metrics(file) for label, file in files.items() if all_inside(root, [file])}


def loss_curves(root: Path, runs: dict[str, Path]) -> pd.DataFrame:
    """Train and validation loss of each run (label -> run directory), and each data source's validation loss where
    a run has several, for a gr.LinePlot."""
    kinds = {"train": "train", "val": "validation"}
    rows = []
    for label, records in run_metrics(root, runs).items():
        rows += [{"step": r["step"], "loss": r["loss"], "series": f"{label} · {kinds[r['kind']]}"}
                 for r in records if r.get("kind") in kinds and "loss" in r]
        per_source = val_curves(records)
        names = short_names(per_source)
        rows += [{"step": step, "loss": loss, "series": f"{label} · validation · {names[name]}"}
                 for name, points in per_source.items() for step, loss in points]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def eval_curves(root: Path, runs: dict[str, Path]) -> pd.DataFrame:
    """Benchmark scores against step of each run (its metrics.jsonl's eval records), for a gr.LinePlot."""
    rows = [{"step": step, "score": value, "series": f"{label} · {name}"}
            for label, records in run_metrics(root, runs).items()
            for name, points in eval_series(records).items() for step, value in points]
    return pd.DataFrame(rows, columns=["step", "score", "series"])


# ---------------------------------------------------------------- the page


FULL = "none"   # the weights switch's value for "as stored"
WEIGHTS = (FULL, "int8")


def quantized(weights) -> Optional[str]:
    """The weights switch, as a request sent it, -> checkpoint.load_model's quantize argument."""
    if not isinstance(weights, str) or weights not in WEIGHTS:
        raise UserError(f"Weights: {str(weights)[:40]!r} refused; give one of {', '.join(WEIGHTS)}")
    return None if weights == FULL else weights


# The sampling controls as (label, minimum, maximum, default, hint): the page's sliders and the check of what a
# request sends (over the API any value can arrive, so the handlers take raw values and check them here).
CONTROLS = {"temperature": ("Temperature", 0, 2, 0.8, "0 = greedy"), "top_k": ("Top-k", 0, 200, 50, "0 = off"),
            "top_p": ("Top-p", 0.05, 1, 0.95, "1 = off"), "max_new_tokens": ("Max new tokens", 1, None, 64, None),
            "repetition_penalty": ("Repetition penalty", 1, 2, 1.0, "1 = off"),
            "seed": ("Seed", 0, MAX_SEED, 0, "same seed, same text")}
WHOLE = {"top_k", "max_new_tokens", "seed"}


def checked(key: str, value, high=None) -> float:
    """A control's value as a request sent it, refused unless it is a number in the control's range (NaN never is)."""
    label, low, top, _, _ = CONTROLS[key]
    high, whole = top if high is None else high, key in WHOLE
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and low <= value <= high and (not whole or value == int(value))):
        kind = "a whole number" if whole else "a number"
        raise UserError(f"{label}: {str(value)[:40]!r} refused; give {kind} from {low} to {high}"
                        + (" (--max_new_tokens)" if key == "max_new_tokens" else ""))
    return int(value) if whole else float(value)


def sampling_params(max_new_tokens_cap: int, *values) -> tuple[SamplingParams, int]:
    """The sampling controls, in CONTROLS' order, -> (SamplingParams, seed); top-k at 0 and top-p at 1 mean off."""
    v = {key: checked(key, value, max_new_tokens_cap if key == "max_new_tokens" else None)
         for key, value in zip(CONTROLS, values)}
    params = SamplingParams(max_new_tokens=v["max_new_tokens"], temperature=v["temperature"], top_k=v["top_k"] or None,
                            top_p=v["top_p"] if v["top_p"] < 1 else None, repetition_penalty=v["repetition_penalty"])
    return params, v["seed"]


def build_app(root: Path, cache: ModelCache, max_prompt_tokens: int, max_new_tokens: int) -> gr.Blocks:
    def get(name: str, weights: str) -> Loaded:
        try:
            return cache.get(name, quantized(weights))
        except LOAD_ERRORS as e:
            raise UserError(str(e)) from None

    def encode_prompt(loaded: Loaded, prompt) -> list[int]:
        if not isinstance(prompt, str):
            raise UserError(f"the prompt must be text, got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:   # a lone surrogate, which JSON can carry
            raise UserError("the prompt is not valid UTF-8 text") from None
        limit = min(max_prompt_tokens, loaded.model.config.max_position_embeddings - 1)
        if len(prompt) > CHARS_PER_TOKEN * limit:
            raise UserError(f"the prompt is {len(prompt):,} characters; this app accepts at most {limit} tokens "
                            "(--max_prompt_tokens)")
        ids = loaded.tokenizer.encode(prompt).ids
        if not ids:
            raise UserError("the prompt is empty: type some text for the model to continue")
        if len(ids) > limit:
            raise UserError(f"the prompt is {len(ids)} tokens; this app accepts at most {limit} (--max_prompt_tokens)")
        return ids

    def status(name: str, weights: str = FULL) -> str:
        t0 = time.perf_counter()
        try:
            loaded = cache.get(name, quantized(weights))
        except LOAD_ERRORS as e:
            return f"⚠️ **could not load this checkpoint**: {e}"
        return f"**{name}** · {loaded.describe()} · ready in {time.perf_counter() - t0:.1f}s"

    def run(name, prompt, *controls):
        *sampling, weights = controls
        params, seed = sampling_params(max_new_tokens, *sampling)
        loaded = get(name, weights)
        ids = encode_prompt(loaded, prompt)
        yield from stream_text(loaded, ids, params, seed)

    def converse(name, message, history, system, *controls):
        """The conversation with the new user message and the reply as it streams; the reply ends at <|im_end|>."""
        *sampling, weights = controls
        params, seed = sampling_params(max_new_tokens, *sampling)
        loaded = get(name, weights)
        room = min(max_prompt_tokens, loaded.model.config.max_position_embeddings - params.max_new_tokens)
        history, ids, end = chat_prompt(loaded, message, history, system, room)
        for text in stream_text(loaded, ids, params, seed, eos_id=end):
            yield history + [{"role": "assistant", "content": text}]

    def compare(names, prompt, *controls):
        *sampling, weights = controls
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError("compare takes a list of checkpoint names")
        names = list(dict.fromkeys(names))
        if not 2 <= len(names) <= COMPARE_SLOTS:
            raise UserError(f"pick between 2 and {COMPARE_SLOTS} checkpoints to compare")
        params, seed = sampling_params(max_new_tokens, *sampling)
        shown = [gr.Column(visible=i < len(names)) for i in range(COMPARE_SLOTS)]
        heads, texts = [""] * COMPARE_SLOTS, [""] * COMPARE_SLOTS
        runs, jobs = {}, []
        for i, name in enumerate(names):   # a checkpoint that fails to load says so in its column; the rest go on
            try:
                loaded = cache.get(name, quantized(weights))
            except LOAD_ERRORS as e:
                heads[i] = f"⚠️ **could not load this checkpoint**: {e}"
                continue
            heads[i] = f"**{name}**\n\n{loaded.describe()}"
            runs[str(loaded.run_dir.relative_to(root))] = loaded.run_dir
            jobs.append((i, loaded, encode_prompt(loaded, prompt)))
        curves = loss_curves(root, runs), eval_curves(root, runs)
        yield *shown, *heads, *texts, *curves
        for i, loaded, ids in jobs:   # one after the other: they would share the same cores anyway
            for text in stream_text(loaded, ids, params, seed):
                texts[i] = text
                yield *shown, *heads, *texts, *curves

    choices = find_checkpoints(root)
    first = choices[0][1] if choices else None
    with gr.Blocks(title="SmolLM2", analytics_enabled=False) as app:
        gr.Markdown(f"## SmolLM2 · checkpoints under `{root}`")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tab("Generate"):
                    with gr.Row():
                        # custom values are allowed so that a name typed or sent over the API reaches resolve_under,
                        # the one check that decides what may be loaded
                        picked = gr.Dropdown(choices, value=first, label="Checkpoint", allow_custom_value=True,
                                             scale=5, elem_id="checkpoint")
                        rescan = gr.Button("↻ Rescan", scale=1, min_width=80)
                    info = gr.Markdown(status(first) if first else "no checkpoints found under this directory")
                    prompt = gr.Textbox(label="Prompt", lines=4, max_length=CHARS_PER_TOKEN * max_prompt_tokens,
                                        placeholder="Once upon a time", elem_id="prompt")
                    with gr.Row():
                        go = gr.Button("Generate", variant="primary", elem_id="generate")
                        halt = gr.Button("Stop")
                    output = gr.Textbox(label="Generated text", lines=8, interactive=False, elem_id="output")
                with gr.Tab("Chat"):
                    chat_picked = gr.Dropdown(choices, value=first, label="Checkpoint (fine-tuned by sft.py or "
                                              "dpo.py)", allow_custom_value=True, elem_id="chat_checkpoint")
                    conversation = gr.Chatbot(label="Conversation", render_markdown=False, elem_id="chatbot")
                    message = gr.Textbox(label="Message", lines=2, max_length=CHARS_PER_TOKEN * max_prompt_tokens,
                                         placeholder="What is 12 + 30?", elem_id="message")
                    system = gr.Textbox(label="System message", placeholder=chat.DEFAULT_SYSTEM, lines=1)
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        halt3 = gr.Button("Stop")
                        forget = gr.Button("New conversation")
                with gr.Tab("Compare"):
                    several = gr.Dropdown(choices, multiselect=True, max_choices=COMPARE_SLOTS,
                                          allow_custom_value=True, label=f"Checkpoints (2 to {COMPARE_SLOTS})")
                    prompt2 = gr.Textbox(label="Prompt", lines=3, max_length=CHARS_PER_TOKEN * max_prompt_tokens)
                    go2 = gr.Button("Compare", variant="primary")
                    columns, heads, texts = [], [], []
                    with gr.Row():
                        for _ in range(COMPARE_SLOTS):
                            with gr.Column(min_width=200, visible=False) as column:
                                columns.append(column)
                                heads.append(gr.Markdown())
                                texts.append(gr.Textbox(label="Generated text", lines=8, interactive=False))
                    plot = gr.LinePlot(loss_curves(root, {}), x="step", y="loss", color="series",
                                       title="Loss curves of the compared runs", y_title="loss (nats/token)")
                    scores = gr.LinePlot(eval_curves(root, {}), x="step", y="score", color="series",
                                         title="Benchmark scores of the compared runs (evaluate.py during training)",
                                         y_title="score")
            with gr.Column(scale=1, min_width=240):
                gr.Markdown("### Sampling")
                top = max(2, max_new_tokens)   # a slider needs its maximum above its minimum; requests are capped
                sampling = [gr.Slider(low, high or top, value=min(default, high or max_new_tokens),
                                      step=1 if key in WHOLE else 0.05, label=label, info=hint, elem_id=key)
                            if key != "seed" else gr.Number(default, precision=0, minimum=low, label=label, info=hint)
                            for key, (label, low, high, default, hint) in CONTROLS.items()]   # sampling_params' order
                gr.Markdown("### Weights")
                weights = gr.Radio([("as stored", FULL), ("int8: faster on a CPU", "int8")], value=FULL,
                                   show_label=False, elem_id="weights",
                                   info="int8 quantizes every matrix as the checkpoint loads (quantize.py)")
        controls = [*sampling, weights]   # sampling_params' order, then the weights switch

        def list_checkpoints_api() -> list[str]:
            return [value for _, value in find_checkpoints(root)]

        gr.api(list_checkpoints_api, api_name="list_checkpoints")
        # preprocess=False: the handlers receive what a request sent, unconverted, and refuse a bad value themselves
        # in one line (Gradio's own range checks would log a traceback for each)
        picked.change(status, [picked, weights], info, api_name="load", preprocess=False)
        weights.change(status, [picked, weights], info, api_visibility="private", preprocess=False)
        rescan.click(lambda: [gr.Dropdown(choices=find_checkpoints(root))] * 3, None, [picked, several, chat_picked],
                     api_visibility="private")
        started = go.click(run, [picked, prompt, *controls], output, api_name="generate", preprocess=False)
        submitted = prompt.submit(run, [picked, prompt, *controls], output, api_visibility="private",
                                  preprocess=False)
        halt.click(None, cancels=[started, submitted])
        chat_inputs = [chat_picked, message, conversation, system, *controls]
        said = send.click(converse, chat_inputs, conversation, api_name="chat", preprocess=False)
        said_enter = message.submit(converse, chat_inputs, conversation, api_visibility="private", preprocess=False)
        for event in (said, said_enter):
            event.then(lambda: "", None, message, api_visibility="private")
        halt3.click(None, cancels=[said, said_enter])
        forget.click(lambda: [], None, conversation, api_visibility="private")
        go2.click(compare, [several, prompt2, *controls], [*columns, *heads, *texts, plot, scores],
                  api_name="compare", preprocess=False)
    return app


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint_dir", default="runs", help="folder searched for checkpoints; nothing outside it "
                        "can be loaded")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on: 127.0.0.1 is this machine only, "
                        "0.0.0.0 every network it is on")
    parser.add_argument("--port", type=whole(1, 65535), default=7860)
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--tokenizer", help="tokenizer.json or hub name for every checkpoint (default: the one found "
                        "with each checkpoint)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 (or fp16) on a GPU, fp32 on CPU")
    parser.add_argument("--cache_size", type=whole(1, 1000), default=3,
                        help="models kept loaded (in fp32, 135M takes 0.5 GB, 1.7B 7 GB)")
    parser.add_argument("--max_prompt_tokens", type=whole(1, 10**6), default=1024, help="longer prompts are refused")
    parser.add_argument("--max_new_tokens", type=whole(1, 10**6), default=512, help="the most one request may ask for")
    args = parser.parse_args(argv)
    root = Path(args.checkpoint_dir).resolve()
    if not root.is_dir():
        parser.error(f"--checkpoint_dir {args.checkpoint_dir}: no such directory (train.py writes runs under runs/)")
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    if args.host not in ("127.0.0.1", "localhost", "::1") or args.share:
        print("note: the app is reachable from other machines; anyone who reaches it can run the models")
    cache = ModelCache(root, args.cache_size, device, dtype, args.tokenizer)
    app = build_app(root, cache, args.max_prompt_tokens, args.max_new_tokens)
    # fonts the browser already has: the page must not reach out to a font server, which may be unreachable
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    try:
        app.queue().launch(server_name=args.host, server_port=args.port, share=args.share, theme=theme)
    except OSError as e:   # the port is taken, or the address is not this machine's
        parser.error(f"--port {args.port}: cannot listen there on {args.host} ({str(e).split('.')[0]}); pick another "
                     "--port")
    return 0


def whole(low: int, high: int):
    """An argparse type: a whole number from low to high."""
    def parse(text: str) -> int:
        if not text.strip().lstrip("-").isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, got {text!r}")
        return int(text)
    return parse


if __name__ == "__main__":
    sys.exit(main())
