"""The peers' rows: transformers `generate` on the same weights as parallama, and peft LoRA / (IA)³ on that
model (one adapter, or N LoRA tenants in one mixed batch through `adapter_names`). transformers and peft
are imported only here (bench/ is the one layer that may), inside the functions that need them.

A peer's prefill is the time of a 1-token generate; its decode tok/s comes from the steps inside the full
`generate` (a no-op logits processor, `StepClock`, notes when each step's logits arrive).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.measure import PeakMemory, sync
from bench.report import row


def load_hf_peer(source: str, dtype: torch.dtype, device: str) -> tuple[Any, str]:
    """(transformers model on the same weights, "") or (None, why it is skipped): the peer runs on the
    default GGUF (transformers' own GGUF loader) or an HF directory, nothing else."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None, "transformers is not installed; peers skipped"
    transformers.utils.logging.disable_progress_bar()
    if source == "default":
        from weights.default import default_gguf_path

        gguf = default_gguf_path()
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    elif Path(source).is_dir() and (Path(source) / "config.json").exists():
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    else:
        return None, f"transformers peers skipped: they run on the default model or an HF directory, not {source}"
    return hf.to(device).eval(), ""


def hf_kv_bytes_per_token(hf: Any) -> int:
    cfg = hf.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd * next(hf.parameters()).element_size()


class StepClock:
    """A logits processor that changes nothing and notes when each step's logits arrive: the first call
    follows the prefill forward, each later one a decode forward (plus that step's sampling and cache
    update), so decode tok/s = requests × (calls − 1) / (last − first), as parallama counts its steps."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores

    def decode_tps(self, requests: int) -> float:
        if len(self.times) < 2:
            return 0.0
        return requests * (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)


class HFCase:
    """A transformers / peft row: greedy `generate` of `batch` copies of the prompt, as a case `run_interleaved`
    can time in the same rounds as parallama's (bench/parallama_rows.py). Each run times a 1-token generate
    (the prefill) and the full generate; decode tok/s comes from the step times inside the latter
    (`StepClock`), not from subtracting the two, which goes negative when the machine is shared. Construction
    makes one warm-up of each inside `PeakMemory`. `weights`: the bytes a decode step reads (for decode_gbs;
    0 = skip)."""

    def __init__(
        self,
        hf: Any,
        ids: list[int],
        new: int,
        beams: int,
        *,
        batch: int = 1,
        engine: str = "transformers",
        method: str = "base",
        tenants: int = 1,
        weights: int = 0,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.hf, self.ids, self.new, self.beams, self.batch = hf, ids, new, beams, batch
        self.engine, self.method, self.tenants, self.weights = engine, method, tenants, weights
        self.kwargs = generate_kwargs or {}
        self.device = next(hf.parameters()).device
        self.x = torch.tensor([ids] * batch, device=self.device)
        eos = getattr(hf.generation_config, "eos_token_id", None)
        self.pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        self.results: list[tuple[float, float, float]] = []  # (prefill s, full generate s, decode tok/s)
        with PeakMemory(self.device) as mem:
            self._generate(1)
            self._generate(new)
        self.peak_mem_mib = mem.mib

    def _generate(self, n: int, clock: StepClock | None = None) -> None:
        from transformers import LogitsProcessorList

        extra = {"logits_processor": LogitsProcessorList([clock])} if clock else {}
        with torch.no_grad():
            self.hf.generate(
                self.x,
                attention_mask=torch.ones_like(self.x),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                num_beams=self.beams,
                pad_token_id=self.pad,
                **extra,
                **self.kwargs,
            )

    def run(self) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        self._generate(1)
        sync(self.device)
        t1 = time.perf_counter()
        clock = StepClock(self.device)
        self._generate(self.new, clock)
        sync(self.device)
        self.results.append((t1 - t0, time.perf_counter() - t1, clock.decode_tps(self.batch)))

    def row(self) -> dict[str, Any]:
        t_prefill, t_total, decode_tps = (statistics.median(r[i] for r in self.results) for i in range(3))
        per_token = hf_kv_bytes_per_token(self.hf)
        batch, n = self.batch, len(self.ids)
        out = row(
            self.engine,
            self.method,
            beams=self.beams,
            batch=batch,
            tenants=self.tenants,
            prompt_len=n,
            new_tokens=self.new,
            t_total=t_total,
            t_prefill=t_prefill,
            kv_bytes=per_token * (n + self.new) * self.beams * batch,
            peak_mem_mib=self.peak_mem_mib,
            decode_tps=decode_tps,
        )
        # per run, in round order: paired with parallama's runs when both were timed in the same rounds
        out["runs_tps"] = [batch * self.new / r[1] for r in self.results]
        out["runs_decode_tps"] = [r[2] for r in self.results]
        out["runs_prefill_tps"] = [batch * n / r[0] for r in self.results]
        if self.weights:  # as parallama's: weights + every beam's K/V mid-generation, per step; a step = batch tokens
            step_bytes = self.weights + batch * self.beams * per_token * (n + self.new // 2)
            out["decode_gbs"] = step_bytes * out["decode_tps"] / batch / 1e9
        return out


def bench_hf(hf: Any, ids: list[int], new: int, beams: int, runs: int, **kw: Any) -> dict[str, Any]:
    """One transformers / peft row on its own: `runs` runs of an `HFCase` (keywords as there). It shares no
    rounds with another row, so it carries no per-run figures: its ratios are never taken as paired."""
    case = HFCase(hf, ids, new, beams, **kw)
    for _ in range(runs):
        case.run()
    out = case.row()
    for key in ("runs_tps", "runs_decode_tps", "runs_prefill_tps"):
        del out[key]
    return out


def peft_model(hf: Any, method: str, n: int = 1, seed: int = 0) -> Any:
    """hf wrapped in peft (in place; `.unload()` gives the plain model back): LoRA r=8 on q/v, or (IA)³
    with peft's llama defaults (k/v/down). n > 1 LoRA adapters "t0".."t{n-1}" get seeded random B, so each
    tenant really differs (B = 0, peft's init, is the same no-op update for all)."""
    from peft import IA3Config as PeftIA3
    from peft import LoraConfig, get_peft_model

    def cfg() -> Any:
        if method == "lora":
            return LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        return PeftIA3(task_type="CAUSAL_LM")

    pm = get_peft_model(hf, cfg(), adapter_name="t0" if n > 1 else "default")
    for i in range(1, n):
        pm.add_adapter(f"t{i}", cfg())
    if n > 1:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in pm.modules():
                for lin in getattr(m, "lora_B", {}).values():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.01)
    return pm.eval()
