"""Adapter fine-tuning: `data` (JSONL → batches), `evaluate` (losses, beam-search test scoring), `ddp`
(data parallelism over adapter gradients), `checkpoint` (atomic resume state), `finetune` (the loop and CLI)."""
