"""Instruction data: JSONL `{"prompt", "response"}` lines → token ids with per-example prompt lengths,
length-grouped batch orders and right-padded batches whose targets are the response tokens only.

Layout of one example: `prompt_ids + response_ids + [eos]`. Prompt and response are tokenized separately,
so the prompt is exactly what generation is given at test time; with `chat` the prompt is the model's chat
template around one user turn, ending in the assistant header. PARA pools at `prompt_len - 1`.

Too long (`max_len`): an example keeps its whole prompt and loses the tail of its response (counted in
`Dataset.truncated` and warned about); one whose prompt leaves no room for a single response token is an
error, like a malformed line. Bad lines raise `DataError` naming file:line, or are skipped and reported
(`skip_bad=True`). Blank lines are ignored; extra fields of a record are kept (a test metric may use them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from infer.pillow.pool import check_record  # the {"prompt", "response"} record, as a pool holds them
from weights.io import read_jsonl as read_jsonl_file

IGNORE = -100  # target of positions that are not scored (prompt and padding)


class DataError(ValueError):
    """Bad data: the one-line message names the file and line (or field)."""


@dataclass
class Example:
    ids: list[int]  # prompt + response (+ eos)
    prompt_len: int
    where: str  # "file:line"
    record: dict[str, Any]  # the JSON object as read

    @property
    def n_targets(self) -> int:
        return len(self.ids) - self.prompt_len


@dataclass
class Dataset:
    path: str
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)  # one message per skipped line
    truncated: int = 0  # examples whose response was cut to fit max_len

    def __len__(self) -> int:
        return len(self.examples)


def read_jsonl(path: str | os.PathLike[str], skip_bad: bool = False) -> tuple[list[tuple[str, dict]], list[str]]:
    """([(file:line, record)], messages of skipped lines). A record needs string "prompt" and "response"."""
    return read_jsonl_file(path, DataError, check_record, skip_bad, hint=" (pass --skip-bad to skip bad lines)")


def encode(tokenizer: Any, prompt: str, response: str, chat: bool) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + eos) as training and test evaluation see them."""
    if chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    else:
        prompt_ids = tokenizer.encode(prompt)
    response_ids = tokenizer.encode(response, bos=False)
    if tokenizer.eos_id is not None:
        response_ids.append(tokenizer.eos_id)
    return prompt_ids, response_ids


def load_dataset(
    path: str | os.PathLike[str], tokenizer: Any, *, chat: bool, max_len: int, skip_bad: bool = False
) -> Dataset:
    """Read and tokenize a JSONL file; see the module docstring for the length and bad-line rules."""
    records, skipped = read_jsonl(path, skip_bad)
    examples, truncated = [], 0
    for where, rec in records:
        prompt_ids, response_ids = encode(tokenizer, rec["prompt"], rec["response"], chat)
        if not prompt_ids:
            msg = f'{where}: field "prompt" encodes to no tokens'
        elif len(prompt_ids) >= max_len:
            msg = f"{where}: prompt of {len(prompt_ids)} tokens leaves no room for the response (max length {max_len})"
        else:
            msg = None
        if msg is not None:
            if not skip_bad:
                raise DataError(f"{msg} (pass --skip-bad to skip bad lines)")
            skipped.append(msg)
            continue
        ids = prompt_ids + response_ids
        if len(ids) > max_len:
            ids, truncated = ids[:max_len], truncated + 1
        examples.append(Example(ids, len(prompt_ids), where, rec))
    if not examples:
        extra = f" ({len(skipped)} bad line(s) skipped)" if skipped else ""
        raise DataError(f"{path}: no examples{extra}")
    return Dataset(str(path), examples, skipped, truncated)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, mega: int = 50) -> list[list[int]]:
    """A seeded epoch order: shuffle, sort each run of `mega` batches by length (little padding), cut into
    batches, shuffle the batches. Every index appears once; only the last batch may be short."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    span = batch_size * mega
    batches = []
    for s in range(0, len(perm), span):
        group = sorted(perm[s : s + span], key=lambda i: -lengths[i])
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    # the one short batch (if any) stays last, so every other optimizer step sees a full batch
    short = [batches.pop()] if len(batches) > 1 and len(batches[-1]) < batch_size else []
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order] + short


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation order: by length, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) int64, right-padded
    targets: torch.Tensor  # (B, T) int64: tokens[b, t+1] where that token is a response token, else IGNORE
    prompt_lens: torch.Tensor  # (B,) int64
    n_tokens: int  # real (unpadded) tokens
    n_targets: int  # scored tokens

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.tokens.to(device), self.targets.to(device), self.prompt_lens.to(device), self.n_tokens, self.n_targets
        )


def collate(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    """Right-pad to the longest example; only response positions are targets."""
    T = max(len(e.ids) for e in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        tokens[b, : len(ids)] = ids
        targets[b, e.prompt_len - 1 : len(ids) - 1] = ids[e.prompt_len :]  # position t predicts token t+1
    prompt_lens = torch.tensor([e.prompt_len for e in examples], dtype=torch.long)
    return Batch(tokens, targets, prompt_lens, sum(len(e.ids) for e in examples), sum(e.n_targets for e in examples))
