"""Benchmarks: `decode.py` (the CLI) over `measure.py`, `report.py`, `parallama_rows.py` and `peers.py`;
`kernels.py` (the Triton kernels against their twins). Run them as scripts (`python bench/decode.py`) or
modules (`python -m bench.decode`)."""
