"""Run history (SQLite), regressions against earlier runs, and what the plugin records in it."""
