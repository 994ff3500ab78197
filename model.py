"""
A LLaMA-3 family decoder, numerically the same as transformers.LlamaForCausalLM.

Embedding, pre-norm RMSNorm, rotary position embeddings (half-split
"rotate_half" layout, optional linear / dynamic-NTK / YaRN scaling), grouped-
query attention through F.scaled_dot_product_attention, SwiGLU MLP, final
RMSNorm, optionally tied output head, no biases.

Parameter names are HF's (`model.layers.0.self_attn.o_proj.weight`, ...) except
two fused projections that are faster to run: `qkv_proj` (q, k, v stacked along
the output dimension) and `gate_up_proj` (gate, up stacked). `to_hf_state_dict`
and `from_hf_state_dict` split and join them; nothing is permuted because the
rotary layout is already HF's.

LoRA (lora_rank > 0): the projections named in lora_targets become
LoRALinear, the frozen weight plus a low-rank update scale * B @ A per part:
q, k and v of the fused qkv_proj each get their own pair, as gate and up do,
so an adapter maps one-to-one onto HF's q_proj, k_proj, ... (PEFT) and
merges into plain weights exactly (merge_lora).

A reward model (head="score", stage rm) has a scalar head `score` (dim -> 1, no bias) in place of the
LM head, as transformers' LlamaForSequenceClassification with num_labels=1: forward gives one score per
position, read at the last token of a sequence.

Packed training rows (several documents in one row) pass `segments`, the
document of every position: attention then stays inside each document
(block-diagonal causal) and positions restart at 0 for each, so every document
is computed as it would be alone.

Generation keeps a preallocated KV cache (no torch.cat per step).
"""

import contextlib
import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


HEADS = ("lm", "score")  # what the last hidden states become: next-token logits, or one score (a reward model)


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None: n_heads (multi-head attention)
    head_dim: Optional[int] = None  # None: dim // n_heads
    ffn_dim: Optional[int] = None  # None: 8/3 * dim rounded up to a multiple of 64, as LLaMA
    max_seq_len: int = 512  # the context length the model is trained at
    rope_theta: float = 10000.0
    # None, or {"type": "linear"|"dynamic"|"yarn", "factor": float, "original_max_seq_len": int}
    rope_scaling: Optional[dict] = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    lora_rank: int = 0  # 0: no adapters
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: tuple = ()  # the parts with adapters, of LORA_PARTS
    head: str = "lm"  # lm: next-token logits (lm_head); score: one scalar per position (a reward model)

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = 64 * math.ceil(int(8 * self.dim / 3) / 64)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            if kind not in ("linear", "dynamic", "yarn"):
                raise ValueError(f"rope_scaling type must be linear, dynamic or yarn, got {kind!r}")
            if float(self.rope_scaling.get("factor", 0)) <= 1.0:
                raise ValueError("rope_scaling factor must be > 1")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")

    def to_dict(self):
        return asdict(self)

    def base(self):
        """The same shape without adapters."""
        return replace(self, lora_rank=0, lora_targets=())

    @property
    def rope_original_len(self):
        """The length RoPE was trained at: scaling starts to matter beyond it."""
        if self.rope_scaling is None:
            return self.max_seq_len
        return int(self.rope_scaling.get("original_max_seq_len", self.max_seq_len))


def lora_trained(name):
    """Whether a LoRA run trains the weight of this name: its adapters, and a score head in full (a head that is new
    has no base weights to adapt)."""
    return ".lora_" in name or name == "score.weight"


def for_head(state, mcfg):
    """A state dict for a model of shape mcfg: a language model's weights start a reward model without their LM
    head (its score head is new)."""
    return {k: v for k, v in state.items() if not (mcfg.head == "score" and k == "lm_head.weight")}


# ----------------------------------------------------------------------------
# Rotary position embeddings, the same formulas as transformers' modeling_rope_utils


def rope_inv_freq(mcfg: ModelConfig, seq_len):
    """Inverse frequencies and the attention scale for a sequence of `seq_len` positions (an int, or a tensor on
    the device: no host sync in batched decoding)."""
    dim, base = mcfg.head_dim, mcfg.rope_theta
    device = seq_len.device if torch.is_tensor(seq_len) else None
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    scaling = mcfg.rope_scaling or {}
    kind, factor = scaling.get("type"), float(scaling.get("factor", 1.0))
    original = mcfg.rope_original_len
    if kind == "linear":
        return 1.0 / (base**exponents) / factor, 1.0
    if kind == "dynamic":
        # NTK-aware: the base grows with the length in use beyond the original, as transformers' "dynamic" does it
        # (from a tensor length, in float32: the same numbers); up to the original the frequencies are unscaled
        seq_len = torch.as_tensor(seq_len, device=device).clamp(min=original)
        base = base * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**exponents), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(dim, base, factor, original, scaling)
    return 1.0 / (base**exponents), 1.0


def _yarn_inv_freq(dim, base, factor, original, scaling):
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    attention_factor = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0)
    return inv_freq, float(attention_factor)


class Rotary(nn.Module):
    """cos and sin tables. Dynamic NTK computes its frequencies for the length of the sequence in use, as
    transformers does: the highest position + 1 of each call, so that under a KV cache each key keeps the rotation
    it was computed with and only the new positions take the longer length's (transformers' generate does the
    same), and batched decoding uses its longest row's length (as transformers' batched generate)."""

    def __init__(self, mcfg: ModelConfig):
        super().__init__()
        self.mcfg = mcfg
        self.dynamic = bool(mcfg.rope_scaling) and mcfg.rope_scaling["type"] == "dynamic"
        inv_freq, self.attention_scale = rope_inv_freq(mcfg, mcfg.rope_original_len)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, start_pos: int, seq_len: int, device, in_use=None):
        """cos and sin, float32, shape (seq_len, head_dim), for positions start_pos .. start_pos+seq_len-1.
        in_use: the sequence length dynamic NTK scales for (default start_pos + seq_len; a tensor in batched
        decoding)."""
        inv_freq, scale = self.inv_freq, self.attention_scale
        end = start_pos + seq_len
        in_use = end if in_use is None else in_use
        if self.dynamic and (torch.is_tensor(in_use) or in_use > self.mcfg.rope_original_len):
            inv_freq = rope_inv_freq(self.mcfg, in_use)[0].to(device)
        positions = torch.arange(start_pos, end, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * scale, emb.sin() * scale


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------
# The blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 whatever the autocast dtype, as HF does
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache:
    """Preallocated keys and values for every layer: generation writes in place, never concatenates."""

    def __init__(self, mcfg: ModelConfig, batch_size, max_len, device, dtype):
        shape = (mcfg.n_layers, batch_size, mcfg.n_kv_heads, max_len, mcfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def update(self, layer, start_pos, k, v):
        """Write k, v (B, kv_heads, T, head_dim) at positions start_pos..; return the keys and values to attend.
        start_pos a (B,) tensor: one new token per row, each at its own position (batched decoding); every
        position is returned then, and the caller's mask says which ones a row may see."""
        if torch.is_tensor(start_pos):
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[layer, rows, :, start_pos] = k[:, :, 0]
            self.v[layer, rows, :, start_pos] = v[:, :, 0]
            return self.k[layer], self.v[layer]
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


LORA_PARTS = ("q", "k", "v", "o", "gate", "up", "down")
# each part's place: the fused projection holding it and HF's name for it
LORA_PLACES = {"q": ("self_attn.qkv_proj", "self_attn.q_proj"), "k": ("self_attn.qkv_proj", "self_attn.k_proj"),
               "v": ("self_attn.qkv_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj", "self_attn.o_proj"),
               "gate": ("mlp.gate_up_proj", "mlp.gate_proj"), "up": ("mlp.gate_up_proj", "mlp.up_proj"),
               "down": ("mlp.down_proj", "mlp.down_proj")}


class LoRALinear(nn.Linear):
    """A bias-free linear layer whose outputs are parts (q, k, v of a fused projection, ...), with a low-rank
    update scale * B_p @ A_p on each part p that is adapted; the weight itself is frozen. With `enabled` False
    it is the base layer (the DPO reference, the GRPO KL)."""

    def __init__(self, in_features, parts, adapted, rank, alpha, dropout):
        super().__init__(in_features, sum(parts.values()), bias=False)
        self.parts, self.scale, self.lora_dropout, self.enabled = parts, alpha / rank, dropout, True
        self.weight.requires_grad_(False)
        self.lora_A = nn.ParameterDict({p: nn.Parameter(torch.empty(rank, in_features)) for p in adapted})
        self.lora_B = nn.ParameterDict({p: nn.Parameter(torch.zeros(parts[p], rank)) for p in adapted})
        for a in self.lora_A.values():  # as PEFT: A random, B zero, so the update starts at zero
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self):
        """The weight update, (out_features, in_features): zero on the parts without an adapter."""
        return torch.cat([self.scale * (self.lora_B[p] @ self.lora_A[p]) if p in self.lora_A else
                          self.weight.new_zeros(n, self.in_features) for p, n in self.parts.items()])

    def forward(self, x):
        y = F.linear(x, self.weight)
        if not self.enabled:
            return y
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return y + torch.cat([self.scale * F.linear(F.linear(h, self.lora_A[p]), self.lora_B[p]) if p in self.lora_A
                              else y.new_zeros(*y.shape[:-1], n) for p, n in self.parts.items()], dim=-1)


def projection(mcfg, in_features, parts):
    """A bias-free linear layer for these output parts: LoRALinear when any of them is a LoRA target."""
    adapted = [p for p in parts if mcfg.lora_rank and p in mcfg.lora_targets]
    if not adapted:
        return nn.Linear(in_features, sum(parts.values()), bias=False)
    return LoRALinear(in_features, parts, adapted, mcfg.lora_rank, mcfg.lora_alpha, mcfg.lora_dropout)


@contextlib.contextmanager
def adapters_off(model):
    """The base model, for the time of the block: every LoRALinear of `model` without its update."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def merge_lora(model):
    """A plain Transformer (no adapters) whose weights are the base weights plus every update."""
    merged = Transformer(model.mcfg.base())
    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            state[name + ".weight"] = (m.weight + m.delta()).detach()
    merged.load_state_dict(state)
    return merged.to(model.model.embed_tokens.weight.device).eval()


class Attention(nn.Module):
    def __init__(self, mcfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.mcfg, self.layer_idx = mcfg, layer_idx
        self.q_size = mcfg.n_heads * mcfg.head_dim
        self.kv_size = mcfg.n_kv_heads * mcfg.head_dim
        self.qkv_proj = projection(mcfg, mcfg.dim, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size})
        self.o_proj = projection(mcfg, self.q_size, {"o": mcfg.dim})

    def forward(self, x, cos, sin, cache=None, start_pos=0, mask=None, at=None):
        """mask: None (causal), or (B, 1, T, T) bool, True where a query may attend to a key (packed rows).
        at: (rows, positions) index tensors: the output (N, dim) of those positions alone."""
        B, T, _ = x.shape
        hd = self.mcfg.head_dim
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(B, T, -1, hd).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(B, T, -1, hd).transpose(1, 2), cos, sin)
        v = v.view(B, T, -1, hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start_pos, k, v)
        causal = T > 1 and mask is None
        if causal and start_pos > 0:
            # new tokens after a cached prefix: causal, aligned to the end of the keys
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.mcfg.dropout if self.training else 0.0,
            enable_gqa=self.mcfg.n_kv_heads != self.mcfg.n_heads,
        )
        y = y.transpose(1, 2)
        if at is not None:
            y = y[at]
        return self.o_proj(y.reshape(*y.shape[:-2], self.q_size))


class MLP(nn.Module):
    def __init__(self, mcfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = projection(mcfg, mcfg.dim, {"gate": mcfg.ffn_dim, "up": mcfg.ffn_dim})
        self.down_proj = projection(mcfg, mcfg.ffn_dim, {"down": mcfg.dim})

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, mcfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(mcfg.dim, mcfg.norm_eps)
        self.self_attn = Attention(mcfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(mcfg.dim, mcfg.norm_eps)
        self.mlp = MLP(mcfg)
        self.dropout = nn.Dropout(mcfg.dropout)

    def forward(self, x, cos, sin, cache=None, start_pos=0, mask=None, at=None):
        """at: see Attention.forward; the MLP runs on those positions alone."""
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos, mask, at)
        x = (x if at is None else x[at]) + self.dropout(a)
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, mcfg: ModelConfig):
        super().__init__()
        self.mcfg = mcfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(mcfg.vocab_size, mcfg.dim),
            layers=nn.ModuleList(Block(mcfg, i) for i in range(mcfg.n_layers)),
            norm=RMSNorm(mcfg.dim, mcfg.norm_eps),
        ))
        if mcfg.head == "score":
            self.score = nn.Linear(mcfg.dim, 1, bias=False)
        else:
            self.lm_head = nn.Linear(mcfg.dim, mcfg.vocab_size, bias=False)
            if mcfg.tie_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(mcfg)
        self.apply(self._init_weights)
        # residual projections scaled by depth (GPT-2 / nanoGPT): the residual stream keeps unit scale
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=mcfg.init_std / math.sqrt(2 * mcfg.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.mcfg.init_std)

    def compute_dtype(self, device):
        """The dtype the attention runs in: autocast's when it is on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.model.embed_tokens.weight.dtype

    def hidden_states(self, idx, cache=None, start_pos=0, segments=None, positions=None, mask=None, at=None):
        """Final-norm hidden states (B, T, dim) of token ids idx (B, T); segments (B, T): see the module doc.
        positions (B, T) with mask (B, 1, T, T), True where a query may attend to a key: any other layout of
        a row, each position at most its index (eval.py: the choices of an item side by side after their
        shared context). at: (rows, positions) index tensors: the hidden states (N, dim) of those positions
        alone; the last layer's output projection and MLP run on them only (eval.py reads ~60% of a row's)."""
        dtype = self.compute_dtype(idx.device)
        batched = torch.is_tensor(start_pos) and segments is None  # batched decoding: row b's one new token is at
        # position start_pos[b], looked up in the table of the cache's positions
        in_use = start_pos.max() + 1 if batched and self.rotary.dynamic else None  # the longest row's length
        if batched:
            table = self.rotary(0, cache.max_len, idx.device, in_use)
        elif positions is not None:  # a row may be longer than its highest position (eval.py's shared rows):
            table = self.rotary(0, int(positions.max()) + 1, idx.device)  # dynamic NTK scales for the latter
        elif segments is not None:  # a packed row of pairs is longer than the documents it holds, which are at most
            # max_seq_len long (their padded rows'): dynamic NTK scales for that, as for a padded row
            table = self.rotary(0, idx.shape[1], idx.device, min(idx.shape[1], self.mcfg.max_seq_len))
        else:
            table = self.rotary(0 if torch.is_tensor(start_pos) else start_pos, idx.shape[1], idx.device)
        cos, sin = (t.to(dtype) for t in table)  # cast once here, not in every layer: 4 fewer kernels per layer
        if segments is not None:
            positions, mask = segment_positions(segments), segment_mask(segments)
        if positions is not None:
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B, 1, T, head_dim)
        elif batched:
            cos, sin = cos[start_pos][:, None, None], sin[start_pos][:, None, None]
            mask = (torch.arange(cache.max_len, device=idx.device) <= start_pos[:, None])[:, None, None]
        x = self.model.embed_tokens(idx)
        last = len(self.model.layers) - 1
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, cache, start_pos, mask, at if i == last else None)
        return self.model.norm(x)

    def forward(self, idx, cache=None, start_pos=0, targets=None, segments=None, logits_at=None, temperature=1.0,
                hidden=False, head_loss=None):
        """Logits (B, T, vocab) of token ids idx (B, T); given targets (B, T), each position's float32
        cross-entropy (B, T) instead, of the logits divided by temperature (grpo: the distribution its
        completions were sampled from). The loss is part of the model so that torch.compile fuses it with
        the head: the float32 copy of the logits is never written out. logits_at (B,): the logits (B, 1,
        vocab) of that one position per row only (the last of a prompt). hidden=True: the final-norm hidden
        states (B, T, dim) instead of logits (a distillation teacher's). head_loss(h, head_weight), with
        targets: a function of the hidden states and the head's weight, computed in this forward, where FSDP
        has gathered the head; the result is (cross-entropy, head_loss(...)) (distillation: the divergence
        from a teacher, training/losses.py). A reward model (head "score"): float32 scores (B, T), or (B, 1)
        at logits_at (the last token of each sequence)."""
        h = self.hidden_states(idx, cache, start_pos, segments)
        if hidden:
            return h
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at].unsqueeze(1)
        if self.mcfg.head == "score":
            return self.score(h).squeeze(-1).float()
        logits = self.lm_head(h)
        if targets is None:
            return logits
        ce = token_cross_entropy(logits if temperature == 1.0 else logits / temperature, targets)
        return ce if head_loss is None else (ce, head_loss(h, self.lm_head.weight))

    # ------------------------------------------------------------------
    # sizes

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token, PaLM appendix B: 6N + 12·L·H·Q·T.

        N counts the weights that take part in a matmul: every linear layer, the
        output head included (tied or not), but not the embedding lookup.
        """
        mcfg = self.mcfg
        tied_head = mcfg.head == "lm" and mcfg.tie_embeddings
        n_matmul = self.num_params(non_embedding=True) + (self.lm_head.weight.numel() if tied_head else 0)
        n_matmul -= sum(p.numel() for name, p in self.named_parameters() if name.endswith("norm.weight"))
        return 6 * n_matmul + 12 * mcfg.n_layers * mcfg.n_heads * mcfg.head_dim * seq_len

    # ------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 frequency_penalty=0.0, presence_penalty=0.0, stop_ids=(), generator=None, max_len=None,
                 on_logits=None):
        """Yield new token ids one at a time (batch of one), with a preallocated KV cache.

        Stops after max_new_tokens, at a token in stop_ids (which is yielded), or when
        the cache (max_len, default max_seq_len) is full. on_logits(logits), when given, sees
        each step's raw logits (1, vocab, float32) before the penalties (see Penalties) and the sampling.
        """
        device = self.lm_head.weight.device
        max_len = max_len or self.mcfg.max_seq_len
        prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        if prompt.shape[1] >= max_len:
            raise ValueError(f"prompt of {prompt.shape[1]} tokens leaves no room in a context of {max_len}")
        steps = min(max_new_tokens, max_len - prompt.shape[1])
        cache = KVCache(self.mcfg, 1, prompt.shape[1] + steps, device, self.compute_dtype(device))
        penalties = Penalties([prompt_ids], self.mcfg.vocab_size, device, repetition_penalty, frequency_penalty,
                              presence_penalty)
        logits = self.lm_head(self.hidden_states(prompt, cache, 0)[:, -1])  # the head on the last position only
        for pos in range(prompt.shape[1], prompt.shape[1] + steps):
            if on_logits is not None:
                on_logits(logits.float())
            token = sample_tokens(penalties(logits.float()), temperature, top_k, top_p, generator)
            next_id = int(token[0])
            yield next_id
            if next_id in stop_ids:
                return
            penalties.add(token)
            logits = self(token[:, None], cache, pos)[:, -1]

    @torch.no_grad()
    def generate_batch(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
                       frequency_penalty=0.0, presence_penalty=0.0, stop_ids=(), generator=None, max_len=None,
                       pad_id=0, check_every=8, all_done=None, rows_done=None):
        """New token ids for each of a batch of prompts of different lengths (lists of ids), sampled together.

        Each prompt starts at position 0 and its new tokens follow its own end, in one preallocated KV cache;
        a row stops at a token in stop_ids (kept), after max_new_tokens, or when it reaches max_len (default
        max_seq_len). Every call goes through forward() (FSDP-safe); the loop runs at most max_new_tokens
        steps and ends early when every row is done, checked every check_every steps (no host sync per
        token): all_done(done) decides, given (all ranks must stop at the same step), else done.all().
        rows_done(tokens so far (N, t)) -> (N,) bool, given: rows the caller counts as done too (a stop string in
        their text), asked at those checks; their tokens up to the check are returned. The penalties: Penalties'."""
        device = self.lm_head.weight.device
        max_len = max_len or self.mcfg.max_seq_len
        lens = torch.tensor([len(p) for p in prompts], device=device)
        if int(lens.max()) >= max_len:
            raise ValueError(f"a prompt of {int(lens.max())} tokens leaves no room in a context of {max_len}")
        budget = (max_len - lens).clamp(max=max_new_tokens)
        ids = torch.full((len(prompts), int(lens.max())), pad_id, dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        cache = KVCache(self.mcfg, len(prompts), int(lens.max()) + max_new_tokens, device, self.compute_dtype(device))
        logits = self(ids, cache, 0, logits_at=lens - 1)[:, -1]  # a prompt's pad positions come after it: unseen
        out = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        length = torch.zeros(len(prompts), dtype=torch.long, device=device)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        all_done = all_done or (lambda d: bool(d.all()))
        penalties = Penalties(prompts, self.mcfg.vocab_size, device, repetition_penalty, frequency_penalty,
                              presence_penalty)
        for t in range(max_new_tokens):
            token = torch.where(done, pad_id, sample_tokens(penalties(logits.float()), temperature, top_k, top_p,
                                                            generator))
            penalties.add(token)  # a finished row's pad tokens too: nothing reads its penalties again
            out[:, t] = token
            length += ~done
            done |= torch.isin(token, stop) | (t + 1 >= budget)
            if (t + 1) % check_every == 0 and rows_done is not None:
                done |= rows_done(out[:, : t + 1])
            if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and all_done(done)):
                break
            logits = self(token[:, None], cache, (lens + t).clamp(max=cache.max_len - 1))[:, -1]
        return [row[:n].tolist() for row, n in zip(out.cpu(), length.cpu().tolist())]


def segment_positions(segments):
    """The position of every token within its segment, (B, T): 0 where a segment starts. Segments are runs."""
    idx = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def segment_mask(segments):
    """(B, 1, T, T) bool: query i may attend to key j when both are in one segment and j <= i."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return ((segments.unsqueeze(2) == segments.unsqueeze(1)) & causal).unsqueeze(1)


def token_cross_entropy(logits, targets):
    """Cross-entropy of every position in float32, shape of targets."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), reduction="none").view(
        targets.shape)


# ----------------------------------------------------------------------------
# sampling


def apply_penalties(logits, seen, counts, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0):
    """logits (N, vocab) penalised: where seen (N, vocab, bool), divided by repetition_penalty when positive and
    multiplied when negative (transformers' RepetitionPenaltyLogitsProcessor); then, OpenAI's, minus
    frequency_penalty * counts + presence_penalty * (counts > 0)."""
    if repetition_penalty != 1.0:
        logits = torch.where(seen, torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty),
                             logits)
    if frequency_penalty or presence_penalty:
        logits = logits - frequency_penalty * counts - presence_penalty * (counts > 0).float()
    return logits


class Penalties:
    """The penalties of rows generated together, and the counts they need (apply_penalties does the arithmetic).

    repetition (1: off; > 1 discourages) acts on every token the row holds, its prompt and its reply so far, as
    transformers' acts on all of input_ids; frequency and presence (0: off; the API's range is -2..2, negative
    encourages) on the tokens the row has generated only, as OpenAI defines them ("how often the token was sampled
    prior to the current position") and vLLM implements them: a prompt's tokens do not count."""

    def __init__(self, prompts, vocab, device, repetition=1.0, frequency=0.0, presence=0.0):
        self.repetition, self.frequency, self.presence = repetition, frequency, presence
        self.on = repetition != 1.0 or frequency != 0.0 or presence != 0.0
        if not self.on:
            return
        self.rows = torch.arange(len(prompts), device=device)
        self.counts = torch.zeros(len(prompts), vocab, device=device)
        self.in_prompt = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
        for r, p in enumerate(prompts):
            self.in_prompt[r, torch.tensor(p, dtype=torch.long, device=device)] = True

    def __call__(self, logits):
        if not self.on:
            return logits
        return apply_penalties(logits, self.in_prompt | (self.counts > 0), self.counts, self.repetition,
                               self.frequency, self.presence)

    def add(self, tokens):
        """Count each row's new token (N,)."""
        if self.on:
            self.counts[self.rows, tokens] += 1


def filter_top_k_top_p(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top k and outside the smallest set with probability >= top_p."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample_tokens(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (N, vocab), (N,): greedy when temperature is 0."""
    if temperature == 0:
        return logits.argmax(-1)
    # the best logit at 0 first: a tiny temperature then sends the others to -inf, never the best to inf (nan)
    logits = filter_top_k_top_p((logits - logits.amax(-1, keepdim=True)) / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------
# HF transformers naming


def to_hf_state_dict(model: Transformer):
    """Our weights under LlamaForCausalLM's names, fused projections split (tensors shared, not copied)."""
    mcfg, out = model.mcfg, {}
    q, kv = mcfg.n_heads * mcfg.head_dim, mcfg.n_kv_heads * mcfg.head_dim
    for name, t in model.state_dict().items():
        if name.endswith("qkv_proj.weight"):
            prefix = name[: -len("qkv_proj.weight")]
            wq, wk, wv = t.split([q, kv, kv], dim=0)
            out.update({prefix + "q_proj.weight": wq, prefix + "k_proj.weight": wk, prefix + "v_proj.weight": wv})
        elif name.endswith("gate_up_proj.weight"):
            prefix = name[: -len("gate_up_proj.weight")]
            gate, up = t.chunk(2, dim=0)
            out.update({prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up})
        elif name == "lm_head.weight" and mcfg.tie_embeddings:  # (a score head keeps its name: HF's too)
            continue  # transformers re-ties it from tie_word_embeddings
        else:
            out[name] = t
    return out


def from_hf_state_dict(hf: dict, mcfg: ModelConfig):
    """LlamaForCausalLM weights -> our state dict (fused projections joined)."""
    out = {}
    for name, t in hf.items():
        if "rotary_emb" in name:
            continue
        if name.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            continue  # joined with their q_proj / gate_proj below
        if name.endswith("q_proj.weight"):
            prefix = name[: -len("q_proj.weight")]
            out[prefix + "qkv_proj.weight"] = torch.cat(
                [t, hf[prefix + "k_proj.weight"], hf[prefix + "v_proj.weight"]], dim=0)
        elif name.endswith("gate_proj.weight"):
            prefix = name[: -len("gate_proj.weight")]
            out[prefix + "gate_up_proj.weight"] = torch.cat([t, hf[prefix + "up_proj.weight"]], dim=0)
        else:
            out[name] = t
    if mcfg.tie_embeddings and mcfg.head == "lm":
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
