"""Where the hybrid's fast decode step spends GPU time: kernels per generated token, replayed as a CUDA graph.

    python scripts/profile_decode.py HYBRID_DIR [--batch 16] [--context 8192]
    python scripts/profile_decode.py HYBRID_DIR --layer-types window_gated_deltanet,sliding_attention,gated_deltanet

The bench (`hybridize bench`) says how fast decoding is; this says why: at batch 1-16 a 135M hybrid's step is
hundreds of tiny kernels, so the count and the slowest few matter more than bandwidth.

With --layer-types, each named type in turn fills every layer of a model of HYBRID_DIR's shape with random weights
(decode speed does not depend on their values): the static decoder's prefill and decode tokens/s for each, then the
kernel table of the first type's step. A head-wise type keeps the first KV head as attention in every layer.
"""

import argparse
import time

import torch
from bench.kernel_profile import print_kernel_table

from hybridize.model import HybridConfig, HybridForCausalLM
from hybridize.model.fast_decode import StaticDecoder


def decoder_for(model, args) -> tuple[StaticDecoder, torch.Tensor]:
    """A static decoder with room for three rounds of `steps` new tokens after one prefill (the kernel table's warm-up,
    profiled and timed rounds), and a random prompt [batch, context]."""
    decoder = StaticDecoder(model, args.batch, args.context + 3 * args.steps + 1)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device="cuda")
    return decoder, prompt


def speeds(decoder: StaticDecoder, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    """(prefill, decode) tokens/s of the second of two prefill + `steps` decode rounds (the first warms up)."""
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        decoder.prefill(prompt)
        torch.cuda.synchronize()
        prefilled = time.perf_counter()
        decoder.decode(steps)
        torch.cuda.synchronize()
        done = time.perf_counter()
    return prompt.numel() / (prefilled - start), prompt.shape[0] * steps / (done - prefilled)


def model_of_type(config: HybridConfig, kind: str, device: str = "cuda") -> HybridForCausalLM:
    """A bf16 model of config's shape with every layer `kind` and random weights."""
    options = config.to_dict()
    for key in ("architectures", "auto_map", "dtype", "transformers_version"):
        options.pop(key, None)
    layers = config.num_hidden_layers
    options["layer_types"] = [kind] * layers
    options["headwise_kv_heads"] = {str(i): [0] for i in range(layers)} if kind.startswith("headwise_") else {}
    return HybridForCausalLM(HybridConfig(**options)).to(device, torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hybrid")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--layer-types", default=None, help="comma-separated; default: the hybrid as it is")
    args = parser.parse_args()
    if args.layer_types is None:
        model = HybridForCausalLM.from_pretrained(args.hybrid, dtype=torch.bfloat16).cuda()
        profiled = f"decode, batch {args.batch}, context {args.context}, {args.steps} steps (CUDA graph replays)"
    else:
        config = HybridConfig.from_pretrained(args.hybrid)
        for kind in args.layer_types.split(","):
            decoder, prompt = decoder_for(model_of_type(config, kind), args)
            prefill, decode = speeds(decoder, prompt, args.steps)
            print(f"{kind}: prefill {prefill:,.0f} tokens/s, decode {decode:,.0f} tokens/s "
                  f"({args.batch * 1e3 / decode:.2f} ms a step), compiled step {decoder.compiled}", flush=True)
            del decoder
            torch.cuda.empty_cache()
        first = args.layer_types.split(",")[0]
        model = model_of_type(config, first)
        profiled = f"{first} decode, batch {args.batch}, context {args.context}, {args.steps} steps"
    decoder, prompt = decoder_for(model, args)
    decoder.prefill(prompt)
    print_kernel_table(profiled, lambda: decoder.decode(args.steps), repeats=1, rows=30)


if __name__ == "__main__":
    main()
