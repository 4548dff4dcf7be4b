"""The optional CPU kernel's build: compiled on first use, cached per jaxlib, registered.

``csrc/adam_step.cc`` is compiled against the FFI headers of the jaxlib that is installed
(``jax.ffi.include_dir()``), cached per jaxlib version and source (:func:`cache_dir`), and
registered with XLA as ``TARGET`` (``jax.ffi``) by :func:`unavailable`. Without a C++
compiler, or with ``OPTAX_DECOUPLED_NO_KERNEL`` set, there is no kernel and ``od.fused_step``
takes the plain step; :func:`unavailable` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jaxlib

__all__ = ["TARGET", "build", "cache_dir", "unavailable"]

SOURCE = Path(__file__).parent / "csrc" / "adam_step.cc"
TARGET = "optax_decoupled_adam_step"
# -ffp-contract=off: no fused multiply-add, so float32 rounding is that of the optax chain.
# -fno-math-errno: sqrt need not set errno (lets the loop vectorize; no numeric effect).
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno")


def cache_dir() -> Path:
  """Where built kernels are kept: ``$OPTAX_DECOUPLED_CACHE``, else
  ``$XDG_CACHE_HOME/optax_decoupled``, else ``~/.cache/optax_decoupled``."""
  if os.environ.get("OPTAX_DECOUPLED_CACHE"):
    return Path(os.environ["OPTAX_DECOUPLED_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "optax_decoupled"


def build(directory: Path | None = None) -> tuple[Path | None, str]:
  """Compiles the kernel against the installed jaxlib's FFI headers, once per jaxlib and
  source: ``(library, how)``, or ``(None, why not)``.

  The library's name holds the jaxlib version and a hash of the source, flags and compiler,
  so another jaxlib (or a changed source) gets its own build, and a kernel is never loaded
  into a jaxlib it was not compiled for. It is written to a temporary file and renamed, so
  processes building at once do not see a partial file. ``$CXX`` (default ``c++``) compiles.
  """
  if os.environ.get("OPTAX_DECOUPLED_NO_KERNEL"):
    return None, "OPTAX_DECOUPLED_NO_KERNEL is set"
  if not sys.platform.startswith("linux"):
    return None, f"the kernel is built on Linux only (this is {sys.platform})"
  cxx = shlex.split(os.environ.get("CXX", "c++"))
  if not cxx or shutil.which(cxx[0]) is None:
    return None, (f"no C++ compiler ({cxx[0] if cxx else '$CXX'!r} not found): install one "
                  "(e.g. g++) or set CXX")
  include = Path(jax.ffi.include_dir())
  if not (include / "xla" / "ffi" / "api" / "ffi.h").exists():
    return None, f"jaxlib {jaxlib.__version__} has no XLA FFI headers in {include}"
  key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, cxx)).encode()).hexdigest()[:16]
  directory = cache_dir() if directory is None else directory
  library = directory / f"libod_adam_step-jaxlib{jaxlib.__version__}-{key}.so"
  if library.exists():
    return library, f"cached in {directory}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
  except OSError as e:
    return None, (f"cannot write the kernel to {directory} ({e}); set OPTAX_DECOUPLED_CACHE "
                  "to a writable folder")
  cmd = [*cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp]
  try:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
  except (OSError, subprocess.TimeoutExpired) as e:
    os.unlink(tmp)
    return None, f"the C++ compiler failed to run: {e}"
  if proc.returncode != 0:
    os.unlink(tmp)
    return None, f"the C++ compiler exited with {proc.returncode}: {proc.stderr[-2000:]}"
  os.replace(tmp, library)
  return library, f"built in {directory}"


@functools.cache
def unavailable() -> str | None:
  """None when the kernel is registered with XLA, otherwise why it is not.

  The first call builds the kernel if no build for this jaxlib is cached (about 8 s on 2 cores;
  :func:`build`)."""
  library, why = build()
  if library is None:
    return f"the CPU kernel is not available: {why}"
  try:
    lib = ctypes.CDLL(str(library))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.OdAdamStep), platform="cpu")
  except (OSError, AttributeError, ValueError, RuntimeError) as e:
    return f"the CPU kernel could not be loaded from {library}: {e}"
  return None
