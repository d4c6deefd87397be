"""Plan selection: which layers keep full attention under a budget and constraints, and which mixer replaces each other.

The kept layers maximize the summed sensitivity (the cost of replacing a layer by its best allowed mixer) over
every placement the constraints allow, found exactly by dynamic programming over (layer, layers still to keep).
Without constraints that is simply the K most sensitive layers.
"""

from dataclasses import dataclass

from ..convert.plan import H2_CYCLE, check_budget
from ..errors import UserError
from .proxies import distant_content, proxy_sensitivity

# What --mixers may name; DEFAULT_MIXERS is what an analysis scores unless told (the window + memory types double the
# scoring cost of the mixers they contain, so they are scored when asked for).
CANDIDATE_MIXERS = ("mamba2", "gated_deltanet", "sliding_attention", "window_gated_deltanet", "window_mamba2")
DEFAULT_MIXERS = ("mamba2", "gated_deltanet", "sliding_attention")
PATTERNS = ("best", "h2")
# Fast mode's order of preference for a layer a sliding window cannot serve: a window + memory layer first where
# allowed (it keeps the window's exact local attention and adds a memory for the rest), then "Gated Delta Networks:
# Improving Mamba2 with Delta Rule" (arXiv:2412.06464), which finds Gated DeltaNet ahead of Mamba2 at recall, the
# part of attention a recurrent state finds hardest.
RECURRENT_PREFERENCE = ("window_gated_deltanet", "window_mamba2", "gated_deltanet", "mamba2", "sliding_attention")


def parse_budget(text: str, num_layers: int) -> int:
    """K attention layers from "K" (0..num_layers) or a fraction "0.25" of num_layers (rounded, halves up)."""
    if text.isdigit():
        return check_budget(text, num_layers)
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if "." not in text or not 0.0 <= fraction <= 1.0:
        raise UserError(f"attention budget must be an integer in 0..{num_layers} or a fraction in [0, 1], got {text!r}")
    return int(fraction * num_layers + 0.5)


@dataclass(frozen=True)
class Constraints:
    """mixers: the mixer types a replaced layer may get; pattern: "best" (each replaced layer its best-scoring
    mixer) or "h2" (replaced layers cycle Mamba2 -> Gated DeltaNet -> sliding window by depth, over the allowed
    ones); no_attention_first: layers 0..n-1 are never kept as attention; min_spacing: kept layers are at least
    this many layers apart (1: no constraint)."""

    mixers: tuple[str, ...] = DEFAULT_MIXERS
    pattern: str = "best"
    no_attention_first: int = 0
    min_spacing: int = 1

    def __post_init__(self):
        unknown = [m for m in self.mixers if m not in CANDIDATE_MIXERS]
        if unknown or not self.mixers or len(set(self.mixers)) != len(self.mixers):
            raise UserError(f"--mixers needs one or more distinct of {', '.join(CANDIDATE_MIXERS)}, "
                            f"got {','.join(self.mixers)!r}")
        if self.pattern not in PATTERNS:
            raise UserError(f"unknown pattern {self.pattern!r}; allowed: {', '.join(PATTERNS)}")
        if self.pattern == "h2" and not set(H2_CYCLE) & set(self.mixers):
            raise UserError(f"--pattern h2 cycles {', '.join(H2_CYCLE)}: --mixers must allow at least one of them")
        if self.no_attention_first < 0:
            raise UserError(f"--no-attention-first must be >= 0, got {self.no_attention_first}")
        if self.min_spacing < 1:
            raise UserError(f"--min-spacing must be >= 1, got {self.min_spacing}")

    def max_attention_layers(self, num_layers: int) -> int:
        """The most layers that can keep attention: every min_spacing-th layer from the first allowed one."""
        free = num_layers - self.no_attention_first
        return 0 if free <= 0 else 1 + (free - 1) // self.min_spacing

    def check_budget(self, budget: int, num_layers: int) -> None:
        most = self.max_attention_layers(num_layers)
        if budget > most:
            raise UserError(
                f"budget {budget} does not fit: with no attention in the first {self.no_attention_first} layers and "
                f"min spacing {self.min_spacing}, at most {most} of {num_layers} layers can keep attention"
            )


def keep_attention(sensitivity: list[float], budget: int, constraints: Constraints) -> list[int]:
    """The `budget` layer indices with the largest summed sensitivity that the constraints allow (ascending)."""
    num_layers, gap = len(sensitivity), constraints.min_spacing
    constraints.check_budget(budget, num_layers)
    impossible = float("-inf")
    # best[i][k]: the largest sum of k sensitivities from layers >= i, kept layers >= gap apart
    best = [[0.0] + [impossible] * budget for _ in range(num_layers + gap)]
    for i in range(num_layers - 1, -1, -1):
        for k in range(1, budget + 1):
            skip = best[i + 1][k]
            take = sensitivity[i] + best[i + gap][k - 1] if i >= constraints.no_attention_first else impossible
            best[i][k] = max(skip, take)
    kept, i, k = [], 0, budget
    while k > 0:
        if i >= constraints.no_attention_first and best[i][k] == sensitivity[i] + best[i + gap][k - 1]:
            kept.append(i)
            i, k = i + gap, k - 1
        else:
            i += 1
    return kept


def assign_mixers(kept: list[int], best_mixer: list[str], constraints: Constraints) -> list[str]:
    """The plan: full attention at `kept`, elsewhere best_mixer[i] ("best") or the allowed h2 cycle by depth ("h2")."""
    plan = list(best_mixer)
    cycle = [m for m in H2_CYCLE if m in constraints.mixers]
    replaced = 0
    for i in range(len(plan)):
        if i in kept:
            plan[i] = "full_attention"
        elif constraints.pattern == "h2":
            plan[i] = cycle[replaced % len(cycle)]
            replaced += 1
    return plan


def choose_plan(budget: int, constraints: Constraints, proxies: dict[str, list[float]],
                kl: dict[str, list[float]] | None, ranking: str, swa_threshold: float, sink_tokens: int = 0):
    """(sensitivity, best mixer, plan) per layer: from measured KL per mixer (full mode), else the proxies (fast).

    With sink_tokens, windows keep the first tokens, so in fast mode the mass a window loses is its outside-window
    mass less what lies on the first token (measured KL already comes from sink windows)."""
    if kl is None:
        if sink_tokens:
            proxies = {**proxies, "outside_window": window_loss_with_sinks(proxies)}
        sensitivity = proxy_sensitivity(proxies, ranking)
        best = fast_choice(proxies["outside_window"], constraints.mixers, swa_threshold)
    else:
        sensitivity, best = measured_choice(kl, constraints.mixers)
    return sensitivity, best, assign_mixers(keep_attention(sensitivity, budget, constraints), best, constraints)


def measured_choice(kl: dict[str, list[float]], mixers: tuple[str, ...]) -> tuple[list[float], list[str]]:
    """Full mode: (sensitivity = the lowest KL over allowed mixers, that mixer) per layer."""
    num_layers = len(next(iter(kl.values())))
    best = [min(mixers, key=lambda m: (kl[m][i], mixers.index(m))) for i in range(num_layers)]
    return [kl[best[i]][i] for i in range(num_layers)], best


def window_loss_with_sinks(proxies: dict[str, list[float]]) -> list[float]:
    """Outside-window mass less the first token's, per layer. Sinks keep more than the first token, so this
    slightly overstates the loss; the analysis records only the first token's mass."""
    first = proxies.get("first_token") or [None] * len(proxies["outside_window"])
    loss = [distant_content(outside, mass) for outside, mass in zip(proxies["outside_window"], first)]
    if any(v is None for v in loss):
        raise UserError("--sink-tokens needs the first-token mass, which this analysis did not record; rerun it")
    return loss


def fast_choice(outside_window: list[float], mixers: tuple[str, ...], swa_threshold: float) -> list[str]:
    """Fast mode: a sliding window where it loses at most `swa_threshold` of the attention mass, else the first
    allowed of RECURRENT_PREFERENCE."""
    fallback = next(m for m in RECURRENT_PREFERENCE if m in mixers)
    swa = "sliding_attention" in mixers
    return ["sliding_attention" if swa and mass <= swa_threshold else fallback for mass in outside_window]
