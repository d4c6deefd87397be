"""Distillation benchmarks: stage-2 throughput and peak memory of a recipe, KD-loss memory at a large vocabulary, curve diffs.

    # stage 2 (KD) of the SmolLM2 recipe, 8 of 30 layers attention, seq 2048: tokens/s and peak memory (one GPU)
    python scripts/bench_distill.py throughput --out /tmp/bench1
    # the same on 2 GPUs under FSDP2 (same global batch, so the loss curve must match the one-GPU run)
    accelerate launch --config_file recipes/accelerate/fsdp2.yaml scripts/bench_distill.py throughput --out /tmp/bench2
    python scripts/bench_distill.py compare /tmp/bench1 /tmp/bench2
    # peak memory and time of the fused chunked KD loss against full logits, at vocabulary 128K
    python scripts/bench_distill.py loss-memory
    # where a stage-2 step's GPU time goes, kernel by kernel (after a warm-up run that autotunes the kernels)
    python scripts/bench_distill.py profile --out /tmp/profile

Each prints one JSON object. The library does the work; this file only chooses sizes and reads the results.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bench.kernel_profile import print_kernels, print_rows

from hybridize.losses import KDOptions, kd_loss, next_token_labels
from hybridize.distill.recipe import apply_override, parse_recipe, read_recipe
from hybridize.distill.trainer import StageRun, Trainer

REPO = Path(__file__).resolve().parents[1]


def kd_trainer(args, out: Path, steps: int) -> Trainer:
    """A Trainer for only the recipe's KD stage, `steps` steps long, writing to `out`."""
    raw = read_recipe(args.recipe)
    kd = next(stage for stage in raw["stages"] if stage["kind"] == "kd")
    raw["stages"] = [kd]
    for assignment in [f"output_dir={out}", f"stages.0.seq_len={args.seq_len}",
                       f"stages.0.micro_batch_size={args.micro_batch}",
                       f"stages.0.global_batch_size={args.global_batch}",
                       f"stages.0.tokens={steps * args.global_batch * args.seq_len}",
                       f"checkpoint.every_steps={10 * steps}", "logging.eval_sequences=8", "logging.trackers=[]",
                       *args.set]:
        apply_override(raw, assignment)
    return Trainer(parse_recipe(raw, f"recipe {args.recipe}"))


def throughput(args) -> dict:
    """Run only the recipe's KD stage for --steps steps and report the per-step rate after --warmup steps."""
    trainer = kd_trainer(args, Path(args.out), args.steps)
    trainer.run()
    if not trainer.main:
        return {}
    rows = [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"][args.warmup:]
    return {
        "bench": "throughput",
        "recipe": str(args.recipe),
        "processes": trainer.accelerator.num_processes,
        "distributed": str(trainer.accelerator.distributed_type),
        "seq_len": args.seq_len,
        "global_batch": args.global_batch,
        "micro_batch": args.micro_batch,
        "timed_steps": len(train),
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in train),
        "tokens_per_s_mean": len(train) * args.global_batch * args.seq_len / sum(r["seconds"] for r in train),
        "peak_memory_gib_rank0": max((r["peak_memory_gib"] for r in train if "peak_memory_gib" in r), default=None),
        "loss_first_last": [train[0]["loss"], train[-1]["loss"]],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def profile_steps(args) -> dict:
    """Kernel table of --steps KD steps, after a 2-step run in the same process has autotuned the Triton kernels.

    Only the trainer's step loop is profiled: loading the models onto the GPU and saving the result, which the
    run also does, are host-device copies that would otherwise fill the table."""
    kd_trainer(args, Path(args.out) / "warm-up", 2).run()
    profiled = kd_trainer(args, Path(args.out) / "profiled", args.steps)
    steps = StageRun._steps

    def profiled_steps(stage_run, bar):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            steps(stage_run, bar)
            torch.cuda.synchronize()
        print_rows(print_kernels(f"{args.steps} KD steps of {args.recipe}", prof, args.steps), args.steps, 40)

    StageRun._steps = profiled_steps
    try:
        profiled.run()
    finally:
        StageRun._steps = steps
    return {}


def naive_kd(hidden, head, teacher_hidden, teacher_head, labels, options):
    """Full-vocabulary logits of both models at once: the memory the fused loss avoids."""
    log_ps = F.log_softmax((hidden @ head.T).float() / options.temperature, -1)  # [N, V]
    with torch.no_grad():
        log_pt = F.log_softmax((teacher_hidden @ teacher_head.T).float() / options.temperature, -1)  # [N, V]
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * options.temperature**2


def loss_memory(args) -> dict:
    """Peak memory above the inputs, and median time, of forward + backward of the KD loss: fused chunked vs naive,
    and vs fla-core's fused KL loss where it is installed (the ratio of the two times in the same run).
    HYBRIDIZE_KERNELS=reference times the fused loss on its PyTorch per-row math instead of the Triton rows kernel."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype) * 0.02  # noqa: E731
    hidden = make(args.tokens, args.hidden).requires_grad_()
    head, teacher_head = make(args.vocab, args.hidden), make(args.vocab, args.hidden)
    teacher_hidden = make(args.tokens, args.hidden)
    labels = next_token_labels(torch.randint(0, args.vocab, (1, args.tokens), device=device, generator=g)).flatten()
    options = KDOptions(chunk_tokens=args.chunk)
    result = {"bench": "loss-memory", "vocab": args.vocab, "hidden": args.hidden, "tokens": args.tokens,
              "chunk_tokens": args.chunk, "dtype": str(dtype), "device": str(device),
              "kernels": os.environ.get("HYBRIDIZE_KERNELS", "auto")}
    variants = {"fused_chunked": lambda: kd_loss(hidden, head, teacher_hidden, teacher_head, labels, options).loss,
                "naive_full_logits": lambda: naive_kd(hidden, head, teacher_hidden, teacher_head, labels, options),
                **peer_kd(hidden, head, teacher_hidden, teacher_head)}
    for name, fn in variants.items():
        try:
            for _ in range(args.repeats + 1):  # the first call warms up (kernel compilation, allocator)
                hidden.grad = None
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                started = time.perf_counter()
                fn().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                result.setdefault(name, {"seconds": []})["seconds"].append(round(time.perf_counter() - started, 4))
            result[name]["seconds"] = statistics.median(result[name]["seconds"][1:])
            if device.type == "cuda":
                result[name]["peak_gib_above_inputs"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
        except torch.OutOfMemoryError:
            result[name] = {"out_of_memory": True}
    if "seconds" in result.get(PEER_KD, {}) and "seconds" in result["fused_chunked"]:
        ratio = result["fused_chunked"]["seconds"] / result[PEER_KD]["seconds"]
        result["fused_chunked_time_over_peer"] = round(ratio, 3)
    return result


PEER_KD = "fla_fused_kl_div"


def peer_kd(hidden, head, teacher_hidden, teacher_head) -> dict:
    """fla-core's fused KL loss where it is installed: the same forward KL (teacher || student) over the same hidden
    states and heads, chunked over tokens with the output head inside, mean over tokens, temperature 1 (the
    defaults timed above). Its kernels need a GPU."""
    if hidden.device.type != "cuda":
        return {}
    try:
        from fla.modules import FusedKLDivLoss
    except ImportError:
        return {}
    peer = FusedKLDivLoss("batchmean")
    return {PEER_KD: lambda: peer(hidden, teacher_hidden, head, teacher_head)}


def compare(args) -> dict:
    """Largest train-loss difference per step between two runs (e.g. one GPU against two under FSDP2)."""
    def losses(run):
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        return {(r["stage"], r["step"]): r["loss"] for r in rows if r["split"] == "train"}

    a, b = losses(args.run_a), losses(args.run_b)
    shared = sorted(set(a) & set(b))
    diffs = [abs(a[k] - b[k]) for k in shared]
    return {"bench": "compare", "steps_compared": len(shared), "max_abs_diff": max(diffs, default=None),
            "max_rel_diff": max((abs(a[k] - b[k]) / abs(a[k]) for k in shared), default=None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("throughput", help="stage-2 tokens/s and peak memory of a recipe")
    prof = commands.add_parser("profile", help="where a KD step's GPU time goes, kernel by kernel")
    for command in (run, prof):
        command.add_argument("--recipe", default=str(REPO / "recipes" / "smollm2-135m" / "gdn.yaml"))
        command.add_argument("--out", required=True, help="a new output directory for the run")
        command.add_argument("--seq-len", type=int, default=2048)
        command.add_argument("--global-batch", type=int, default=64)
        command.add_argument("--micro-batch", type=int, default=8)
        command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="further recipe overrides")
    run.add_argument("--steps", type=int, default=30)
    run.add_argument("--warmup", type=int, default=5, help="steps left out of the rate (compilation, autotuning)")
    prof.add_argument("--steps", type=int, default=2)
    memory = commands.add_parser("loss-memory", help="KD loss peak memory: fused chunked vs full logits")
    memory.add_argument("--vocab", type=int, default=128256)
    memory.add_argument("--hidden", type=int, default=2048)
    memory.add_argument("--tokens", type=int, default=16384, help="tokens per micro batch (8 x 2048)")
    memory.add_argument("--chunk", type=int, default=2048)
    memory.add_argument("--repeats", type=int, default=3, help="timed calls after a warm-up call (median)")
    diff = commands.add_parser("compare", help="train-loss differences between two runs")
    diff.add_argument("run_a")
    diff.add_argument("run_b")
    args = parser.parse_args()
    commands_by_name = {"throughput": throughput, "profile": profile_steps, "loss-memory": loss_memory, "compare": compare}
    result = commands_by_name[args.command](args)
    if result:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
