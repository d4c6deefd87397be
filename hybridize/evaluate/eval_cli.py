"""`hybridize eval HYBRID [--teacher MODEL]`: quality, recall and lm-eval tasks, hybrid and teacher side by side.

Prints the tables and writes OUT/eval.json, OUT/eval.png (summary) and OUT/passkey.png (heat maps);
OUT defaults to HYBRID/eval, which `hybridize push` puts on the model card.
"""

import dataclasses

from .common import add_common_arguments, comma_joined, float_list, int_list
from .pipeline import EvalSettings, evaluate_to_folder
from .quality import QualitySettings
from .recall import RecallSettings


def _defaults(full, small, name: str, show=str) -> str:
    """"default: X; --small: Y" for a setting with a full-size and a CPU-sized value."""
    return f"default: {show(getattr(full, name))}; --small: {show(getattr(small, name))}"


def add_arguments(parser) -> None:
    add_common_arguments(parser, "eval")
    q, q_small = QualitySettings(), QualitySettings.small()
    r, r_small = RecallSettings(), RecallSettings.small()
    quality = parser.add_argument_group("quality (held-out text)")
    quality.add_argument("--domains", type=lambda s: tuple(s.split(",")), default=None,
                         help=f"comma-separated text domains (default: {comma_joined(q.domains)})")
    quality.add_argument("--seq-len", type=int, default=None,
                         help=f"tokens per held-out block ({_defaults(q, q_small, 'seq_len')})")
    quality.add_argument("--blocks", type=int, default=None,
                         help=f"held-out blocks per domain ({_defaults(q, q_small, 'blocks_per_domain')})")
    quality.add_argument("--greedy-prompts", type=int, default=None,
                         help=f"greedy continuations per domain ({_defaults(q, q_small, 'greedy_prompts')})")
    quality.add_argument("--batch-size", type=int, default=None,
                         help=f"blocks per forward pass ({_defaults(q, q_small, 'batch_size')})")
    recall = parser.add_argument_group("recall")
    recall.add_argument("--no-recall", action="store_true", help="skip the passkey and MQAR tests")
    recall.add_argument("--passkey-lengths", type=int_list, default=None,
                        help="context lengths (default: 1K, 2K, ... up to the teacher's limit; "
                             f"--small: {comma_joined(r_small.lengths)})")
    recall.add_argument("--passkey-depths", type=float_list, default=None,
                        help=f"needle depths in [0, 1] ({_defaults(r, r_small, 'depths', comma_joined)})")
    recall.add_argument("--passkey-trials", type=int, default=None,
                        help=f"prompts per (length, depth) cell ({_defaults(r, r_small, 'trials')})")
    recall.add_argument("--mqar-pairs", type=int_list, default=None,
                        help=f"key-value pair counts ({_defaults(r, r_small, 'mqar_pairs', comma_joined)})")
    harness = parser.add_argument_group("lm-evaluation-harness")
    harness.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=[],
                         help="lm-eval task names or task YAML files, comma-separated (default: none)")
    harness.add_argument("--tasks-include", default=None, help="a folder of extra lm-eval task YAMLs")
    harness.add_argument("--tasks-limit", type=int, default=None, help="examples per task (default: all)")
    harness.add_argument("--num-fewshot", type=int, default=None,
                         help="few-shot examples per prompt (default: each task's own setting)")


def _override(settings, **values):
    """The settings with every value that is not None replaced."""
    return dataclasses.replace(settings, **{k: v for k, v in values.items() if v is not None})


def run(args) -> int:
    base = EvalSettings.small() if args.small else EvalSettings()
    quality = _override(base.quality, domains=args.domains, seq_len=args.seq_len, blocks_per_domain=args.blocks,
                        greedy_prompts=args.greedy_prompts, batch_size=args.batch_size)
    recall = None if args.no_recall else _override(
        base.recall, lengths=args.passkey_lengths, depths=args.passkey_depths, trials=args.passkey_trials,
        mqar_pairs=args.mqar_pairs)
    settings = EvalSettings(quality=quality, recall=recall, tasks=tuple(args.tasks), tasks_include=args.tasks_include,
                            tasks_limit=args.tasks_limit, num_fewshot=args.num_fewshot)
    evaluate_to_folder(args.hybrid, args.out, settings, teacher=args.teacher, device=args.device,
                       dtype=args.dtype, overwrite=args.overwrite)
    return 0
