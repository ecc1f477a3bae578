"""Sampling and KV-cache decoding: the one generation path of the repository.

`generate()` runs one prefill over the (left-padded) prompts, then one token per step from a preallocated KV cache;
generate.py's command line, train.py's samples, validate_params.py's greedy check and app.py all call it.
`sample()` picks a token from logits (repetition penalty, temperature, top-k, top-p) and `TextStream` turns the
tokens into text as they arrive (streaming and stop strings).
"""

import functools
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import SmolLM2

MAX_SEED = 2**64 - 1   # torch.Generator takes a 64-bit seed
# the smallest and largest temperature, top_p and repetition penalty accepted: past them, fp32 logits divided or
# multiplied by the value overflow (or the value itself rounds to 0 in fp32), and the probabilities become NaN
LOW, HIGH = 1e-6, 1e6


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0          # 0: greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        # written as `not (good)` so that NaN, which fails every comparison, is refused too
        problems = [(not self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
                    (not (self.temperature == 0 or LOW <= self.temperature <= HIGH),
                     f"temperature must be 0 (greedy) or a number from {LOW:g} to {HIGH:g}, got {self.temperature}"),
                    (self.top_k is not None and not self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
                    (self.top_p is not None and not LOW <= self.top_p <= 1,
                     f"top_p must be a number from {LOW:g} to 1, got {self.top_p}"),
                    (not LOW <= self.repetition_penalty <= HIGH,
                     f"repetition_penalty must be a number from {LOW:g} to {HIGH:g}, got {self.repetition_penalty}")]
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
        # after top-k only its k tokens are left: order those, not all 49k logits (a full sort per token took as
        # long as the decode step itself)
        n = logits.size(-1) if p.top_k is None else min(p.top_k, logits.size(-1))
        sorted_logits, order = logits.topk(n, dim=-1)     # descending
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p        # the mass before this token already reached p
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, ~drop)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, generator: Optional[torch.Generator] = None,
           seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pick the next token from logits (B, V) -> (B,): the argmax when greedy, else a draw from warp_logits."""
    logits = warp_logits(logits, p, seen)
    if p.temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _can_pack() -> bool:
    """Whether this PyTorch build has oneDNN's packed-weight matmul (CPU builds with mkldnn: x86 and Arm)."""
    try:
        return torch.backends.mkldnn.is_available() and callable(torch.ops.mkldnn._reorder_linear_weight) \
            and callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


LAYOUTS = ("row", "column") + (("packed",) if _can_pack() else ())
_chosen_layouts: dict = {}   # (batch, threads, weight shapes) -> the layout calibrate_layout measured fastest


def laid(w: torch.Tensor, layout: str) -> torch.Tensor:
    """w (N, K) stored as `layout` keeps it: row-major, column-major, or packed in oneDNN's blocked order."""
    if layout == "packed":
        return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous())
    return w.t().contiguous().t() if layout == "column" else w.contiguous()


def product(x: torch.Tensor, w: torch.Tensor, layout: str) -> torch.Tensor:
    """x (..., K) @ w.T -> (..., N), w as `laid` stores it for `layout`."""
    if layout == "packed":
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


class PackedLinear(nn.Module):
    """A bias-free Linear whose product runs from a copy of its weight packed by oneDNN (PyTorch's CPU matmul
    library) into the blocked order its kernel reads fastest. The plain weight stays beside it (parameter names,
    the other layouts, a tied embedding), so this layout holds the Linear weights twice. x (..., K) -> (..., N)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self._pack()

    def _pack(self) -> None:
        self.register_buffer("packed", laid(self.weight, "packed"), persistent=False)
        self.packed_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # autograd and inductor need the plain weight (inductor packs its own only for frozen graphs)
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight)
        if self.weight._version != self.packed_version:   # changed in place since it was packed: pack it again
            self._pack()
        return product(x, self.packed, "packed")


def decode_layout(model: SmolLM2, batch: int) -> str:
    """How the Linear weights are stored to decode `batch` rows per step fastest: "row", "column" or "packed".

    A decode step multiplies every weight matrix by `batch` activation rows. PyTorch's CPU kernels run that product
    from the row-major matrix training leaves, from a column-major copy (MKL) or from a copy oneDNN packed for
    itself, at speeds that depend on the batch, the thread count and the machine (on one 2-core machine column-major
    won at batch 1 and rows at batch 8; on another, packed won both by 1.5-2.5x), so the CPU's choice is measured
    once per batch size and thread count (calibrate_layout). On a GPU, cuBLAS reads either order alike: rows stay.
    """
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    if not shapes or model.lm_head.weight.device.type != "cpu":   # none when int8: quantize.py has one layout
        return "row"
    key = (batch, torch.get_num_threads(), tuple(shapes))
    if key not in _chosen_layouts:
        _chosen_layouts[key] = calibrate_layout(model, batch)
    return _chosen_layouts[key]


def current_layout(model: SmolLM2) -> str:
    """The layout lay_out last gave the model's Linear weights (the head's tells: lay_out treats them all alike)."""
    if isinstance(model.lm_head, PackedLinear):
        return "packed"
    w = model.lm_head.weight
    return "column" if w.t().is_contiguous() and not w.is_contiguous() else "row"


MIN_VISIT = 0.02   # seconds: a few of the scheduler's time slices


@torch.inference_mode()
def calibrate_layout(model: SmolLM2, batch: int, rounds: int = 7, steps: int = 2) -> str:
    """Time the model's own decode step for `batch` rows in each layout and return the fastest; the model keeps
    the layout it came in. What is timed is the step generate runs (every product, the head, each module's own
    overhead): the products timed alone, shape by shape, ranked the layouts otherwise than decoding did. Each of
    `rounds` rounds visits every layout, back and forth (so each round re-lays the weights twice, not three times,
    and a busy machine slows all layouts alike), for `steps` steps and MIN_VISIT seconds at least (so a small
    model's visit outlasts the scheduler's pauses); a layout's step is its median visit."""
    start, caches = current_layout(model), [layer.self_attn.kv_cache for layer in model.model.layers]
    device = model.lm_head.weight.device
    model.setup_cache(batch, MIN_CACHE)
    tok = torch.zeros(batch, dtype=torch.long, device=device)
    slot = torch.zeros(1, dtype=torch.long, device=device)
    valid = torch.ones(batch, MIN_CACHE, dtype=torch.bool, device=device)
    visits = {layout: [] for layout in LAYOUTS}
    try:
        for r in range(rounds):
            for layout in LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]:
                lay_out(model, layout)
                n, t0 = 0, time.perf_counter()
                while n < steps or time.perf_counter() - t0 < MIN_VISIT:
                    decode_step(model, tok, slot, valid)
                    n += 1
                visits[layout].append((time.perf_counter() - t0) / n)
    finally:
        lay_out(model, start)
        for layer, cache in zip(model.model.layers, caches):
            layer.self_attn.kv_cache = cache
    return min(LAYOUTS, key=lambda layout: sorted(visits[layout])[rounds // 2])


@torch.no_grad()
def lay_out(model: SmolLM2, layout: str) -> SmolLM2:
    """Store each Linear weight row-major (as training leaves it), column-major or packed: same values, shapes and
    parameter names. Only what differs is copied; a tied lm_head re-lays the embedding with it (packed: a copy)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and layout == "packed":
                setattr(module, name, PackedLinear(child.weight))
            elif isinstance(child, PackedLinear) and layout != "packed":
                plain = nn.Linear(child.weight.shape[1], child.weight.shape[0], bias=False, device="meta")
                plain.weight = child.weight
                setattr(module, name, plain)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight.data
            if layout == "column" and not w.t().is_contiguous():
                module.weight.data = w.t().contiguous().t()
            elif layout == "row" and not w.is_contiguous():
                module.weight.data = w.contiguous()
    return model


def use_decode_layout(model: SmolLM2, batch: int) -> SmolLM2:
    """Lay the model out the way `decode_layout` finds fastest for `batch` rows per step. Meant for a model that only
    generates (safetensors refuses to save non-contiguous tensors); a training model keeps its layout."""
    return lay_out(model, decode_layout(model, batch))


MIN_CACHE = 64        # the shortest KV cache; longer ones double, so a few lengths serve every request
MIN_PREFILL = 16      # the shortest compiled prefill; longer ones double (CUDA)
STOP_CHECK_EVERY = 8  # on a GPU, the steps between two looks at the rows' EOS (each look waits for the device)


def bucket(needed: int, smallest: int, limit: int) -> int:
    """The smallest power-of-two multiple of `smallest` that holds `needed`, but at most `limit`."""
    n = smallest
    while n < needed:
        n *= 2
    return min(n, limit)


def decode_step(model: SmolLM2, tok: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One new token per row (B,) written at cache slot `slot` (1,) -> next-token logits (B, 1, V)."""
    return model(tok[:, None], cache_pos=slot, valid=valid)[0]


def prefill(model: SmolLM2, ids: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The prompts (B, T) written at cache slots (T,) -> the last position's logits (B, 1, V)."""
    return model(ids, cache_pos=slots, valid=valid, last_only=True)[0]


def compile_unavailable(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot build the decode step for this device, or None when it can."""
    import torch._dynamo
    if not torch._dynamo.is_inductor_supported():
        return "torch.compile (inductor) does not support this Python or platform"
    if device.type == "cpu":   # inductor writes C++ for the CPU and builds it with the system's compiler
        from torch._inductor.cpp_builder import get_cpp_compiler
        try:
            get_cpp_compiler()
        except Exception:
            return "on the CPU inductor needs a C++ compiler and none was found (install g++)"
    return None


@functools.cache
def compiled(fn: Callable, device_type: str) -> Callable:
    """fn(model, tokens (B, T), slots (T,), valid (B, S)) through torch.compile, built once per process: the batch B
    and the cache length S are marked dynamic (the cache's by _mark_dynamic), so one graph serves every prompt and
    position, not one per size. On CUDA the step is also captured as a CUDA graph ("reduce-overhead"), which replays
    its hundreds of kernels with one launch (one capture per size)."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config
    built = torch.compile(fn, fullgraph=True, mode="reduce-overhead" if device_type == "cuda" else None)
    # size-oblivious: a batch of one is one more size of the same graph (dynamo would otherwise specialise 1); and
    # dynamo takes a module's buffers as fixed-size by default, but the KV cache's marks must count (the weights,
    # never marked, stay fixed-size)
    built = fx_config.patch(backed_size_oblivious=True)(built)
    built = torch._dynamo.config.patch(force_parameter_static_shapes=False,
                                       force_nn_module_property_static_shapes=False)(built)

    def run(model: SmolLM2, tokens: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        torch._dynamo.mark_dynamic(tokens, 0)
        torch._dynamo.mark_dynamic(valid, 0)
        torch._dynamo.mark_dynamic(valid, 1)
        return built(model, tokens, slots, valid)
    return run


def _mark_dynamic(model: SmolLM2) -> None:
    """Mark the KV cache's batch and length dynamic for `compiled` (once per cache: a mark stays on its tensor)."""
    import torch._dynamo
    for layer in model.model.layers:
        for t in (layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v):
            torch._dynamo.mark_dynamic(t, 0)
            torch._dynamo.mark_dynamic(t, 2)


def _padded_prompts(prompts: list[list[int]], T: int, S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to T tokens (B, T), and valid (B, S): True at every real token and every later slot."""
    ids = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), S, dtype=torch.bool, device=device)
    for i, toks in enumerate(prompts):
        ids[i] = toks[0]   # padding repeats a real token, so a repetition penalty sees nothing foreign
        ids[i, T - len(toks):] = torch.tensor(toks, device=device)
        valid[i, T - len(toks):] = True
    valid[:, T:] = True
    return ids, valid


@torch.inference_mode()
def generate(model: SmolLM2, prompts: list[list[int]], params: SamplingParams, eos_id: Optional[int] = None,
             seed: Optional[int] = None, on_tokens: Optional[Callable[[torch.Tensor], bool]] = None,
             compile: bool = False) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to params.max_new_tokens tokens; return the new tokens.

    Prompts of different lengths are left-padded; the padding is masked out and positions count real tokens only,
    so each row comes out exactly as if it had been generated alone. A row ends at `eos_id` (kept in its output).
    `on_tokens(tokens (B,))` is called after every step (for streaming); returning True stops generation.
    `compile` runs the decode step through torch.compile, built once for every prompt (see `compiled`); on CUDA the
    prefill too, its prompts padded to a few lengths. An eval-mode model keeps its KV cache for the next call.
    """
    if not prompts or any(len(t) == 0 for t in prompts):
        raise ValueError("every prompt needs at least one token")
    context = model.config.max_position_embeddings
    if (longest := max(len(t) for t in prompts)) >= context:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in the context of {context}; keep its newest "
                         f"tokens")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be a whole number from 0 to 2**64 - 1, got {seed}")
    device = model.lm_head.weight.device
    compile_prefill = compile and device.type == "cuda"   # a CPU build of each length costs more than it saves
    T = bucket(longest, MIN_PREFILL, context) if compile_prefill else longest
    T = T if T + params.max_new_tokens <= context else longest   # padding never costs a token of the context
    steps = min(params.max_new_tokens, context - T)
    S = bucket(T + steps, MIN_CACHE, context)
    ids, valid = _padded_prompts(prompts, T, S, device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    step_fn = compiled(decode_step, device.type) if compile else decode_step
    prefill_fn = compiled(prefill, device.type) if compile_prefill else prefill

    was_training = model.training
    model.eval()
    model.setup_cache(len(prompts), S)
    if compile:
        _mark_dynamic(model)
    try:
        out = _decode(model, ids, valid, params, steps, eos_id, generator, on_tokens, step_fn, prefill_fn)
    finally:
        if was_training:   # a training model keeps no decode state between its samples
            model.clear_cache()
        model.train(was_training)
    if not out:
        return [[] for _ in prompts]
    new = torch.stack(out, dim=1).tolist()
    if eos_id is not None:   # cut each row after its first EOS
        new = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in new]
    return new


def _decode(model, ids, valid, params, steps, eos_id, generator, on_tokens, step_fn, prefill_fn) -> list:
    """The prefill, then one token per step: generate's loop, returning each step's tokens (B,)."""
    B, T = ids.shape
    cuda = ids.device.type == "cuda"
    out, seen = [], ids
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    slot = torch.tensor([T], device=ids.device)   # (1,): a tensor, so the compiled step never sees a new constant
    logits = prefill_fn(model, ids, torch.arange(T, device=ids.device), valid)
    for step in range(steps):
        tok = sample(logits[:, -1], params, generator, seen)
        if eos_id is not None:
            tok = torch.where(done, torch.full_like(tok, eos_id), tok)
            done = done | (tok == eos_id)
        out.append(tok)
        if on_tokens is not None and on_tokens(tok):
            break
        # bool() waits for the device: on a GPU only every few steps (the extra tokens are EOS, cut by generate)
        if step == steps - 1 or ((not cuda or step % STOP_CHECK_EVERY == 0) and bool(done.all())):
            break
        if params.repetition_penalty != 1.0:
            seen = torch.cat([seen, tok[:, None]], dim=1)
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()   # the last step's graph outputs are consumed: reuse them
        logits = step_fn(model, tok, slot, valid)
        slot += 1
    return out


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
