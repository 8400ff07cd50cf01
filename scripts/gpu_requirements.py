"""Print dscluster's requirements for a GPU machine, one a line: pyproject.toml's dependencies and
test extras, less torch (the machine's own CUDA build is used) and mpi4py (it needs an MPI
compiler, and the GPU check does not use MPI). Used by gpu-check.sh and gpu-wheels.sh."""

import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    name = re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0].lower()
    if name not in ("torch", "mpi4py"):
        print(requirement)
