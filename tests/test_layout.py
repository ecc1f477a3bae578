"""The layout a reader walks stays as the README draws it: the root is the story and the commands, the package
holds the rest, imports point one way, and no file or function outgrows one sitting. An AST walk, no imports run.

    python -m pytest -q tests/test_layout.py
"""

import ast
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "smollm2"
MAX_ROOT_FILES, MAX_FILE_LINES, MAX_FUNCTION_LINES = 12, 450, 80


def root_files() -> list[Path]:
    return sorted(ROOT.glob("*.py"))


def package_files() -> list[Path]:
    return sorted((ROOT / PACKAGE).glob("*.py"))


def module_name(path: Path) -> str:
    if path.parent.name == PACKAGE:
        return PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"
    return path.stem


def imported_modules(path: Path) -> set[str]:
    """Every module of this repository that `path` imports, at its top or inside a function."""
    ours = {module_name(p) for p in root_files() + package_files()}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from smollm2 import chat` imports the module smollm2.chat; `from smollm2.chat import x` the module
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found.update(name for name in names if name in ours and name != PACKAGE)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in root_files() + package_files()}


def test_the_root_holds_the_story_and_the_commands_and_nothing_else():
    files = root_files()
    assert len(files) <= MAX_ROOT_FILES, [p.name for p in files]
    for path in files:
        if path.name == "model.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guards = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert guards, f"{path.name} is neither model.py nor a command a user runs: it belongs in {PACKAGE}/"
    assert sorted(p.name for p in ROOT.glob("*.yaml")) == ["config_smollm2_135M.yaml", "config_tiny.yaml"], \
        "the other configs live in configs/"


def test_model_py_depends_on_torch_alone():
    allowed = set(sys.stdlib_module_names) | {"torch"}
    for node in ast.walk(ast.parse((ROOT / "model.py").read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                assert name.split(".")[0] in allowed, f"model.py imports {name}"


def test_the_package_imports_no_root_script_but_model_py():
    roots = {module_name(p) for p in root_files()}
    for path in package_files():
        wrong = (imported_modules(path) & roots) - {"model"}
        assert not wrong, f"{PACKAGE}/{path.name} imports the root script(s) {sorted(wrong)}"


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, trail + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_file_over_450_lines_and_no_function_over_80():
    for path in root_files() + package_files():
        text = path.read_text(encoding="utf-8")
        assert text.count("\n") <= MAX_FILE_LINES, f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                assert length <= MAX_FUNCTION_LINES, f"{where}: {length} lines"


def test_every_file_opens_with_a_docstring_and_root_files_say_what_to_read_next():
    for path in root_files() + package_files():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc, f"{path.relative_to(ROOT)} has no docstring saying what it does"
        if path.parent == ROOT:
            assert doc.rstrip().split("\n\n")[-1].startswith("Read next:"), \
                f"{path.name}: its docstring's last paragraph should say what to read next ('Read next: ...')"


def test_the_package_map_names_every_module():
    doc = ast.get_docstring(ast.parse((ROOT / PACKAGE / "__init__.py").read_text(encoding="utf-8")))
    missing = [p.name for p in package_files() if p.stem != "__init__" and p.name not in doc]
    assert not missing, f"{PACKAGE}/__init__.py's map does not name {missing}"


def test_no_root_module_shadows_an_installed_library():
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    shadowing = [p.name for p in root_files() if p.stem in installed]
    assert not shadowing, f"{shadowing}: a library of that name could not be imported beside this repository"


def test_no_test_imports_another_test_module():
    """Nor conftest.py, which pytest loads itself: what tests share is in helpers.py (functions) or is a fixture."""
    tests = {p.stem for p in (ROOT / "tests").glob("*.py")}
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in tests - {"helpers"}:
                raise AssertionError(f"tests/{path.name} imports {node.module}: shared helpers live in "
                                     "tests/helpers.py, shared fixtures in tests/conftest.py")
            if isinstance(node, ast.Import) and any(a.name in tests - {"helpers"} for a in node.names):
                raise AssertionError(f"tests/{path.name} imports another test module")
