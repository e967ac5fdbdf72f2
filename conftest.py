"""Root conftest: the suite's pytest integration lives in tooling/pytest_plugin.py (loaded via
pyproject's addopts), so that this file stays a pointer for newcomers."""
