"""`python -m quantlib COMMAND`: the few maintenance commands the workflow's messages point at.

  adopt PATH [--yes]   record the checksums of an artifact that has none (written by an older version of quantlib)

Each command is a subparser with a `run(args) -> exit code` function; add one by adding both.
"""

from __future__ import annotations

import argparse
import sys

from quantlib.artifacts.integrity import adopt, adoption
from quantlib.errors import QuantlibError


def run_adopt(args) -> int:
    root, n_files, n_bytes = adoption(args.path)
    print(f"{root}: {n_files} file(s), {n_bytes / 1e6:,.1f} MB, without a checksum record. Adopting records their "
          "checksums as they are now, and every later read trusts them: adopt only an artifact that an older "
          "version of quantlib wrote whole (otherwise delete it and rerun the workflow to rebuild it).")
    if not args.yes:
        try:
            answer = input("Adopt it? [y/N] ")
        except EOFError:  # no terminal to answer from: the default
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("Not adopted: nothing was written.")
            return 1
    adopt(root)
    print(f"Adopted {root}: its checksums are recorded.")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m quantlib", description=__doc__.splitlines()[0])
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmd = commands.add_parser("adopt", help="record the checksums of an artifact written by an older version",
                              description="Record the checksums of an artifact that has no checksum record (one "
                                          "written by a version of quantlib older than checksums), after you "
                                          "confirm; a folder gets checksums.json, a file its .sha256.json sidecar.")
    cmd.add_argument("path", help="the artifact (a folder such as results/quantized/<name>, or a file such as "
                                  "resources/datasets/<key>.parquet); a path inside a folder artifact adopts the "
                                  "folder")
    cmd.add_argument("--yes", action="store_true", help="adopt without asking")
    cmd.set_defaults(run=run_adopt)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except QuantlibError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
