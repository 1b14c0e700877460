"""Download the experiments' datasets from their public sources, once, to work offline afterwards.

    python3 data/download.py cola                         # into data/cola/
    python3 data/download.py all                          # every dataset below but ultrachat_200k
    python3 data/download.py alpaca tinystories_sample --out ~/llama-data

Each dataset becomes a folder OUT/NAME/ in the layout the experiments read (those of ../shared/data), with
a PROVENANCE.md: its source, revision or checksums, license and rows. The experiments look for their
data in data/ first, then in ../shared/data, and download what is in neither; `--data-dir OUT` points
them at another folder. A folder that is complete is not fetched again; an interrupted download (Ctrl-C
too) leaves none behind, and what a killed one left is deleted by the next. Files fetched before a stop
wait in OUT/.cache/ and are used once their content is checked again. Offline (HF_HUB_OFFLINE=1, or no
network to the Hugging Face Hub) nothing is fetched, and one line says so at once.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llama.cli.usage import ArgumentParser, one_line, report

# data/sources.py, the download code, is this folder's module: `data.sources` where this file is imported as
# data.download (the tests, `python3 -m data.download`), `sources` where it runs as python3 data/download.py
# (whose folder is then sys.path[0]). llama/ never imports either.
if __package__:
    from .sources import DATASETS, PROJECT_DATA, ChecksumMismatch, Remote, download, selected
else:
    from sources import DATASETS, PROJECT_DATA, ChecksumMismatch, Remote, download, selected


def datasets_table() -> str:
    """The known datasets, one line each: name, size, where it comes from, what it is."""
    lines = ["datasets:"]
    for data in DATASETS.values():
        origin = data.origin
        where = origin.base.split("/")[3] + "/" + origin.base.split("/")[4] if isinstance(origin, Remote) else origin.repo
        note = "" if data.in_all else " (not in all)"
        lines.append(f"  {data.name:<28} {data.size:>7}  {where}: {data.title}{note}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="data/download.py", description=__doc__, epilog=datasets_table(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", metavar="NAME", help="datasets to download (listed below), or all")
    parser.add_argument("--out", type=Path, default=PROJECT_DATA,
                        help="the folder that gets one NAME/ folder per dataset (default: the repository's data/, "
                             "where the experiments look first)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        chosen = selected(args.names)
    except ValueError as error:
        return report(error)
    for data in chosen:
        try:
            download(data, args.out)
        except KeyboardInterrupt:
            print(f"\ninterrupted: {args.out / data.name} was not written; run the command again to fetch what is "
                  "still missing", file=sys.stderr)
            return 130
        except (ValueError, OSError) as error:  # ChecksumMismatch is a ValueError, Unavailable an OSError
            kind = "checksum mismatch" if isinstance(error, ChecksumMismatch) else "error"
            print(f"{kind}: {data.name}: {' '.join(one_line(error).split())}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
