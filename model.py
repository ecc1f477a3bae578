"""SmolLM2, written out by hand: a Llama-architecture decoder in plain PyTorch.

Read top to bottom: the architecture (ModelConfig) -> RMSNorm -> rotary embeddings -> grouped-query attention (with
its KV cache) -> SwiGLU MLP -> decoder block -> the model, whose loss runs over chunks of positions so the full
logits never exist. Module and parameter names are exactly those of Hugging Face `LlamaForCausalLM`
(`model.layers.0.self_attn.q_proj.weight`, ...), so a state dict moves between the two with no rename map, and the
rotary layout is HF's rotate-half, so no weight permutation is needed either. It imports torch alone: everything
else in the repository builds on this file.

Read next: data.py, where the token blocks this model trains on come from (validate_params.py, later, proves the
model equal to transformers' own).
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


@dataclass
class ModelConfig:
    """The architecture, under Hugging Face `LlamaConfig`'s names."""
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 0
    hidden_act: str = "silu"
    hidden_size: int = 576
    initializer_range: float = 0.02
    intermediate_size: int = 1536
    is_llama_config: bool = True
    max_position_embeddings: int = 2048
    num_attention_heads: int = 9
    num_hidden_layers: int = 30
    num_key_value_heads: int = 3
    pad_token_id: Optional[int] = None
    pretraining_tp: int = 1
    rms_norm_eps: float = 1e-5
    rope_interleaved: bool = False
    rope_scaling: Optional[dict] = None
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    use_cache: bool = True
    vocab_size: int = 49152

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight.

    Unlike LayerNorm there is no mean subtraction and no bias. The statistics are taken in fp32 even under bf16
    autocast (a sum of squares of 576+ bf16 values loses precision), and the result is cast back to the input dtype.
    F.rms_norm computes x * rsqrt(mean(x^2) + eps) in one call instead of five (on the CPU in the same order, so the
    same bits as those five). In fp32 it also multiplies by the weight; in bf16 it would multiply before rounding to
    bf16, where HF rounds first, so there the weight is applied after the cast. At batch 1 a call costs about as much
    as its arithmetic, hence one call where possible.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), rotate-half layout.

    Channel i of the first half and channel i of the second half of each head form a 2-D pair that is rotated by the
    angle pos * theta^(-2i/head_dim). The dot product q.k then depends only on the distance between positions.
    Angles are computed in fp32: at position 2000 a bf16 angle would be off by several radians.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_inv_freq()

    def reset_inv_freq(self):
        """theta^(-2i/head_dim), also after `to_empty` (no checkpoint holds this buffer); computed on the CPU and
        moved, so a model built on any device gets the same bits."""
        i = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device="cpu")
        self.inv_freq = (1.0 / (self.theta ** (i / self.head_dim))).to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) -> cos and signed sin of shape (1, 1, T, hd) or (B, 1, T, hd), fp32 (the axis of
        size 1 is the heads'). The pair (x_i, x_j), j = i + hd/2, becomes (x_i cos - x_j sin, x_j cos + x_i sin):
        both halves share the angles, and the sine is negated on the first half."""
        freqs = positions.float()[..., None] * self.inv_freq.float()   # (..., T, hd/2)
        freqs = freqs[:, None] if freqs.dim() == 3 else freqs[None, None]   # (B or 1, 1, T, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by RotaryEmbedding's cos, sin (B or 1, 1, T, hd): x cos + (x with its halves swapped)
    sin. The signed sine makes the swap HF's rotate-half (-x_j, x_i), bit for bit, in four ops instead of six."""
    if cos.dtype != x.dtype:   # under autocast: q and k are bf16, cos and sin stay in the weights' dtype
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class KVCache(nn.Module):
    """Keys and values allocated once: tokens are written at the slots given and attention reads every slot (those
    not yet written masked), so a decode step's shapes never change and a compiled step is built once."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at slots (T,); return the whole cache (B, n_kv, S, hd)."""
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


# Devices whose SDPA has a kernel taking an explicit mask together with shared k/v heads (enable_gqa) without a
# (B*nh, T, T) score matrix: torch's CPU flash kernel. On CUDA flash refuses a mask and memory-efficient refuses
# enable_gqa, so only the math kernel takes both, with fp32 scores (~1.1 GiB a layer at 8 x 2048): there k and v
# are repeated to every query head, and the memory-efficient kernel runs.
MASKED_GQA_DEVICES = ("cpu",)


def attention_kernels(device_type: str) -> dict[str, str]:
    """The SDPA kernel that causal rows and masked rows (packed sequences, document masking) run on a device."""
    masked = "flash, shared k/v heads" if device_type in MASKED_GQA_DEVICES else "memory-efficient, k/v repeated"
    return {"causal": "flash", "masked": masked}


class Attention(nn.Module):
    """Causal self-attention with grouped queries (GQA).

    n_heads query heads share n_kv key/value heads in groups of n_heads/n_kv; the KV cache is that many times smaller.
    SDPA's `enable_gqa` lets the kernel index the shared heads instead of materialising repeated copies.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.kv_cache: Optional[KVCache] = None
        self.qkv_proj: Optional[nn.Module] = None   # decoding in int8: the three stacked, one product (quantize.py)

    def forward(self, x, cos, sin, cache_pos: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        B, T, _ = x.shape
        if self.qkv_proj is None:
            # view as (B, T, H, hd), then put heads before time: RoPE and SDPA both expect (B, H, T, hd)
            q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # (B, nh, T, hd)
            k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)      # (B, n_kv, T, hd)
            v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)      # (B, n_kv, T, hd)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:   # the stacked product's columns are the q, k and v heads in turn: q and k are rotated in one go
            qkv = self.qkv_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)         # (B, nh + 2 n_kv, T, hd)
            qk = apply_rotary(qkv[:, :self.n_heads + self.n_kv], cos, sin)
            q, k, v = qk[:, :self.n_heads], qk[:, self.n_heads:], qkv[:, self.n_heads + self.n_kv:]
        if self.kv_cache is not None and cache_pos is not None:   # cache_pos: the slots (T,) these tokens fill
            k, v = self.kv_cache.update(cache_pos, k, v)                              # (B, n_kv, S, hd)
        gqa = self.n_kv != self.n_heads
        if mask is None:   # plain causal: SDPA picks its fastest (flash / memory-efficient) kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:              # boolean mask, True = may attend
            if gqa and self.kv_cache is None and q.device.type not in MASKED_GQA_DEVICES:   # training rows
                k = k.repeat_interleave(self.n_heads // self.n_kv, 1)                       # (B, nh, T, hd)
                v, gqa = v.repeat_interleave(self.n_heads // self.n_kv, 1), False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)             # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The gate decides, per hidden unit, how much of up(x) passes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: Optional[nn.Module] = None   # decoding in int8: the two stacked, one product (quantize.py)

    def forward(self, x):
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache_pos=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# What a layer keeps for its backward: the outputs of its matmuls and of attention, the costly ops. Everything
# between them (norms, casts, RoPE, SiLU, products) is recomputed from those in the backward, for a few percent of
# the step's time: autograd would otherwise keep two or three tensors per such op, most of a layer's memory.
_KEPT_OPS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_cudnn_attention.default}


def _keep_matmul_outputs(intermediate_size: int, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep _KEPT_OPS' outputs, except down_proj's (the one matmul over the MLP's hidden units): it only feeds the
    residual sum, which needs nothing for its backward, and a layer's recompute stops before reaching it."""
    if op in _KEPT_OPS and not (op is torch.ops.aten.mm.default and args[0].shape[-1] == intermediate_size):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _uncached_autocast(device_type: str):
    """Autocast caches each weight's bf16 cast until its region ends, so a second forward in one region skips the
    casts its recompute then makes, and selective recompute, which replays a layer op for op, fails. Uncached, the
    weights' copies also die with their use instead of lasting to the backward."""
    return torch.autocast(device_type, cache_enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


class LlamaModel(nn.Module):
    """The decoder stack without the output head: HF calls this `model`, hence the `model.` key prefix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)


def packed_layout(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ids (B, T) of sequences packed side by side -> positions counted from each sequence's first token
    (B, T), and the attention mask (B, 1, T, T), True where a query may see a key: causal, and block-diagonal so that
    no sequence sees another."""
    T = segments.shape[1]
    idx = torch.arange(T, device=segments.device)                                        # (T,)
    begins = torch.ones_like(segments, dtype=torch.bool)
    begins[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(begins, idx, 0).cummax(-1).values                               # (B, T): its sequence's start
    same = segments[:, :, None] == segments[:, None, :]                                  # (B, T, T)
    return idx - first, (same & (idx[None, :] <= idx[:, None]))[:, None]


LOSS_CHUNK_TOKENS = 1024   # positions per chunk of the loss: 1024 x 49152 fp32 logits = 200 MB at a time


def chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                          chunk: int = LOSS_CHUNK_TOKENS, per_row: bool = False, count_correct: bool = False):
    """Mean cross-entropy of the head's logits x @ weight.T (x (B, T, C), targets (B, T)), never holding them whole.

    Full logits for 8 x 2048 tokens over 49k classes are 3.2 GB in fp32, and autograd would also keep their
    log-softmax and build their gradient. Here each chunk of positions runs the head matmul and an fp32 log-softmax
    inside a checkpoint, which saves only the chunk's input and recomputes its logits during backward; the loss is
    the sum over chunks divided by the number of real targets (targets == ignore_index count for nothing).
    per_row: each row's summed cross-entropy (B,) instead, -log p(that row's targets) (DPO scores whole replies).
    count_correct: (the mean, how many targets the argmax of their logits predicts) instead (SFT's token accuracy).
    """
    if per_row:   # whole rows per chunk, so each row's sum stays its own
        B, T = targets.shape
        rows = max(1, chunk // T)
        return torch.cat([checkpoint(_head_loss, x[i:i + rows].flatten(0, 1), weight, targets[i:i + rows].flatten(),
                                     ignore_index, "none", use_reentrant=False).view(-1, T).sum(-1)
                          for i in range(0, B, rows)])                                    # (B,)
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)                           # (N, C), (N,)
    total, correct = torch.zeros((), device=x.device), torch.zeros((), dtype=torch.long, device=x.device)
    for i in range(0, x.size(0), chunk):
        loss, hits = checkpoint(_head_loss, x[i:i + chunk], weight, targets[i:i + chunk], ignore_index, "sum",
                                count_correct, use_reentrant=False)
        total, correct = total + loss, correct + hits
    mean = total / (targets != ignore_index).sum()
    return (mean, correct) if count_correct else mean


def _head_loss(x, weight, targets, ignore_index, reduction, count_correct=False):
    logits = F.linear(x, weight)                                                           # (n, V), autocast dtype
    # in fp32: a bf16 log-softmax over 49k classes is too coarse
    loss = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)
    if reduction == "none":
        return loss
    # the targets the argmax predicts (an ignored one, -100, never equals an argmax)
    return loss, (logits.argmax(-1) == targets).sum() if count_correct else targets.new_zeros(())


class SmolLM2(nn.Module):
    """The causal language model: token ids -> next-token logits (and the loss, when targets are given)."""

    def __init__(self, cfg: ModelConfig, init_std: float = 0.02):
        super().__init__()
        self.config, self.init_std = cfg, init_std
        device = torch.get_default_device()   # cpu, or the device of a `with torch.device(...)` around this call
        # built on the meta device, the layers draw no random numbers of their own (nn.Linear's, overwritten
        # anyway): init_weights' draws are the only ones, which FSDP's ranks can then replay (distributed.py)
        with torch.device("meta"):
            self.model = LlamaModel(cfg)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:   # one matrix reads tokens in and scores them out
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False   # recompute whole layers, keeping only their inputs (recompute_layer)
        self.selective_recompute = True       # recompute only what lies between matmuls (run.selective_recompute)
        self.layers_recompute_themselves = False   # each layer wrapped in its own checkpoint (compiled under FSDP)
        if device.type != "meta":   # on the meta device it stays empty until sharded, then filled shard by shard
            self.to_empty(device=device)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None):
        """Every parameter, in named_parameters' order, filled by init_parameter from one random stream."""
        for name, p in self.named_parameters():
            self.init_parameter(name, p, generator)

    @torch.no_grad()
    def init_parameter(self, name: str, t: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Fill t, the whole tensor of parameter `name`: Normal(0, std) as nanotron's `init_method.std`, but the
        projections that write into the residual stream (o_proj, down_proj) get std/sqrt(2 * n_layers) so the
        stream's variance does not grow with depth; the norms' weights start at 1. (FSDP draws each whole tensor
        in the same order and keeps its shard, so a sharded run starts from these very weights.)"""
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(t, 0.0, self.init_std / math.sqrt(2 * self.config.num_hidden_layers), generator=generator)
        else:
            nn.init.normal_(t, 0.0, self.init_std, generator=generator)

    def to_empty(self, *, device, recurse: bool = True):
        """Storage on `device` for a model built on the meta device, left unfilled but for the rotary frequencies.
        The tied head is tied again: to_empty gives each module's reference to a plain parameter its own tensor."""
        super().to_empty(device=device, recurse=recurse)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.model.rotary_emb.reset_inv_freq()
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())   # a tied matrix is one parameter, counted once

    def _recompute_policy(self) -> dict:
        if self.gradient_checkpointing:   # the default policy: recompute everything
            return {}
        keep = partial(_keep_matmul_outputs, self.config.intermediate_size)
        return {"context_fn": partial(create_selective_checkpoint_contexts, keep)}

    # ---- KV cache
    def setup_cache(self, batch: int, max_len: int, dtype=None, device=None):
        """A cache of max_len slots per row; one of that shape already there is kept (a session allocates once)."""
        p = self.model.norm.weight   # the compute dtype, also when the matrices are stored quantized
        device = torch.device(device or p.device)
        if dtype is None:   # under autocast (train.py's samples) the keys leave the matmuls in its dtype
            dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else p.dtype
        for layer in self.model.layers:
            attn, old = layer.self_attn, layer.self_attn.kv_cache
            if old is None or (old.k.shape, old.k.dtype, old.k.device) != (
                    (batch, attn.n_kv, max_len, attn.head_dim), dtype, device):
                attn.kv_cache = KVCache(batch, attn.n_kv, max_len, attn.head_dim, dtype, device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                cache_pos: Optional[Union[int, torch.Tensor]] = None, valid: Optional[torch.Tensor] = None,
                segments: Optional[torch.Tensor] = None, last_only: bool = False, ignore_index: int = -100,
                per_row: bool = False, count_correct: bool = False):
        """input_ids (B, T) -> (logits (B, T, V), None), or with targets (B, T): (None, the mean cross-entropy over
        targets != ignore_index), computed chunk by chunk so that the full logits never exist.

        cache_pos: the KV cache slots (T,) of these tokens (after `setup_cache`), or the first one; None: no cache.
        valid: (B, S) bool over every cache slot ((B, T) without a cache), False at left padding; positions then
            count valid tokens only.
        segments: (B, T) ids of the sequences packed into each row (e.g. conversations); each one is computed as if
            alone: its positions start at 0 and its tokens attend only to earlier tokens of the same sequence.
        last_only: compute logits for the last position only (what a decoder needs to pick the next token).
        per_row: the loss is each row's summed cross-entropy (B,), -log p(targets of that row), instead of the mean.
        count_correct: the loss is (the mean, how many targets the argmax predicts), for the token accuracy.
        """
        B, T = input_ids.shape
        cache = self.model.layers[0].self_attn.kv_cache if cache_pos is not None else None
        if isinstance(cache_pos, int):
            cache_pos = torch.arange(cache_pos, cache_pos + T, device=input_ids.device)
        slots = cache_pos if cache is not None else torch.arange(T, device=input_ids.device)   # (T,)
        positions = slots if valid is None else (valid.long().cumsum(-1) - 1).clamp(min=0).index_select(1, slots)
        mask = None
        if segments is not None:   # packed training rows (no cache, no padding)
            positions, mask = packed_layout(segments)
        elif cache is not None or valid is not None:
            # keys: every slot of the cache (the slots not yet written lie after the query, so causality hides them)
            keys = torch.arange(cache.k.shape[2] if cache is not None else T, device=input_ids.device)   # (S,)
            mask = keys[None, :] <= slots[:, None]                                                       # (T, S)
            if valid is not None:
                # a padding slot may still see itself, so no softmax row is empty (an empty row gives NaN)
                mask = mask & (valid[:, None, :] | (keys[None, :] == slots[:, None]))          # (B, T, S)
                mask = mask[:, None]                                                           # (B, 1, T, S)
            if cache is not None:   # additive, in the keys' dtype: SDPA would convert a boolean one in every layer
                mask = torch.zeros(mask.shape, dtype=cache.k.dtype, device=mask.device).masked_fill_(~mask, -math.inf)
        cos, sin = self.model.rotary_emb(positions)
        # in the weights' dtype once, not in every layer (under autocast apply_rotary casts them to q's dtype)
        dtype = self.model.norm.weight.dtype   # the compute dtype, also when the matrices are stored in int8
        cos, sin = cos.to(dtype), sin.to(dtype)

        x = self.model.embed_tokens(input_ids)                                           # (B, T, C)
        recompute = self.training and torch.is_grad_enabled()
        recompute = recompute and (self.gradient_checkpointing or self.selective_recompute)
        with _uncached_autocast(x.device.type) if recompute else nullcontext():
            for layer in self.model.layers:
                if recompute and not self.layers_recompute_themselves:
                    x = checkpoint(layer, x, cos, sin, cache_pos, mask, use_reentrant=False, **self._recompute_policy())
                else:
                    x = layer(x, cos, sin, cache_pos, mask)
            x = self.model.norm(x)
            if targets is not None:
                return None, chunked_cross_entropy(x, self.lm_head.weight, targets, ignore_index, per_row=per_row,
                                                   count_correct=count_correct)
            if last_only:
                x = x[:, -1:]
            return self.lm_head(x), None                                                  # (B, T, V)
