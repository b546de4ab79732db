"""One tensor-parallel rank for tests/test_tp.py, run under torchrun (gloo): `tp_worker.py SPEC.json OUT_DIR`.

SPEC: {"model": source, "tp": N, "prompts": [[ids]...], "new": n, "adapters": {name: dir}, "row_adapters": [...],
"logits": bool}. Each rank writes OUT_DIR/rank{k}.pt: the weight files it opened, its resident weight bytes, its KV
pool shape, and (rank 0) the no-cache logits, the greedy tokens of one mixed batch through TPEngine.generate, and
the collectives of one isolated decode step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

opened: list[str] = []
_load = torch.load


def _recording_load(f, *args, **kwargs):  # every checkpoint file this rank opens
    if isinstance(f, (str, Path)):
        opened.append(Path(f).name)
    return _load(f, *args, **kwargs)


torch.load = _recording_load


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers this rank holds (a tied tensor once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    from infer import SamplingParams
    from infer.tp_engine import TPEngine
    from model import Llama
    from model.peft import LoRAAdapter, LoRAConfig, model_fingerprint
    from model.tp import COMM
    from weights.adapters import load_adapter, save_adapter

    model = Llama.from_pretrained(spec["model"], tp=spec["tp"])
    rank = model.tp.rank
    res: dict = {"opened": list(opened), "bytes": resident_bytes(model), "embedding": model.tp.embedding}
    res["fingerprint"] = model_fingerprint(model)  # adapters check it: the whole model's, from the pieces
    if spec.get("logits"):
        with torch.no_grad():
            res["logits"] = model(torch.tensor(spec["prompts"][:1]))
    engine = TPEngine(model, num_blocks=64, block_size=4)
    res["kv_shape"] = tuple(engine.cache.k.shape)
    for name, d in spec.get("adapters", {}).items():
        engine.add_adapter(name, load_adapter(d, model))  # sliced at load
    params = SamplingParams(max_new_tokens=spec["new"])
    rows = spec.get("row_adapters") or [None] * len(spec["prompts"])
    outs = engine.generate(spec["prompts"], params, rows)  # every rank: rank 0 schedules, the others follow
    res["tokens"] = [o.token_ids for o in outs]
    try:  # rank 0's error reaches every rank, and the engine goes on
        engine.generate([[10**6]], params)
    except ValueError as e:
        res["error"] = str(e)
    if engine.is_driver:  # one decode step in isolation: two rows, counted on rank 0
        for ids, name in zip(spec["prompts"][:2], rows[:2]):
            engine.add_request(ids, SamplingParams(max_new_tokens=3), name)
        engine.step()  # prefill + the first decode step
        COMM.reset()
        engine.step()  # a decode step alone
        res["decode_comm"] = {"calls": dict(COMM.calls), "bytes": dict(COMM.bytes), "rows": 2}
        while engine.has_unfinished():
            engine.step()
        if spec.get("share"):  # an adapter added from rank 0 while the others serve, then used and streamed
            torch.manual_seed(0)
            whole = LoRAAdapter(model.args, LoRAConfig(r=2, target_modules=("q_proj", "k_proj", "o_proj")))
            for layer in whole.layers:
                for pair in layer.values():
                    torch.nn.init.normal_(pair.lora_B.weight, std=0.5)
            save_adapter(whole, out / "shared")
            engine.share_adapter("shared", whole)
            outs = engine.generate(spec["prompts"], params, ["shared"] * len(spec["prompts"]))
            res["shared_tokens"] = [o.token_ids for o in outs]
            res["streamed"] = "".join(engine.stream(spec["prompts"][0], params, "shared"))
            engine.unshare_adapter("shared")
        engine.close()
    else:
        engine.run_worker()
    torch.save(res, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
