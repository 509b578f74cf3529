"""The shape of tieta's code, read from its source files (nothing is imported).

Pinned here:

- tieta's modules import each other without a cycle (module-level imports; the public surface
  ``tieta/__init__.py``, which re-exports everything, is left out);
- imports sit at the top of a module, except in the command line (which imports lazily so that
  ``--help`` stays fast) and in the functions listed in ``LAZY_IMPORTS``, each with its reason;
- ``tieta.ops`` (pure tensor operations) imports nothing of tieta;
- no module outside ``tieta.methods`` names a method in code (only in comments and docstrings):
  what differs per method comes from the method registry; the few that name methods on purpose
  are listed in ``NAMES_METHODS_ON_PURPOSE``, each with its reason.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path
from typing import Iterator, Optional

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "tieta"

# (file relative to src/tieta, function) -> why it imports inside its body
LAZY_IMPORTS = {
    ("data/assets.py", "_import_onnx"): "onnx is an optional dependency (tieta[assets])",
    ("data/assets.py", "_onnx_to_timm"): "onnx is an optional dependency (tieta[assets])",
    ("report/figure.py", "pyplot"): "matplotlib is an optional dependency (tieta[plots])",
    ("backbone.py", "builtin_weights"): "tieta.data.assets, only when a built-in asset is named",
    ("backbone.py", "builtin_models"): "tieta.data.assets, only when a built-in asset is named or suggested",
    ("data/assets.py", "saliency_dinov2_vits14_weights"): "timm and safetensors, only when the asset is built",
    ("data/assets.py", "_write_elpv"): "tqdm, only when the ELPV task is built",
    ("deploy/onnx.py", "_onnxruntime"): "onnxruntime is an optional dependency (tieta[onnx])",
    ("deploy/onnx.py", "_onnx_translations"): "onnxscript is an optional dependency (tieta[onnx])",
    ("data/hub.py", "_datasets"): "datasets is an optional dependency (tieta[datasets])",
    ("data/vtab.py", "open_task"): "tieta.data.sources and tieta.data.hub, which build on this module's Task",
    ("hf/source.py", "_download"): "huggingface_hub, only for hf:ORG/NAME (tieta[transformers])",
    ("hf/export.py", "_transformers"): "transformers is an optional dependency (tieta[transformers])",
    ("train/loggers.py", "_import_tensorboard"): "tensorboard is an optional dependency (tieta[tensorboard])",
    ("train/loggers.py", "_import_wandb"): "wandb is an optional dependency (tieta[wandb])",
    ("video/clips.py", "need_av"): "PyAV is an optional dependency (tieta[video])",
}
LAZY_FILES = {"cli.py"}  # every function of these may import lazily

METHOD_NAMES = ("dyt", "tome", "pyra", "evit", "dynamicvit", "diffrate")
# a method's name as a word: "add_tome" and "DyT" match, "customer" does not
METHOD_WORD = re.compile(r"(?<![a-z])(" + "|".join(METHOD_NAMES) + r")(?![a-z])")
# names that contain a method's name but are not about the method: the PYRA paper's 2**30 FLOP unit,
# a public key of count_flops' result, and the words that cite that paper's unit
NOT_A_METHOD = {"pyra_gflops", "pyra_unit", "pyra paper"}
# folders and files outside methods/ (relative to src/tieta) that name methods on purpose -> why
NAMES_METHODS_ON_PURPOSE = {
    "reference": "transcribes the published PYRA, DyT and NOAH code: their checkpoints' keys, arguments and names",
    "ops": "each file is one method's pure tensor operations, part of that method (a method is its module "
           "plus its ops file)",
    "native": "ToMe's merge in C: one method's operations, as ops/ holds them",
    "measure/bench_suite.py": "tieta bench times named methods side by side (the PYRA paper's speed table): "
                              "its line-up is what it measures",
    "measure/suites.py": "the names of tieta bench's line-ups, and what each times",
    "measure/free_merge.py": "the bench's ToMe whose merges cost nothing, timed beside ToMe",
    "report/speed.py": "the reading of tieta bench's line-up (PYRA's speed against ToMe's)",
    "report/tables.py": "the columns of tieta bench's line-up (PYRA / ToMe)",
    "demo.py": "the demo's recipe: the methods it trains and compares by name",
}


def source_files() -> list[Path]:
    """Every .py file of the tieta package."""
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    """``src/tieta/methods/blocks.py`` -> ``tieta.methods.blocks``; a package's __init__ -> the package."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    """Whether ``name`` (dotted) is a module or package of tieta's source tree."""
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` reads from (resolving relative imports)."""
    if not node.level:
        return node.module or ""
    parts = importer.split(".")
    parts = parts if is_package else parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imported_tieta_modules(node: ast.stmt, importer: str, is_package: bool) -> list[str]:
    """The tieta modules an import statement loads: ``from tieta.methods import blocks`` ->
    ``tieta.methods.blocks`` where that is a module, else the package it reads from."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "tieta"]
    if isinstance(node, ast.ImportFrom):
        base = absolute(node, importer, is_package)
        if base.split(".")[0] != "tieta":
            return []
        return [f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base for alias in node.names]
    return []


def module_level_imports(tree: ast.Module) -> Iterator[ast.stmt]:
    """Import statements that run when the module is imported: top level, and inside top-level
    ``if`` / ``try`` blocks, but not under ``if TYPE_CHECKING:``."""
    pending = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                pending.extend(node.body)
            pending.extend(node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                pending.extend(handler.body)


def import_graph() -> dict[str, set[str]]:
    """tieta module -> the tieta modules it imports at module level (without ``tieta`` itself and
    without the public surface's re-exports)."""
    graph: dict[str, set[str]] = {}
    for path in source_files():
        importer = module_name(path)
        if importer == "tieta":
            continue
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for node in module_level_imports(tree):
            targets.update(imported_tieta_modules(node, importer, is_package))
        graph[importer] = {target for target in targets if target not in ("tieta", importer)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """A cycle of the directed graph as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" on the current path, "done" when fully explored
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = "open"
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                return path[path.index(successor):] + [successor]
            if successor not in state:
                cycle = visit(successor)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def imports_in_functions() -> set[tuple[str, str]]:
    """(file relative to src/tieta, function) for every function whose body holds an import."""
    found = set()
    for path in source_files():
        relative = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = [sub for statement in node.body for sub in ast.walk(statement)]
                if any(isinstance(sub, (ast.Import, ast.ImportFrom)) for sub in body):
                    found.add((relative, node.name))
    return found


def docstring_lines(tree: ast.Module) -> set[int]:
    """Line numbers covered by the module's, classes' and functions' docstrings."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def method_names_in_code(path: Path) -> list[str]:
    """``line: token`` for each code token (not a comment, not a docstring) naming a method."""
    text = path.read_text()
    docstrings = docstring_lines(ast.parse(text, str(path)))
    hits = []
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
            continue
        if token.type == tokenize.STRING and token.start[0] in docstrings:
            continue
        lowered = token.string.lower()
        for name in NOT_A_METHOD:
            lowered = lowered.replace(name, "")
        if METHOD_WORD.search(lowered):
            hits.append(f"{path.relative_to(SRC)}:{token.start[0]}: {token.string}")
    return hits


def test_the_import_graph_covers_the_package():
    graph = import_graph()
    assert "tieta.methods.blocks" in graph["tieta.methods.tome"]
    assert "tieta.methods.registry" in graph["tieta.methods.params"]  # `from tieta.methods import registry`
    assert "tieta.native" in graph["tieta.native.tome_merge"]  # `from tieta.native import load_library`


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_tieta_modules_import_each_other_without_a_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_inside_functions_are_only_the_listed_lazy_ones():
    found = {key for key in imports_in_functions() if key[0] not in LAZY_FILES}
    print("imports inside functions, outside " + ", ".join(sorted(LAZY_FILES)) + ":")
    for file, function in sorted(found):
        print(f"  {file}:{function}  ({LAZY_IMPORTS.get((file, function), 'NOT LISTED')})")
    assert found - set(LAZY_IMPORTS) == set(), "new import inside a function; import at module level"
    assert set(LAZY_IMPORTS) - found == set(), "listed lazy import no longer exists; remove it from LAZY_IMPORTS"


def test_ops_import_nothing_of_tieta():
    offenders = []
    for path in sorted((PACKAGE / "ops").rglob("*.py")):
        importer = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if imported_tieta_modules(node, importer, path.name == "__init__.py"):
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def test_method_word_matches_names_not_other_words():
    assert METHOD_WORD.search("add_tome") and METHOD_WORD.search("dyt") and METHOD_WORD.search("dynamicvit")
    assert not METHOD_WORD.search("customer") and not METHOD_WORD.search("brevity")


def outside_the_methods() -> list[Path]:
    """Every source file outside ``tieta/methods/`` and outside ``NAMES_METHODS_ON_PURPOSE``."""
    def exempt(relative: str) -> bool:
        return any(relative == place or relative.startswith(place + "/") for place in NAMES_METHODS_ON_PURPOSE)

    return [path for path in source_files()
            if path.relative_to(PACKAGE).parts[0] != "methods" and not exempt(path.relative_to(PACKAGE).as_posix())]


def test_no_module_outside_the_methods_names_a_method_in_code():
    files = outside_the_methods()
    assert PACKAGE / "cli.py" in files and PACKAGE / "deploy" / "export.py" in files
    assert PACKAGE / "train" / "fit.py" in files and PACKAGE / "measure" / "flops.py" in files
    hits = [hit for path in files for hit in method_names_in_code(path)]
    assert hits == [], "method names in code:\n" + "\n".join(hits)


def test_the_exempt_places_exist_and_still_name_methods():
    for place in NAMES_METHODS_ON_PURPOSE:
        path = PACKAGE / place
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        assert files and any(method_names_in_code(file) for file in files), place
