"""The layers only point down: no module imports a layer above its own (README, "Architecture").

    op -> module -> detector -> data -> training | inference -> drawing -> tools

(lowest first: a module may import its own layer and those before it). Training and inference share a rank and
must not import each other. The check parses every ``.py`` file under ``deformable/``, ``models/`` and ``tools/``
with ``ast`` (nothing is imported or run) and resolves each ``import`` and ``from ... import`` (relative ones
included, and those inside functions) to a project module; third-party imports are ignored. A project module that
no layer claims is an error too, so a new file has to be placed.

The checker is tested on itself: a synthetic module in the op layer that imports the detector is reported, e.g.

    deformable/ops.py:3: 'from models.config import Config' imports models.config (detector) from the op layer
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass

from _repo import ROOT

# (layer, rank, modules): a name ending in ".*" is a package with everything in it, any other name one module. Files
# directly in deformable/ are listed one by one, so that a new one has to be placed.
LAYERS: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("op", 0, ("deformable._C", "deformable._extension", "deformable.backend", "deformable.reference",
               "deformable.validation", "deformable.ops", "deformable.cope_locate", "deformable.benchmarking")),
    ("module", 1, ("deformable", "deformable.__main__", "deformable.modules", "deformable.cope",
                   "deformable.cope_sampling", "deformable.recording")),
    ("detector", 2, ("models.*",)),
    ("data", 3, ("deformable.data.*",)),
    ("training", 4, ("deformable.training.*",)),
    ("inference", 4, ("deformable.inference.*",)),
    ("drawing", 5, ("deformable.viz.*",)),
    ("tools", 6, ("tools.*",)),
)  # fmt: skip
PROJECT_PACKAGES = ("deformable", "models", "tools")
SCANNED = ("deformable", "models", "tools")


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    statement: str
    target: str
    target_layer: str
    layer: str

    def __str__(self) -> str:
        return (
            f"{self.path}:{self.line}: {self.statement!r} imports {self.target} ({self.target_layer}) "
            f"from the {self.layer} layer"
        )


def layer_of(module: str) -> tuple[str, int] | None:
    """``(layer, rank)`` of a dotted project module name, or None when no layer claims it."""
    for name, rank, members in LAYERS:
        for member in members:
            package = member.removesuffix(".*")
            if module == package or (member.endswith(".*") and module.startswith(package + ".")):
                return name, rank
    return None


def module_name(path: str) -> str:
    """``deformable/training/engine.py`` -> ``deformable.training.engine``; a package's ``__init__`` -> the package."""
    parts = os.path.splitext(path)[0].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path: str) -> bool:
    return os.path.basename(path) == "__init__.py"


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, package: bool, exists) -> list[str]:
    """The dotted modules an import statement loads (for ``from X import name``: ``X.name`` when that is a module
    per ``exists``, else ``X``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    targets = []
    for alias in node.names:
        candidate = f"{source}.{alias.name}"
        targets.append(candidate if exists(candidate) else source)
    return targets


def check_source(path: str, source: str, exists) -> list[Violation]:
    """The upward imports in one file (``path`` relative to the repository, e.g. ``deformable/ops.py``).

    Raises:
        ValueError: the file, or a project module it imports, belongs to no layer.
    """
    module = module_name(path)
    if module.startswith("tools"):
        module = "tools"  # every tool, benchmark and experiment is the top layer
    own = layer_of(module)
    if own is None:
        raise ValueError(f"{path}: module {module} belongs to no layer; add it to LAYERS in tests/test_layers.py")
    violations = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for target in imported_modules(node, module, _is_package(path), exists):
            if target.split(".")[0] not in PROJECT_PACKAGES:
                continue  # third party, the standard library, or a tool's sibling script
            theirs = layer_of(target)
            if theirs is None:
                raise ValueError(f"{path}:{node.lineno}: {target} belongs to no layer; add it to LAYERS")
            upward = theirs[1] > own[1]
            sideways = theirs[1] == own[1] and theirs[0] != own[0]  # training <-> inference
            if upward or sideways:
                statement = ast.get_source_segment(source, node) or ast.unparse(node)
                violations.append(Violation(path, node.lineno, statement, target, theirs[0], own[0]))
    return violations


def project_files() -> list[str]:
    """Every ``.py`` under the scanned folders, relative to the repository."""
    files = []
    for top in SCANNED:
        for folder, dirs, names in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            files += [os.path.relpath(os.path.join(folder, n), ROOT) for n in names if n.endswith(".py")]
    return sorted(files)


def module_exists(name: str) -> bool:
    """True when ``name`` is a module or package file in this checkout (or the compiled ``deformable._C``)."""
    path = os.path.join(ROOT, *name.split("."))
    return name == "deformable._C" or os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def test_no_module_imports_a_layer_above_its_own():
    violations = []
    for path in project_files():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            violations += check_source(path, f.read(), module_exists)
    assert not violations, "upward imports:\n" + "\n".join(map(str, violations))


def test_every_layer_has_its_files():
    layers = {layer_of(module_name(p) if not p.startswith("tools") else "tools")[0] for p in project_files()}
    assert layers == {name for name, _, _ in LAYERS}


def test_the_checker_reports_an_upward_import():
    """The test of the test: synthetic sources with upward imports are reported with file, line and statement."""
    source = '"""An op that reaches up."""\n\nfrom models.config import Config\nfrom . import reference\n'
    (violation,) = check_source("deformable/ops.py", source, module_exists)
    assert str(violation) == (
        "deformable/ops.py:3: 'from models.config import Config' imports models.config (detector) from the op layer"
    )
    inside_a_function = "def f():\n    from ..viz import draw\n"
    (violation,) = check_source("deformable/inference/run.py", inside_a_function, module_exists)
    assert (violation.line, violation.target, violation.target_layer) == (2, "deformable.viz.draw", "drawing")
    sideways = "import deformable.inference.images\n"
    (violation,) = check_source("deformable/training/engine.py", sideways, module_exists)
    assert violation.target_layer == "inference" and violation.layer == "training"
    downward = "from deformable.data import collate\nimport torch\nfrom models import build_detector\n"
    assert check_source("deformable/inference/images.py", downward, module_exists) == []


def test_the_checker_refuses_an_unplaced_module():
    try:
        check_source("deformable/newthing.py", "import torch\n", module_exists)
    except ValueError as exc:
        assert "belongs to no layer" in str(exc)
    else:
        raise AssertionError("a module outside every layer was accepted")
