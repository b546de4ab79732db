"""LLaMA in one flat file, with Meta's parameter names so a Meta checkpoint is a plain state dict.

Shapes: B batch, T tokens, d model width, H / H_kv query / key-value heads, hd head width.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import reference
from kernels.native import MAX_HEAD_DIM, MAX_LORA_RANK, MAX_ROWS
from kernels.ops import TORCH_OPS, Ops, get_ops
from model.args import ModelArgs
from model.checks import check_adapter, check_prompt_lens, check_tensors
from model.peft.base import Adapter, LoRADelta
from model.stacked import stacked_weight
from model.step import StepBatch
from model.tp import SINGLE, TensorParallel

AdapterLayer = tuple[dict[str, torch.Tensor] | None, dict[str, list[LoRADelta]] | None]  # scales, LoRA


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops = TORCH_OPS) -> None:
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add and this norm as one op (one kernel on GPU)."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


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
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ wᵀ with an adapter's column scale (per row, or per sequence with `rows` the row → sequence map)
    and/or unmerged LoRA updates (a row has one or the other)."""
    return _add_lora(ops, ops.linear_scale(x, w, scale, rows), x, lora)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, ops: Ops = TORCH_OPS, tp: TensorParallel = SINGLE) -> None:
        """args: this rank's shapes (`TensorParallel.local_args`: its heads under tensor parallelism)."""
        super().__init__()
        self.ops, self.tp = ops, tp
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.split = [args.q_dim, args.kv_dim, args.kv_dim]
        # Meta's wq | wk | wv stacked by rows, so Q, K and V are one GEMM with one scale epilogue; state
        # dicts still say attention.wq/wk/wv.weight (split on save, stacked on load)
        self.wqkv = stacked_weight(self, "wqkv", dict(zip(("wq", "wk", "wv"), self.split)), args.dim)
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
        broadcast over T (B, ·) or one per packed row (M, ·) with `step` (or per sequence (S, ·) with
        "rows", the (M,) row → sequence map): "qkv" (fused columns), or any of "q" (H·hd), "k", "v"
        (H_kv·hd). lora "q"/"k"/"v"/"o": unmerged low-rank updates.
        """
        ops, s, lo = self.ops, scales or {}, lora or {}
        lead = x.shape[:-1]
        qkv = ops.linear_scale(x, self.wqkv, self._qkv_scale(s), s.get("rows"))  # (B, T, q+2kv) | (M, q+2kv)
        if any(lo.get(p) for p in "qkv"):
            parts = qkv.split(self.split, -1)  # Q | K | V columns
            qkv = torch.cat([_add_lora(ops, t, x, lo.get(p)) for t, p in zip(parts, "qkv")], -1)
        if step is None:
            # Q and K heads side by side: one RoPE call rotates both (a view, no copy)
            qk = qkv[..., : self.split[0] + self.split[1]].unflatten(-1, (self.n_heads + self.n_kv_heads, -1))
            q, k = ops.rope(qk, cos_sin).split([self.n_heads, self.n_kv_heads], dim=-2)  # (B, T, H | H_kv, hd)
            v = qkv[..., -self.split[2] :].unflatten(-1, (self.n_kv_heads, self.head_dim))  # (B, T, H_kv, hd)
            out = ops.attention(q, k, v, causal=True)
        else:
            # RoPE of Q and K and the cache write of K and V as one op (one kernel on triton)
            q = ops.rope_write_kv(
                qkv, cos_sin, k_cache, v_cache, step.slots, self.n_heads, self.n_kv_heads
            )  # (M, H, hd)
            out = ops.paged_attention(
                q,
                k_cache,
                v_cache,
                step.block_tables,
                step.seq_lens,
                step.positions,
                step.row_to_seq,
                step.row_index,
                step.max_rows,
                contiguous_kv=step.contiguous_kv,
            )
        out = out.reshape(*lead, -1)  # (B, T | M, H · hd)
        # row-parallel wo: each rank's heads give a partial sum (LoRA's A is cut the same way), summed here
        return self.tp.all_reduce(_project(ops, out, self.wo.weight, lora=lo.get("o")))

    def _qkv_scale(self, s: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The fused scale: given (engine pools) or stacked from per-projection vectors, 1 where absent."""
        if "qkv" in s or not any(t in s for t in "qkv"):
            return s.get("qkv")
        ref = next(s[t] for t in "qkv" if t in s)
        return torch.cat(
            [s.get(t, ref.new_ones(ref.shape[0], n)).expand(ref.shape[0], n) for t, n in zip("qkv", self.split)], -1
        )


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); Meta's w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, hidden_dim: int, ops: Ops = TORCH_OPS, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.ops, self.tp = ops, tp
        self.hidden_dim = hidden_dim
        # w1 | w3 stacked by rows (state dicts still say feed_forward.w1/w3.weight): gate and up are
        # adjacent row blocks of one tensor, which a backend may run as one GEMM
        self.w13 = stacked_weight(self, "w13", {"w1": hidden_dim, "w3": hidden_dim}, dim)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        scale_u: torch.Tensor | None = None,
        lora: dict[str, list[LoRADelta]] | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, d) | (M, d); scale_u (B | M, hidden), or (S, hidden) with `rows` the (M,) row → sequence
        map: an adapter's scale of the up projection (PARA's l_u; (IA)³'s down-proj input scale, since
        silu(g)·u·l = silu(g)·(l·u)); lora "gate"/"up"/"down"."""
        ops, lo = self.ops, lora or {}
        w_gate, w_up = self.w13.split(self.hidden_dim)  # (hidden, d) views
        if lo.get("gate") or lo.get("up"):  # LoRA on gate/up: the two GEMMs cannot be fused
            gate = _project(ops, x, w_gate, lora=lo.get("gate"))
            hidden = F.silu(gate) * _project(ops, x, w_up, scale_u, lo.get("up"), rows)
        else:
            hidden = ops.gated_up(x, w_gate, w_up, scale_u=scale_u, row_to_seq=rows)
        return self.tp.all_reduce(_project(ops, hidden, self.w2.weight, lora=lo.get("down")))  # row-parallel w2


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, ops: Ops = TORCH_OPS, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.attention = Attention(args, ops, tp)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim, ops, tp)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, ops)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, ops)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: torch.Tensor,
        *cache_args: Any,
        adapter: Callable[[torch.Tensor], AdapterLayer] | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's residual convention: x is the last sub-layer's output (the embeddings, with residual None,
        for the first block) and residual the stream it joins; returns (this block's FFN output, the stream
        before it), so each residual add is fused with the norm after it.

        adapter: the stream at this block's input → this layer's scales {"q", "k", "v", "u"} (any subset;
        with "rows", per sequence: see Attention.forward) and LoRA updates {"q", "k", "v", "o", "gate", "up",
        "down"}; PARA pools its vectors from that stream.
        keep: packed rows whose outputs are read later (the last layer of a cached step whose logits are wanted
        at a few rows, as llama.cpp's output ids): every row's K/V is written, the FFN runs on these rows only
        (not with LoRA, whose updates name rows).
        """
        if residual is None:
            normed, h = self.attention_norm(x), x
        else:
            normed, h = self.attention_norm.add(x, residual)
        scales, lora = adapter(h) if adapter is not None else (None, None)
        x = self.attention(normed, cos_sin, *cache_args, scales=scales, lora=lora)
        s = scales or {}
        if keep is not None:
            if "rows" in s:  # per-sequence scales: the kept rows' sequences
                s = {**s, "rows": s["rows"][keep]}
            elif "u" in s and s["u"].shape[0] == x.shape[0] > 1:  # per-row scales (one row: broadcast)
                s = {**s, "u": s["u"][keep]}
            x, h = x[keep], h[keep]
        normed, h = self.ffn_norm.add(x, h)
        return self.feed_forward(normed, scale_u=s.get("u"), lora=lora, rows=s.get("rows")), h

    def decode_weights(self) -> tuple[torch.Tensor, ...]:
        """(attention_norm, wqkv, wo, ffn_norm, w13, w2): the compiled decode layer's weights, in its order."""
        a, f = self.attention, self.feed_forward
        return (self.attention_norm.weight, a.wqkv, a.wo.weight, self.ffn_norm.weight, f.w13, f.w2.weight)

    def decode(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: torch.Tensor,
        step: StepBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scales: dict[str, torch.Tensor],
        lora: dict[str, list[LoRADelta]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for a decode step (row m = sequence m) as one `ops.decode_layer` call."""
        a = self.attention
        return a.ops.decode_layer(
            x,
            residual,
            self.decode_weights(),
            self.attention_norm.eps,
            (a.n_heads, a.n_kv_heads, a.head_dim),
            cos_sin,
            k_cache,
            v_cache,
            step.slots,
            step.block_tables,
            step.seq_lens,
            scales.get("qkv"),
            scales.get("u"),
            lora,
        )


class Llama(nn.Module):
    def __init__(self, args: ModelArgs, backend: str = "torch", tp: TensorParallel | None = None) -> None:
        """backend: "torch" (the PyTorch reference ops), "triton" (fused kernels) or "cpu" (BLAS GEMMs),
        fixed here for every layer (kernels/ops.py). `from_pretrained` resolves "auto" and PARALLAMA_BACKEND.
        tp: this rank's place in a tensor-parallel group (model/tp.py); the layers then hold its heads, FFN
        columns and vocab rows (`local_args`), and `args` still describes the whole model."""
        super().__init__()
        self.args = args
        self.tp = tp = tp or SINGLE
        self.local_args = local = tp.local_args(args)  # == args without tensor parallelism
        self.ops = ops = get_ops(backend)
        self.tok_embeddings = tp.make_embedding(args)
        self.layers = nn.ModuleList(TransformerBlock(local, ops, tp) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, ops)
        self.output = nn.Linear(args.dim, tp.vocab_rows(args)[2], bias=False)  # its vocab rows (all of them: tp 1)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.tokenizer: Any = None  # a weights.tokenizer.Tokenizer, set by from_pretrained
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
        return self.logits(self.hidden_states(tokens, adapter, prompt_lens))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output projection of final-norm states (..., d) → float32 logits (..., vocab): `forward`'s last
        op, for callers that need only some positions' logits (a loss over response tokens)."""
        with self.ops.scope():
            return self.tp.gather_last(self.ops.linear_scale(h, self.output.weight), self.args.vocab_size).float()

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
            check_prompt_lens(prompt_lens, B, T)
        if adapter is not None:
            self.check_adapter(adapter)
            if prompt_lens is None:
                prompt_lens = torch.full((B,), T, dtype=torch.long, device=tokens.device)
        with self.ops.scope():
            x, h = self.tok_embeddings(tokens), None  # (B, T, d)
            cos_sin = self.rope_cos_sin[:T]
            for i, layer in enumerate(self.layers):
                hook = None if adapter is None else functools.partial(adapter.layer, i, prompt_lens=prompt_lens)
                x, h = layer(x, h, cos_sin, adapter=hook)
            return self.norm.add(x, h)[0]

    def check_adapter(self, adapter: Adapter) -> None:
        """A clear error for an object that is not an adapter, or one made for a model of another shape."""
        if self.tp.size > 1 and getattr(adapter, "tp_shard", None) is None and isinstance(adapter, Adapter):
            raise ValueError(
                f"{adapter.method} adapter is whole; under tensor parallelism each rank uses its shard "
                "(weights.load_adapter slices at load; or model.tp.shard_adapter(adapter, model.args))"
            )
        check_adapter(adapter, self.local_args)  # under tensor parallelism: this rank's shard of the adapter

    def forward_step(
        self, tokens: torch.Tensor, step: StepBatch, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """One cached step over packed rows: writes their K/V into the paged pool and attends.

        tokens: (M,); k_cache, v_cache: (n_layers, num_blocks, block_size, H_kv, hd).
        Returns float32 logits for `step.logit_rows` (all rows when None): (R, vocab).
        """
        x, h = self.tok_embeddings(tokens), None  # (M, d)
        native, kept = self._native_decode(x, step, k_cache), False
        with self.ops.scope(native or x.shape[0] <= MAX_ROWS):  # a few rows: GEMVs on the compiled layers' pool
            cos_sin = self.rope_cos_sin[step.positions]  # (M, hd/2, 2)
            ad = step.adapters
            # nothing to compute (decode, or a prefill without PARA rows): every layer's vectors come from
            # one gather per pool
            gathered = None
            if ad is not None and not ad.compute:
                gathered = {t: p[:, ad.row_slots] for t, p in ad.pools.items()}  # (n_layers, M | S, width)
            if native and self.ops.decode_layers is not None and (ad is None or not ad.lora):  # all layers, one call
                stack = self._decode_stack(k_cache, v_cache)
                x, h = self.ops.decode_layers(stack, x, cos_sin, step.slots, step.block_tables, step.seq_lens, gathered)
            for i, layer in enumerate(self.layers if h is None else ()):
                if native:
                    scales, lora = ad.layer(i, x, gathered) if ad is not None else ({}, {})
                    x, h = layer.decode(x, h, cos_sin, step, k_cache[i], v_cache[i], scales, lora)
                    continue
                hook = None if ad is None else functools.partial(ad.layer, i, gathered=gathered)
                # the last layer's FFN only for the rows whose logits are wanted (its K/V written for all)
                keep = step.logit_rows if i == len(self.layers) - 1 and (ad is None or not ad.lora) else None
                # K/V are scaled before write_kv, so the cache holds l_v ⊙ V and is never rescaled
                x, h = layer(x, h, cos_sin, step, k_cache[i], v_cache[i], adapter=hook, keep=keep)
                kept = keep is not None
            if step.logit_rows is not None and not kept:
                x, h = x[step.logit_rows], h[step.logit_rows]
            if native:  # on the layers' threads (see kernels/native.py)
                logits = self.ops.decode_linear(self.norm.add(x, h)[0], self.output.weight)  # (R, vocab)
            else:
                logits = self.ops.linear_scale(self.norm.add(x, h)[0], self.output.weight)  # (R, vocab / tp)
            return self.tp.gather_last(logits, self.args.vocab_size).float()

    def _decode_stack(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> Any:
        """The compiled layers over this KV pool (`ops.decode_stack`), built once and rebuilt when the weights
        or the pool moved."""
        stack = getattr(self, "_stack", None)
        first, last = self.layers[0].attention.wqkv, self.layers[-1].feed_forward.w2.weight
        if stack is None or not stack.matches(first, last, k_cache, v_cache):
            a = self.layers[0].attention
            stack = self.ops.decode_stack(
                [layer.decode_weights() for layer in self.layers],
                self.layers[0].attention_norm.eps,
                (a.n_heads, a.n_kv_heads, a.head_dim),
                k_cache,
                v_cache,
            )
            self._stack = stack
        return stack

    def _native_decode(self, x: torch.Tensor, step: StepBatch, k_cache: torch.Tensor) -> bool:
        """Whether this step's layers run as `ops.decode_layer` calls: a decode step (row m = sequence m's
        newest token) of at most 8 rows, fp32 on CPU, head_dim ≤ 256, one process, LoRA without dropout (eval
        mode) and of rank ≤ 256, no autograd."""
        ad = step.adapters
        lora_ok = ad is None or all(not a.training and a.config.r <= MAX_LORA_RANK for a, _ in ad.lora)
        return (
            self.ops.decode_layer is not None
            and step.max_rows == 1
            and x.shape[0] == step.block_tables.shape[0] <= MAX_ROWS
            and self.args.head_dim <= MAX_HEAD_DIM
            and x.dtype == k_cache.dtype == torch.float32
            and x.device.type == "cpu"
            and self.tp.size == 1
            and (ad is None or ad.row_to_seq is None)
            and lora_ok
            and step.block_tables.dtype == step.slots.dtype == step.seq_lens.dtype == torch.int64
            and not torch.is_grad_enabled()
        )

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Adopt a Meta-named state dict (tensors are used as given: no copy when dtype matches).

        Names and shapes are checked first so a bad checkpoint gives one line naming the tensor.
        """
        sd = dict(state_dict)
        if self.args.tie_embeddings:
            sd.setdefault("output.weight", sd.get("tok_embeddings.weight"))
        check_tensors(sd, self.state_dict(keep_vars=True), source)
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
        tp: int = 1,
        **overrides: Any,
    ) -> Llama:
        """Load "default" (SmolLM2-135M-Instruct), a Meta dir, an HF dir or a .gguf file.

        backend: "auto" (triton on CUDA, cpu elsewhere), "torch", "triton" or "cpu"; the environment
        variable PARALLAMA_BACKEND overrides it. `overrides` replace ModelArgs fields (e.g.
        max_seq_len=4096). tp > 1: this process's tensor-parallel shard, under `torchrun --nproc-per-node tp`
        (each rank reads only its part of the files; model/tp.py). Returns the model in eval mode with
        `.tokenizer` and `.args`.
        """
        from weights.build import load_model  # the one place model/ reaches up: files are weights/' job

        return load_model(source, dtype=dtype, device=device, backend=backend, tp=tp, **overrides)
