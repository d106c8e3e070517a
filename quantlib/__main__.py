"""`python -m quantlib COMMAND`: the few maintenance commands the workflow's messages point at.

  adopt PATH [--yes]   record the checksums of an artifact that has none (written by an older version of quantlib)
  name NAME            check a short name and explain it (settings, defaults, what it reads, where it is written)
  name --solver ...    print the short name of settings given one by one
  generate PATH TEXT   continue a prompt with any checkpoint (quantized, packed or FP), streaming the text

Each command is a subparser with a `run(args) -> exit code` function; add one by adding both.
"""

from __future__ import annotations

import argparse
import sys

from quantlib.artifacts.integrity import adopt, adoption
from quantlib.catalog import names as paths
from quantlib.catalog.names import parse_calib_name
from quantlib.catalog.spec import QuantSpec
from quantlib.errors import ConfigError, QuantlibError


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


def _value(text: str):
    """An option's value from the command line: a number, true/false, or the text itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def explain(spec) -> list[str]:
    """What a short name means, line by line: its parts, every option it takes with its value (default or not),
    what the quantize job reads and where the result goes."""
    if spec.is_fp:
        return [spec.short_name(), f"  the unquantized model '{spec.model}'"]
    lines = [spec.short_name(), f"  model           {spec.model}"]
    if spec.calib is not None:
        c = spec.calib
        lines.append(f"  calibration     {c.nsamples} windows of {c.seqlen} tokens of '{c.dataset}', seed {c.seed}")
    lines += [f"  method          {spec.describe()}: {spec.mode.replace('_', '-')}, stored as '{spec.format}'",
              f"  setting         {spec.bits} bits, " + ("per channel" if spec.group_size == -1 else
                                                        f"groups of {spec.group_size} columns")]
    for key, option in sorted(spec.option_defs().items()):
        value = spec.opt(key)
        mark = "" if key in dict(spec.options) else " (default)"
        lines.append(f"  {key:<15} {value}{mark}: {option.help}")
    if spec.distill is not None:
        d = spec.distill
        lines.append(f"  distill         on {d.calib.nsamples} windows of {d.calib.seqlen} tokens of "
                     f"'{d.calib.dataset}': " + ", ".join(f"{k} {v}" for k, v in d.options) if d.options else
                     f"  distill         on {d.calib.nsamples} windows of {d.calib.seqlen} tokens of '{d.calib.dataset}'")
    if spec.pack is not None:
        lines.append(f"  packed as       {spec.pack}")
    reads = spec.inputs() if spec.distill is None and spec.pack is None else {}
    for kind, path in reads.items():
        lines.append(f"  reads           {kind}: {path}")
    where = (paths.packed_path(spec.pack, spec.unpacked().short_name()) if spec.pack
             else paths.quantized_path(spec.short_name()))
    lines.append(f"  written to      {where}")
    return lines


def run_name(args) -> int:
    if args.name:
        spec = QuantSpec.parse(args.name)
    else:
        if not (args.model and args.solver):
            raise ConfigError("give a short name to explain, or --model and --solver (with --bits ...) to print one")
        calib = parse_calib_name(f"{args.model}.{args.calib}")[1] if args.calib else None
        options = dict(kv.split("=", 1) for kv in args.set or [])
        spec = QuantSpec.build(args.model, args.solver, args.bits, args.group, args.init or "minmax",
                               args.preprocess or (), calib, {k: _value(v) for k, v in options.items()})
    print("\n".join(explain(spec)) if args.name or args.explain else spec.short_name())
    return 0


def run_generate(args) -> int:
    from quantlib.api import generate  # here: the other commands never load torch

    generate(args.path, args.prompt, max_new_tokens=args.max_new_tokens, sampler=args.sampler,
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat,
             on_text=lambda piece: print(piece, end="", flush=True))
    print()
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

    cmd = commands.add_parser("name", help="check and explain a short name, or print the one of given settings",
                              description="With a NAME: read it (only canonical names are accepted) and explain "
                                          "every part, option and default. Without: print the short name of the "
                                          "settings given as flags.")
    cmd.add_argument("name", nargs="?", help="a short name, e.g. llama-2-7b.c4.n128.L2048.ldlq.neuqi.w3g128")
    cmd.add_argument("--model", help="the model key")
    cmd.add_argument("--solver", help="rtn, ldlq, quantease, ... (`fp` for the unquantized model)")
    cmd.add_argument("--bits", type=int)
    cmd.add_argument("--group", type=int, default=-1, help="group size (-1: per channel)")
    cmd.add_argument("--init", help="parameter init (default minmax)")
    cmd.add_argument("--preprocess", action="append", help="a preprocessor (repeatable), e.g. magr")
    cmd.add_argument("--calib", help="{dataset}.n{N}.L{L}[.s{seed}], e.g. c4.n128.L2048")
    cmd.add_argument("--set", action="append", metavar="KEY=VALUE", help="an option by its config key (repeatable)")
    cmd.add_argument("--explain", action="store_true", help="explain the name printed")
    cmd.set_defaults(run=run_name)

    cmd = commands.add_parser("generate", help="continue a prompt with a checkpoint, streaming the text",
                              description="Load any checkpoint the workflow writes (results/quantized/<name>, "
                                          "results/packed/<format>/<name>, or a full-precision model folder) and "
                                          "continue PROMPT, printing the text as it is decoded.")
    cmd.add_argument("path")
    cmd.add_argument("prompt")
    cmd.add_argument("--max-new-tokens", type=int, default=64)
    cmd.add_argument("--sampler", default="greedy", help="greedy or sample")
    cmd.add_argument("--temperature", type=float, default=1.0)
    cmd.add_argument("--top-k", type=int, default=0)
    cmd.add_argument("--top-p", type=float, default=1.0)
    cmd.add_argument("--seed", type=int, default=0)
    cmd.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    cmd.set_defaults(run=run_generate)
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
