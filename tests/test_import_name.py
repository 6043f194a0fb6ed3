"""One import name: the code reaches workers/ and clients/ only as molteniron.workers and
molteniron.clients. A module imported under both names would exist twice, each with
its own state (a second metrics registry, a second logger tree), so a stray
`import workers` is a bug even where it happens to work from the source tree."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL_ONLY = {"workers", "clients"}


def imported_names(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append((node.lineno, node.module))
    return names


def test_no_module_imports_workers_or_clients_by_their_top_level_name():
    mapped = {ROOT / "molteniron" / name for name in TOP_LEVEL_ONLY}  # the symlinks
    sources = [path for folder in ("molteniron", "workers", "clients", "tests", "bench")
               for path in (ROOT / folder).rglob("*.py")
               if not any(path.is_relative_to(link) for link in mapped)]
    assert len(sources) > 100
    stray = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in sources
             for line, name in imported_names(path) if name.split(".")[0] in TOP_LEVEL_ONLY]
    assert not stray, "import these as molteniron.workers / molteniron.clients:\n" + \
        "\n".join(stray)


def test_the_package_maps_workers_and_clients_to_the_top_level_folders():
    import molteniron.clients.cli
    import molteniron.workers.keeper

    assert Path(molteniron.workers.keeper.__file__).resolve() == ROOT / "workers" / "keeper.py"
    assert Path(molteniron.clients.cli.__file__).resolve() == ROOT / "clients" / "cli.py"
