"""The examples in docs/keyd.toml.5.md are valid configurations, and the stacks the tests configure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from keyd.config import parse_config
from tests import configs

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


DOCUMENTED = [  # the tests' scenarios with the documented devices, in the order of the examples
    configs.seed_000("/dev/disk/by-id/usb-Seagate_Expansion_Desk_NA4KXXXX-0:0",
                     services=["smbd.service", "minidlna.service"]),
    configs.seed_001("6b8b4567:327b23c6:643c9869:66334873", services=["smbd.service"]),
    configs.seed_002("/dev/disk/by-id/ata-DISK1-part1", "/dev/disk/by-id/ata-DISK2-part1",
                     services=["smbd.service"]),
    configs.seed_003("PARTUUID=5a3c0d12-02"),
    configs.seed_004("/dev/disk/by-id/ata-OLD_DISK-part2"),
    configs.luks_on_raid("0b0b0b0b-1111-2222-3333-444455556666", degraded="always",
                         options=["nodev", "nosuid"]),
]


@pytest.mark.parametrize(("block", "scenario"), list(zip(BLOCKS, DOCUMENTED, strict=True)),
                         ids=[str(i) for i in range(len(BLOCKS))])
def test_the_tests_scenarios_are_the_documented_stacks(block: str, scenario: str) -> None:
    assert parse_config(scenario, "doc") == parse_config(block, "doc")
