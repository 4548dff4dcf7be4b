"""pytest configuration shared by the test files: markers."""

from __future__ import annotations


def pytest_configure(config):
  config.addinivalue_line(
      "markers",
      "hlo: asserts on the text of lowered or compiled HLO (structure, not values); these "
      "depend on XLA's printer and may need updating across XLA releases. "
      "Deselect with -m 'not hlo'.")
