"""What each request of the app does: plain methods that take the values a request sent and return, or yield as the
text streams in, what the page shows. No server is needed to call them.

Over the API any value can arrive (the page's own limits are bypassed), so every value is checked here and a bad one
is refused with a PageError: its message is shown in the page, and the server logs no traceback for it.
"""

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import gradio as gr
import pandas as pd

from smollm2 import chat
from smollm2.app_models import LOAD_ERRORS, Loaded, ModelCache, find_checkpoints, stream_text
from smollm2.confine import all_inside
from smollm2.metrics import eval_series, read_metrics, short_names, statistic_series, val_curves
from smollm2.sampling import MAX_SEED, SamplingParams

COMPARE_SLOTS = 4   # columns of the compare view: Gradio needs its components declared up front
CHARS_PER_TOKEN = 16   # a prompt longer than 16 characters per allowed token is refused before it is tokenized
PageError = functools.partial(gr.Error, print_exception=False)   # shown in the page; not a server fault to log
COULD_NOT_LOAD = "⚠️ **could not load this checkpoint**: "


# ---------------------------------------------------------------- checking what a request sends


FULL = "none"   # the weights switch's value for "as stored"
WEIGHTS = (FULL, "int8")


def quantized(weights) -> Optional[str]:
    """The weights switch, as a request sent it, -> smollm2.loading.load_model's quantize argument."""
    if not isinstance(weights, str) or weights not in WEIGHTS:
        raise PageError(f"Weights: {str(weights)[:40]!r} refused; give one of {', '.join(WEIGHTS)}")
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
        raise PageError(f"{label}: {str(value)[:40]!r} refused; give {kind} from {low} to {high}"
                        + (" (--max_new_tokens)" if key == "max_new_tokens" else ""))
    return int(value) if whole else float(value)


def sampling_params(max_new_tokens_cap: int, *values) -> tuple[SamplingParams, int]:
    """The sampling controls, in CONTROLS' order, -> (SamplingParams, seed); top-k at 0 and top-p at 1 mean off."""
    v = {key: checked(key, value, max_new_tokens_cap if key == "max_new_tokens" else None)
         for key, value in zip(CONTROLS, values)}
    params = SamplingParams(max_new_tokens=v["max_new_tokens"], temperature=v["temperature"], top_k=v["top_k"] or None,
                            top_p=v["top_p"] if v["top_p"] < 1 else None, repetition_penalty=v["repetition_penalty"])
    return params, v["seed"]


def as_messages(history) -> list[dict]:
    """The chat box's history as a request sent it -> [{"role", "content": text}]; Gradio may send a message's
    content as a list of parts. Anything else is refused."""
    if not isinstance(history, list) or not all(isinstance(m, dict) for m in history):
        raise PageError("the conversation must be a list of {role, content} messages")
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
        raise PageError("the message is empty: type something to say")
    if len(message) > CHARS_PER_TOKEN * room:
        raise PageError(f"the message is {len(message):,} characters; this app accepts at most {room} tokens "
                        "(--max_prompt_tokens)")
    if system is not None and not isinstance(system, str):
        raise PageError("the system message must be text")
    messages = as_messages(history) + [{"role": "user", "content": message}]
    try:
        end = chat.end_id(loaded.tokenizer)
        ids, _ = chat.fit_context(loaded.tokenizer, ([{"role": "system", "content": system}] if system else [])
                                  + messages, room)
    except chat.ChatError as e:
        raise PageError(str(e)) from None
    return messages, ids, end


# ---------------------------------------------------------------- the compared runs' curves


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


def statistic_curves(root: Path, runs: dict[str, Path]) -> pd.DataFrame:
    """Post-training statistics against step of each run (held-out accuracy per task, GRPO's reward and KL, DPO's
    accuracy, SFT's token accuracy: metrics.statistic_series), for a gr.LinePlot."""
    rows = [{"step": step, "value": value, "series": f"{label} · {name}"}
            for label, records in run_metrics(root, runs).items()
            for name, points in statistic_series(records).items() for step, value in points]
    return pd.DataFrame(rows, columns=["step", "value", "series"])


# ---------------------------------------------------------------- the requests


@dataclass
class Handlers:
    """Every request the page (or an API client) makes, served from one ModelCache under the caps the command was
    started with: --max_prompt_tokens and --max_new_tokens. `controls` are the sampling controls in CONTROLS' order,
    then the weights switch."""
    cache: ModelCache
    max_prompt_tokens: int
    max_new_tokens: int

    @property
    def root(self) -> Path:
        return self.cache.root

    def checkpoints(self) -> list[tuple[str, str]]:
        """The checkpoint picker's choices, (label, name), found afresh under the checkpoint directory."""
        return find_checkpoints(self.root)

    def checkpoint_names(self) -> list[str]:
        return [name for _, name in self.checkpoints()]

    def status(self, name: str, weights: str = FULL) -> str:
        """The named checkpoint at a glance (step, validation loss, size, context) once loaded, or why it could not
        be: the line under the page's picker."""
        t0 = time.perf_counter()
        try:
            loaded = self.cache.get(name, quantized(weights))
        except LOAD_ERRORS as e:
            return f"{COULD_NOT_LOAD}{e}"
        return f"**{name}** · {loaded.describe()} · ready in {time.perf_counter() - t0:.1f}s"

    def load(self, name, weights) -> Loaded:
        """The checkpoint a request names, in the weights it asks for; one that cannot be loaded is a PageError."""
        try:
            return self.cache.get(name, quantized(weights))
        except LOAD_ERRORS as e:
            raise PageError(str(e)) from None

    def encode_prompt(self, loaded: Loaded, prompt) -> list[int]:
        """A prompt as a request sent it -> its token ids, refused unless it is text that fits the model's context
        and --max_prompt_tokens (its length in characters is checked first, so a huge one is never tokenized)."""
        if not isinstance(prompt, str):
            raise PageError(f"the prompt must be text, got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:   # a lone surrogate, which JSON can carry
            raise PageError("the prompt is not valid UTF-8 text") from None
        limit = min(self.max_prompt_tokens, loaded.model.config.max_position_embeddings - 1)
        if len(prompt) > CHARS_PER_TOKEN * limit:
            raise PageError(f"the prompt is {len(prompt):,} characters; this app accepts at most {limit} tokens "
                            "(--max_prompt_tokens)")
        ids = loaded.tokenizer.encode(prompt).ids
        if not ids:
            raise PageError("the prompt is empty: type some text for the model to continue")
        if len(ids) > limit:
            raise PageError(f"the prompt is {len(ids)} tokens; this app accepts at most {limit} (--max_prompt_tokens)")
        return ids

    def generate(self, name, prompt, *controls) -> Iterator[str]:
        """The prompt's continuation by the named checkpoint, as it grows."""
        *sampling, weights = controls
        params, seed = sampling_params(self.max_new_tokens, *sampling)
        loaded = self.load(name, weights)
        ids = self.encode_prompt(loaded, prompt)
        yield from stream_text(loaded, ids, params, seed)

    def converse(self, name, message, history, system, *controls) -> Iterator[list[dict]]:
        """The conversation with the new user message and the reply as it streams; the reply ends at <|im_end|>."""
        *sampling, weights = controls
        params, seed = sampling_params(self.max_new_tokens, *sampling)
        loaded = self.load(name, weights)
        room = min(self.max_prompt_tokens, loaded.model.config.max_position_embeddings - params.max_new_tokens)
        history, ids, end = chat_prompt(loaded, message, history, system, room)
        for text in stream_text(loaded, ids, params, seed, eos_id=end):
            yield history + [{"role": "assistant", "content": text}]

    def compare(self, names, prompt, *controls) -> Iterator[tuple[list[str], list[str], pd.DataFrame, pd.DataFrame,
                                                                 pd.DataFrame]]:
        """One prompt through 2 to COMPARE_SLOTS checkpoints, one after the other -> (a header per column, a text per
        column, the runs' loss curves, their benchmark scores, their post-training statistics): first with no text,
        then as each text grows. Each checkpoint picked has a header; one that fails to load says why in it, and the
        others go on."""
        *sampling, weights = controls
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise PageError("compare takes a list of checkpoint names")
        names = list(dict.fromkeys(names))
        if not 2 <= len(names) <= COMPARE_SLOTS:
            raise PageError(f"pick between 2 and {COMPARE_SLOTS} checkpoints to compare")
        params, seed = sampling_params(self.max_new_tokens, *sampling)
        heads, texts = [""] * COMPARE_SLOTS, [""] * COMPARE_SLOTS
        runs, jobs = {}, []
        for i, name in enumerate(names):
            try:
                loaded = self.cache.get(name, quantized(weights))
            except LOAD_ERRORS as e:
                heads[i] = f"{COULD_NOT_LOAD}{e}"
                continue
            heads[i] = f"**{name}**\n\n{loaded.describe()}"
            runs[str(loaded.run_dir.relative_to(self.root))] = loaded.run_dir
            jobs.append((i, loaded, self.encode_prompt(loaded, prompt)))
        curves = loss_curves(self.root, runs), eval_curves(self.root, runs), statistic_curves(self.root, runs)
        yield heads, list(texts), *curves
        for i, loaded, ids in jobs:   # one after the other: they would share the same cores anyway
            for text in stream_text(loaded, ids, params, seed):
                texts[i] = text
                yield heads, list(texts), *curves
