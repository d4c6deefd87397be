"""`hybridize demo`: convert the embedded teacher with the default plan and show, on CPU, what the toolkit reports."""

import argparse
import dataclasses
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .convert.pipeline import convert_to_folder
from .evaluate import bench, quality
from .teacher import DEFAULT_TEACHER, load_teacher

DEFAULT_PLAN = "h2:8"
PROMPT = "def fibonacci(n):\n    "
# Lighter than eval/bench --small (one greedy prompt per domain, 16 tokens; batch 1 only): the whole demo takes under
# a minute on 2 idle CPU cores, and CPU time shared with other jobs can stretch that many times over (README).
DEMO_QUALITY = dataclasses.replace(quality.QualitySettings.small(), greedy_prompts=1, greedy_new_tokens=16)
DEMO_BENCH = dataclasses.replace(bench.BenchSettings.small(), batch_sizes=(1,))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", default=DEFAULT_PLAN, help=f"plan spec (default {DEFAULT_PLAN}: 8 of 30 attention)")
    parser.add_argument("--out", default="out/demo-hybrid", help="where the converted hybrid is written")


def _greedy(model, tokenizer, prompt: str, new_tokens: int = 16) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:])


def run(args: argparse.Namespace) -> int:
    print(f"== 1. convert the embedded teacher ({DEFAULT_TEACHER}) with plan {args.plan}")
    folder = convert_to_folder(None, args.plan, Path(args.out), overwrite=True)
    print("\n== 2. load the folder with AutoModelForCausalLM (no teacher needed) and generate with its cache")
    hybrid = AutoModelForCausalLM.from_pretrained(folder).eval()
    teacher, tokenizer = load_teacher(None)
    print(f"prompt : {PROMPT!r}")
    print(f"teacher: {_greedy(teacher, tokenizer, PROMPT)!r}")
    print(f"hybrid : {_greedy(hybrid, tokenizer, PROMPT)!r}   (untrained: distillation closes this gap)")
    print("\n== 3. hybridize eval, CPU-sized: held-out quality per domain, hybrid vs teacher")
    with torch.inference_mode():
        print(quality.compare(hybrid, teacher, tokenizer, settings=DEMO_QUALITY)[1])
    print("\n== 4. hybridize bench, CPU-sized: prefill/decode speed and cache size, hybrid vs teacher")
    print(bench.small_bench(hybrid, teacher, tokenizer, settings=DEMO_BENCH)[1])
    print("(At these CPU-sized contexts a fixed recurrent state can outweigh a short KV cache; the cache and decode\n"
          " gains grow with context: docs/benchmarks.md has the GPU figures at 1K-8K.)")
    print("\nNext: hybridize analyze, distill, eval, bench and push on a GPU (README.md, Commands).")
    return 0
