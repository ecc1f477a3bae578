"""Weight-only int8 quantization for decoding: `quantize_model(model, "int8")` stores every Linear weight and the tied
embedding/head in int8 with one scale per output channel, and multiplies with PyTorch's own int8 kernel.

Why it helps. Decoding one token multiplies each weight matrix by one activation vector per row of the batch: every
weight is read from memory once and used for a single multiply-add, so the step takes as long as the weights take
to stream from memory, not to multiply. An int8 weight is a quarter of the bytes of an fp32 one, so a matrix-vector
product that is limited by memory bandwidth can run up to 4x faster; the arithmetic it adds (widening int8 to float,
one multiply by the scale) is hidden behind the memory traffic it saves.

The scheme. Row n of a weight matrix W (N, K) produces output channel n. It gets its own scale
    s_n = max_k |W[n, k]| / 127,    q[n, k] = round(W[n, k] / s_n) in [-127, 127],    so W ~= q * s[:, None].
The largest weight of each row maps to +-127 and every weight is off by at most s_n / 2: the error of a row follows
its own largest weight, so a row of small weights is not rounded to zero because another row holds a large one (as
one scale per tensor would do). The scale is symmetric (no zero point) because trained weights are centred on zero.
Since y_n = sum_k x_k W[n, k] = s_n * sum_k x_k q[n, k], the scale is applied once per output after the dot product,
and only the weights are quantized ("weight-only"): activations, norms, attention and the KV cache stay in the
compute dtype.

The tied embedding is the head's matrix: row t is token t's vector, so one int8 copy with one scale per token serves
both the lookup (the rows looked up are multiplied back by their scales, exactly) and the head (a Linear over it).
The Linears that read the same input are stacked into one matrix (q, k and v; gate and up: `stacked`), so a layer
makes four kernel calls, not seven.

The kernel is `torch._weight_int8pack_mm(x (M, K), q (N, K) int8, s (N,))` (aten::_weight_int8pack_mm). On x86
CPUs its vectorized path reads and writes bf16 (fp32 activations take a scalar loop ten times slower), so each int8
matmul rounds its input and its output to bf16, a relative error of at most 2^-9 each and smaller than what rounding
the weights to int8 costs, and its result returns to the compute dtype at once; the scales are bf16 values, so the
kernel reads them exactly. The kernel needs K to be a multiple of 16: a layer that is not (none in the SmolLM2
shapes) dequantizes its weight for an ordinary matmul instead.

On a GPU the scheme is refused: the op's CUDA kernel computes one output element per thread without tensor cores,
and measured slower than the bf16 matmul it replaces, so int8 there would cost speed and quality both.
bench/bench_quantize.py measures what the whole scheme costs in perplexity and greedy agreement.

Quantization is a transform at load time (`loading.load_model(..., quantize="int8")`): checkpoints, parameter
names and the fp32 model are untouched, and a quantized model refuses to train or to be saved.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import MLP, Attention, SmolLM2
from smollm2.errors import InputError

QUANTIZE_CHOICES = ("int8",)
KERNEL_K_MULTIPLE = 16   # the CPU kernel reads K in blocks of 16 and assumes rows aligned to them


class QuantizedModelError(RuntimeError):
    """Something only an fp32/bf16 model can do (train, save a checkpoint) was asked of a quantized one."""


def refuse(what: str) -> QuantizedModelError:
    return QuantizedModelError(f"this model's weights are int8 (quantized at load time for decoding): it cannot "
                               f"{what}. Load the checkpoint again without quantize (generate.py: no --quantize)")


@torch.no_grad()
def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) int8 and s (N,) fp32 with w ~= q * s[:, None]: symmetric, one scale per row."""
    w = w.detach().float()
    s = (w.abs().amax(dim=1) / 127).clamp(min=1e-30)   # an all-zero row: any scale gives q = 0
    s = s.to(torch.bfloat16).float()                    # a bf16 value, exact in every dtype the kernel may read
    q = torch.round(w / s[:, None]).clamp(-127, 127)    # a scale rounded down may push the largest weight past 127
    return q.to(torch.int8), s


class Int8Weight(nn.Module):
    """An int8 matrix (N, K), its per-row scales (N,) and the compute dtype it stands in for: the state of the
    quantized Linear and embedding (a tied pair shares one)."""

    def __init__(self, q: nn.Parameter, scales: torch.Tensor, compute_dtype: torch.dtype):
        super().__init__()
        self.weight = q                            # a Parameter, so num_parameters() still counts it
        self.register_buffer("scales", scales)     # bf16: the activation dtype the CPU kernel runs fastest with
        self.compute_dtype = compute_dtype

    @classmethod
    def of(cls, w: torch.Tensor):
        """The int8 form of a float matrix w (N, K), on w's device, standing in for w's dtype."""
        q, s = quantize_rows(w)
        return cls(nn.Parameter(q.to(w.device), requires_grad=False), s.to(w.device, torch.bfloat16),
                   w.dtype)

    def train(self, mode: bool = True):
        if mode:
            raise refuse("train")
        return super().train(False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise refuse("be saved as a checkpoint (save the unquantized model instead)")


class Int8Linear(Int8Weight):
    """y = x @ W.T computed as (x @ q.T) * s by PyTorch's weight-only int8 kernel. x (..., K) -> y (..., N)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = x.shape[-1]
        if K % KERNEL_K_MULTIPLE:
            return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        # activations in the kernel's dtype, the scales' (Int8Weight.of), as the densely packed rows it reads
        y = torch._weight_int8pack_mm(x.reshape(-1, K).to(self.scales.dtype).contiguous(), self.weight, self.scales)
        return y.to(x.dtype).view(x.shape[:-1] + (-1,))                                         # (M, N) -> (..., N)


def stacked(*linears: nn.Linear) -> Int8Linear:
    """Linears that read the same input (q, k and v; gate and up) as one Int8Linear over their rows stacked, whose
    output holds theirs side by side (..., N_1 + N_2 + ...). At batch 1 a kernel call costs microseconds of dispatch
    and thread start besides its work, and a step makes one per matrix: stacked, seven calls a layer become four.
    Each row keeps its own scale and the kernel computes each output from its row alone, so each part of the output
    is its Linear's own int8 product, bit for bit."""
    return Int8Linear.of(torch.cat([lin.weight for lin in linears]))


class Int8Embedding(Int8Weight):
    """Token ids (...) -> their rows of the int8 matrix times each row's scale (...,  C), in the compute dtype."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # scales are bf16 values (quantize_rows), exact in any float dtype: the rows come back exactly
        return F.embedding(ids, self.weight).to(self.compute_dtype) * self.scales[ids, None].to(self.compute_dtype)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Weight) for m in model.modules())


@torch.no_grad()
def quantize_model(model: SmolLM2, scheme: Optional[str]) -> SmolLM2:
    """Replace, in place, every Linear and the embedding by its int8 form (scheme "int8"); None leaves the model be.
    q, k and v, and gate and up, become one stacked product each (qkv_proj, gate_up_proj, which model.py uses when
    they are set).

    Run it after the model is on its device and in its compute dtype. The remaining parameters (the norm gains) are
    frozen too: a quantized model is for decoding only.
    """
    if scheme is None:
        return model
    if scheme not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize: unknown scheme {scheme!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    if is_quantized(model):
        raise ValueError("quantize: this model is quantized already")
    if (device := model.lm_head.weight.device).type != "cpu":
        raise InputError(f"--quantize int8 runs on the CPU only: on {device.type} PyTorch's int8 kernel (one thread per "
                         f"output, no tensor cores) is slower than bf16; drop --quantize and use --dtype bf16 there")
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    embed = model.model.embed_tokens = Int8Embedding.of(model.model.embed_tokens.weight)
    # a tied head is a Linear over the embedding's own int8 matrix and scales: one copy in memory
    model.lm_head = Int8Linear(embed.weight, embed.scales, embed.compute_dtype) if tied else \
        Int8Linear.of(model.lm_head.weight)
    for module in list(model.modules()):
        if isinstance(module, Attention):
            module.qkv_proj = stacked(module.q_proj, module.k_proj, module.v_proj)
            del module.q_proj, module.k_proj, module.v_proj
        elif isinstance(module, MLP):
            module.gate_up_proj = stacked(module.gate_proj, module.up_proj)
            del module.gate_proj, module.up_proj
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.of(child.weight))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
