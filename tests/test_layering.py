"""The layering of DESIGN.md: schemas imports nothing else of ours, pipeline imports schemas only,
cache_teacher and train_student never import each other (both import pipeline and schemas).

Every import statement counts, at module level or inside a function, and so does
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"schemas", "pipeline", "cache_teacher", "train_student"}
ALLOWED = {
    "schemas": {"schemas"},
    "pipeline": {"pipeline", "schemas"},
    "cache_teacher": {"cache_teacher", "pipeline", "schemas"},
    "train_student": {"train_student", "pipeline", "schemas"},
}


def imported(tree: ast.AST):
    """(line, module) of every absolute import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None)
                   in {"import_module", "__import__"})):
            yield node.lineno, node.args[0].value


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imported(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            top = module.split(".")[0]
            if top in OURS and top not in ALLOWED[package]:
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    return found


@pytest.mark.parametrize("package", list(ALLOWED))
def test_package_imports_only_what_the_layering_allows(package):
    assert violations(package) == [], f"{package} may import only {sorted(ALLOWED[package])} of ours"


def test_the_check_sees_imports_inside_functions_and_by_name():
    tree = ast.parse("def f():\n    import train_student.bench\n    from cache_teacher import worker\n"
                     "    importlib.import_module('train_student.setup')\n")
    assert [module for _, module in imported(tree)] == ["train_student.bench", "cache_teacher",
                                                        "train_student.setup"]
