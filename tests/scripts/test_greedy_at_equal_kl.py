"""scripts/greedy_at_equal_kl.py on a tiny teacher: the noisy copies are what they say (noise of the named share of
each weight matrix's spread, norms untouched, bf16 rounding at share 0, the same for a seed), and more noise means
more KL through the eval's own measurement."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from hybridize.teacher import load_teacher, teacher_folder
from helpers import REPO, load_script, run_script, save_tiny_teacher

noisy_copy = load_script(REPO / "scripts" / "greedy_at_equal_kl.py").noisy_copy


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(teacher_folder(None))
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-llama", tokenizer, 2, max_positions=1024)


def test_a_noisy_copy_has_the_named_noise_in_its_matrices_only(teacher_dir):
    teacher = load_teacher(str(teacher_dir), dtype=torch.float32, device=torch.device("cpu"))[0]
    share = 0.05
    student = noisy_copy(teacher, share, seed=3)
    for (name, t), s in zip(teacher.named_parameters(), student.parameters()):
        if t.ndim < 2:
            assert torch.equal(t, s), name
            continue
        # the std of n Gaussian draws is off by about 1 / sqrt(2n) of itself; 6 of those bound it
        relative = ((s - t).std() / t.std()).item()
        assert abs(relative - share) < 6 * share / (2 * t.numel()) ** 0.5, (name, relative)
    again = noisy_copy(teacher, share, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), again.parameters()))
    rounded = noisy_copy(teacher, 0.0, seed=3)
    assert all(torch.equal(r, t.to(torch.bfloat16).float()) for r, t in zip(rounded.parameters(), teacher.parameters()))


def test_more_noise_is_more_kl_through_the_eval(teacher_dir, tmp_path):
    out = tmp_path / "rows.json"
    done = run_script("greedy_at_equal_kl.py", "--teacher", teacher_dir, "--small", "--noise", "0.01,0.2",
                      "--device", "cpu", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["noise"] for row in rows] == [0.01, 0.2]
    assert 0 < rows[0]["kl"] < rows[1]["kl"]
    assert all(0 <= row["greedy_exact"] <= 1 and 0 <= row["greedy_prefix"] <= 32 for row in rows)
