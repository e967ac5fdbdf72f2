"""The README's layout section names every engine module, so the list a reader starts from is whole."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_layout_names_every_engine_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = re.search(r"^## Layout\n(.*?)^### ", readme, re.S | re.M).group(1)
    named = set(re.findall(r"[\w.]+\.(?:py|sh)\b", layout))
    engine = ROOT / "tooling"
    # The slices (tooling/models/<model>/) are described by what one slice holds, not file by file.
    # Package markers are not modules, except the backend registry.
    modules = [p for p in engine.rglob("*") if p.suffix in (".py", ".sh") and "models" not in p.relative_to(engine).parts
               and (p.name != "__init__.py" or p.parent.name == "backends")]
    missing = sorted(str(p.relative_to(ROOT)) for p in modules if p.name not in named)
    assert not missing, f"README.md's layout section does not name {missing}"
