"""LLaMA in one flat file, with Meta's parameter names so a Meta checkpoint is a plain state dict.

Shapes: B batch, T tokens, d model width, H / H_kv query / key-value heads, hd head width.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import reference
from kernels.ops import TORCH_OPS, Ops, get_ops, resolve_backend
from model.args import ModelArgs

if TYPE_CHECKING:
    from model.peft import Adapter
    from weights.tokenizer import Tokenizer


class LoRADelta(NamedTuple):
    """An unmerged low-rank update of one projection: y[rows] += dropout(x[rows]) @ aᵀ @ bᵀ · scaling."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float
    rows: torch.Tensor | None = None  # packed rows this adapter owns (None: every row)
    dropout: float = 0.0  # training-time dropout on the LoRA input


def scale_columns(args: ModelArgs) -> dict[str, tuple[str, slice]]:
    """Where each adapter scale lives: (pool, column slice); q, k, v share the fused QKV projection."""
    q, kv = args.q_dim, args.kv_dim
    return {
        "q": ("qkv", slice(0, q)),
        "k": ("qkv", slice(q, q + kv)),
        "v": ("qkv", slice(q + kv, q + 2 * kv)),
        "u": ("u", slice(0, args.ffn_dim)),
    }


@dataclass
class AdapterStep:
    """Adapters on the cached path.

    Scale adapters (PARA, (IA)³) live in two pools, the fused QKV columns and the FFN up columns, one
    row per slot (slot 0 stays 1, the identity, for rows without one): PARA vectors are computed once,
    in the prefill step, from each sequence's last prompt row; (IA)³ vectors are written when the
    request is admitted; every later step only gathers. LoRA rows are grouped per adapter and pay their
    low-rank matmuls every step.
    """

    pools: dict[str, torch.Tensor]  # "qkv" (q | k | v columns) / "u" → (n_layers, n_slots, width)
    row_slots: torch.Tensor  # (M,) the pool row each packed row reads
    # (adapter, packed rows holding each sequence's last prompt token (n,), their slots (n,))
    compute: list[tuple[Adapter, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    lora: list[tuple[Adapter, torch.Tensor | None]] = field(default_factory=list)  # (adapter, its rows | None: all)

    @staticmethod
    def make_pool(
        args: ModelArgs, pool: str, n_slots: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """An all-ones (identity) pool, stacked over layers: "qkv" scales the fused Q|K|V projection's
        columns, "u" the FFN up projection's."""
        width = args.q_dim + 2 * args.kv_dim if pool == "qkv" else args.ffn_dim
        return torch.ones(args.n_layers, n_slots, width, dtype=dtype, device=device)

    def layer(
        self, i: int, h: torch.Tensor, gathered: dict[str, torch.Tensor] | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, list[LoRADelta]]]:
        """Layer i's per-row scales (M, width) and LoRA deltas. Prefill first writes the vectors
        computed from this layer's input h; decode reads `gathered`, taken once per step for all layers."""
        if gathered is not None:
            scales = {t: g[i] for t, g in gathered.items()}
        else:
            for adapter, rows, slots in self.compute:  # pool at each sequence's last prompt row
                where = scale_columns(adapter.args)
                for t, vec in adapter.scales(i, h[rows]).items():
                    pool, cols = where[t]
                    self.pools[pool][i, slots, cols] = vec.to(self.pools[pool].dtype)
            scales = {t: p[i, self.row_slots] for t, p in self.pools.items()}
        lora: dict[str, list[LoRADelta]] = {}
        for adapter, rows in self.lora:
            for proj, d in adapter.deltas(i).items():
                lora.setdefault(proj, []).append(d._replace(rows=rows))
        return scales, lora


@dataclass
class StepBatch:
    """One cached step over the packed rows of S sequences: prefill chunks, decode rows, or both.

    Row m is the `row_index[m]`-th new token of sequence `row_to_seq[m]`, at absolute position
    `positions[m]`; its K/V go to cache slot `slots[m]` (block * block_size + offset).
    """

    positions: torch.Tensor  # (M,)
    row_to_seq: torch.Tensor  # (M,)
    row_index: torch.Tensor  # (M,)
    slots: torch.Tensor  # (M,)
    block_tables: torch.Tensor  # (S, max_blocks), padded with any valid block id
    seq_lens: torch.Tensor  # (S,) context length after this step's writes
    max_rows: int  # most new rows any sequence has in this step (1 for pure decode)
    logit_rows: torch.Tensor | None = None  # rows whose logits are returned (None: all)
    adapters: AdapterStep | None = None  # per-row adapters (None: no row has one)
    # one sequence whose blocks are consecutive ids: (first block, context length); its K/V are then a
    # slice of the pool, which backends may read in place (decided once per step, not per layer)
    contiguous_kv: tuple[int, int] | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops = TORCH_OPS) -> None:
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


def _add_lora(ops: Ops, y: torch.Tensor, x: torch.Tensor, lora: list[LoRADelta] | None) -> torch.Tensor:
    for d in lora or ():
        y = ops.lora_add(y, x, d.a, d.b, d.scaling, d.rows, d.dropout)
    return y


def _project(
    ops: Ops,
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None = None,
    lora: list[LoRADelta] | None = None,
) -> torch.Tensor:
    """x @ wᵀ with an adapter's per-row column scale and/or unmerged LoRA updates (a row has one or the other)."""
    return _add_lora(ops, ops.linear_scale(x, w, scale), x, lora)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, ops: Ops = TORCH_OPS) -> None:
        super().__init__()
        self.ops = ops
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.split = [args.q_dim, args.kv_dim, args.kv_dim]
        # Meta's wq | wk | wv stacked by rows, so Q, K and V are one GEMM with one scale epilogue; state
        # dicts still say attention.wq/wk/wv.weight (split on save, stacked on load)
        self.wqkv = _stacked_weight(self, "wqkv", dict(zip(("wq", "wk", "wv"), self.split)), args.dim)
        self.wo = nn.Linear(args.q_dim, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: torch.Tensor,
        step: StepBatch | None = None,
        k_cache: torch.Tensor | None = None,
        v_cache: torch.Tensor | None = None,
        scales: dict[str, torch.Tensor] | None = None,
        lora: dict[str, list[LoRADelta]] | None = None,
    ) -> torch.Tensor:
        """x: (B, T, d) without a cache, or packed rows (M, d) with `step` and this layer's caches.

        scales: adapter scales of the projection outputs, applied before RoPE, one row per sequence
        broadcast over T (B, ·) or one per packed row (M, ·) with `step`: "qkv" (fused columns), or any
        of "q" (H·hd), "k", "v" (H_kv·hd). lora "q"/"k"/"v"/"o": unmerged low-rank updates.
        """
        ops, s, lo = self.ops, scales or {}, lora or {}
        lead = x.shape[:-1]
        qkv = ops.linear_scale(x, self.wqkv, self._qkv_scale(s))  # (B, T, q+2kv) | (M, q+2kv)
        if any(lo.get(p) for p in "qkv"):
            qkv = torch.cat([_add_lora(ops, t, x, lo.get(p)) for t, p in zip(qkv.split(self.split, -1), "qkv")], -1)
        # Q and K heads side by side: one RoPE call rotates both (a view, no copy)
        qk = qkv[..., : self.split[0] + self.split[1]].unflatten(-1, (self.n_heads + self.n_kv_heads, self.head_dim))
        q, k = ops.rope(qk, cos_sin).split([self.n_heads, self.n_kv_heads], dim=-2)  # (B, T | M, H | H_kv, hd)
        v = qkv[..., -self.split[2] :].unflatten(-1, (self.n_kv_heads, self.head_dim))  # (B, T | M, H_kv, hd)
        if step is None:
            out = ops.attention(q, k, v, causal=True)
        else:
            ops.write_kv(k_cache, v_cache, step.slots, k, v)
            out = ops.paged_attention(
                q, k_cache, v_cache, step.block_tables, step.seq_lens,
                step.positions, step.row_to_seq, step.row_index, step.max_rows, contiguous_kv=step.contiguous_kv,
            )  # fmt: skip
        return _project(ops, out.reshape(*lead, -1), self.wo.weight, lora=lo.get("o"))

    def _qkv_scale(self, s: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The fused scale: given (engine pools) or stacked from per-projection vectors, 1 where absent."""
        if "qkv" in s or not any(t in s for t in "qkv"):
            return s.get("qkv")
        ref = next(s[t] for t in "qkv" if t in s)
        return torch.cat(
            [s.get(t, ref.new_ones(ref.shape[0], n)).expand(ref.shape[0], n) for t, n in zip("qkv", self.split)], -1
        )


def _stacked_weight(module: nn.Module, name: str, parts: dict[str, int], in_dim: int) -> nn.Parameter:
    """One (sum(rows), in_dim) parameter for several of Meta's projections that read the same input, so
    they run as one GEMM. State dicts keep Meta's names: `{part}.weight` tensors are split out on save
    and stacked on load by the hooks registered here."""
    weight = nn.Parameter(torch.empty(sum(parts.values()), in_dim))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # what each nn.Linear would have done (same fan-in)

    def split(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        w = state_dict.pop(prefix + name)
        for part, rows in zip(parts, w.split(list(parts.values()))):
            state_dict[f"{prefix}{part}.weight"] = rows.clone()  # own storage: safetensors refuses shared tensors

    def stack(state_dict: dict, prefix: str, *args: Any) -> None:
        keys = [f"{prefix}{part}.weight" for part in parts]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = torch.cat([state_dict.pop(k) for k in keys])

    module.register_state_dict_post_hook(split)
    module.register_load_state_dict_pre_hook(lambda mod, *args: stack(*args))
    return weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); Meta's w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, hidden_dim: int, ops: Ops = TORCH_OPS) -> None:
        super().__init__()
        self.ops = ops
        self.hidden_dim = hidden_dim
        # w1 | w3 stacked by rows (state dicts still say feed_forward.w1/w3.weight): gate and up are
        # adjacent row blocks of one tensor, which a backend may run as one GEMM
        self.w13 = _stacked_weight(self, "w13", {"w1": hidden_dim, "w3": hidden_dim}, dim)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(
        self, x: torch.Tensor, scale_u: torch.Tensor | None = None, lora: dict[str, list[LoRADelta]] | None = None
    ) -> torch.Tensor:
        """x: (B, T, d) | (M, d); scale_u (B | M, hidden): an adapter's scale of the up projection
        (PARA's l_u; (IA)³'s down-proj input scale, since silu(g)·u·l = silu(g)·(l·u)); lora "gate"/"up"/"down"."""
        ops, lo = self.ops, lora or {}
        w_gate, w_up = self.w13.split(self.hidden_dim)  # (hidden, d) views
        if lo.get("gate") or lo.get("up"):  # LoRA on gate/up: the two GEMMs cannot be fused
            gate = _project(ops, x, w_gate, lora=lo.get("gate"))
            hidden = F.silu(gate) * _project(ops, x, w_up, scale_u, lo.get("up"))
        else:
            hidden = ops.gated_up(x, w_gate, w_up, scale_u=scale_u)
        return _project(ops, hidden, self.w2.weight, lora=lo.get("down"))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, ops: Ops = TORCH_OPS) -> None:
        super().__init__()
        self.attention = Attention(args, ops)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim, ops)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, ops)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, ops)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: torch.Tensor,
        *cache_args: Any,
        scales: dict[str, torch.Tensor] | None = None,
        lora: dict[str, list[LoRADelta]] | None = None,
    ) -> torch.Tensor:
        """scales: an adapter's per-sequence vectors {"q", "k", "v", "u"} (any subset) for this layer;
        lora: per-projection low-rank updates {"q", "k", "v", "o", "gate", "up", "down"}."""
        h = x + self.attention(self.attention_norm(x), cos_sin, *cache_args, scales=scales, lora=lora)
        return h + self.feed_forward(self.ffn_norm(h), scale_u=(scales or {}).get("u"), lora=lora)


class Llama(nn.Module):
    def __init__(self, args: ModelArgs, backend: str = "torch") -> None:
        """backend: "torch" (the PyTorch reference ops), "triton" (fused kernels) or "cpu" (BLAS GEMMs),
        fixed here for every layer (kernels/ops.py). `from_pretrained` resolves "auto" and PARALLAMA_BACKEND."""
        super().__init__()
        self.args = args
        self.ops = ops = get_ops(backend)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, ops) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, ops)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.tokenizer: Tokenizer | None = None
        self.setup_rope()

    def setup_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the cos/sin table; a buffer so .to(device) moves it, not saved in state dicts."""
        a = self.args
        device = device or self.tok_embeddings.weight.device
        if torch.device(device).type == "meta":  # built under torch.device("meta"): from_pretrained fills it
            self.register_buffer(
                "rope_cos_sin", torch.empty(a.max_seq_len, a.head_dim // 2, 2, device="meta"), persistent=False
            )
            return
        inv_freq = reference.rope_frequencies(
            a.head_dim,
            a.rope_theta,
            scaled=a.use_scaled_rope,
            scale_factor=a.rope_scale_factor,
            low_freq_factor=a.rope_low_freq_factor,
            high_freq_factor=a.rope_high_freq_factor,
            original_max_seq_len=a.rope_original_max_seq_len,
        )
        table = reference.rope_table(inv_freq, a.max_seq_len).to(device)
        self.register_buffer("rope_cos_sin", table, persistent=False)  # (max_seq_len, hd/2, 2)

    def forward(
        self,
        tokens: torch.Tensor,
        adapter: Adapter | None = None,
        prompt_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full causal forward with no cache, the reference for every faster path.

        tokens: (B, T) int64 → logits (B, T, vocab) float32.
        adapter: a `model.peft` adapter (PARA, (IA)³ or LoRA) applied to every row. PARA computes each
        layer's vectors from the layer's input at each row's last prompt token, `prompt_lens - 1`
        (prompt_lens: (B,) in [1, T]; None = the whole row is the prompt), and scales every position
        of that row; (IA)³ and LoRA ignore prompt_lens.
        """
        h = self.hidden_states(tokens, adapter, prompt_lens)
        with self.ops.scope():
            return self.ops.linear_scale(h, self.output.weight).float()

    def hidden_states(
        self,
        tokens: torch.Tensor,
        adapter: Adapter | None = None,
        prompt_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final norm's output (B, T, d) in the model's dtype: `forward` without the output projection
        (e.g. to embed text by pooling it). Arguments as `forward`."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.args.max_seq_len}")
        if prompt_lens is not None:
            self._check_prompt_lens(prompt_lens, B, T)
        if adapter is not None:
            self.check_adapter(adapter)
            if prompt_lens is None:
                prompt_lens = torch.full((B,), T, dtype=torch.long, device=tokens.device)
        with self.ops.scope():
            h = self.tok_embeddings(tokens)  # (B, T, d)
            cos_sin = self.rope_cos_sin[:T]
            for i, layer in enumerate(self.layers):
                scales, lora = (None, None) if adapter is None else adapter.layer(i, h, prompt_lens)
                h = layer(h, cos_sin, scales=scales, lora=lora)
            return self.norm(h)

    @staticmethod
    def _check_prompt_lens(prompt_lens: torch.Tensor, B: int, T: int) -> None:
        if not isinstance(prompt_lens, torch.Tensor) or prompt_lens.shape != (B,) or prompt_lens.is_floating_point():
            shape = tuple(prompt_lens.shape) if isinstance(prompt_lens, torch.Tensor) else type(prompt_lens).__name__
            raise ValueError(f"prompt_lens must be an integer tensor of shape ({B},), got {shape}")
        if B and (int(prompt_lens.min()) < 1 or int(prompt_lens.max()) > T):
            raise ValueError(f"prompt_lens must lie in [1, {T}], got {prompt_lens.tolist()}")

    def check_adapter(self, adapter: Adapter) -> None:
        """A clear error for an object that is not an adapter, or one made for a model of another shape."""
        from model.peft import Adapter

        if not isinstance(adapter, Adapter):
            raise ValueError(f"adapter must be a model.peft adapter, got {type(adapter).__name__}")
        a, b = adapter.args, self.args
        if (a.n_layers, a.dim, a.q_dim, a.kv_dim, a.ffn_dim) != (b.n_layers, b.dim, b.q_dim, b.kv_dim, b.ffn_dim):
            raise ValueError(
                f"{adapter.method} adapter was built for a model of another shape (n_layers, dim, q/kv/ffn widths "
                f"{a.n_layers}, {a.dim}, {a.q_dim}/{a.kv_dim}/{a.ffn_dim}; this model has "
                f"{b.n_layers}, {b.dim}, {b.q_dim}/{b.kv_dim}/{b.ffn_dim})"
            )

    def forward_step(
        self, tokens: torch.Tensor, step: StepBatch, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """One cached step over packed rows: writes their K/V into the paged pool and attends.

        tokens: (M,); k_cache, v_cache: (n_layers, num_blocks, block_size, H_kv, hd).
        Returns float32 logits for `step.logit_rows` (all rows when None): (R, vocab).
        """
        with self.ops.scope():
            h = self.tok_embeddings(tokens)  # (M, d)
            cos_sin = self.rope_cos_sin[step.positions]  # (M, hd/2, 2)
            ad = step.adapters
            if ad is not None and ad.row_slots.numel() > 1 and bool((ad.row_slots == ad.row_slots[0]).all()):
                # every row reads one slot (a lone prompt, its beams): (1, width) scales broadcast over the
                # rows instead of being gathered into an (M, width) copy per layer
                ad = dataclasses.replace(ad, row_slots=ad.row_slots[:1])
            # decode: nothing to compute, so every layer's vectors come from one gather per pool
            gathered = None
            if ad is not None and not ad.compute:
                gathered = {t: p[:, ad.row_slots] for t, p in ad.pools.items()}  # (n_layers, M, width)
            for i, layer in enumerate(self.layers):
                scales, lora = (None, None) if ad is None else ad.layer(i, h, gathered)
                # K/V are scaled before write_kv, so the cache holds l_v ⊙ V and is never rescaled
                h = layer(h, cos_sin, step, k_cache[i], v_cache[i], scales=scales, lora=lora)
            if step.logit_rows is not None:
                h = h[step.logit_rows]
            return self.ops.linear_scale(self.norm(h), self.output.weight).float()

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Adopt a Meta-named state dict (tensors are used as given: no copy when dtype matches).

        Names and shapes are checked first so a bad checkpoint gives one line naming the tensor.
        """
        sd = dict(state_dict)
        if self.args.tie_embeddings:
            sd.setdefault("output.weight", sd.get("tok_embeddings.weight"))
        expected = self.state_dict(keep_vars=True)
        missing = [k for k in expected if sd.get(k) is None]
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise ValueError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")
        unexpected = sorted(set(sd) - set(expected))
        if unexpected:
            raise ValueError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:3])}")
        for k, p in expected.items():
            if tuple(sd[k].shape) != tuple(p.shape):
                raise ValueError(
                    f"{source}: tensor {k} has shape {tuple(sd[k].shape)}, the model args imply {tuple(p.shape)}"
                )
        self.load_state_dict(sd, assign=True)
        if self.args.tie_embeddings:  # assign=True replaced both parameters; tie them again
            self.output.weight = self.tok_embeddings.weight

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike[str] = "default",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        backend: str = "auto",
        **overrides: Any,
    ) -> Llama:
        """Load "default" (SmolLM2-135M-Instruct), a Meta dir, an HF dir or a .gguf file.

        backend: "auto" (triton on CUDA, cpu elsewhere), "torch", "triton" or "cpu"; the environment
        variable PARALLAMA_BACKEND overrides it. `overrides` replace ModelArgs fields (e.g.
        max_seq_len=4096). Returns the model in eval mode with `.tokenizer` and `.args`.
        """
        from weights import load_checkpoint

        backend = resolve_backend(backend, device)  # before the (slow) load: a bad backend answers at once

        ckpt = load_checkpoint(source)
        args = ckpt.args
        if overrides:
            args = ModelArgs.from_dict({**args.to_dict(), **overrides})
        with torch.device("meta"):
            model = cls(args, backend=backend)
        sd = {k: v.to(device=device, dtype=dtype) for k, v in ckpt.state_dict.items()}
        model.load_weights(sd, source=str(ckpt.path))
        model.setup_rope(device)
        model.tokenizer = ckpt.tokenizer
        return model.eval()
