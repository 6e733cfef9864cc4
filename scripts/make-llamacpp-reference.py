#!/usr/bin/env python3
"""Record llama.cpp's tokenization and greedy continuation of a few prompts, as the reference
turbine's tokenizer and forward pass are tested against.

Run with the reference venv (llama-cpp-python installed):

    ~/.cache/turbine/refvenv/bin/python scripts/make-llamacpp-reference.py \
        [MODEL.gguf] [OUT.json]

Defaults: the default model (~/.cache/turbine/models/SmolLM2-135M-Instruct.Q4_1.gguf, or
$TURBINE_MODEL_DIR/...) and tests/fixtures/llamacpp_reference.json.

Output schema (JSON):
{
  "llama_cpp_version": str,      # llama_cpp.__version__ that produced the file
  "model_file": str,             # file name of the GGUF (no directory)
  "n_greedy": int,               # number of greedy tokens per prompt (32)
  "prompts": [{
      "name": str,               # short label
      "text": str,               # the exact prompt text
      "add_bos": bool,           # whether a BOS token was prepended (the model's
                                 #   tokenizer.ggml.add_bos_token, false for SmolLM2)
      "prompt_ids": [int],       # llm.tokenize(text.encode(), add_bos=add_bos, special=True):
                                 #   special tokens written in the text (e.g. <|im_start|>)
                                 #   are matched as single tokens
      "greedy_ids": [int],       # exactly n_greedy tokens: at each step the argmax of the
                                 #   last position's logits, fed back; generation does NOT
                                 #   stop at EOS (it is a pure forward-pass reference)
      "greedy_top2_gap": [float] # per greedy step, logit(top1) - logit(top2); a tiny gap
                                 #   means the step is a near-tie that fp differences may flip
  }]
}
"""

import json
import os
import sys
from pathlib import Path

import jinja2
import llama_cpp
import numpy as np

N_GREEDY = 32
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> Path:
    base = os.environ.get("TURBINE_MODEL_DIR")
    if base:
        return Path(base) / MODEL_NAME
    cache = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(cache) / "turbine" / "models" / MODEL_NAME


def render_chat(template: str, messages, bos: str, eos: str) -> str:
    """Apply the GGUF's own chat template with jinja2 (as HF transformers does)."""

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
    )


def greedy(llm: llama_cpp.Llama, prompt_ids, n: int):
    """Greedy decoding with the low-level eval loop: argmax over the last logits each step
    (ties broken towards the lower token id)."""
    llm.reset()
    llm.eval(prompt_ids)
    out, gaps = [], []
    for _ in range(n):
        # With logits_all=False llama.cpp computes logits for the last position of each
        # batch only; read them straight from the context (Llama.scores stays unfilled).
        raw = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        logits = raw.astype(np.float64)
        order = np.argsort(-logits, kind="stable")
        tok = int(order[0])
        out.append(tok)
        gaps.append(float(logits[order[0]] - logits[order[1]]))
        llm.eval([tok])
    return out, gaps


def main() -> None:
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else default_model()
    root = Path(__file__).resolve().parent.parent
    out_path = (
        Path(sys.argv[2]) if len(sys.argv) > 2 else root / "tests" / "fixtures" / "llamacpp_reference.json"
    )

    llm = llama_cpp.Llama(
        str(model), n_ctx=2048, n_threads=2, seed=0, logits_all=False, verbose=False
    )
    meta = llm.metadata
    add_bos = meta.get("tokenizer.ggml.add_bos_token", "true") == "true"
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    eos = llm.detokenize([llm.token_eos()], special=True).decode()

    chat_text = render_chat(
        meta["tokenizer.chat_template"],
        [{"role": "user", "content": "What is the capital of France?"}],
        bos,
        eos,
    )
    prompts = [
        ("plain", "The quick brown fox jumps over the lazy dog. Once upon a time,"),
        (
            "code",
            "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
        ),
        ("chat", chat_text),
        (
            "unicode",
            "Café naïve résumé — 東京は日本の首都です。 Emoji: 🦀🚀👍🏽 ¡Hola! Ελληνικά, русский, العربية.",
        ),
        (
            "long",
            "The history of computing is a story of abstraction layered upon abstraction. "
            "In the 1940s, engineers programmed machines by rewiring plugboards; by the 1950s, "
            "assembly languages let them name instructions, and FORTRAN (1957) let scientists "
            "write formulas. Operating systems arrived to share expensive hardware among many "
            "users, and in 1969 the ARPANET connected four computers. Personal computers in the "
            "1980s, the World Wide Web in the 1990s, and smartphones in the 2000s each widened "
            "the circle of people who compute.   Numbers: 3.14159, 1,000,000 and 2024-06-01; "
            "contractions: don't, it's, we'll, they're, I'd.\n\nIn summary,",
        ),
        ("whitespace", "  leading spaces\n\n\ttabs\tand   multiple    spaces  \n"),
    ]

    records = []
    for name, text in prompts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        greedy_ids, gaps = greedy(llm, ids, N_GREEDY)
        records.append(
            {
                "name": name,
                "text": text,
                "add_bos": add_bos,
                "prompt_ids": [int(t) for t in ids],
                "greedy_ids": greedy_ids,
                "greedy_top2_gap": [round(g, 4) for g in gaps],
            }
        )
        print(f"{name}: {len(ids)} prompt ids, greedy -> {llm.detokenize(greedy_ids)!r}")

    doc = {
        "llama_cpp_version": llama_cpp.__version__,
        "model_file": model.name,
        "n_greedy": N_GREEDY,
        "prompts": records,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
