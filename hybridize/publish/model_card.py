"""The model card (README.md): what the model is, its plan, size, cache, eval and bench results, recipe, provenance."""

import json
from collections import Counter
from pathlib import Path

from .. import __version__
from ..evaluate.bench import bench_tables

from ..evaluate.lm_eval_tasks import lm_eval_table
from ..evaluate.quality import quality_table
from ..evaluate.recall import recall_table
from ..model.configuration_hybrid import BRANCH_TYPES, HEADWISE_TYPES, WINDOW_MEMORY_TYPES
from ..teacher import ALIASES

WINDOW_NAME = "sliding-window attention"
MIXER_NAMES = {"full_attention": "full attention", "sliding_attention": WINDOW_NAME,
               "mamba2": "Mamba2", "gated_deltanet": "Gated DeltaNet",
               "window_gated_deltanet": "sliding-window attention + Gated DeltaNet memory",
               "window_mamba2": "sliding-window attention + Mamba2 memory"}
MIXER_NAMES.update({kind: f"head-wise: some KV heads' attention + {MIXER_NAMES[memory]} heads"
                    for kind, memory in HEADWISE_TYPES.items()})
STATE_BYTES = 4  # recurrent states are kept in fp32
EMBEDDED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF (Q4_1) was quantized from


def cache_footprint(model, kv_bytes: int = 2) -> dict:
    """Decode-time memory per sequence, with K/V and conv windows in a `kv_bytes` dtype (2: bf16).

    per_token: bytes each new token adds (full-attention K/V, head-wise layers' kept heads included); sliding_max:
    what the sliding-window layers hold once their windows (and sink tokens) are full; recurrent: the fixed conv windows and states;
    teacher_per_token: the all-attention teacher's K/V per token.
    """
    config = model.config
    kv = 2 * config.num_key_value_heads * config.head_dim * kv_bytes
    per_token = sliding = recurrent = 0
    window = config.sliding_window + config.sliding_window_sinks
    for layer, kind in zip(model.model.layers, config.layer_types):
        if kind == "full_attention":
            per_token += kv
            continue
        if kind in ("sliding_attention", *WINDOW_MEMORY_TYPES):
            sliding += kv * window
        if kind in HEADWISE_TYPES:  # the kept KV heads' share of a full layer's K/V
            kept = kv * layer.mixer.window.num_kv_heads // config.num_key_value_heads
            if config.headwise_window:
                sliding += kept * window
            else:
                per_token += kept
        if kind != "sliding_attention":
            mixer = layer.mixer.memory if kind in BRANCH_TYPES else layer.mixer
            heads, rows, cols = mixer.state_shape
            recurrent += heads * rows * cols * STATE_BYTES
            recurrent += sum(mixer.conv_channels) * (config.conv_kernel_size - 1) * kv_bytes
    return {"per_token": per_token, "sliding_max": sliding, "recurrent": recurrent,
            "teacher_per_token": kv * config.num_hidden_layers}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return ""


def _read(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _plan_rows(layer_types: list[str], window: int, sinks: int) -> list[str]:
    """Consecutive layers of one kind share a row."""
    rows, start = [], 0
    for i in range(1, len(layer_types) + 1):
        if i == len(layer_types) or layer_types[i] != layer_types[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            kind, name = layer_types[start], MIXER_NAMES[layer_types[start]]
            if kind == "sliding_attention" or kind in WINDOW_MEMORY_TYPES:
                extent = f" ({window} tokens" + (f" + the first {sinks})" if sinks else ")")
                name = name.replace(WINDOW_NAME, WINDOW_NAME + extent, 1)
            rows.append(f"| {span} | {name} |")
            start = i
    return rows


def _teacher(conversion: dict | None, distill: dict | None) -> dict:
    return (distill or {}).get("teacher") or (conversion or {}).get("teacher") or {}


def _summary(repo_id: str, model, teacher: dict, distill: dict | None, params: int) -> str:
    config = model.config
    counts = Counter(config.layer_types)
    kept = counts["full_attention"]
    replaced = ", ".join(f"{counts[k]} {MIXER_NAMES[k]}" for k in MIXER_NAMES if k != "full_attention" and counts[k])
    trained = (f"then distilled from it on {sum(s.get('tokens', 0) for s in distill.get('stages', [])):,} tokens"
               if distill else "not distilled yet: these are the converted weights, before any training")
    return (f"**{repo_id}** is a hybrid of **{teacher.get('name', 'its teacher')}** ({params / 1e6:.1f}M parameters). "
            f"Of its {config.num_hidden_layers} attention layers, {kept} {'is' if kept == 1 else 'are'} kept as full "
            f"attention and the others "
            f"were replaced ({replaced}), initialized from the attention weights by "
            f"hybridize {__version__}, {trained}.")


def _cache_section(footprint: dict, context: int) -> list[str]:
    ours = footprint["per_token"] * context + footprint["sliding_max"] + footprint["recurrent"]
    theirs = footprint["teacher_per_token"] * context
    return [
        "| cache (bf16 K/V, fp32 states) | per sequence |",
        "|---|---|",
        f"| full-attention K/V, per token | {_size(footprint['per_token'])} (teacher: "
        f"{_size(footprint['teacher_per_token'])}) |",
        f"| sliding-window K/V, at most | {_size(footprint['sliding_max'])} |",
        f"| Mamba2 / GDN states, fixed | {_size(footprint['recurrent'])} |",
        f"| total at {context} tokens | {_size(ours)} vs {_size(theirs)} for the teacher "
        f"({ours / theirs:.0%}) |",
    ]


def _distill_section(distill: dict) -> list[str]:
    lines = ["| stage | kind | tokens | steps | seq len | lr | last train loss |", "|---|---|---|---|---|---|---|"]
    recipe_stages = {s.get("name"): s for s in distill.get("recipe", {}).get("stages", [])}
    for stage in distill.get("stages", []):
        cfg = recipe_stages.get(stage.get("name"), {})
        loss = stage.get("train_loss_last")
        lines.append(f"| {stage.get('name')} | {stage.get('kind')} | {stage.get('tokens', 0):,} | "
                     f"{stage.get('steps_done')} | {cfg.get('seq_len', '')} | {cfg.get('lr', '')} | "
                     f"{'' if loss is None else f'{loss:.4g}'} |")
    recipe = json.dumps(distill.get("recipe", {}), indent=2)
    return [*lines, "", "<details><summary>full recipe</summary>", "", "```json", recipe, "```", "", "</details>"]


def _provenance(teacher: dict, conversion: dict | None, distill: dict | None) -> list[str]:
    lines = [f"- teacher: `{teacher.get('name')}` from {teacher.get('source')}"
             + (f" at revision `{teacher['revision']}`" if teacher.get("revision") else "")]
    lines += [f"  - `{name}` sha256 `{digest}`" for name, digest in teacher.get("files", {}).items()]
    if conversion:
        lines.append(f"- converted by hybridize {conversion.get('hybridize_version')} with plan "
                     f"`{conversion.get('plan_spec')}`, seed {conversion.get('seed')} (conversion.json)")
    if distill:
        versions = ", ".join(f"{k} {v}" for k, v in distill.get("versions", {}).items())
        lines.append(f"- distilled by hybridize {distill.get('hybridize_version')} on {distill.get('device')} "
                     f"({distill.get('processes')} process(es), {distill.get('mixed_precision')}); {versions} "
                     "(distill.json)")
    lines.append(f"- exported by hybridize {__version__}")
    return lines


def render_card(repo_id: str, folder: Path, model, params: int) -> str:
    """README.md for the export `folder` (which holds the records and results export_folder copied)."""
    conversion, distill = _read(folder, "conversion.json"), _read(folder, "distill.json")
    evaluation, bench = _read(folder / "eval", "eval.json"), _read(folder / "bench", "bench.json")
    teacher = _teacher(conversion, distill)
    base = teacher.get("name")
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [hybridize, hybrid, mamba2, gated-deltanet, distillation]"]
    if base in ALIASES:
        front.append(f"base_model: {EMBEDDED_BASE_MODEL}")
    elif base and not Path(base).exists():
        front.append(f"base_model: {base}")
    config = model.config
    lines = [*front, "---", "", f"# {repo_id.split('/')[-1]}", "",
             _summary(repo_id, model, teacher, distill, params), "",
             "## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
             # The tokenizer reads config.json too, whose custom model type only the code here can parse.
             f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)', "```", "",
             "Only `torch` and `transformers` are needed: `trust_remote_code=True` runs the model code in this "
             "repository, which computes with plain-PyTorch kernels. The hybridize toolkit is not needed to load "
             f"the model; where hybridize {__version__} is installed (from its source repository: it is not "
             "published on a package index), the same code uses its Triton kernels on a GPU instead, after "
             "checking that the installed `hybridize` is that toolkit at that version. `generate()` works as for any "
             "causal LM (the cache holds K/V for attention layers and fixed-size states for the others).", "",
             "## Architecture", "", "| layers | mixer |", "|---|---|",
             *_plan_rows(config.layer_types, config.sliding_window, config.sliding_window_sinks), "",
             f"Hidden size {config.hidden_size}, {config.num_attention_heads} query / {config.num_key_value_heads} "
             f"KV heads of {config.head_dim}, vocabulary {config.vocab_size}, context "
             f"{config.max_position_embeddings}, {params:,} parameters.", "",
             *_cache_section(cache_footprint(model), config.max_position_embeddings), ""]
    if evaluation:
        lines += ["## Evaluation", "", f"Hybrid and teacher side by side on held-out text ({evaluation['device']}, "
                  f"{evaluation['dtype']}; `hybridize eval`).", "", "```text", quality_table(evaluation["quality"])]
        if "recall" in evaluation:
            lines += ["", recall_table(evaluation["recall"])]
        lines += ["```", "", "![quality](eval/eval.png)", ""]
        if "recall" in evaluation:
            lines += ["![passkey](eval/passkey.png)", ""]
        if "lm_eval" in evaluation:
            lines += ["```text", lm_eval_table(evaluation["lm_eval"]), "```", ""]
    if bench:
        lines += ["## Speed and memory", "", f"On {bench['device']} ({bench['dtype']}; `hybridize bench`).", "",
                  "```text", bench_tables(bench), "```", "", "![speed and memory](bench/bench.png)", ""]
    lines += ["## Distillation", ""]
    lines += _distill_section(distill) if distill else ["Not distilled: the weights are those of the conversion."]
    lines += ["", "## Provenance", "", *_provenance(teacher, conversion, distill), ""]
    return "\n".join(lines)
