"""Package hygiene: the public face is ``__all__``, and the version is defined once."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import types
import zipfile

import pytest

import optax_decoupled as od

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _public(module):
  return {n for n, v in vars(module).items()
          if not n.startswith("_") and not isinstance(v, types.ModuleType)}


def test_no_stray_public_names():
  assert _public(od) == set(od.__all__)
  assert "version" not in dir(od) and "PackageNotFoundError" not in dir(od)


def test_flax_face_is_its_all():
  import optax_decoupled.flax as odf

  assert _public(odf) == set(odf.__all__)


def test_version_is_defined_once_in_pyproject_and_in_the_changelog():
  pyproject = (ROOT / "pyproject.toml").read_text()
  version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
  assert od.__version__ in (version, "0.0.0")  # 0.0.0: a source tree that is not installed
  assert f"## [{version}]" in (ROOT / "CHANGELOG.md").read_text()
  sources = [p.read_text() for p in (ROOT / "optax_decoupled").rglob("*.py")]
  assert not any(f'"{version}"' in s for s in sources), "the version is written twice"


def test_each_message_text_is_written_once():
  """The hints every entry point shares live in one place, so they cannot drift apart."""
  root = pathlib.Path(od.__file__).parent
  source = "".join(p.read_text() for p in sorted(root.rglob("*.py")))
  for text in ("A negative value would grow the weights.", "negate the loss",
               "sees only its own", "was called with a step count",
               "is not a valid regular expression"):
    assert source.count(text) == 1, text
  assert ".replace(\"decay_multipliers\"" not in source and "str(e).replace" not in source


@pytest.mark.slow  # builds a wheel
def test_the_wheel_is_pure_python_and_carries_the_kernel_source(tmp_path):
  # The kernel is compiled on first use against the installed jaxlib, so a plain (not
  # editable) install must ship its source, and nothing built or machine-specific.
  root = pathlib.Path(__file__).resolve().parents[1]
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                  str(root)], check=True, capture_output=True)
  wheel, = tmp_path.glob("optax_decoupled-*.whl")
  assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
  names = zipfile.ZipFile(wheel).namelist()
  assert "optax_decoupled/csrc/adam_step.cc" in names
  assert "optax_decoupled/py.typed" in names
  assert not [n for n in names if n.endswith((".so", ".json"))], names
