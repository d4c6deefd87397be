"""pyproject.toml: the license in the SPDX string form, with a setuptools that reads it (no deprecation warnings)."""

import re
from pathlib import Path

PYPROJECT = (Path(__file__).parent.parent / "pyproject.toml").read_text()


def test_license_is_an_spdx_string_and_setuptools_reads_it():
    assert re.search(r'^license = "Apache-2\.0"$', PYPROJECT, re.MULTILINE)
    lower = re.search(r'^requires = \["setuptools>=(\d+)', PYPROJECT, re.MULTILINE)
    assert lower and int(lower.group(1)) >= 77  # the first setuptools that reads PEP 639 license strings
