"""`he2expr import`: spot data (her2st folders, h5ad; `importers.spots`, the default, as before) or a 10x Xenium
output folder (`he2expr import xenium`, `importers.xenium`)."""

from __future__ import annotations

import sys

XENIUM = "xenium"


def main(argv: list[str] | None = None, prog: str = "he2expr import") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [XENIUM]:
        from importers.xenium import main as xenium_main

        return xenium_main(argv[1:], prog=f"{prog} {XENIUM}")
    from importers.spots import main as spots_main

    if argv and argv[0] not in ("-h", "--help"):
        return spots_main(argv, prog=prog)
    try:
        return spots_main(argv, prog=prog)
    finally:  # after the spot importer's usage (argparse exits from inside it)
        print(f"\nxenium: {prog} {XENIUM} --src FOLDER --out DIR ...   a 10x Xenium output folder "
              f"({prog} {XENIUM} --help)")


if __name__ == "__main__":
    sys.exit(main())
