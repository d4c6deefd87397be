"""Tiny teacher / hybrid pairs on disk, built with the real SmolLM2 tokenizer and the real conversion."""

import pytest
import torch
from transformers import AutoTokenizer

from hybridize.convert.init import TEACHER_CALIBRATED
from hybridize.convert.pipeline import convert_to_folder
from hybridize.evaluate.common import load_pair
from hybridize.teacher import teacher_folder
from helpers import save_tiny_teacher


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(teacher_folder(None))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer):
    """A 4-layer Llama (hidden 64, GQA 4:2) over the real 49152-token vocabulary, saved like any HF model."""
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-llama", tokenizer, layers=4, max_positions=1024)


def _convert(tmp_path_factory, teacher_dir, plan: str):
    """The teacher-calibrated init: its recurrent layers' gates start open, so they count in what eval measures."""
    folder = tmp_path_factory.mktemp("hybrid") / plan.replace(":", "-")
    return convert_to_folder(str(teacher_dir), plan, folder, options=TEACHER_CALIBRATED, log=lambda *_: None)


@pytest.fixture(scope="session")
def hybrid_dir(tmp_path_factory, teacher_dir):
    """1 full-attention layer; Mamba2, GDN and sliding-window attention in the other three."""
    return _convert(tmp_path_factory, teacher_dir, "h2:1")


@pytest.fixture(scope="session")
def identity_dir(tmp_path_factory, teacher_dir):
    """Every layer kept as attention: the hybrid computes exactly what the teacher does."""
    return _convert(tmp_path_factory, teacher_dir, "all:full_attention")


@pytest.fixture(scope="session")
def pair(hybrid_dir):
    """(student, teacher, tokenizer) loaded the way `hybridize eval` loads them (teacher from conversion.json)."""
    student, teacher, tokenizer, _ = load_pair(hybrid_dir, None, dtype=torch.float32, device=torch.device("cpu"))
    return student, teacher, tokenizer
