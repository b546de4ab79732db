"""Paged-cache steps against the no-cache full forward (the reference)."""

from __future__ import annotations

import pytest
import torch

from infer.cache import BlockTable, CacheFullError, PagedKVCache
from model import Llama, ModelArgs
from tests.tolerance import MODEL_PATH, assert_close


def tiny(n_kv_heads: int, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    args = ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=n_kv_heads, vocab_size=101, max_seq_len=128)
    model = Llama(args).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("n_kv_heads", [6, 2])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@torch.no_grad()
def test_ragged_prefill_then_decode_matches_full_forward(n_kv_heads, block_size):
    model = tiny(n_kv_heads)
    lens = [5, 17, 33, 1]
    total = [n + 6 for n in lens]
    seqs = [torch.randint(0, 101, (n,)) for n in total]
    cache = PagedKVCache(model.args, num_blocks=64 * 32 // block_size, block_size=block_size)
    tables = [BlockTable() for _ in seqs]
    # prefill all prompts in one packed step, every row's logits
    step = cache.prepare_step(tables, lens, all_logits=True)
    tokens = torch.cat([s[:n] for s, n in zip(seqs, lens)])
    got = model.forward_step(tokens, step, cache.k, cache.v)
    ref = torch.cat([model(s[None, :n])[0] for s, n in zip(seqs, lens)])
    assert_close(got, ref, MODEL_PATH)
    # decode: one row per sequence, lengths differ
    for t in range(6):
        step = cache.prepare_step(tables, [1] * len(seqs))
        tokens = torch.stack([s[n + t] for s, n in zip(seqs, lens)])
        got = model.forward_step(tokens, step, cache.k, cache.v)
        ref = torch.stack([model(s[None, : n + t + 1])[0, -1] for s, n in zip(seqs, lens)])
        assert_close(got, ref, MODEL_PATH)
    for table in tables:
        cache.free(table)
    assert cache.allocator.num_free == cache.num_blocks


@torch.no_grad()
def test_fork_shares_blocks_and_copies_on_write():
    model = tiny(2)
    cache = PagedKVCache(model.args, num_blocks=8, block_size=4)
    prompt = torch.randint(0, 101, (6,))
    parent = BlockTable()
    model.forward_step(prompt, cache.prepare_step([parent], [6]), cache.k, cache.v)
    child = cache.fork(parent)
    assert child.blocks == parent.blocks and cache.allocator.refcount[parent.blocks[1]] == 2
    free_before = cache.allocator.num_free
    a, b = torch.tensor([7]), torch.tensor([9])
    la = model.forward_step(a, cache.prepare_step([parent], [1]), cache.k, cache.v)
    lb = model.forward_step(b, cache.prepare_step([child], [1]), cache.k, cache.v)
    assert cache.allocator.num_free == free_before - 1  # one copy of the shared partial block
    assert parent.blocks[0] == child.blocks[0] and parent.blocks[1] != child.blocks[1]
    assert_close(la[0], model(torch.cat([prompt, a])[None])[0, -1], MODEL_PATH)
    assert_close(lb[0], model(torch.cat([prompt, b])[None])[0, -1], MODEL_PATH)
    cache.free(parent)
    cache.free(child)
    assert cache.allocator.num_free == 8


def test_full_cache_reserves_nothing():
    model = tiny(2)
    cache = PagedKVCache(model.args, num_blocks=2, block_size=4)
    tables = [BlockTable(), BlockTable()]
    with pytest.raises(CacheFullError):
        cache.prepare_step(tables, [5, 4])
    assert cache.allocator.num_free == 2 and all(t.num_tokens == 0 for t in tables)


def test_freed_blocks_are_handed_out_again_in_ascending_order():
    """A lone sequence keeps consecutive block ids across requests (the cpu backend attends in place)."""
    cache = PagedKVCache(tiny(2).args, num_blocks=8, block_size=4)
    first = BlockTable()
    cache.reserve(first, 13)
    assert first.blocks == [0, 1, 2, 3]
    cache.free(first)
    again = BlockTable()
    assert cache.prepare_step([again], [9]).contiguous_kv == (0, 9)  # blocks 0, 1, 2: attended in place
    assert again.blocks == [0, 1, 2]
    other = BlockTable()
    cache.prepare_step([other], [3])  # block 3
    assert cache.prepare_step([again], [4]).contiguous_kv is None  # 0, 1, 2 then 4: not consecutive
    assert cache.prepare_step([again, other], [1, 1]).contiguous_kv is None  # two sequences
