"""The experiment YAMLs milkit ships (``configs/<method>/<name>.yaml``), found from a source
checkout or from an installed wheel (``<prefix>/share/milkit/configs``, pyproject data-files).

``milkit configs`` lists them; ``milkit train sm/camelyon16_smap.yaml`` accepts a shipped
name wherever a path to a YAML does not exist.
"""

from __future__ import annotations

import sys
from pathlib import Path


def config_roots() -> list[Path]:
    """Folders that hold shipped configs, the source checkout first."""
    candidates = [Path(__file__).resolve().parents[2] / "configs", Path(sys.prefix) / "share" / "milkit" / "configs"]
    return [p for p in candidates if p.is_dir()]


#: folders listed before the others by ``milkit configs``: what milkit recommends (issue 11 §2)
FIRST = ("recommended",)


def list_configs() -> dict[str, Path]:
    """Shipped name (``method/file.yaml``) → path; the first root that has a name wins.
    ``recommended/`` comes first, then the paper configs in name order."""
    found: dict[str, Path] = {}
    for root in config_roots():
        for p in sorted(root.rglob("*.yaml")):
            found.setdefault(p.relative_to(root).as_posix(), p)

    def rank(name: str) -> tuple[int, str]:
        top = name.split("/", 1)[0]
        return (FIRST.index(top) if top in FIRST else len(FIRST), name)

    return {k: found[k] for k in sorted(found, key=rank)}


def describe(path: Path) -> str:
    """The first comment line of a YAML (what each shipped config says it reproduces)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def resolve_config(name: str | Path) -> Path:
    """``name`` itself when it is a file, else the shipped config of that name."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = list_configs()
    key = path.as_posix().removeprefix("configs/")
    if key in shipped:
        return shipped[key]
    close = [k for k in shipped if path.name and k.endswith("/" + path.name)]
    hint = f"; did you mean {', '.join(close)}?" if close else "; 'milkit configs' lists the shipped ones"
    raise FileNotFoundError(f"{name}: does not exist, and no shipped config has that name{hint}")
