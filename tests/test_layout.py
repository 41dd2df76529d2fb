"""The layout's import rules, checked on every module of every package (imports inside
functions count too): one room per role, each importing only what its role may."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "client", "collector", "audit", "training")
FORBIDDEN = {
    # protocol is the shared contract: numpy, Pillow and the standard library (onnxruntime
    # only in protocol/runtime.py, imported when a model is opened)
    "protocol": {"torch", "client", "collector", "audit", "training", "research", "flask", "requests", "sklearn"},
    "client": {"torch", "collector", "audit", "training", "research", "flask"},
    "collector": {"client", "audit", "training", "research"},
    "audit": {"training", "collector", "research"},
    "training": {"client", "collector", "audit", "research"},
}
# torch in the collector only where a training job runs
TORCH_ALLOWED = {"collector/train_job.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_its_role_may(package: str) -> None:
    bad = []
    for path in _modules(package):
        rel = path.relative_to(REPO).as_posix()
        forbidden = set(FORBIDDEN[package])
        if package == "collector" and rel not in TORCH_ALLOWED:
            forbidden.add("torch")
        if package == "protocol" and rel != "protocol/runtime.py":
            forbidden.add("onnxruntime")
        bad += [f"{rel} imports {name}" for name in sorted(_imports(path) & forbidden)]
    assert not bad, "\n".join(bad)


def test_the_rules_catch_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from training.train import main\n    import torch.nn as nn\n")

    assert _imports(module) == {"training", "torch"}


def test_nothing_installed_reads_the_tests_folder() -> None:
    hits = [p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in _modules(pkg)
            if '"tests"' in p.read_text() or "tests/assets" in p.read_text()]
    assert not hits, hits


def test_protocol_and_client_import_without_torch() -> None:
    code = ("import sys, protocol.datasets, protocol.preprocess, protocol.runtime, protocol.wire, protocol.sparse_code, "
            "client.cli, client.pipeline; bad = [m for m in ('torch', 'training', 'audit') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
