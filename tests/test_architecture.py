"""The parts of mitra_model keep their arrows: the import-linter contracts of pyproject.toml hold
(layers, a release side without the build toolchain or Prefect, a library without Prefect, no import
loop), and every import deferred into a function says why beside it."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "mitra_model"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_every_architecture_contract_is_kept() -> None:
    contracts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert {c["type"] for c in contracts} == {"layers", "forbidden", "acyclic_siblings"}
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" KEPT") == len(contracts), done.stdout


def test_a_contract_breach_fails_the_check(tmp_path: Path) -> None:
    """The check can fail: a copy of the package whose release side imports the build is refused."""
    import shutil

    shutil.copytree(PACKAGE, tmp_path / "mitra_model", symlinks=True)
    (tmp_path / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    layout = tmp_path / "mitra_model" / "release" / "layout.py"
    layout.write_text(layout.read_text() + "\nfrom mitra_model.build import recipes  # a breach\n")
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False, env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "mitra_model.release.layout -> mitra_model.build.recipes" in done.stdout


def _deferred_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, explained) for each import inside a function: explained when a comment is on its
    line or above the block of imports it starts or belongs to."""
    lines = path.read_text().split("\n")
    found = []
    for function in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            above = node.lineno - 1
            while above >= 1 and (not lines[above - 1].strip()
                                   or lines[above - 1].strip().startswith(("import ", "from ", ")"))):
                above -= 1  # the block of imports this one belongs to (isort's groups are split by a blank line)
            explained = "#" in lines[node.lineno - 1] or (above >= 1 and lines[above - 1].strip().startswith("#"))
            found.append((node.lineno, module or "", explained))
    return found


def test_every_deferred_import_says_why() -> None:
    """An import inside a function is allowed to keep the slim install or start-up light, never to dodge
    a loop (the acyclic contract above counts it like any other), and a comment says which."""
    unexplained = [f"{path.relative_to(REPO_ROOT)}:{line} imports {module}"
                   for path in sorted(PACKAGE.rglob("*.py"))
                   for line, module, explained in _deferred_imports(path) if not explained]
    assert not unexplained, "deferred imports without a reason:\n" + "\n".join(unexplained)
