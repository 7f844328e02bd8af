"""Wheels the GPU machine lacks for the learner, its tests and ``bench/learner.py --scale``, fetched here into .whl/.

The device machine has CUDA torch (and numpy, Jinja2, sympy: torch's own needs) but none of this project's other
dependencies, and no network. This writes the closure of the learner's imports as this environment resolved them
(the same versions the tests pass with here), minus what torch brings, as CPython 3.12 x86-64 wheels::

    .venv/bin/python scripts/gpu_wheels.py            # then: carry .whl in the device call (bench/gpu_learner.sh)

Run it with the project's venv: the versions come from its installed metadata.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = ["transformers", "tokenizers", "safetensors", "pydantic", "msgpack", "pyzmq", "trio", "rich", "tomli-w",
         "psutil", "pytest", "pytest-timeout"]
ON_THE_DEVICE = {"torch", "numpy", "sympy", "mpmath", "jinja2", "markupsafe", "filelock", "typing-extensions",
                 "networkx", "fsspec", "setuptools", "triton"}
"""torch's requirements: the device's torch brought its own; a second copy on the path would shadow them."""
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64"]
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def closure(roots: list[str]) -> dict[str, str]:
    """name -> installed version of ``roots`` and everything they require (no extras) on the device's Python."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found or name in ON_THE_DEVICE or name.startswith("nvidia-"):
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # required only on other platforms or Pythons, or optional
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(MARKERS):
                todo.append(req.name)
    return found


def main() -> int:
    out = Path(__file__).resolve().parent.parent / ".whl"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={version}" for name, version in sorted(closure(ROOTS).items())]
    print(f"{len(pins)} wheels: {' '.join(pins)}", flush=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *platforms, "-d", str(out), *pins]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
