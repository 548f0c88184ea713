"""The layer rule of docs/architecture.md, checked on every import in the tree (module level or not).

Bottom to top: ``countersign`` (the client package) < ``audit`` < ``consent`` < ``approvals`` < ``ledger`` <
``config``. A package imports only its own layer and those below it; the CIBA grant reaches the
token endpoint through ``COUNTERSIGN["TOKEN_GRANTS"]`` (a setting), and services queue Celery
tasks by their registered name, so nothing needs an import upwards.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["countersign", "audit", "consent", "approvals", "ledger", "config"]
# Known exceptions, each a debt with its way out (docs/architecture.md, "The layer rule"). Paid:
# none is owed. A new one goes here with its reason, and comes off once it is paid.
DEBTS: dict[str, set[str]] = {}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _layer(module: str) -> str | None:
    top = module.split(".", 1)[0]
    return top if top in LAYERS else None


@pytest.mark.parametrize("package", LAYERS)
def test_a_package_imports_nothing_above_its_layer(package: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(package) + 1])
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        debts = DEBTS.get(str(path.relative_to(ROOT)), set())
        for line, module in _imports(path):
            layer = _layer(module)
            if layer is not None and layer not in allowed and layer not in debts:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert wrong == [], f"{package} may import only {sorted(allowed)}:\n" + "\n".join(wrong)


def test_every_debt_is_still_owed() -> None:
    # A debt paid off (the module no longer reaches up) comes off the list.
    for name, packages in DEBTS.items():
        reached = {_layer(module) for _, module in _imports(ROOT / name)}
        assert packages <= reached, f"{name} no longer imports {packages - reached}: drop it from DEBTS"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    # The rule above would pass on a tree it cannot read; make sure it reads this one.
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\n\ndef f():\n    from approvals.rar import action_hash\n    import config.celery\n"
    )
    assert [m for _, m in _imports(sample)] == ["os", "approvals.rar", "config.celery"]
    assert sum(1 for _ in (ROOT / "consent").rglob("*.py")) > 20
