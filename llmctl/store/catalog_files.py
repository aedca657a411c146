"""Where the catalog's entries are read from, in the order they apply: the TOML files
shipped in `llmctl/data/catalog/`, then the user's hand-written `$LLMCTL_HOME/catalog/*.toml`,
then `user.json` (what `llmctl catalog add/import` write). Import-light: tab completion
checks these files' dates without loading the catalog."""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "catalog"
USER_FILE = "user.json"


def catalog_files(home: Path | None) -> list[Path]:
    files = sorted(SHIPPED.glob("*.toml"))
    folder = home / "catalog" if home is not None else None
    if folder is not None and folder.is_dir():
        # The user's entries come last so that they win over shipped ones; the entries
        # `llmctl catalog add` wrote come after hand-written ones.
        files += sorted(folder.glob("*.toml"))
        if (folder / USER_FILE).is_file():
            files.append(folder / USER_FILE)
    return files
