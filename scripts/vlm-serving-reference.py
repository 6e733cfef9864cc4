#!/usr/bin/env python3
"""Writes tests/fixtures/tiny-idefics3/serving.json: what a client of the served fixture model
should read back, for the serving tests (tests/vlm_e2e.rs through the official openai client).

Per image: the question, transformers' greedy tokens (from reference.json, written by
scripts/make-vlm-fixture.py with `generate(do_sample=False)`), and their text as the HF
`tokenizers` library decodes them with special tokens skipped (what a chat completion's
`content` shows). Needs only `tokenizers`:

    /root/.cache/turbine/ref-venv/bin/pip install tokenizers
    /root/.cache/turbine/ref-venv/bin/python scripts/vlm-serving-reference.py tests/fixtures/tiny-idefics3
"""

import json
import sys
from pathlib import Path

import tokenizers


def main() -> None:
    fixture = Path(sys.argv[1])
    ref = json.loads((fixture / "reference.json").read_text())
    tok = tokenizers.Tokenizer.from_file(str(fixture / "tokenizer.json"))
    eos = tok.token_to_id("<end_of_utterance>")
    out = {
        "tokenizers": tokenizers.__version__,
        "source": "reference.json (transformers generate, greedy)",
        "eos_token_id": eos,
        "images": {},
    }
    for name, r in ref["images"].items():
        ids = r["greedy_tokens"]
        assert eos not in ids, "an EOS inside the reference would end the served answer early"
        out["images"][name] = {
            "image": r["image"],
            "question": r["question"],
            "greedy_tokens": ids,
            "text": tok.decode(ids, skip_special_tokens=True),
            "prompt_tokens": len(r["prompt_ids"]),
        }
    (fixture / "serving.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v["text"] for k, v in out["images"].items()}))


if __name__ == "__main__":
    main()
