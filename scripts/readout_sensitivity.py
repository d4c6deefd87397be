"""Which layers the teacher's passkey read-out depends on at conversion (step 0), and what plans keep of it.

    python scripts/readout_sensitivity.py layers --out layers.json
    python scripts/readout_sensitivity.py plans "full_attention:0,1,2,8,18,20,23,24 gated_deltanet:rest" ...

The read-out layers are the teacher's layers whose best head puts at least --threshold of the last token's attention
on the passkey's number (scripts/needle_trace.py; on SmolLM2-135M, 20-23). A hybrid's read-out is the sum of that
attention over those layers, as a share of the teacher's (a replaced read-out layer adds 0).
`layers`: each layer alone replaced by --mixer, the rest the teacher's, and the read-out left.
`plans`: each plan's step-0 KL on the calibration text's held-out blocks and its read-out.
Every hybrid gets the teacher-calibrated init (what the recorded runs used), fitted in memory; nothing is written but
--out.
--recurrent-rope builds them as `hybridize convert --recurrent-rope` does.
"""

import argparse
import json

import torch

from hybridize.convert.build import hybrid_config_from_teacher
from hybridize.convert.calibrate import teacher_calibration
from hybridize.convert.init import TEACHER_CALIBRATED
from hybridize.convert.pipeline import build_hybrid, fitting_batch
from hybridize.convert.plan import resolve_plan
from hybridize.convert.report import model_stats, next_token_stats
from hybridize.corpus import calibration_batch
from hybridize.evaluate.needle_trace import needle_trace
from hybridize.teacher import load_teacher, teacher_folder


class Converter:
    """The teacher, its attention statistics for every layer (computed once), and hybrids of any plan built from them."""

    def __init__(self, teacher_name, length: int, threshold: float, recurrent_rope: bool = False):
        self.teacher, self.tokenizer = load_teacher(teacher_name)
        self.recurrent_rope = recurrent_rope
        self.folder, self.length = teacher_folder(teacher_name), length
        self.layers = self.teacher.config.num_hidden_layers
        self.fitting, self.statistics = teacher_calibration(self.teacher, fitting_batch(self.tokenizer, 256),
                                                            list(range(self.layers)))
        self.teacher_readout = needle_trace(self.teacher, self.tokenizer, length)["needle_attention"]
        self.readout_layers = [i for i, a in enumerate(self.teacher_readout) if a >= threshold]
        self.ids = calibration_batch(self.tokenizer, seq_len=256, blocks_per_domain=1)
        with torch.no_grad():
            self.teacher_logprobs, self.teacher_nll = next_token_stats(self.teacher(input_ids=self.ids).logits,
                                                                       self.ids)

    def hybrid(self, plan: list[str]):
        config = hybrid_config_from_teacher(self.teacher.config, plan, dtype=self.teacher.dtype,
                                            recurrent_rope=self.recurrent_rope)
        fitting = {i: self.fitting[i] for i, kind in enumerate(plan) if kind != "full_attention"}
        return build_hybrid(self.folder, config, TEACHER_CALIBRATED, 0, self.statistics, fitting)[0].eval()

    def readout(self, hybrid) -> dict:
        attention = needle_trace(hybrid, self.tokenizer, self.length)["needle_attention"]
        kept = {i: attention[i] or 0.0 for i in self.readout_layers}
        share = sum(kept.values()) / sum(self.teacher_readout[i] for i in self.readout_layers)
        return {"readout_share": round(share, 4), "by_layer": {i: round(a, 4) for i, a in kept.items()}}


def layers(converter: Converter, mixer: str) -> dict:
    rows = {}
    for i in range(converter.layers):
        plan = ["full_attention"] * converter.layers
        plan[i] = mixer
        rows[i] = converter.readout(converter.hybrid(plan))
        print(f"layer {i:2d} alone {mixer}: read-out {rows[i]['readout_share']:.3f}", flush=True)
    return rows


def plans(converter: Converter, specs: list[str]) -> dict:
    rows = {}
    for spec in specs:
        hybrid = converter.hybrid(resolve_plan(spec, converter.layers))
        with torch.no_grad():
            stats = model_stats(hybrid, converter.ids, converter.teacher_logprobs, converter.teacher_nll)
        rows[spec] = {"kl_teacher_hybrid": round(stats["kl_teacher_hybrid"], 4), **converter.readout(hybrid)}
        print(f"{spec}: KL {rows[spec]['kl_teacher_hybrid']:.3f}, read-out {rows[spec]['readout_share']:.3f}",
              flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["layers", "plans"])
    parser.add_argument("plans", nargs="*", help="plan specs (plans)")
    parser.add_argument("--teacher", default=None, help="default: the embedded teacher")
    parser.add_argument("--mixer", default="gated_deltanet", help="the layer type each layer becomes (layers)")
    parser.add_argument("--length", type=int, default=1024, help="passkey prompt length")
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--recurrent-rope", action="store_true", help="recurrent mixers rotate by RoPE")
    parser.add_argument("--out", help="write the rows here as JSON")
    args = parser.parse_args()
    converter = Converter(args.teacher, args.length, args.threshold, args.recurrent_rope)
    print(f"read-out layers {converter.readout_layers}: teacher attention on the number "
          f"{[round(converter.teacher_readout[i], 3) for i in converter.readout_layers]}", flush=True)
    rows = layers(converter, args.mixer) if args.command == "layers" else plans(converter, args.plans)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"readout_layers": converter.readout_layers, "rows": rows,
                       "teacher": {i: converter.teacher_readout[i] for i in converter.readout_layers}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
