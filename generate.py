"""Text generation with a preallocated KV cache: one prefill over the prompts, then one token per step.

`generate()` is the one generation path of the repository: this file's command line, train.py's samples,
validate_params.py's greedy check and app.py all call it. `TextStream` turns its tokens into text as they arrive
(streaming and stop strings). The command line loads anything `checkpoint.load_model` does: a training checkpoint,
a run directory (its newest checkpoint) or a Hugging Face model directory.

    python generate.py --checkpoint_path runs/tiny --prompt "def " --max_new_tokens 64
    python generate.py --checkpoint_path runs/tiny --interactive
    python generate.py --compare runs/tiny --prompt "import os" --temperature 0

Only the generated text goes to stdout; logs and timings go to stderr, so the output pipes cleanly.
"""

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tokenizers import Tokenizer

from checkpoint import CheckpointError, list_checkpoints, load_model
from model import SmolLM2


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0          # 0: greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        problems = [(self.max_new_tokens < 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
                    (self.temperature < 0, f"temperature must be >= 0 (0: greedy), got {self.temperature}"),
                    (self.top_k is not None and self.top_k < 1, f"top_k must be >= 1, got {self.top_k}"),
                    (self.top_p is not None and not 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
                    (self.repetition_penalty <= 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")]
        for bad, message in problems:
            if bad:
                raise ValueError(message)


def warp_logits(logits: torch.Tensor, p: SamplingParams, seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The logits (B, V) a token is drawn from, in Hugging Face's order: repetition penalty, temperature, top-k, top-p.

    Repetition penalty divides the positive logits (multiplies the negative ones) of tokens already in `seen`;
    top-k keeps the k largest logits; top-p keeps the smallest set of tokens whose probability reaches p.
    Tokens filtered out get -inf. With temperature 0 (greedy) only the penalty applies.
    """
    logits = logits.float()
    if seen is not None and p.repetition_penalty != 1.0:
        picked = logits.gather(-1, seen)
        picked = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        logits = logits.scatter(-1, seen, picked)
    if p.temperature <= 0:
        return logits
    logits = logits / p.temperature
    if p.top_k is not None and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p        # the mass before this token already reached p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, generator: Optional[torch.Generator] = None,
           seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pick the next token from logits (B, V) -> (B,): the argmax when greedy, else a draw from warp_logits."""
    logits = warp_logits(logits, p, seen)
    if p.temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def use_decode_layout(model: SmolLM2) -> SmolLM2:
    """Store each Linear weight column-major: the same values, shapes and names in a new memory order.

    Decoding multiplies every weight matrix by one vector per row, and on the CPU MKL runs that product over a
    column-major matrix about 1.5x faster than over the row-major one training leaves (bench/bench_generate.py);
    at batch 1 those products are most of the time. For a model that only generates: safetensors refuses to save
    such tensors, and training steps would be slower.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):   # a tied lm_head re-lays the embedding with it, once
            module.weight.data = module.weight.data.t().contiguous().t()
    return model


def decode_step(model: SmolLM2, tok: torch.Tensor, pos: int, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """One new token per row (B,) written at cache slot `pos` -> next-token logits (B, 1, V)."""
    return model(tok[:, None], cache_pos=pos, valid=valid)[0]


@functools.cache
def compiled_decode_step() -> Callable:
    # dynamic=True: the attended cache grows by one slot per step, so shapes change every call; marking them dynamic
    # up front gives one graph instead of a recompilation at the second step
    return torch.compile(decode_step, dynamic=True)


@torch.inference_mode()
def generate(model: SmolLM2, prompts: list[list[int]], params: SamplingParams, eos_id: Optional[int] = None,
             seed: Optional[int] = None, on_tokens: Optional[Callable[[torch.Tensor], bool]] = None,
             compile: bool = False) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to params.max_new_tokens tokens; return the new tokens.

    Prompts of different lengths are left-padded; the padding is masked out and positions count real tokens only,
    so each row comes out exactly as if it had been generated alone. A row ends at `eos_id` (kept in its output).
    `on_tokens(tokens (B,))` is called after every step (for streaming); returning True stops generation.
    `compile` runs the decode step through torch.compile (worth it on a GPU; the prefill stays eager).
    """
    if not prompts or any(len(t) == 0 for t in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.lm_head.weight.device
    B, T = len(prompts), max(len(t) for t in prompts)
    max_len = min(T + params.max_new_tokens, model.config.max_position_embeddings)
    steps = max_len - T
    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    valid = torch.zeros(B, max_len, dtype=torch.bool, device=device)
    for i, toks in enumerate(prompts):
        ids[i] = toks[0]   # padding repeats a real token, so a repetition penalty sees nothing foreign
        ids[i, T - len(toks):] = torch.tensor(toks, device=device)
        valid[i, T - len(toks):] = True
    valid[:, T:] = True
    padded = bool((~valid[:, :T]).any())
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    step_fn = compiled_decode_step() if compile else decode_step

    was_training = model.training
    model.eval()
    model.setup_cache(B, max_len)
    try:
        out = []
        seen = ids
        done = torch.zeros(B, dtype=torch.bool, device=device)
        logits, _ = model(ids, cache_pos=0, valid=valid if padded else None, last_only=True)
        for step in range(steps):
            tok = sample(logits[:, -1], params, generator, seen)
            if eos_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_id), tok)
                done = done | (tok == eos_id)
            out.append(tok)
            if on_tokens is not None and on_tokens(tok):
                break
            if bool(done.all()) or step == steps - 1:
                break
            if params.repetition_penalty != 1.0:
                seen = torch.cat([seen, tok[:, None]], dim=1)
            logits = step_fn(model, tok, T + step, valid if padded else None)
    finally:
        model.clear_cache()
        model.train(was_training)
    if not out:
        return [[] for _ in prompts]
    new = torch.stack(out, dim=1).tolist()
    if eos_id is not None:   # cut each row after its first EOS
        new = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in new]
    return new


class TextStream:
    """generate()'s `on_tokens` hook: turns each row's tokens into text as they arrive and ends rows at stop strings.

    Byte-level BPE splits a multi-byte character over several tokens, and decoding a list that ends inside one gives
    U+FFFD. So every step decodes the row's whole list of new tokens and hands on only the part that can no longer
    change: nothing from a trailing U+FFFD on, nor a tail that a stop string may still complete.
    `on_text(row, new_text, done)` receives those pieces; `done` is True on a row's last call.
    """

    def __init__(self, tokenizer, batch: int, stop: Sequence[str] = (), eos_id: Optional[int] = None,
                 on_text: Optional[Callable[[int, str, bool], None]] = None):
        self.tokenizer, self.eos_id, self.on_text = tokenizer, eos_id, on_text
        self.stop = [s for s in stop if s]
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.texts = [""] * batch        # each row's text so far, cut before its stop string
        self.sent = [0] * batch          # how many characters of it on_text has received
        self.done = [False] * batch

    def __call__(self, tok: torch.Tensor) -> bool:
        """Take one token per row; return True once every row has ended (EOS or a stop string)."""
        for row, t in enumerate(tok.tolist()):
            if self.done[row]:
                continue
            if t == self.eos_id:
                self._finish(row)
                continue
            self.tokens[row].append(t)
            text = self.tokenizer.decode(self.tokens[row])
            cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            self.texts[row] = text[:min(cuts)] if cuts else text
            if cuts:
                self._finish(row)
            else:
                self._release(row, self._settled(text))
        return all(self.done)

    def close(self) -> list[str]:
        """End the rows still open (they reached the length limit) and return every row's text."""
        for row, done in enumerate(self.done):
            if not done:
                self._finish(row)
        return self.texts

    def _settled(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))
        held = max((k for s in self.stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
        return end - held

    def _finish(self, row: int) -> None:
        self.done[row] = True
        self._release(row, len(self.texts[row]), done=True)

    def _release(self, row: int, end: int, done: bool = False) -> None:
        new = self.texts[row][self.sent[row]:end]
        self.sent[row] = max(self.sent[row], end)
        if self.on_text is not None and (new or done):
            self.on_text(row, new, done)


# ---------------------------------------------------------------- command line


class InputError(Exception):
    """A problem with the user's flags or input: reported as one line on stderr, never a traceback."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device torch knows; use auto, cpu, cuda or cuda:N") from None


def pick_dtype(device: torch.device, name: str) -> torch.dtype:
    """fp32 on CPU (half-precision matmuls there are slow or emulated); bf16 on a GPU that has it, else fp16."""
    if device.type != "cuda":
        if name not in ("auto", "fp32"):
            raise InputError(f"--dtype {name} is for GPUs; on {device.type} generation runs in fp32")
        return torch.float32
    if name == "auto":
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        raise InputError("--dtype bf16: this GPU has no bf16 support (compute capability < 8.0); use --dtype fp16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load(path, device: torch.device, dtype: torch.dtype):
    """checkpoint.load_model, with every failure to read the user's file turned into one CheckpointError line."""
    try:
        model, cfg, info = load_model(path, device)
    except CheckpointError:
        raise
    except Exception as e:   # e.g. an unreadable config.json or safetensors file in a HF directory
        raise CheckpointError(f"{path}: could not be loaded ({type(e).__name__}: {e})") from None
    return model.to(dtype), cfg, info


def open_tokenizer(name: Optional[str]) -> Tokenizer:
    """A tokenizer.json file, a directory holding one, or a Hugging Face hub name (downloaded once, then cached)."""
    if not name:
        raise InputError("no tokenizer.json beside the checkpoint and none named in its config; pass --tokenizer FILE")
    path = Path(name)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file() and name.endswith(".json"):
        raise InputError(f"tokenizer {path}: file not found; pass --tokenizer FILE")
    try:
        return Tokenizer.from_file(str(path)) if path.is_file() else Tokenizer.from_pretrained(name)
    except Exception as e:
        raise InputError(f"tokenizer '{name}' could not be loaded ({e}); pass --tokenizer FILE") from None


def encode_prompts(tokenizer, texts: list[str], context: int, max_new_tokens: int, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt; a prompt too long for the context keeps its newest tokens, with a warning."""
    room = context - max_new_tokens
    out = []
    for n, text in enumerate(texts, 1):
        ids = tokenizer.encode(text).ids
        if not ids:
            raise InputError(f"prompt {n} is empty: give some text for the model to continue")
        if max(ids) >= vocab_size:
            raise InputError(f"prompt {n}: the tokenizer gives id {max(ids)} but the model has {vocab_size} tokens; "
                             "is --tokenizer the one this model was trained with?")
        if len(ids) > room:
            log(f"warning: prompt {n} has {len(ids)} tokens, but the context of {context} holds only {room} besides "
                f"{max_new_tokens} new tokens; its first {len(ids) - room} tokens are dropped")
            ids = ids[-room:]
        out.append(ids)
    return out


class Session:
    """A loaded model and tokenizer plus the user's sampling flags: prompts in, completions out."""

    def __init__(self, path, args):
        self.args = args
        device = pick_device(args.device)
        self.model, cfg, self.info = load(path, device, pick_dtype(device, args.dtype))
        if device.type == "cpu":
            use_decode_layout(self.model)
        self.tokenizer = open_tokenizer(args.tokenizer or self.info["tokenizer"])
        mc = cfg.model.model_config
        self.eos_id = mc.eos_token_id if mc.eos_token_id is not None else self.tokenizer.token_to_id("<|endoftext|>")
        n = args.max_new_tokens
        if n is None:   # 128, but a small context keeps half of itself for the prompt
            n = min(128, mc.max_position_embeddings // 2)
        if n >= mc.max_position_embeddings:
            raise InputError(f"--max_new_tokens {n} does not fit the model's context of {mc.max_position_embeddings} "
                             f"tokens with a prompt; use at most {mc.max_position_embeddings - 1}")
        self.params = sampling_params(args, n)
        self.compile = args.compile and device.type == "cuda"
        if args.compile and not self.compile:
            log("warning: --compile applies to GPU decoding only; running eagerly on the CPU")
        step, loss = self.info["step"], self.info["val_loss"]
        facts = ([f"step {step}"] if step is not None else []) + ([f"val loss {loss:.3f}"] if loss is not None else [])
        facts += [f"{self.model.num_parameters() / 1e6:.1f}M parameters", f"{device} {self.model.lm_head.weight.dtype}"]
        log(f"loaded {self.info['source']}: {', '.join(facts)}")

    def complete(self, prompts: list[str], on_text=None) -> list[str]:
        """Generate for a batch of prompts, log the throughput, and return each completion (text only)."""
        mc = self.model.config
        ids = encode_prompts(self.tokenizer, prompts, mc.max_position_embeddings, self.params.max_new_tokens,
                             mc.vocab_size)
        stream = TextStream(self.tokenizer, len(ids), self.args.stop or (), self.eos_id, on_text)
        t0 = time.perf_counter()
        new = generate(self.model, ids, self.params, self.eos_id, self.args.seed, on_tokens=stream,
                       compile=self.compile)
        seconds = time.perf_counter() - t0
        n = sum(len(row) for row in new)
        log(f"{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tok/s")
        return stream.close()


def sampling_params(args, max_new_tokens: int) -> SamplingParams:
    try:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    except ValueError as e:
        raise InputError(f"--{e}") from None


def printer(n_prompts: int) -> Callable[[int, str, bool], None]:
    """on_text for the terminal: one prompt streams as it is generated; several are printed in order, each as soon as
    it and those before it have finished, separated by a blank line (a header on stderr says which prompt it is)."""
    parts = [""] * n_prompts
    finished = [False] * n_prompts
    shown = 0

    def on_text(row: int, text: str, done: bool) -> None:
        nonlocal shown
        if n_prompts == 1:
            sys.stdout.write(text + ("\n" if done else ""))
            sys.stdout.flush()
            return
        parts[row] += text
        finished[row] = done
        while shown < n_prompts and finished[shown]:
            log(f"--- prompt {shown + 1}")
            sys.stdout.write(("\n" if shown else "") + parts[shown] + "\n")
            sys.stdout.flush()
            shown += 1
    return on_text


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--prompt_file {args.prompt_file}: cannot be read ({e})") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise InputError("no prompt: give --prompt TEXT (repeatable), --prompt_file FILE or --interactive")
    return prompts


def interactive(session: Session) -> None:
    """Read one prompt per line until EOF; each completion streams to stdout."""
    tty = sys.stdin.isatty()
    while True:
        if tty:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return
        prompt = line.rstrip("\n")
        if not prompt:
            continue
        try:
            session.complete([prompt], printer(1))
        except InputError as e:   # an empty or unusable line: say so and wait for the next one
            log(f"error: {e}")


def compare(args) -> None:
    """The same prompts through every checkpoint of a run: a table of step, validation loss and completion."""
    prompts = read_prompts(args)
    paths = list_checkpoints(args.compare)
    if not paths:
        raise CheckpointError(f"{args.compare}: no step_*.pt checkpoints in this run directory or its checkpoints/")
    rows = []
    for path in paths:
        try:
            session = Session(path, args)
        except CheckpointError as e:   # one bad file should not hide the others
            log(f"warning: skipped: {e}")
            continue
        rows.append((session.info["step"], session.info["val_loss"], session.complete(prompts)))
    if not rows:
        raise CheckpointError(f"{args.compare}: none of its {len(paths)} checkpoints could be loaded")
    for n, prompt in enumerate(prompts):
        print(f"{'' if n == 0 else chr(10)}prompt: {json.dumps(prompt, ensure_ascii=False)}")
        print(f"{'step':>10}  {'val loss':>8}  completion")
        for step, loss, texts in rows:
            print(f"{'?' if step is None else step:>10}  {'-' if loss is None else f'{loss:.4f}':>8}  "
                  f"{json.dumps(texts[n], ensure_ascii=False)}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint_path", help="a step_*.pt checkpoint, a run directory (its newest checkpoint) or "
                                               "a Hugging Face model directory")
    src.add_argument("--compare", metavar="RUN_DIR", help="run the prompts through every checkpoint of this run")
    ap.add_argument("--tokenizer", help="tokenizer.json file or hub name (default: the one found with the checkpoint)")
    ap.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    ap.add_argument("--prompt_file", help="a file of prompts, one per line")
    ap.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, until EOF")
    ap.add_argument("--max_new_tokens", type=int, help="default: 128, or half the context if that is shorter")
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top_k", type=int)
    ap.add_argument("--top_p", type=float)
    ap.add_argument("--repetition_penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, help="makes sampling reproducible")
    ap.add_argument("--stop", action="append", help="end a completion before this string; repeatable "
                                                    "(in bash, $'\\n\\n' is a blank line)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="auto: bf16 (or fp16) on a GPU, fp32 on CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU only)")
    args = ap.parse_args(argv)
    if args.interactive and (args.prompt or args.prompt_file or args.compare):
        ap.error("--interactive reads prompts from stdin: drop --prompt/--prompt_file/--compare")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.compare:
            compare(args)
            return 0
        prompts = None if args.interactive else read_prompts(args)
        session = Session(args.checkpoint_path, args)
        if prompts is None:
            interactive(session)
        else:
            session.complete(prompts, printer(len(prompts)))
        return 0
    except (InputError, CheckpointError) as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `| head` closed stdout: stop quietly, and keep Python's exit-time flush from failing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
