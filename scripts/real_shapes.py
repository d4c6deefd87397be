"""Random-weight teachers with the exact configs of real Llamas, saved in bf16 the way the Hub stores them.

    python scripts/real_shapes.py teacher --shape llama3.2-1b --out /tmp/llama-1b --tokenizer DIR
    python scripts/real_shapes.py text --out /tmp/docs.jsonl         # local training text (stdlib code, KJV prose)

The tokenizer is any local one (the embedded SmolLM2's, say); the model keeps the real vocabulary of 128256, so the
embedding, the LM head and the KD loss have their real sizes. Special-token ids are the tokenizer's. Used by
scripts/gpu/real_shapes.sh; the library does the work.
"""

import argparse
import json
import sys
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hybridize.corpus import documents

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# The published config.json of each model, less the token ids (taken from the tokenizer used); vocabulary and
# context are Llama 3's unless a shape names its own.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, vocab_size=49152,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                        rope_parameters={**LLAMA3_ROPE, "factor": 32.0}),
    "llama3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                        rope_parameters={**LLAMA3_ROPE, "factor": 32.0}),
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                        rope_parameters={**LLAMA3_ROPE, "factor": 8.0}),
}


def save_teacher(args) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(**{"vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                            "hidden_act": "silu", "bos_token_id": tokenizer.bos_token_id,
                            "eos_token_id": tokenizer.eos_token_id, **SHAPES[args.shape]})
    started = time.perf_counter()
    torch.manual_seed(0)
    # Initialized on the GPU when there is one: an 8B init on the CPU takes minutes.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.out, max_shard_size="5GB")  # sharded with an index, as the Hub stores them
    tokenizer.save_pretrained(args.out)
    return {"shape": args.shape, "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - started, 1)}


def save_text(args) -> dict:
    picked = list(documents("code", "train")) + list(documents("prose", "train"))
    with open(args.out, "w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in picked)
    return {"documents": len(picked)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    teacher = commands.add_parser("teacher")
    teacher.add_argument("--shape", choices=sorted(SHAPES), required=True)
    teacher.add_argument("--out", required=True)
    teacher.add_argument("--tokenizer", required=True, help="a local tokenizer folder")
    text = commands.add_parser("text")
    text.add_argument("--out", required=True)
    args = parser.parse_args()
    print(json.dumps({"teacher": save_teacher, "text": save_text}[args.command](args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
