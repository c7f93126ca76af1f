"""The README's layout is true to the tree: every path it names exists, and every module and
folder of the package is named."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"^## Layout\n+```\n(.*?)```", readme, re.S | re.M).group(1)
    named, root = set(), ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if indent > 2 or not line.strip():
            continue  # a description's next line
        first = re.split(r"\s{2,}", line.strip())[0]
        for part in first.split(", "):
            path = root + part if indent else part
            if not indent:
                root = part
            if "<" not in path:
                named.add(path.rstrip("/"))
    return named


def test_every_path_the_layout_names_exists():
    missing = sorted(p for p in layout() if not (ROOT / p).exists())
    assert not missing, f"README layout names paths that do not exist: {missing}"


def test_the_layout_names_every_module_and_folder_of_the_package():
    named = layout()
    package = {f"connector/{p.name}" for p in (ROOT / "connector").iterdir()
               if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or
               (p.is_dir() and (p / "__init__.py").exists())}
    unnamed = sorted(p for p in package if not any(n == p or n.startswith(p + "/") for n in named))
    assert not unnamed, f"README layout misses: {unnamed}"
