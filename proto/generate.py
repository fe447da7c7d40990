"""Regenerate the Python code for proto/*.proto (one command: ``scripts/dev protos``).

protoc (from the pinned grpcio-tools) writes ``*_pb2.py``, ``*_pb2_grpc.py`` and, through
mypy-protobuf, ``*_pb2.pyi`` stubs beside the .proto files. protoc emits top-level imports
(``import common_pb2``); they are rewritten to ``layervault.proto`` package imports.
``--check`` regenerates into a temporary folder and fails if anything differs (CI).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

PROTO_DIR = pathlib.Path(__file__).resolve().parent
PACKAGE = "layervault.proto"


def proto_files() -> list[pathlib.Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    plugin_dir = pathlib.Path(sys.executable).parent
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--mypy_out={out_dir}",
        *[p.name for p in proto_files()],
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_DIR)
    modules = [p.stem + "_pb2" for p in proto_files()]
    pattern = re.compile(r"^import (%s)(_grpc)? as" % "|".join(modules), re.MULTILINE)
    stub_pattern = re.compile(r"^import (%s)$" % "|".join(modules), re.MULTILINE)
    written = []
    for path in sorted(out_dir.glob("*_pb2*.py*")):
        text = path.read_text()
        text = pattern.sub(lambda m: f"from {PACKAGE} import {m.group(1)}{m.group(2) or ''} as", text)
        text = stub_pattern.sub(lambda m: f"from {PACKAGE} import {m.group(1)}", text)
        path.write_text(text)
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(pathlib.Path(tmp))
        stale = []
        for path in fresh:
            target = PROTO_DIR / path.name
            if not target.exists() or target.read_bytes() != path.read_bytes():
                stale.append(target.name)
                if not args.check:
                    shutil.copyfile(path, target)
    if args.check and stale:
        print("stale generated code: " + ", ".join(stale) + " (run: scripts/dev protos)", file=sys.stderr)
        return 1
    print(("regenerated: " + ", ".join(stale)) if stale else "generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
