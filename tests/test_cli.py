"""`python -m infer.generate`: output format and one-line errors with a non-zero exit."""

from __future__ import annotations

import json

import pytest

from infer.generate import main


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
