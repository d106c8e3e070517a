"""Glue for `workflow/scripts/*`: logging into the rule's log file, threads, and clean errors."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Callable

from quantlib.config.plugins import load_plugins
from quantlib.errors import QuantlibError


def run_script(smk, main: Callable) -> None:
    """Run `main(smk)` with stdout/stderr (Python, C and tqdm output) in the rule's log file, and the library's
    progress lines (logger "quantlib", INFO) on the terminal as well.

    The config's `plugins` are imported first, so the job sees the catalog the Snakefile saw. A QuantlibError (bad
    input, missing data, a plugin that does not import) is reported in one line, in the log and on the terminal,
    without a traceback; any other exception keeps its traceback in the log.
    """
    log_path = smk.log[0] if len(smk.log) else None
    terminal = os.fdopen(os.dup(2), "w")
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    # Progress on the console too (one line per block, per dataset, ...); the full log, progress bars included, is
    # the rule's log file.
    job = " ".join(str(v) for v in smk.wildcards) if len(smk.wildcards) else ""
    console = logging.StreamHandler(terminal)
    console.setLevel(logging.INFO)
    console.setFormatter(logging.Formatter(f"[{smk.rule}{' ' + job if job else ''}] %(message)s"))
    logging.getLogger("quantlib").addHandler(console)
    import torch

    torch.set_num_threads(max(1, smk.threads))
    try:
        load_plugins(smk.config.get("plugins", []))
        main(smk)
    except QuantlibError as exc:
        msg = f"{type(exc).__name__}: {exc}"
        logging.getLogger("quantlib").error(msg)
        print(f"\n[{smk.rule}] {msg}\n", file=terminal, flush=True)
        sys.exit(1)
    except Exception:
        traceback.print_exc()
        print(f"\n[{smk.rule}] failed with an unexpected error; see {log_path}\n", file=terminal, flush=True)
        sys.exit(1)
