"""The app's models: what can be loaded under --checkpoint_dir, the few kept loaded, and their text as it streams.

find_checkpoints lists every run, checkpoint and Hugging Face export under the folder whose files all lie inside it;
ModelCache loads a name only after confine.py has checked every file the load opens, and keeps the most recent few;
stream_text runs sampling.generate() in a worker thread and yields the text as it grows, for the page to show.
"""

import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from tokenizers import Tokenizer

from model import SmolLM2
from smollm2.checkpoint import (checkpoint_step, files_to_load, is_hf_dir, list_checkpoints, resolve_checkpoint,
                                run_dir_of)
from smollm2.confine import all_inside, files_inside, resolve_under
from smollm2.errors import CheckpointError, InputError
from smollm2.loading import eos_id_for, load_model, open_tokenizer, tokenizer_file
from smollm2.sampling import SamplingParams, TextStream, generate, use_decode_layout

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
    """A checkpoint ready to generate, with what loading it told (step, validation loss, quantization) and the run
    it belongs to, whose metrics.jsonl the compare view plots."""
    model: SmolLM2
    tokenizer: Tokenizer
    eos_id: Optional[int]
    info: dict          # step, val_loss, source: from loading.load_model
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
