"""PILLOW (PARA.md §5) at inference: an RL-trained matching network picks m exemplars from a prompt pool and
prepends them to each query. Training lives in `train.pillow`, which builds on this package.

`pool` (pool files, embeddings and their cache), `matcher` (the matching network, the nearest / random baselines,
matcher files), `selector` (few-shot prompts and `Pillow`, the inference-time selector).
"""

from infer.pillow.matcher import (
    CONFIG,
    FORMAT,
    WEIGHTS,
    Matcher,
    Rollout,
    load_matcher,
    mlp,
    nearest_choices,
    random_choices,
    save_matcher,
)
from infer.pillow.pool import (
    PillowError,
    Pool,
    Record,
    banned_mask,
    cached_embeddings,
    check_record,
    check_shots,
    default_cache_dir,
    embed_texts,
    exemplar_text,
    fingerprint_sha,
    hidden_mean,
    load_pool,
    q_id,
    read_records,
    texts_sha256,
)
from infer.pillow.selector import Pillow, few_shot_prompt

__all__ = [
    "CONFIG",
    "FORMAT",
    "WEIGHTS",
    "Matcher",
    "Pillow",
    "PillowError",
    "Pool",
    "Record",
    "Rollout",
    "banned_mask",
    "cached_embeddings",
    "check_record",
    "check_shots",
    "default_cache_dir",
    "embed_texts",
    "exemplar_text",
    "few_shot_prompt",
    "fingerprint_sha",
    "hidden_mean",
    "load_matcher",
    "load_pool",
    "mlp",
    "nearest_choices",
    "q_id",
    "random_choices",
    "read_records",
    "save_matcher",
    "texts_sha256",
]
