"""Can a layer type learn to retrieve what has left its window? Tiny models trained from scratch on associative recall.

    python scripts/mqar_past_window.py --steps 600 full_attention sliding_attention gated_deltanet window_gated_deltanet

Each sequence holds `--pairs` key-value pairs, then `--filler` filler tokens, then the same keys in a new order, each
to be answered with its value. With the default `--window 8` every pair is at least `--filler` tokens behind its
query, so a sliding window alone can only guess (1 in 20), and whatever beats that was carried past the window. Two
layers of each type, one seed, AdamW at 3e-3, the loss on the answers only; prints the answer accuracy on 512
held-out sequences. Models built from a config start with their own init (a window + memory layer with its memory
open). On the CPU it runs the PyTorch references; on a GPU, the Triton kernels.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from hybridize.model import HybridConfig, HybridForCausalLM

KEYS, VALUES = 20, 20  # token ids: 0-1 unused, keys 2..21, values 22..41, filler from 42 to the vocabulary's end
VOCAB = 64


def recall_batch(size: int, pairs: int, filler: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [size, 4 * pairs + filler], labels of the same shape: each answer's value at its query key, else -100)."""
    keys = torch.stack([torch.randperm(KEYS, generator=generator)[:pairs] for _ in range(size)]) + 2
    values = torch.randint(2 + KEYS, 2 + KEYS + VALUES, (size, pairs), generator=generator)
    fill = torch.randint(2 + KEYS + VALUES, VOCAB, (size, filler), generator=generator)
    order = torch.stack([torch.randperm(pairs, generator=generator) for _ in range(size)])
    asked, answers = keys.gather(1, order), values.gather(1, order)
    ids = torch.cat([torch.stack([keys, values], -1).flatten(1), fill, torch.stack([asked, answers], -1).flatten(1)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 2 * pairs + filler + 1 :: 2] = answers
    return ids, labels


def model_of(layer_type: str, window: int, device: str) -> HybridForCausalLM:
    config = HybridConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=[layer_type] * 2,
                          sliding_window=window, max_position_embeddings=256, conv_kernel_size=4, gdn_num_heads=4,
                          gdn_num_k_heads=4, gdn_head_k_dim=16, gdn_head_v_dim=16)
    return HybridForCausalLM(config).to(device)


def answer_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]  # [B, T - 1, V]: position t predicts token t + 1
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)


def train_and_score(layer_type: str, args) -> tuple[float, float]:
    """(last training loss, held-out answer accuracy)."""
    torch.manual_seed(args.seed)
    model = model_of(layer_type, args.window, args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        ids, labels = recall_batch(args.batch, args.pairs, args.filler, generator)
        loss = answer_loss(model, ids.to(args.device), labels.to(args.device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ids, labels = recall_batch(512, args.pairs, args.filler, torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        predicted = model(input_ids=ids.to(args.device)).logits[:, :-1].argmax(-1).cpu()
    answered = labels[:, 1:] != -100
    return loss.item(), (predicted[answered] == labels[:, 1:][answered]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layer_types", nargs="+")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--filler", type=int, default=24)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"chance: {1 / VALUES:.3f}")
    for layer_type in args.layer_types:
        start = time.perf_counter()
        loss, accuracy = train_and_score(layer_type, args)
        print(f"{layer_type:24s} last loss {loss:.3f}  answer accuracy {accuracy:.3f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
