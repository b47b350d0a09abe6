"""Code that a self-contained component file must copy stays equal to its original.

The component modules (``scheduling_ddpm.py``, ``unet_ddpm.py``, ``pipeline_ddpm.py``) import only torch,
diffusers and the standard library, because a saved pipeline carries them as remote code; a small helper or
option list that several of them need is therefore copied, as diffusers does, under a marker line

    # Copied from ddpm_components.scheduling_ddpm._check_choice

directly above the copied top-level ``def``, ``class`` or assignment. This test compares every marked copy
with the source text of its original, so a change to one that is not made to all fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import ddpm_components

PACKAGE = Path(ddpm_components.__file__).parent
MARKER = re.compile(r"^# Copied from (ddpm_components(?:\.\w+)+)\s*$")


def _top_level_definitions(path: Path) -> dict[int, tuple[str, str]]:
    """``{first line: (name, source text)}`` of the top-level defs, classes and assignments of ``path``."""
    text = path.read_text(encoding="utf-8")
    definitions = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
            first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
        elif isinstance(node, ast.Assign):
            names = [target.id for target in node.targets if isinstance(target, ast.Name)]
            first = node.lineno
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
            first = node.lineno
        else:
            continue
        lines = text.splitlines()[first - 1 : node.end_lineno]
        for name in names:
            definitions[first] = (name, "\n".join(lines))
    return definitions


def _definition(module_file: Path, name: str) -> str | None:
    for found, source in _top_level_definitions(module_file).values():
        if found == name:
            return source
    return None


def find_copy_problems(package: Path) -> tuple[list[str], int]:
    """Every marked copy under ``package`` that differs from its original (or whose original is missing),
    and the number of marked copies checked."""
    problems, checked = [], 0
    for path in sorted(package.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        definitions = _top_level_definitions(path)
        for number, line in enumerate(lines, start=1):
            match = MARKER.match(line.strip())
            if not match:
                continue
            checked += 1
            where = f"{path.name}:{number}"
            if number + 1 not in definitions:
                problems.append(f"{where}: the marker is not directly above a top-level definition")
                continue
            copy_name, copy_source = definitions[number + 1]
            module_path, _, original_name = match.group(1).rpartition(".")
            original_file = package.joinpath(*module_path.split(".")[1:]).with_suffix(".py")
            original = _definition(original_file, original_name) if original_file.is_file() else None
            if original is None:
                problems.append(f"{where}: the original {match.group(1)} does not exist")
            elif copy_name != original_name:
                problems.append(f"{where}: the copy is named {copy_name}, the original {original_name}")
            elif copy_source != original:
                problems.append(f"{where}: {copy_name} differs from {match.group(1)}; make them equal again")
    return problems, checked


def test_marked_copies_equal_their_originals():
    problems, checked = find_copy_problems(PACKAGE)
    assert not problems, "\n".join(problems)
    assert checked >= 2, "the component files are expected to carry marked copies"


def test_a_drifted_copy_is_reported(tmp_path: Path):
    package = tmp_path / "ddpm_components"
    package.mkdir()
    (package / "original.py").write_text('def helper(x):\n    return f"x={x!r}"\n\n\nLIMIT = 3\n')
    (package / "copy.py").write_text(
        "# Copied from ddpm_components.original.helper\n"
        'def helper(x):\n    return f"x = {x!r}"\n\n\n'
        "# Copied from ddpm_components.original.LIMIT\nLIMIT = 3\n\n\n"
        "# Copied from ddpm_components.original.missing\ndef missing():\n    pass\n"
    )
    problems, checked = find_copy_problems(package)
    assert checked == 3
    assert len(problems) == 2
    assert "helper differs from ddpm_components.original.helper" in problems[0]
    assert "ddpm_components.original.missing does not exist" in problems[1]
