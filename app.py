"""Show a model to people: `python app.py --checkpoint_dir runs/` serves a page to pick a checkpoint, type a prompt and
watch the text stream in, chat with a fine-tuned checkpoint, or run one prompt through several checkpoints side by side
next to their loss curves.

It builds on generate.py's loader (checkpoint.load_model: training checkpoints, run directories, Hugging Face
exports, tensors read with weights_only so a crafted pickle runs no code) and tokenizer opener, and on sampling.py's
generate(), the repository's one generation path, with TextStream, which turns its per-step tokens into text; chats
are rendered by chat.py, the template training used.
Safe by default: it listens on 127.0.0.1 unless --host or --share say otherwise, loads only what lies under
--checkpoint_dir (its real path, symlinks resolved), and caps the prompt and the number of new tokens.
"""

import argparse
import functools
import os
import queue
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

import chat
from checkpoint import CheckpointError, is_hf_dir, list_checkpoints, resolve_checkpoint, run_dir_of
from generate import InputError, eos_id_for, load, open_tokenizer, pick_device, pick_dtype
from metrics import read_metrics
from model import SmolLM2
from sampling import SamplingParams, TextStream, generate

COMPARE_SLOTS = 4   # columns of the compare view: Gradio needs its components declared up front
CHARS_PER_TOKEN = 16   # a prompt longer than 16 characters per allowed token is refused before it is tokenized
UserError = functools.partial(gr.Error, print_exception=False)   # shown in the page; not a server fault to log
LOAD_ERRORS = (CheckpointError, InputError, OSError)   # what loading a user's checkpoint may raise, with a message


# ---------------------------------------------------------------- finding and loading checkpoints under one folder


def find_checkpoints(root: Path) -> list[tuple[str, str]]:
    """Everything loadable under root, as (label, path relative to root): each run directory (meaning its newest
    checkpoint) followed by its checkpoints newest first, then each Hugging Face export (a folder with config.json)."""
    runs, exports = set(), []
    for dirpath, dirnames, filenames in os.walk(root):   # symlinked folders are listed but not entered
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if is_hf_dir(here):
            exports.append(here)
            dirnames.clear()
        elif any(f.startswith("step_") and f.endswith(".pt") for f in filenames):
            runs.add(here.parent if here.name == "checkpoints" else here)
    found = []
    for run in sorted(runs):
        files = list_checkpoints(run)
        if files:
            found.append((f"{run.relative_to(root)} · newest", str(run.relative_to(root))))
            found += [(str(f.relative_to(root)),) * 2 for f in reversed(files)]
    found += [(f"{e.relative_to(root)} · Hugging Face export", str(e.relative_to(root))) for e in sorted(exports)]
    return found


def resolve_under(root: Path, name: str) -> Path:
    """A checkpoint named relative to root (itself resolved) -> its real path; whatever lies outside root is refused."""
    if not name or not name.strip():
        raise CheckpointError("no checkpoint picked: choose one from the list")
    path = (root / name).resolve()   # `..`, an absolute name and symlinks are all resolved before the check
    if not path.is_relative_to(root):
        raise CheckpointError(f"{name!r} is outside the checkpoint directory: refused (this app loads only what lies "
                              "under --checkpoint_dir)")
    if not path.exists():
        raise CheckpointError(f"{name}: no such checkpoint under the checkpoint directory")
    return path


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
                           f"{self.model.num_parameters() / 1e6:.1f}M params",
                           f"context {self.model.config.max_position_embeddings} tokens"])


class ModelCache:
    """The most recently used models, so that switching back to a checkpoint is instant. Keyed by the file a name
    resolves to: two names of one checkpoint share it, and a run directory that gained a newer checkpoint loads it."""

    def __init__(self, root: Path, size: int, device: torch.device, dtype: torch.dtype,
                 tokenizer: Optional[str] = None):
        self.root, self.size, self.device, self.dtype, self.tokenizer = root, size, device, dtype, tokenizer
        self.models: OrderedDict[Path, Loaded] = OrderedDict()
        self.lock = threading.Lock()   # two requests for one checkpoint load it once

    def get(self, name: str) -> Loaded:
        """The loaded checkpoint; raises one of LOAD_ERRORS, whose message is meant for the page."""
        path = resolve_under(self.root, name)
        file = path if is_hf_dir(path) else resolve_checkpoint(path)
        with self.lock:
            if file in self.models:
                self.models.move_to_end(file)
                return self.models[file]
            model, cfg, info = load(file, self.device, self.dtype)
            tokenizer = open_tokenizer(self.tokenizer or info["tokenizer"])
            self.models[file] = Loaded(model, tokenizer, eos_id_for(cfg, tokenizer), info,
                                       run_dir_of(file) if file.is_file() else file)   # an HF dir is its own
            while len(self.models) > self.size:
                self.models.popitem(last=False)
            return self.models[file]


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
    text_stream = TextStream(loaded.tokenizer, 1, eos_id=eos_id, on_text=lambda row, text, done: pieces.put((text, done)))

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
    """The chat box's history -> [{"role", "content": text}]: Gradio hands message contents over as lists of parts."""
    messages = []
    for m in history or []:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if m.get("role") in ("user", "assistant") and isinstance(content, str):
            messages.append({"role": m["role"], "content": content})
    return messages


def loss_curves(runs: dict[str, Path]) -> pd.DataFrame:
    """Train and validation loss of each run (label -> run directory), from its metrics.jsonl, for a gr.LinePlot."""
    kinds = {"train": "train", "val": "validation"}
    rows = [{"step": r["step"], "loss": r["loss"], "series": f"{label} · {kinds[r['kind']]}"}
            for label, run_dir in runs.items() for r in read_metrics(run_dir / "metrics.jsonl")
            if r.get("kind") in kinds and "loss" in r]
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


# ---------------------------------------------------------------- the page


def sampling_params(temperature, top_k, top_p, max_new_tokens, repetition_penalty,
                    seed) -> tuple[SamplingParams, int]:
    """The sampling controls -> (SamplingParams, seed); a slider at 0 (top-k) or 1 (top-p) means off. Gradio has
    already refused values outside each slider's range: max new tokens above --max_new_tokens among them."""
    params = SamplingParams(max_new_tokens=int(max_new_tokens), temperature=temperature, top_k=int(top_k) or None,
                            top_p=top_p if top_p < 1 else None, repetition_penalty=repetition_penalty)
    return params, int(seed)


def build_app(root: Path, cache: ModelCache, max_prompt_tokens: int, max_new_tokens: int) -> gr.Blocks:
    def get(name: str) -> Loaded:
        try:
            return cache.get(name)
        except LOAD_ERRORS as e:
            raise UserError(str(e)) from None

    def encode_prompt(loaded: Loaded, prompt: str) -> list[int]:
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

    def status(name: str) -> str:
        t0 = time.perf_counter()
        try:
            loaded = cache.get(name)
        except LOAD_ERRORS as e:
            return f"⚠️ **could not load this checkpoint**: {e}"
        return f"**{name}** · {loaded.describe()} · ready in {time.perf_counter() - t0:.1f}s"

    def run(name, prompt, *sampling):
        loaded = get(name)
        ids = encode_prompt(loaded, prompt)
        yield from stream_text(loaded, ids, *sampling_params(*sampling))

    def converse(name, message, history, system, *sampling):
        """The conversation with the new user message and the reply as it streams; the reply ends at <|im_end|>.
        The oldest turns are left out when the conversation outgrows the prompt limit."""
        loaded = get(name)
        if not message or not message.strip():
            raise UserError("the message is empty: type something to say")
        if len(message) > CHARS_PER_TOKEN * max_prompt_tokens:
            raise UserError(f"the message is {len(message):,} characters; this app accepts at most "
                            f"{max_prompt_tokens} tokens (--max_prompt_tokens)")
        params, seed = sampling_params(*sampling)
        history = as_messages(history) + [{"role": "user", "content": message}]
        room = min(max_prompt_tokens, loaded.model.config.max_position_embeddings - params.max_new_tokens)
        try:
            end = chat.end_id(loaded.tokenizer)
            ids, _ = chat.fit_context(loaded.tokenizer, ([{"role": "system", "content": system}] if system else [])
                                      + history, room)
        except chat.ChatError as e:
            raise UserError(str(e)) from None
        for text in stream_text(loaded, ids, params, seed, eos_id=end):
            yield history + [{"role": "assistant", "content": text}]

    def compare(names, prompt, *sampling):
        names = list(dict.fromkeys(names or []))
        if not 2 <= len(names) <= COMPARE_SLOTS:
            raise UserError(f"pick between 2 and {COMPARE_SLOTS} checkpoints to compare")
        params, seed = sampling_params(*sampling)
        shown = [gr.Column(visible=i < len(names)) for i in range(COMPARE_SLOTS)]
        heads, texts = [""] * COMPARE_SLOTS, [""] * COMPARE_SLOTS
        runs, jobs = {}, []
        for i, name in enumerate(names):   # a checkpoint that fails to load says so in its column; the rest go on
            try:
                loaded = cache.get(name)
            except LOAD_ERRORS as e:
                heads[i] = f"⚠️ **could not load this checkpoint**: {e}"
                continue
            heads[i] = f"**{name}**\n\n{loaded.describe()}"
            runs[str(loaded.run_dir.relative_to(root))] = loaded.run_dir
            jobs.append((i, loaded, encode_prompt(loaded, prompt)))
        curves = loss_curves(runs)
        yield *shown, *heads, *texts, curves
        for i, loaded, ids in jobs:   # one after the other: they would share the same cores anyway
            for text in stream_text(loaded, ids, params, seed):
                texts[i] = text
                yield *shown, *heads, *texts, curves

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
                                         placeholder="Reverse: owl sun tree", elem_id="message")
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
                    plot = gr.LinePlot(loss_curves({}), x="step", y="loss", color="series",
                                       title="Loss curves of the compared runs", y_title="loss (nats/token)")
            with gr.Column(scale=1, min_width=240):
                gr.Markdown("### Sampling")
                temperature = gr.Slider(0, 2, value=0.8, step=0.05, label="Temperature", info="0 = greedy",
                                        elem_id="temperature")
                top_k = gr.Slider(0, 200, value=50, step=1, precision=0, label="Top-k", info="0 = off")
                top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top-p", info="1 = off")
                new_tokens = gr.Slider(1, max_new_tokens, value=min(64, max_new_tokens), step=1, precision=0,
                                       label="Max new tokens", elem_id="max_new_tokens")
                repetition = gr.Slider(1, 2, value=1.0, step=0.05, label="Repetition penalty", info="1 = off")
                seed = gr.Number(0, precision=0, minimum=0, label="Seed", info="same seed, same text")
        sampling = [temperature, top_k, top_p, new_tokens, repetition, seed]

        def list_checkpoints_api() -> list[str]:
            return [value for _, value in find_checkpoints(root)]

        gr.api(list_checkpoints_api, api_name="list_checkpoints")
        picked.change(status, picked, info, api_name="load")
        rescan.click(lambda: [gr.Dropdown(choices=find_checkpoints(root))] * 3, None, [picked, several, chat_picked],
                     api_visibility="private")
        started = go.click(run, [picked, prompt, *sampling], output, api_name="generate")
        submitted = prompt.submit(run, [picked, prompt, *sampling], output, api_visibility="private")
        halt.click(None, cancels=[started, submitted])
        chat_inputs = [chat_picked, message, conversation, system, *sampling]
        said = send.click(converse, chat_inputs, conversation, api_name="chat")
        said_enter = message.submit(converse, chat_inputs, conversation, api_visibility="private")
        for event in (said, said_enter):
            event.then(lambda: "", None, message, api_visibility="private")
        halt3.click(None, cancels=[said, said_enter])
        forget.click(lambda: [], None, conversation, api_visibility="private")
        go2.click(compare, [several, prompt2, *sampling], [*columns, *heads, *texts, plot],
                  api_name="compare")
    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint_dir", default="runs", help="folder searched for checkpoints; nothing outside it "
                        "can be loaded")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on: 127.0.0.1 is this machine only, "
                        "0.0.0.0 every network it is on")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--tokenizer", help="tokenizer.json or hub name for every checkpoint (default: the one found "
                        "with each checkpoint)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 (or fp16) on a GPU, fp32 on CPU")
    parser.add_argument("--cache_size", type=int, default=3, help="models kept loaded (in fp32, 135M takes 0.5 GB, "
                        "1.7B 7 GB)")
    parser.add_argument("--max_prompt_tokens", type=int, default=1024, help="longer prompts are refused")
    parser.add_argument("--max_new_tokens", type=int, default=512, help="the most one request may ask for")
    args = parser.parse_args(argv)
    root = Path(args.checkpoint_dir).resolve()
    if not root.is_dir():
        parser.error(f"--checkpoint_dir {args.checkpoint_dir}: no such directory (train.py writes runs under runs/)")
    try:
        device = pick_device(args.device)
        dtype = pick_dtype(device, args.dtype)
    except InputError as e:
        parser.error(str(e))
    if args.host not in ("127.0.0.1", "localhost", "::1") or args.share:
        print("note: the app is reachable from other machines; anyone who reaches it can run the models")
    cache = ModelCache(root, max(1, args.cache_size), device, dtype, args.tokenizer)
    app = build_app(root, cache, args.max_prompt_tokens, args.max_new_tokens)
    # fonts the browser already has: the page must not reach out to a font server, which may be unreachable
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    app.queue().launch(server_name=args.host, server_port=args.port, share=args.share, theme=theme)


if __name__ == "__main__":
    main()
