"""`hybridize push --dry-run`: the folder's contents, its remote code (with and without hybridize), and the card."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
import torch
import transformers
from transformers.dynamic_module_utils import get_imports

from hybridize import __hybridize_toolkit__, __version__
from hybridize.cli import main
from hybridize.convert.pipeline import convert_to_folder
from hybridize.evaluate.common import load_hybrid
from hybridize.atomic import OUTPUT_RECORD
from hybridize.model import HybridForCausalLM
from hybridize.publish.pipeline import publish_to_folder
from hybridize.publish.remote_code import AUTO_MAP

CODE = ["attention.py", "cache.py", "configuration_hybrid.py", "context.py", "gated_deltanet.py", "headwise.py",
        "mamba2.py", "modeling_hybrid.py", "ops.py", "ref_conv1d.py", "ref_gated_delta.py", "ref_norm.py", "ref_ssd.py",
        "window_memory.py"]
# torch, transformers and what installing transformers brings (huggingface_hub), plus the standard library.
PLAIN_IMPORTS = {"math", "torch", "transformers", "huggingface_hub", "typing", "dataclasses", "collections", "ast",
                 "importlib", "re"}


@pytest.fixture(scope="module")
def dry_run(hybrid_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dry") / "upload"
    assert main(["push", str(hybrid_dir), "me/tiny-hybrid", "--dry-run", str(out)]) == 0
    return out


def _ids():
    return torch.randint(0, 49152, (2, 37), generator=torch.Generator().manual_seed(0))


def test_folder_holds_weights_tokenizer_records_and_code(dry_run):
    files = {p.name for p in dry_run.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "conversion.json", *CODE} <= files
    assert json.loads((dry_run / "config.json").read_text())["auto_map"] == AUTO_MAP
    for name in CODE:
        # What transformers checks is installed before it runs remote code: never hybridize itself.
        assert set(get_imports(dry_run / name)) <= PLAIN_IMPORTS, name
    # The fast path stays: with hybridize installed, ops.py takes its kernels.
    assert "from hybridize.kernels.gated_delta import" in (dry_run / "ops.py").read_text()


def test_publish_to_folder_writes_what_the_dry_run_writes(dry_run, hybrid_dir, tmp_path):
    """Called from Python: the same files, the same card, and every JSON file with the same keys."""
    out = tmp_path / "upload"
    files = publish_to_folder(hybrid_dir, "me/tiny-hybrid", out)

    def tree(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))

    assert tree(out) == tree(dry_run) and files == [name for name in tree(out) if name != OUTPUT_RECORD]
    assert "README.md" in files and "model.safetensors" in files
    assert (out / "README.md").read_text() == (dry_run / "README.md").read_text()
    for name in (n for n in files if n.endswith(".json")):
        assert json.loads((out / name).read_text()).keys() == json.loads((dry_run / name).read_text()).keys(), name


def test_exported_folder_still_loads_in_package(dry_run):
    """Where hybridize.model is imported, its registered classes win over the remote code (same weights)."""
    model, _ = load_hybrid(dry_run)
    assert type(model) is HybridForCausalLM


def test_card_describes_the_model(dry_run, hybrid_dir):
    card = (dry_run / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-hybrid", trust_remote_code=True)' in card
    local, _ = load_hybrid(hybrid_dir)
    params = sum(p.numel() for p in {id(p): p for p in local.parameters()}.values())
    assert f"{params:,} parameters" in card
    for row in ("| 0 | Mamba2 |", "| 1 | Gated DeltaNet |", "| 2 | full attention |",
                "| 3 | sliding-window attention (512 tokens) |",
                "| 4 | sliding-window attention (512 tokens) + Gated DeltaNet memory |",
                "| 5 | head-wise: some KV heads' attention + Gated DeltaNet heads |",
                "| 6 | head-wise: some KV heads' attention + Mamba2 heads |"):
        assert row in card
    # K and V x 2 heads x 16 x bf16 for layer 2, and half that for each head-wise layer 5, 6 (1 of 2 KV heads kept)
    assert "full-attention K/V, per token | 256 B (teacher: 896 B)" in card
    assert "Not distilled" in card and "sha256" in card


def test_card_shows_eval_and_bench_results(hybrid_dir, tmp_path):
    hybrid = shutil.copytree(hybrid_dir, tmp_path / "hybrid")
    teacher = ["--teacher", str(hybrid_dir.parent / "teacher")]  # the copy's recorded relative path points elsewhere
    assert main(["eval", str(hybrid), *teacher, "--no-recall", "--domains", "code", "--seq-len", "32", "--blocks", "1",
                 "--greedy-prompts", "1"]) == 0
    assert main(["bench", str(hybrid), *teacher, "--contexts", "16", "--batch-sizes", "1", "--new-tokens", "2",
                 "--repeats", "1", "--paths", "hybrid-fast,teacher-static"]) == 0
    out = tmp_path / "upload"
    assert main(["push", str(hybrid), "me/tiny-hybrid", "--dry-run", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "ppl hybrid" in card and "![quality](eval/eval.png)" in card
    assert "## Speed and memory" in card and "![speed and memory](bench/bench.png)" in card
    assert (out / "eval" / "eval.png").is_file() and (out / "bench" / "bench.png").is_file()


def test_card_shows_the_distillation_record(hybrid_dir, tmp_path):
    """distill.json as the trainer writes it: recipe, teacher and one summary per stage."""
    hybrid = shutil.copytree(hybrid_dir, tmp_path / "hybrid")
    teacher = json.loads((hybrid / "conversion.json").read_text())["teacher"]
    stages = [{"name": "align", "kind": "attention_output", "tokens": 2_000_000, "steps_done": 61,
               "train_loss_last": 0.0123},
              {"name": "kd", "kind": "kd", "tokens": 50_000_000, "steps_done": 1525, "train_loss_last": 0.456}]
    recipe = {"teacher": teacher["name"], "stages": [{"name": "align", "seq_len": 512, "lr": 0.001},
                                                      {"name": "kd", "seq_len": 2048, "lr": 0.0001}]}
    record = {"hybridize_version": "0.1.0", "recipe": recipe, "teacher": teacher, "stages": stages, "processes": 1,
              "mixed_precision": "bf16", "device": "NVIDIA H100", "versions": {"torch": "2.11.0"}}
    (hybrid / "distill.json").write_text(json.dumps(record))
    out = tmp_path / "upload"
    assert main(["push", str(hybrid), "me/tiny-hybrid", "--dry-run", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "distilled from it on 52,000,000 tokens" in card
    assert "| align | attention_output | 2,000,000 | 61 | 512 | 0.001 | 0.0123 |" in card
    assert "| kd | kd | 50,000,000 | 1525 | 2048 | 0.0001 | 0.456 |" in card
    assert "distilled by hybridize 0.1.0 on NVIDIA H100" in card and (out / "distill.json").is_file()


@pytest.mark.parametrize("probe", ["HF_HUB_OFFLINE", "network"])
def test_push_offline_says_so_in_one_line_at_once_and_leaves_nothing(probe, hybrid_dir, tmp_path, capsys,
                                                                     monkeypatch):
    """Offline by the flag, or by the network probe (no Hub reachable from the test machines)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", probe == "HF_HUB_OFFLINE")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    tempfile.tempdir = None  # read TMPDIR again
    hybrid = shutil.copytree(hybrid_dir, tmp_path / "hybrid")
    before = sorted(p.name for p in hybrid.iterdir())
    started = time.perf_counter()
    try:
        assert main(["push", str(hybrid), "me/tiny-hybrid", "--private", "--revision", "v1"]) == 2
    finally:
        tempfile.tempdir = None
    assert time.perf_counter() - started < 15  # the probe's 3 s timeout, not minutes of retries
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "offline" in err[0] and "--dry-run" in err[0]
    assert sorted(p.name for p in hybrid.iterdir()) == before and not (hybrid / "publish").exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_push_refuses_bad_ids_and_foreign_folders(hybrid_dir, tmp_path, capsys):
    assert main(["push", str(hybrid_dir), "no-namespace", "--dry-run", str(tmp_path / "a")]) == 2
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    assert main(["push", str(hybrid_dir), "me/x", "--dry-run", str(foreign)]) == 2
    assert main(["push", str(hybrid_dir), "me/x", "--dry-run", str(hybrid_dir.parent)]) == 2
    assert (foreign / "todo.txt").read_text() == "keep me" and (hybrid_dir / "config.json").is_file()
    assert len(capsys.readouterr().err.strip().splitlines()) == 3
    # --overwrite writes the export beside the user's file, which stays.
    assert main(["push", str(hybrid_dir), "me/x", "--dry-run", str(foreign), "--overwrite"]) == 0
    assert (foreign / "todo.txt").read_text() == "keep me" and (foreign / "model.safetensors").is_file()


def _fresh_venv() -> Path:
    """A venv with only torch and transformers (this run's versions), cached in the temp folder across runs."""
    torch_version = torch.__version__.split("+")[0]
    key = f"torch{torch_version}-transformers{transformers.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}"
    root = Path(tempfile.gettempdir()) / "hybridize-test-venvs" / key
    if (root / ".ready").is_file():
        return root / "bin" / "python"
    staging = root.with_name(f"{key}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True)
    subprocess.run([str(staging / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"torch=={torch_version}", f"transformers=={transformers.__version__}"], check=True, timeout=1500)
    (staging / ".ready").touch()
    if root.exists():  # another run finished first
        shutil.rmtree(staging)
    else:
        staging.rename(root)
    return root / "bin" / "python"


REMOTE_SCRIPT = """
import importlib.util, sys, torch
from transformers import AutoModelForCausalLM
folder, ids_path, out_path = sys.argv[1:]
spec = importlib.util.find_spec("hybridize")
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = torch.load(ids_path)
with torch.no_grad():
    logits = model(ids).logits
generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
kernels = sorted(name for name in sys.modules if name.startswith("hybridize.kernels.") or ".ref_" in name)
hybridize = spec and spec.origin
torch.save({"logits": logits, "generated": generated, "kernels": kernels, "hybridize": hybridize}, out_path)
"""


def _environment(tmp_path: Path) -> dict:
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)), "HF_HUB_OFFLINE": "1",
            "HF_MODULES_CACHE": str(tmp_path / "modules")}


def _without_hybridize(tmp_path: Path, *extra_path: Path) -> tuple[list[str], dict]:
    """(python command, environment) of this interpreter where `hybridize` cannot be imported: -S skips the .pth
    files, among them the editable install's, and PYTHONPATH gives back site-packages (plus `extra_path` first)."""
    site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return [sys.executable, "-S"], _environment(tmp_path) | {"PYTHONPATH": os.pathsep.join([*map(str, extra_path),
                                                                                           *sorted(site)])}


def _load_remotely(python: Path, folder: Path, tmp_path: Path, command=None, env=None) -> dict:
    """Load `folder` with trust_remote_code in a new process of `python` (which never imports hybridize.model)."""
    torch.save(_ids(), tmp_path / "ids.pt")
    command = [*(command or [str(python)]), "-c", REMOTE_SCRIPT, str(folder), str(tmp_path / "ids.pt"),
               str(tmp_path / "out.pt")]
    done = subprocess.run(command, cwd=tmp_path, env=env or _environment(tmp_path), capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


REFERENCE_KERNELS = {"ref_conv1d", "ref_decode_attention", "ref_gated_delta", "ref_norm", "ref_ssd"}


def test_converted_folder_loads_where_hybridize_is_not_importable(hybrid_dir, tmp_path):
    """convert writes the remote code and auto_map too: no push needed to load the hybrid without hybridize."""
    assert json.loads((hybrid_dir / "config.json").read_text())["auto_map"] == AUTO_MAP
    command, env = _without_hybridize(tmp_path)
    remote = _load_remotely(Path(sys.executable), hybrid_dir, tmp_path, command, env)
    assert remote["hybridize"] is None
    assert {name.rsplit(".", 1)[1] for name in remote["kernels"]} == REFERENCE_KERNELS
    _assert_same_model(remote, hybrid_dir)


def test_recurrent_rope_hybrid_loads_where_hybridize_is_not_importable(hybrid_dir, tmp_path):
    """A hybrid converted with --recurrent-rope: the remote code rotates as the package does (same logits and greedy
    tokens without hybridize importable)."""
    folder = convert_to_folder(str(hybrid_dir.parent / "teacher"), "mamba2:0 gated_deltanet:1 full_attention:rest",
                               tmp_path / "rope", recurrent_rope=True, log=lambda *_: None)
    assert json.loads((folder / "config.json").read_text())["recurrent_rope"] is True
    command, env = _without_hybridize(tmp_path)
    remote = _load_remotely(Path(sys.executable), folder, tmp_path, command, env)
    assert remote["hybridize"] is None
    _assert_same_model(remote, folder)


def test_the_cards_loading_snippet_runs_without_hybridize(dry_run, tmp_path):
    """The card's code block, as a user would paste it, with the repository id pointing at the dry-run folder."""
    card = (dry_run / "README.md").read_text()
    snippet = re.search(r"## How to load\n\n```python\n(.*?)```", card, re.DOTALL).group(1)
    check = ('\nids = tokenizer("def add(a, b):", return_tensors="pt").input_ids\n'
             'out = model.generate(ids, max_new_tokens=3, do_sample=False)\n'
             'import importlib.util\nassert importlib.util.find_spec("hybridize") is None\n'
             'print("generated", out.shape[1] - ids.shape[1])\n')
    command, env = _without_hybridize(tmp_path)
    done = subprocess.run([*command, "-c", snippet.replace("me/tiny-hybrid", str(dry_run)) + check], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "generated 3"
    assert "pip install hybridize" not in card and "pypi.org/project/hybridize" not in card


FOREIGN_INIT = """
import pathlib
pathlib.Path(__file__).parent.parent.joinpath("ran").write_text("foreign code ran")
__hybridize_toolkit__ = {mark!r}
__version__ = {version!r}
"""


@pytest.mark.parametrize("impostor", ["no marker", "other version"])
def test_a_foreign_hybridize_package_never_runs(impostor, dry_run, tmp_path):
    """Another package named `hybridize` first on the path: ops.py reads its __init__.py, never imports it, and
    takes the reference kernels."""
    fake = tmp_path / "fake"
    (fake / "hybridize" / "kernels").mkdir(parents=True)
    mark, version = ("someone else's", __version__) if impostor == "no marker" else (__hybridize_toolkit__, "9.9.9")
    (fake / "hybridize" / "__init__.py").write_text(FOREIGN_INIT.format(mark=mark, version=version))
    (fake / "hybridize" / "kernels" / "__init__.py").write_text(FOREIGN_INIT.format(mark=mark, version=version))
    command, env = _without_hybridize(tmp_path, fake)
    remote = _load_remotely(Path(sys.executable), dry_run, tmp_path, command, env)
    assert remote["hybridize"] == str(fake / "hybridize" / "__init__.py")  # it was there to be found
    assert not (fake / "ran").exists()
    assert {name.rsplit(".", 1)[1] for name in remote["kernels"]} == REFERENCE_KERNELS


def _assert_same_model(remote: dict, hybrid_dir: Path) -> None:
    local, _ = load_hybrid(hybrid_dir)
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], local(_ids()).logits, rtol=1e-5, atol=1e-5)
    expected = local.generate(_ids(), attention_mask=torch.ones_like(_ids()), max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert torch.equal(remote["generated"], expected)


def test_remote_code_uses_hybridize_kernels_when_installed(hybrid_dir, dry_run, tmp_path):
    remote = _load_remotely(Path(sys.executable), dry_run, tmp_path)
    assert "hybridize.kernels.gated_delta" in remote["kernels"]
    assert not any(".ref_" in name for name in remote["kernels"])
    _assert_same_model(remote, hybrid_dir)


@pytest.mark.slow
def test_fresh_venv_without_hybridize_loads_the_same_model(hybrid_dir, dry_run, tmp_path):
    """Only torch and transformers installed: the reference kernels beside ops.py run, with the same results."""
    python = _fresh_venv()
    probe = subprocess.run([str(python), "-c", "import importlib.util; print(importlib.util.find_spec('hybridize'))"],
                           cwd=tmp_path, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "None"
    remote = _load_remotely(python, dry_run, tmp_path)
    assert {name.rsplit(".", 1)[1] for name in remote["kernels"]} == REFERENCE_KERNELS
    _assert_same_model(remote, hybrid_dir)
