"""Plans: the mixer type of every layer, from a list, a compact spec, a JSON file, or a named pattern with a budget.

Accepted forms of a plan spec (resolved against the teacher's layer count):
- a list of layer types, one per layer;
- a compact spec: "full_attention:0,7,14,21 gated_deltanet:rest" (each layer named once; "rest" fills the others);
- a JSON file with a "layer_types" list (what `hybridize analyze` writes);
- "uniform:K[:MIXER]": K full-attention layers spread evenly through the depth, the rest MIXER (gated_deltanet);
  "uniform:0:window_gated_deltanet" (or "all:window_gated_deltanet") keeps no full attention: constant memory;
- "h2:K": K full-attention layers spread evenly, the rest cycling Mamba2 -> Gated DeltaNet -> sliding window,
  the ordering "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv:2412.06464, Table S.1) found best
  when training from scratch;
- "all:MIXER": every layer MIXER ("all:full_attention" reproduces the teacher).

Head-wise layers (headwise_gated_deltanet, headwise_mamba2) keep the first half of their KV heads as attention unless
a plan file says which: its "headwise_kv_heads" ({layer: [KV heads]}, what `hybridize analyze --heads K` writes).
"""

import json
from pathlib import Path

from ..errors import UserError
from ..model.configuration_hybrid import BRANCH_TYPES, LAYER_TYPES, RECURRENT_TYPES, WINDOW_MEMORY_TYPES

H2_CYCLE = ("mamba2", "gated_deltanet", "sliding_attention")
# One letter per layer type, for one-line plan summaries.
SHORT_NAMES = {"full_attention": "A", "sliding_attention": "S", "mamba2": "M", "gated_deltanet": "G",
               "window_gated_deltanet": "g", "window_mamba2": "m", "headwise_gated_deltanet": "h",
               "headwise_mamba2": "k"}


def uniform_positions(num_layers: int, budget: int) -> list[int]:
    """K indices spread evenly, centred in K equal segments: never layer 0 unless K is large."""
    return sorted({int((i + 0.5) * num_layers / budget) for i in range(budget)})


def check_budget(text: str, num_layers: int) -> int:
    """K from "K", checked to be in 0..num_layers (also used by `hybridize analyze`)."""
    if not text.isdigit() or not 0 <= int(text) <= num_layers:
        raise UserError(f"attention budget must be an integer in 0..{num_layers}, got {text!r}")
    return int(text)


def _check_type(kind: str, allowed=LAYER_TYPES) -> str:
    if kind not in allowed:
        raise UserError(f"unknown layer type {kind!r}; allowed: {', '.join(allowed)}")
    return kind


def _pattern(name: str, args: list[str], num_layers: int) -> list[str]:
    if name == "all":
        if len(args) != 1:
            raise UserError("pattern 'all' takes one layer type: all:MIXER")
        return [_check_type(args[0])] * num_layers
    if name not in ("uniform", "h2") or not args:
        raise UserError(f"unknown plan pattern {name!r}; use uniform:K[:MIXER], h2:K or all:MIXER")
    budget = check_budget(args[0], num_layers)
    kept = set(uniform_positions(num_layers, budget)) if budget else set()
    if name == "uniform":
        replacements = RECURRENT_TYPES + ("sliding_attention",) + tuple(BRANCH_TYPES)
        mixer = _check_type(args[1], replacements) if len(args) > 1 else "gated_deltanet"
        return ["full_attention" if i in kept else mixer for i in range(num_layers)]
    replaced = [i for i in range(num_layers) if i not in kept]
    plan = ["full_attention"] * num_layers
    for n, i in enumerate(replaced):
        plan[i] = H2_CYCLE[n % len(H2_CYCLE)]
    return plan


def _compact(spec: str, num_layers: int) -> list[str]:
    plan: list[str | None] = [None] * num_layers
    rest = None
    for part in spec.split():
        kind, _, where = part.partition(":")
        _check_type(kind)
        if where == "rest":
            rest = kind
            continue
        for token in where.split(","):
            if not token.isdigit() or int(token) >= num_layers:
                raise UserError(f"plan {part!r}: layer index {token!r} is not in 0..{num_layers - 1}")
            if plan[int(token)] is not None:
                raise UserError(f"plan {part!r}: layer {token} is named twice")
            plan[int(token)] = kind
    missing = [i for i, kind in enumerate(plan) if kind is None]
    if missing and rest is None:
        raise UserError(f"plan leaves layers {missing} unnamed; add e.g. 'gated_deltanet:rest'")
    return [kind if kind is not None else rest for kind in plan]


def plan_headwise_kv_heads(spec: str | list[str]) -> dict[str, list[int]] | None:
    """A plan file's "headwise_kv_heads" (None for other specs, or a file without one)."""
    if not (isinstance(spec, str) and spec.endswith(".json")):
        return None
    try:
        heads = json.loads(Path(spec).read_text()).get("headwise_kv_heads")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"plan file {spec}: cannot read it ({err})") from err
    if heads is not None and not (isinstance(heads, dict) and all(
            isinstance(kept, list) and all(isinstance(h, int) for h in kept) for kept in heads.values())):
        raise UserError(f"plan file {spec}: headwise_kv_heads must map layer indices to lists of KV heads")
    return heads


def resolve_plan(spec: str | list[str], num_layers: int) -> list[str]:
    """The layer types of a plan spec (see the module docstring), checked against `num_layers`."""
    if isinstance(spec, str) and spec.endswith(".json"):
        path = Path(spec)
        try:
            spec = json.loads(path.read_text())["layer_types"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"plan file {path}: cannot read a 'layer_types' list ({err})") from err
    if isinstance(spec, str):
        head, *args = spec.split(":")
        plan = _pattern(head, args, num_layers) if head in ("uniform", "h2", "all") else _compact(spec, num_layers)
    else:
        plan = [_check_type(kind) for kind in spec]
    if len(plan) != num_layers:
        raise UserError(f"plan has {len(plan)} layers but the model has {num_layers}")
    return plan


def has_window_memory(plan: list[str]) -> bool:
    return any(kind in WINDOW_MEMORY_TYPES for kind in plan)


def check_memory_outside_window(plan: list[str], memory_outside_window: bool) -> None:
    """memory_outside_window changes window + memory layers only: asked for in a plan without one, it is a mistake."""
    if memory_outside_window and not has_window_memory(plan):
        raise UserError("memory_outside_window (convert --memory-outside-window) applies to window_gated_deltanet and "
                        "window_mamba2 layers, and the plan has none")


def describe(plan: list[str]) -> str:
    """One line per mixer type with its layer indices, for printing the resolved plan."""
    lines = ["".join(SHORT_NAMES[k] for k in plan) + "   (A attention, S sliding window, M Mamba2, G Gated DeltaNet, "
             "g window + Gated DeltaNet, m window + Mamba2, h head-wise attention + Gated DeltaNet, k head-wise "
             "attention + Mamba2)"]
    for kind in LAYER_TYPES:
        layers = [i for i, k in enumerate(plan) if k == kind]
        if layers:
            lines.append(f"  {kind:<18} {len(layers):>3}: {','.join(map(str, layers))}")
    return "\n".join(lines)
