"""Build hook: compiles the optional CPU kernel (``optax_decoupled/csrc/adam_step.cc``).

Run by hatchling for every wheel and editable install (``pip install .`` / ``pip install -e .``).
It needs a C++17 compiler (``$CXX`` or ``c++``) and XLA's FFI headers, which ship with jaxlib
(a build requirement, see ``pyproject.toml``). If either is missing, or the compiler fails,
the hook prints why and the package installs without the kernel: ``od.fused_step`` then uses
its pure-JAX path, which gives the same results (see ``optax_decoupled/_kernel.py``).
Set ``OPTAX_DECOUPLED_NO_KERNEL=1`` to skip the build.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("optax_decoupled") / "csrc" / "adam_step.cc"
LIBRARY = Path("optax_decoupled") / "csrc" / "libod_adam_step.so"
BUILD_INFO = Path("optax_decoupled") / "csrc" / "build_info.json"

# -ffp-contract=off: no fused multiply-add, so float32 rounding is that of the optax chain.
# -fno-math-errno: sqrt need not set errno (lets the loop vectorize; no numeric effect).
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"]


def build_kernel(root: Path) -> tuple[bool, str]:
  """Compiles the kernel next to its source; returns (built, message)."""
  if os.environ.get("OPTAX_DECOUPLED_NO_KERNEL"):
    return False, "OPTAX_DECOUPLED_NO_KERNEL is set"
  if not sys.platform.startswith("linux"):
    return False, f"the kernel is built on Linux only (this is {sys.platform})"
  cxx = shlex.split(os.environ.get("CXX", "c++"))
  if shutil.which(cxx[0]) is None:
    return False, f"no C++ compiler ({cxx[0]!r} not found; set CXX)"
  try:
    import jaxlib
  except ImportError as e:
    return False, f"jaxlib not importable in the build environment ({e})"
  include = Path(jaxlib.__file__).parent / "include"  # what jax.ffi.include_dir() returns.
  if not (include / "xla" / "ffi" / "api" / "ffi.h").exists():
    return False, f"jaxlib {jaxlib.__version__} has no XLA FFI headers in {include}"
  out = root / LIBRARY
  cmd = [*cxx, *FLAGS, f"-I{include}", str(root / SOURCE), "-o", str(out)]
  try:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
  except (OSError, subprocess.TimeoutExpired) as e:
    return False, f"compiler failed to run: {e}"
  if proc.returncode != 0:
    out.unlink(missing_ok=True)
    return False, f"compiler exited with {proc.returncode}:\n{proc.stderr[-2000:]}"
  # The runtime refuses a kernel built against a newer FFI than the jaxlib it runs with.
  (root / BUILD_INFO).write_text(json.dumps({"jaxlib": jaxlib.__version__, "command": cmd}))
  return True, f"built {LIBRARY} with jaxlib {jaxlib.__version__}'s FFI headers"


class CustomBuildHook(BuildHookInterface):
  """Adds the compiled kernel to the wheel (or leaves it in place for editable installs)."""

  def initialize(self, version: str, build_data: dict) -> None:
    if self.target_name != "wheel":
      return
    root = Path(self.root)
    built, message = build_kernel(root)
    print(f"optax_decoupled: CPU kernel {'built' if built else 'not built'}: {message}",
          file=sys.stderr)
    if not built:
      return
    build_data["pure_python"] = False
    build_data["infer_tag"] = True
    if version != "editable":  # editable installs import the package (and the .so) in place.
      build_data["force_include"][str(root / LIBRARY)] = str(LIBRARY)
      build_data["force_include"][str(root / BUILD_INFO)] = str(BUILD_INFO)
