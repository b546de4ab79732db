"""`python -m infer.generate`: output format and one-line errors with a non-zero exit."""

from __future__ import annotations

import json

import pytest
import torch

from infer.generate import main
from weights.adapters import save_adapter


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--beams", "0", "--prompt", "x"], "beams must be >= 1"),
        (["--top-p", "0", "--prompt", "x"], "top_p"),
        (["--model", "no-such-model", "--prompt", "x"], "unknown model source 'no-such-model'"),
        (["--prompt", "word " * 9000], "exceeds the context"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(argv, message, capsys, gguf_path):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_json_output_batches_prompts(capsys, smollm2):
    prompts = ["The capital of France is", "1, 2, 3,"]
    argv = ["--json", "--max-new-tokens", "6"] + [a for p in prompts for a in ("--prompt", p)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["prompt_ids"] for r in rows] == [smollm2.tokenizer.encode(p) for p in prompts]
    for r in rows:
        assert len(r["output_ids"]) == 6 and r["text"] == smollm2.tokenizer.decode(r["output_ids"])
    assert "Paris" in rows[0]["text"]


def test_chat_streams_text(capsys, smollm2):
    assert main(["--chat", "--max-new-tokens", "12", "--prompt", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_adapter_per_prompt(tmp_path, capsys, smollm2):
    """--adapter once per prompt ('none' = base): each row equals the engine run with that adapter."""
    from infer.engine import Engine
    from infer.sampling import SamplingParams
    from model.peft import LoRAConfig, PARAConfig, create_adapter

    torch.manual_seed(0)
    para, lora = create_adapter(smollm2, PARAConfig()), create_adapter(smollm2, LoRAConfig(r=4))
    with torch.no_grad():
        for layer in para.layers:
            # VG reads the RMS-normalised pool (pre-activations ~0.5): W_up ~ N(0, 0.2) moves l by ~0.1-0.3
            layer["para"].up.weight.normal_(0, 0.2)
        for layer in lora.layers:
            for ab in layer.values():
                ab.lora_B.weight.normal_(0, 0.05)
    save_adapter(para, tmp_path / "para")
    save_adapter(lora, tmp_path / "lora")
    prompts = ["The capital of France is", "1, 2, 3,", "Once upon a time"]
    dirs = [str(tmp_path / "para"), "none", str(tmp_path / "lora")]
    argv = ["--json", "--max-new-tokens", "5"]
    argv += [a for p, d in zip(prompts, dirs) for a in ("--prompt", p, "--adapter", d)]
    assert main(argv) == 0
    rows = [json.loads(line)["output_ids"] for line in capsys.readouterr().out.strip().splitlines()]
    engine = Engine(smollm2, num_blocks=64)
    engine.add_adapter("para", para)
    engine.add_adapter("lora", lora)
    params = SamplingParams(max_new_tokens=5)
    expected = [engine.generate(p, params, adapters=[n])[0].token_ids for p, n in zip(prompts, ["para", None, "lora"])]
    assert rows == expected
    assert rows[0] != engine.generate(prompts[0], params)[0].token_ids  # the adapter was really applied

    assert main(["--prompt", "a", "--prompt", "b", "--prompt", "c", "--adapter", "x", "--adapter", "y"]) == 2
    assert "--adapter given 2 times for 3 prompts" in capsys.readouterr().err
    assert main(["--prompt", "a", "--adapter", str(tmp_path / "missing")]) == 2
    assert "not an adapter directory" in capsys.readouterr().err


def test_device_and_dtype_reach_the_model(monkeypatch, capsys, smollm2):
    """--device / --dtype go to Llama.from_pretrained; a bad pair exits 2 with one line before any load."""
    from model import Llama
    from tests.serve_helpers import tiny_model

    tiny, seen = tiny_model(smollm2.tokenizer), {}  # fast steps, the real tokenizer
    monkeypatch.setattr(Llama, "from_pretrained", lambda source, **kw: seen.update(source=source, **kw) or tiny)
    assert main(["--json", "--dtype", "bfloat16", "--max-new-tokens", "2", "--prompt", "Hi"]) == 0
    assert (seen["dtype"], seen["device"]) == (torch.bfloat16, torch.device("cpu"))
    assert main(["--json", "--max-new-tokens", "2", "--prompt", "Hi"]) == 0
    assert (seen["dtype"], seen["device"]) == (torch.float32, torch.device("cpu"))  # the defaults
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--dtype", "float64", "--prompt", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "float64" in err
    seen.clear()
    assert main(["--device", "tpu0", "--prompt", "x"]) == 2
    assert "not a device" in capsys.readouterr().err and not seen
    if not torch.cuda.is_available():
        assert main(["--device", "cuda", "--prompt", "x"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err and not seen
