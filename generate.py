"""Generate text from any checkpoint: `python generate.py --checkpoint_path PATH --prompt "..."`.

The command line loads anything smollm2/loading.py's `load_model` does: a training checkpoint, a run directory (its
newest checkpoint), a Hugging Face model directory or an s3:// path; the decoding itself is smollm2/sampling.py's
`generate()`, the repository's one generation path.

    python generate.py --checkpoint_path runs/tiny --prompt "def " --max_new_tokens 64
    python generate.py --checkpoint_path runs/tiny --interactive
    python generate.py --checkpoint_path runs/tiny-sft --chat
    python generate.py --compare runs/tiny --prompt "import os" --temperature 0
    python generate.py --checkpoint_path runs/tiny --quantize int8 --prompt "def "    # int8 weights: faster on a CPU

Only the generated text goes to stdout; logs and timings go to stderr, so the output pipes cleanly. A bad flag or
input is one line, `error: ...`, and exit status 2.

Read next: sft.py, which teaches a pretrained checkpoint to chat. Generation builds on smollm2/sampling.py (sampling,
the KV-cache decode, TextStream), quantize.py (int8 weights) and chat.py (the chat template `--chat` renders).
"""

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from smollm2 import chat
from smollm2.checkpoint import list_checkpoints
from smollm2.errors import CheckpointError, InputError, command
from smollm2.loading import eos_id_for, load_model, log, open_tokenizer, pick_device, pick_dtype
from smollm2.quantize import QUANTIZE_CHOICES
from smollm2.sampling import MAX_SEED, SamplingParams, TextStream, compile_unavailable, generate, use_decode_layout


def encode_prompts(tokenizer, texts: list[str], context: int, max_new_tokens: int, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt; a prompt too long for the context keeps its newest tokens, with a warning."""
    room = context - max_new_tokens
    out = []
    for n, text in enumerate(texts, 1):
        try:
            text.encode("utf-8")   # a byte that is not UTF-8 in argv arrives as a lone surrogate
        except UnicodeEncodeError as e:
            raise InputError(f"prompt {n} is not valid UTF-8 (at character {e.start}); give UTF-8 text") from None
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
        dtype = pick_dtype(device, args.dtype)
        self.model, cfg, self.info = load_model(path, device, dtype, args.quantize)
        self.tokenizer = open_tokenizer(args.tokenizer or self.info["tokenizer"])
        self.eos_id = eos_id_for(cfg, self.tokenizer)
        mc = cfg.model.model_config
        n = args.max_new_tokens
        if n is None:   # 128, but a small context keeps half of itself for the prompt
            n = min(128, mc.max_position_embeddings // 2)
        if n >= mc.max_position_embeddings:
            raise InputError(f"--max_new_tokens {n} does not fit the model's context of {mc.max_position_embeddings} "
                             f"tokens with a prompt; use at most {mc.max_position_embeddings - 1}")
        self.params = sampling_params(args, n)
        why_not = compile_unavailable(device) if args.compile else None
        self.compile = args.compile and why_not is None
        if why_not:
            log(f"warning: --compile: {why_not}; running eagerly")
        step, loss = self.info["step"], self.info["val_loss"]
        facts = ([f"step {step}"] if step is not None else []) + ([f"val loss {loss:.3f}"] if loss is not None else [])
        facts += [f"{self.model.num_parameters() / 1e6:.1f}M parameters", f"{device} {dtype}"]
        facts += [f"{args.quantize} weights"] if args.quantize else []
        log(f"loaded {self.info['source']}: {', '.join(facts)}")

    def complete(self, prompts: list[str], on_text=None) -> list[str]:
        """Generate for a batch of prompts, log the throughput, and return each completion (text only)."""
        mc = self.model.config
        ids = encode_prompts(self.tokenizer, prompts, mc.max_position_embeddings, self.params.max_new_tokens,
                             mc.vocab_size)
        return self._generate(ids, self.eos_id, on_text)

    def reply(self, messages: list[dict], on_text=None) -> str:
        """The assistant's next message in a conversation (chat.py's template), ending at <|im_end|>. When the
        conversation outgrows the context, its oldest turns are left out, whole."""
        try:
            end = chat.end_id(self.tokenizer)
            room = self.model.config.max_position_embeddings - self.params.max_new_tokens
            ids, dropped = chat.fit_context(self.tokenizer, messages, room)
        except chat.ChatError as e:
            raise InputError(str(e)) from None
        if dropped:
            log(f"note: the conversation outgrew the context of {self.model.config.max_position_embeddings} tokens; "
                f"its {dropped} oldest turns are left out")
        return self._generate([ids], end, on_text)[0]

    def _generate(self, ids: list[list[int]], eos_id: Optional[int], on_text) -> list[str]:
        stream = TextStream(self.tokenizer, len(ids), self.args.stop or (), eos_id, on_text)
        use_decode_layout(self.model, len(ids))
        t0 = time.perf_counter()
        new = generate(self.model, ids, self.params, eos_id, self.args.seed, on_tokens=stream, compile=self.compile)
        seconds = time.perf_counter() - t0
        n = sum(len(row) for row in new)
        log(f"{n} tokens in {seconds:.2f} s, {n / seconds:.1f} tok/s")
        return stream.close()


def sampling_params(args, max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty)


def printer(prompts: list[str], output_format: str = "text") -> Callable[[int, str, bool], None]:
    """on_text for the terminal. text: one prompt streams as it is generated; several are printed in order, each as
    soon as it and those before it have finished, separated by a blank line (a header on stderr says which prompt it
    is). jsonl: one JSON record {"prompt", "completion"} per line, in order, each when its completion is whole."""
    n_prompts = len(prompts)
    parts = [""] * n_prompts
    finished = [False] * n_prompts
    shown = 0

    def on_text(row: int, text: str, done: bool) -> None:
        nonlocal shown
        if n_prompts == 1 and output_format == "text":
            sys.stdout.write(text + ("\n" if done else ""))
            sys.stdout.flush()
            return
        parts[row] += text
        finished[row] = done
        while shown < n_prompts and finished[shown]:
            if output_format == "jsonl":
                sys.stdout.write(json.dumps({"prompt": prompts[shown], "completion": parts[shown]},
                                            ensure_ascii=False) + "\n")
            else:
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


def stdin_lines(marker: str) -> Iterator[str]:
    """Each line of stdin without its newline, until EOF; `marker` on stderr asks for the next when a person types.
    A line that is not UTF-8 is reported and skipped."""
    tty = sys.stdin.isatty()
    for n in itertools.count(1):
        if tty:
            sys.stderr.write(marker)
            sys.stderr.flush()
        raw = sys.stdin.buffer.readline()   # bytes: a line that is not UTF-8 must not end the session
        if not raw:
            return
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            log(f"error: line {n} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start}); skipped")
            continue
        yield line


def interactive(session: Session) -> None:
    """Read one prompt per line until EOF; each completion streams to stdout. A line the model cannot take is
    reported and skipped."""
    for prompt in stdin_lines("> "):
        try:
            if prompt:
                session.complete([prompt], printer([prompt], session.args.output_format))
        except InputError as e:   # an empty or unusable line: say so and wait for the next one
            log(f"error: {e}")


def converse(session: Session, system: Optional[str]) -> None:
    """A conversation on stdin and stdout: each line is a user message, and the reply, which ends at <|im_end|>,
    streams to stdout on its own line. The whole conversation so far is the next reply's prompt."""
    chat.end_id(session.tokenizer)   # a checkpoint that cannot chat says so before the first message
    messages = [{"role": "system", "content": system}] if system is not None else []   # "": an empty system turn
    for line in stdin_lines("you> "):
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            messages.append({"role": "assistant", "content": session.reply(messages, printer([line]))})
        except InputError as e:   # a message too long for the context: say so and wait for the next one
            messages.pop()
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
    if args.output_format == "jsonl":
        for step, loss, texts in rows:
            for prompt, text in zip(prompts, texts):
                print(json.dumps({"step": step, "val_loss": loss, "prompt": prompt, "completion": text},
                                 ensure_ascii=False))
        return
    for n, prompt in enumerate(prompts):
        print(f"{'' if n == 0 else chr(10)}prompt: {json.dumps(prompt, ensure_ascii=False)}")
        print(f"{'step':>10}  {'val loss':>8}  completion")
        for step, loss, texts in rows:
            print(f"{'?' if step is None else step:>10}  {'-' if loss is None else f'{loss:.4f}':>8}  "
                  f"{json.dumps(texts[n], ensure_ascii=False)}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint_path", help="a step_*.pt checkpoint, a run directory (its newest checkpoint) or "
                                               "a Hugging Face model directory")
    src.add_argument("--compare", metavar="RUN_DIR", help="run the prompts through every checkpoint of this run")
    ap.add_argument("--tokenizer", help="tokenizer.json file or hub name (default: the one found with the checkpoint)")
    ap.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    ap.add_argument("--prompt_file", help="a file of prompts, one per line")
    ap.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, until EOF")
    ap.add_argument("--chat", action="store_true", help="hold a conversation: each stdin line is a user message, each "
                    "reply ends at <|im_end|> (a checkpoint fine-tuned by sft.py or dpo.py)")
    ap.add_argument("--system", help="with --chat: the system message (default: SmolLM2's own; \"\" for an empty one)")
    ap.add_argument("--max_new_tokens", type=int, help="default: 128, or half the context if that is shorter")
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default: 0.8)")
    ap.add_argument("--top_k", type=int, help="sample among the k most likely tokens only")
    ap.add_argument("--top_p", type=float, help="sample among the most likely tokens holding this much probability")
    ap.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeating prompt or output "
                                                                          "tokens (default: 1, off)")
    ap.add_argument("--seed", type=int, help="makes sampling reproducible (0 to 2**64 - 1)")
    ap.add_argument("--stop", action="append", help="end a completion before this string; repeatable "
                                                    "(in bash, $'\\n\\n' is a blank line)")
    ap.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="auto (default): bf16 (or fp16) on a GPU, fp32 on the CPU")
    ap.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="int8: weight-only int8 matrices, decoding about 1.7x "
                                                                 "faster at batch 1, CPU only (see docs/benchmarks.md)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU, or CPU with a C++ "
                                                           "compiler; slow to start, see docs/benchmarks.md)")
    ap.add_argument("--output_format", default="text", choices=["text", "jsonl"],
                    help="text (default): the completions as they are; jsonl: one JSON record per prompt "
                         '({"prompt", "completion"}; with --compare also "step", "val_loss")')
    args = ap.parse_args(argv)
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        ap.error(f"--seed {args.seed}: give a whole number from 0 to 2**64 - 1")
    if args.interactive and (args.prompt or args.prompt_file or args.compare):
        ap.error("--interactive reads prompts from stdin: drop --prompt/--prompt_file/--compare")
    if args.chat and (args.prompt or args.prompt_file or args.compare or args.interactive):
        ap.error("--chat reads the user's messages from stdin: drop --prompt/--prompt_file/--compare/--interactive")
    if args.system is not None and not args.chat:
        ap.error("--system is the system message of a --chat conversation: add --chat")
    try:   # bad sampling values are refused before a model is loaded
        sampling_params(args, 1 if args.max_new_tokens is None else args.max_new_tokens)
    except ValueError as e:
        ap.error(f"--{e}")
    return args


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.compare:
            compare(args)
            return 0
        prompts = None if args.interactive or args.chat else read_prompts(args)
        session = Session(args.checkpoint_path, args)
        if args.chat:
            converse(session, args.system)
        elif prompts is None:
            interactive(session)
        else:
            session.complete(prompts, printer(prompts, args.output_format))
        return 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `| head` closed stdout: stop quietly, and keep Python's exit-time flush from failing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
