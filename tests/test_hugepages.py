"""weights/hugepages.py: the weights move into one huge-page arena unchanged (bitwise logits, ties kept,
training still reaches them), the size threshold and the PARALLAMA_HUGEPAGES switch; on SmolLM2, where THP is
on, the kernel really backs them with 2 MiB pages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_meta_model
from weights.hugepages import HUGE, to_huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_weights_move_unchanged_and_aligned():
    model, _ = tiny_meta_model()
    tokens = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        before = model(tokens)
    old = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    moved = to_huge_pages(model, min_bytes=1)  # the tiny model's tensors are all under the default threshold
    assert moved >= sum(p.nbytes for p in model.parameters())
    ptrs = sorted(p.data_ptr() for p in model.parameters())
    assert ptrs[0] % HUGE == 0 and all(p % 64 == 0 for p in ptrs)  # the arena starts on a huge page
    for n, p in model.named_parameters():
        assert p.data_ptr() != old[n][0] and torch.equal(p.detach(), old[n][1]), n  # moved, same values
    with torch.no_grad():
        assert torch.equal(model(tokens), before)  # the same function, bit for bit
    # gradients still reach the moved parameters
    model.layers[0].attention.wqkv.requires_grad_(True)
    model(tokens).sum().backward()
    assert model.layers[0].attention.wqkv.grad is not None


def test_tied_embeddings_stay_tied():
    from model import Llama, ModelArgs

    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, tie_embeddings=True, max_seq_len=16)
    model = Llama(args).eval()
    assert model.output.weight is model.tok_embeddings.weight
    to_huge_pages(model, min_bytes=1)
    assert model.output.weight is model.tok_embeddings.weight
    with torch.no_grad():
        model.tok_embeddings.weight[3, 0] = 42.0  # one storage: a write shows through both
    assert model.output.weight[3, 0] == 42.0


def test_threshold_and_switch(monkeypatch):
    model, _ = tiny_meta_model()
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert to_huge_pages(model) == 0  # every tiny tensor is under the default 1 MiB
    monkeypatch.setenv("PARALLAMA_HUGEPAGES", "0")
    assert to_huge_pages(model, min_bytes=1) == 0
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_smollm2_weights_are_on_huge_pages(smollm2):
    """from_pretrained moved every large weight (wqkv, w13, w2, wo, the embeddings) into the arena; where THP is
    enabled, the kernel backs the mapping holding them with huge pages."""
    big = [p for p in smollm2.parameters() if p.nbytes >= HUGE // 2]
    ptrs = sorted(p.data_ptr() for p in big)
    assert len(big) == 30 * 4 + 1 and ptrs[0] % HUGE == 0
    span = max(p.data_ptr() + p.nbytes for p in big) - ptrs[0]
    assert span < sum(p.nbytes for p in big) + len(big) * 64  # one contiguous arena
    if not THP.exists() or "[never]" in THP.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    huge_kb, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) <= ptrs[0] < int(head.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            huge_kb = int(line.split()[1])
    assert huge_kb * 1024 >= sum(p.nbytes for p in big) // 2  # most of it (a kernel may split a few pages)
