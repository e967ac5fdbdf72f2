"""``python -m tooling report``: the run history as a self-contained HTML page and a markdown summary."""
