"""What ships is only the product: nothing under keyd/ imports the lab or the test tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PRODUCT = Path(__file__).resolve().parents[2] / "keyd"
NOT_SHIPPED = ("keyd_lab", "tests")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(PRODUCT.rglob("*.py")), ids=lambda p: str(p.relative_to(PRODUCT)))
def test_product_module_imports_nothing_that_is_not_shipped(path: Path) -> None:
    outside = {name for name in imported_modules(path) if name.split(".")[0] in NOT_SHIPPED}
    assert not outside, f"{path} imports {sorted(outside)}"


def test_the_check_sees_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import tests.support.daemon_fakes\nfrom keyd_lab.vm import Lab\nfrom . import x\n")
    assert imported_modules(sample) == {"tests.support.daemon_fakes", "keyd_lab.vm"}
