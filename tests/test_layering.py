"""The layering rule of docs/architecture.md, checked on the import statements of the package.

Every ``import vitpcm.X`` / ``from vitpcm.X import`` in a module of package P must name a
package P may use. Imports inside functions count too (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vitpcm"

# the small shared helpers: every layer may use them; they use only each other
SHARED = {"errors", "io", "atomic", "locks", "classes", "images", "config", "runs", "utils", "crf_params"}

# package (first component below vitpcm) -> what it may import besides itself and SHARED
ALLOWED: Dict[str, Set[str]] = {
    **{name: set() for name in SHARED},
    "theory": set(),
    "models": set(),
    "data": set(),
    "evaluation": set(),
    "postprocess": set(),
    "viz": {"evaluation"},
    "losses": {"models"},
    "engine": set(),
    "tasks": {"engine", "models", "data", "losses", "evaluation", "postprocess"},
    "stages": {"engine", "tasks", "models", "data", "losses", "evaluation", "postprocess", "viz"},
    "cli": {"stages"},
    "__init__": None,  # the public API re-exports everything (lazily)
    "__main__": {"cli"},
}

# modules that must never import these third-party packages, even lazily
NO_HEAVY = {
    "evaluation": {"torch", "timm", "matplotlib"},
    "postprocess": {"torch", "timm"},
    "runs": {"torch", "timm", "numpy"},
    "config": {"torch", "timm"},  # timm only inside resolve functions is checked by test_cli
    "io": {"torch", "timm"},
    "atomic": {"torch", "timm"},
    "locks": {"torch", "timm"},
    "classes": {"torch", "timm"},
    "images": {"torch", "timm"},
    "utils": {"torch", "timm"},
}

# the one exception: the torch backend of the dense CRF (crf.backend=torch) is torch by nature;
# postprocess/crf.py imports it lazily, only when that backend runs
HEAVY_ALLOWED = {"postprocess/crf_torch.py": {"torch"}}


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _vitpcm_imports(tree: ast.AST) -> List[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("vitpcm")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("vitpcm"):
            if node.module == "vitpcm":  # from vitpcm import X: X is a package or an API name
                found += [f"vitpcm.{a.name}" for a in node.names if not a.name.startswith("__")]
            else:
                found.append(node.module)
    return found


def _top_imports(tree: ast.AST) -> Set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


MODULES = sorted(p for p in SRC.rglob("*.py"))


def test_every_package_has_a_rule():
    packages = {_package_of(p) for p in MODULES}
    assert packages <= set(ALLOWED), f"add {sorted(packages - set(ALLOWED))} to ALLOWED and docs/architecture.md"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_layers(path: Path):
    package = _package_of(path)
    allowed = ALLOWED[package]
    if allowed is None:
        return
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = []
    for module in _vitpcm_imports(tree):
        parts = module.split(".")
        if len(parts) < 2:
            continue
        target = parts[1]
        if target == package or target in SHARED or target in allowed:
            continue
        bad.append(module)
    assert not bad, (
        f"{path.relative_to(SRC)} ({package}) may not import {bad}: see the layering rule in docs/architecture.md"
    )


@pytest.mark.parametrize("package", sorted(NO_HEAVY))
def test_light_packages_import_no_heavy_library(package: str):
    paths = [p for p in MODULES if _package_of(p) == package]
    assert paths, package
    for path in paths:
        heavy = _top_imports(ast.parse(path.read_text(encoding="utf-8"))) & NO_HEAVY[package]
        heavy -= HEAVY_ALLOWED.get(path.relative_to(SRC).as_posix(), set())
        assert not heavy, f"{path.relative_to(SRC)} imports {sorted(heavy)}"


def test_the_rule_catches_a_violation(tmp_path: Path):
    # the checker itself: a models module importing data must be reported
    tree = ast.parse("from vitpcm.data.transforms import tile_views\nimport vitpcm.engine.trainer\n")
    targets = {m.split(".")[1] for m in _vitpcm_imports(tree)}
    assert targets - ALLOWED["models"] - SHARED == {"data", "engine"}
