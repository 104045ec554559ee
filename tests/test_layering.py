"""Imports flow one way: ``pseudolabel`` (domain) ← ``resources`` ← ``assets`` ← ``dagster_project``.

Read from the source with ``ast`` (imports inside functions included), so a lazy import cannot hide an
upward one. Rules:
- a package never imports a package to its right in the chain above;
- the domain package never imports Dagster (the model worker has only ``dagster_pipes``);
- an asset module never imports another asset module (shared definitions live in ``assets/common.py``);
- nothing but tests, benchmarks and the demo imports the test-support package ``pseudolabel.testing``.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["pseudolabel", "resources", "assets", "dagster_project"]
TESTING = "pseudolabel.testing"
ASSETS_SHARED = {"assets", "assets.common"}  # importers allowed to see every asset module
MAY_USE_TESTING = {"dagster_project.demo"}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[str]:
    """Every absolute module an import statement in ``path`` names (``from a import b`` gives a, a.b)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports_an_asset_module(imported: str) -> bool:
    return within(imported, "assets") and imported != "assets" and not within(imported, "assets.common")


def violations(root: Path) -> list[str]:
    found = []
    for layer_index, layer in enumerate(LAYERS):
        for path in sorted((root / layer).rglob("*.py")):
            importer = module_name(root, path)
            for imported in imported_modules(path):
                top = imported.split(".")[0]
                where = f"{path.relative_to(root)}: imports {imported}"
                if top in LAYERS and LAYERS.index(top) > layer_index:
                    found.append(f"{where} (upward: {layer} may not import {top})")
                if layer == "pseudolabel" and top == "dagster":
                    found.append(f"{where} (the domain package never imports Dagster)")
                if layer == "assets" and importer not in ASSETS_SHARED and imports_an_asset_module(imported):
                    found.append(f"{where} (asset modules never import each other)")
                if (
                    within(imported, TESTING)
                    and not within(importer, TESTING)
                    and importer not in MAY_USE_TESTING
                ):
                    found.append(f"{where} (production code never imports {TESTING})")
    return found


def test_imports_flow_one_way():
    assert violations(REPO) == []


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_check_catches_each_kind_of_violation(tmp_path):
    write(tmp_path, "pseudolabel/labels.py", "def f():\n    from resources.storage import X\n")
    write(tmp_path, "pseudolabel/worker.py", "import dagster\n")
    write(tmp_path, "pseudolabel/loader.py", "from pseudolabel.testing.models import FakeDetector\n")
    write(tmp_path, "resources/storage.py", "from assets.masks import masks\n")
    write(tmp_path, "assets/masks.py", "from assets.common import shard_partitions\n")
    write(tmp_path, "assets/labels.py", "from assets import masks\n")
    write(tmp_path, "assets/dataset.py", "from assets.labels import THRESHOLDS\n")
    write(tmp_path, "dagster_project/demo.py", "from pseudolabel.testing import servers\n")
    write(tmp_path, "dagster_project/cli.py", "import pseudolabel.testing.servers\n")
    found = violations(tmp_path)
    expected = [
        "pseudolabel/labels.py: imports resources.storage",
        "pseudolabel/loader.py: imports pseudolabel.testing.models",
        "pseudolabel/worker.py: imports dagster",
        "resources/storage.py: imports assets.masks",
        "assets/dataset.py: imports assets.labels",
        "assets/labels.py: imports assets.masks",
        "dagster_project/cli.py: imports pseudolabel.testing.servers",
    ]
    for line in expected:
        assert any(v.startswith(line) for v in found), (line, found)
    # assets.common and the demo's use of the test-support package are allowed.
    assert not any("assets/masks.py" in v or "dagster_project/demo.py" in v for v in found), found
