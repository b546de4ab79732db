"""Command-line generation: `python -m infer.generate --model default --prompt "..." [--chat]`.

This is the simple reference loop (a full no-cache forward per token); the paged-cache engine
replaces it without changing the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

import torch

from model import Llama


@torch.inference_mode()
def generate_tokens(
    model: Llama,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    stop_ids: frozenset[int] = frozenset(),
) -> Iterator[int]:
    """Yield new token ids one at a time: greedy at temperature 0, else softmax sampling."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.tok_embeddings.weight.device)
    for _ in range(max_new_tokens):
        logits = model(ids)[0, -1]  # (vocab,)
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        else:
            nxt = int(logits.argmax())
        yield nxt
        if nxt in stop_ids:
            return
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'default', a .gguf file, a Meta or an HF directory")
    p.add_argument("--prompt", action="append", required=True, help="may be given several times")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    a = p.parse_args(argv)
    if a.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if a.temperature < 0:
        p.error("--temperature must be >= 0")
    try:
        model = Llama.from_pretrained(a.model)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = model.tokenizer
    if tok is None:
        print(f"error: {a.model} has no tokenizer; text prompts need one", file=sys.stderr)
        return 2
    for prompt in a.prompt:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if a.chat else prompt
        ids = tok.encode(text)
        if len(ids) + a.max_new_tokens > model.args.max_seq_len:
            print(f"error: prompt of {len(ids)} tokens + {a.max_new_tokens} new exceeds the context "
                  f"({model.args.max_seq_len})", file=sys.stderr)
            return 2
        out: list[int] = []
        shown = ""
        for t in generate_tokens(model, ids, a.max_new_tokens, a.temperature, a.seed, tok.stop_ids):
            out.append(t)
            if not a.json:
                text_so_far = tok.decode([i for i in out if i not in tok.stop_ids])
                if not text_so_far.endswith("\ufffd"):  # hold back a partial UTF-8 character
                    print(text_so_far[len(shown):], end="", flush=True)
                    shown = text_so_far
        if a.json:
            body = tok.decode([i for i in out if i not in tok.stop_ids])
            print(json.dumps({"prompt_ids": ids, "output_ids": out, "text": body}))
        else:
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
