from setuptools import find_packages, setup

setup(
    name="parallama",
    version="0.1.0",
    description="A minimal LLaMA in PyTorch with PARA adapters fused into Triton kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["model*", "kernels*", "weights*", "infer*", "train*"]),
    install_requires=[
        # Ranges for installing into your own environment; `make` installs the exact versions in
        # requirements.lock instead. On a CPU machine install torch first: an unpinned torch would
        # pull the multi-GB CUDA build, and an installed one satisfies this range.
        "torch>=2.5",
        "triton>=3.2",
        "safetensors>=0.4",
        "numpy>=1.26",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "tiktoken>=0.7",
        "gguf>=0.10",
        "jinja2>=3.1",  # chat templates shipped in GGUF/HF metadata are Jinja
        "tqdm>=4.66",
    ],
    extras_require={
        # test oracles and benchmark peers; never imported by the packages above
        "dev": [
            "pytest>=8",
            "pytest-randomly>=3.15",  # random test order, seed printed: order dependence shows up in CI
            "hypothesis>=6",
            "transformers>=4.46",
            "peft>=0.13",
            "accelerate>=1.0",
            "ruff>=0.6",
            "import-linter>=2.1",  # the layering contract in pyproject.toml (make lint)
            "openai>=1.40",  # the official client drives the server in tests
            "httpx>=0.27",  # raw HTTP against the server in tests and bench/serve.py
        ],
        # the OpenAI-compatible server (python -m infer.serve)
        "serve": [
            "fastapi>=0.110",
            "uvicorn>=0.30",
        ],
    },
)
