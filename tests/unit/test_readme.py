"""The README's annotation reference is generated from the one table in code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_annotation_table_matches_code() -> None:
    text = README.read_text()
    table = text.split("<!-- annotations:begin -->")[1].split("<!-- annotations:end -->")[0]
    generated = subprocess.run(
        [sys.executable, "-m", "webhook.annotations"], capture_output=True, text=True, check=True
    ).stdout
    assert table.strip() == generated.strip()


def test_readme_opens_with_the_two_commands() -> None:
    head = README.read_text()[:400]
    assert "sudo make demo" in head and "make test" in head
