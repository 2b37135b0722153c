"""Writes the built-in identity_pref / identity_pref_eval datasets (committed; rerun only to regenerate).

Each identity question becomes a preference pair: chosen = the identity answer with {{name}}/{{author}} (filled in
at load time, as for `identity`), rejected = what the embedded SmolLM2-135M-Instruct itself answers (greedy, system
prompt "You are a helpful assistant.", 64 new tokens), i.e. on-policy rejected samples. Every fourth question is
held out into identity_pref_eval.

    python scripts/make_identity_pref.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.chat.engine import load_engine
from tuneforge.config.schema import GenerationConfig, ModelConfig
from tuneforge.data.types import Message

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "tuneforge" / "data" / "builtin"
SYSTEM = "You are a helpful assistant."


def main() -> None:
    rows = json.loads((BUILTIN / "identity.json").read_text(encoding="utf-8"))
    engine = load_engine(ModelConfig(), "auto", SYSTEM)
    gen = GenerationConfig(max_new_tokens=64, temperature=0.0, system=SYSTEM)
    prompts = [[Message("user", r["instruction"])] for r in rows]
    answers = []
    for start in range(0, len(prompts), 8):
        answers += [c.text for c in engine.generate_batch(prompts[start:start + 8], gen, adapter=False)]
    pairs = [{"conversations": [{"from": "human", "value": r["instruction"]}],
              "chosen": {"from": "gpt", "value": r["output"]}, "rejected": {"from": "gpt", "value": a}}
             for r, a in zip(rows, answers)]
    train = [p for i, p in enumerate(pairs) if i % 4 != 3]
    held_out = [p for i, p in enumerate(pairs) if i % 4 == 3]
    for name, part in (("identity_pref.json", train), ("identity_pref_eval.json", held_out)):
        (BUILTIN / name).write_text(json.dumps(part, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {len(part)} pairs to {BUILTIN / name}")


if __name__ == "__main__":
    main()
