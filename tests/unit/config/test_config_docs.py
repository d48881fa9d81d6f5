"""The examples in docs/keyd.toml.5.md are valid configurations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from keyd.config import parse_config

DOC = Path(__file__).resolve().parents[3] / "docs" / "keyd.toml.5.md"
EXAMPLES = DOC.read_text().split("## EXAMPLES", 1)[1]
BLOCKS = re.findall(r"```toml\n(.*?)```", EXAMPLES, re.S)


def test_every_seed_has_an_example() -> None:
    for seed in ("000", "001", "002", "003", "004"):
        assert f"### Seed {seed}" in EXAMPLES
    assert len(BLOCKS) == 6


@pytest.mark.parametrize("block", BLOCKS, ids=[str(i) for i in range(len(BLOCKS))])
def test_examples_parse(block: str) -> None:
    config = parse_config(block, "doc")
    assert config.volumes
