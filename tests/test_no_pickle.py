"""layervault's own code never unpickles: manifests, optimizer hyper-parameters and every
other thing it reads back are JSON, protobuf or raw tensor bytes.

Unpickling data from storage runs whatever code the data names, so a store writable by
someone else would be a way into every training job that loads from it. The scan reads the
syntax tree of every module in ``sdk/`` (``layervault``) and ``agent/`` (``layervault.agent``)
and fails on an import of a pickle-family module, a call of ``torch.load``, ``pickle.load(s)``,
``marshal.load(s)``, ``tf.keras``'s pickle-based loaders, or ``numpy.load`` without
``allow_pickle=False``.

Allowed: nothing. DCP's non-tensor items (ints, strings, lr-scheduler state) are DCP's own
``torch.save`` bytes; ``layervault.torch.dcp`` stores them as uint8 entries and hands them
back to DCP's planner (``planner.load_bytes``), which is where ``torch.load`` runs - in
PyTorch, not here, exactly as with DCP's own ``FileSystemReader`` (see the README).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCANNED = [ROOT / "sdk", ROOT / "agent"]
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
LOADERS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("marshal", "load"), ("marshal", "loads"),
           ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
           ("joblib", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle")}
NUMPY = {"np", "numpy"}

#: (path relative to the repo root, finding) pairs that are allowed, each with a reason. Empty on purpose.
ALLOWED: dict[tuple[str, str], str] = {}


def _dotted(node: ast.AST) -> tuple[str, ...]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def pickle_uses(source: str) -> list[str]:
    """Every place in ``source`` that could unpickle, as 'line N: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(f"line {node.lineno}: from {node.module} import ...")
            elif node.module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"line {node.lineno}: from torch import load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if len(name) >= 2 and name[-2:] in LOADERS:
                found.append(f"line {node.lineno}: {'.'.join(name)}()")
            elif len(name) >= 2 and name[-2] in NUMPY and name[-1] == "load":
                safe = any(k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value is False
                           for k in node.keywords)
                if not safe:
                    found.append(f"line {node.lineno}: {'.'.join(name)}() without allow_pickle=False")
    return found


def test_the_scanner_finds_what_it_looks_for():
    planted = """
import pickle
import cloudpickle as cp
from marshal import loads
from torch import load
import torch, numpy as np
torch.load(f)
torch.load(f, weights_only=True)
np.load(path)
np.load(path, allow_pickle=False)
"""
    found = pickle_uses(planted)
    assert [f.split(":")[0] for f in found] == [f"line {n}" for n in (2, 3, 4, 5, 7, 8, 9)], found


def _modules() -> list[pathlib.Path]:
    return sorted(p for folder in SCANNED for p in folder.rglob("*.py"))


def test_there_is_something_to_scan():
    names = {p.relative_to(ROOT).as_posix() for p in _modules()}
    assert {"agent/manifest.py", "agent/restore.py", "sdk/torch/managers.py", "sdk/torch/dcp.py", "sdk/cli.py"} <= names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_layervault_never_unpickles(path):
    relative = path.relative_to(ROOT).as_posix()
    found = [f for f in pickle_uses(path.read_text(encoding="utf-8")) if (relative, f.split(": ", 1)[1]) not in ALLOWED]
    assert not found, f"{relative} may unpickle: {found}"
