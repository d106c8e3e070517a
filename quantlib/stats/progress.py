"""Resuming inside a job: a walk over the decoder blocks keeps its progress in a folder beside its output, so that a
job killed in block k+1 starts again there, not at block 1, and writes the same bytes as an uninterrupted run (all
but the fields that only measure time, `quantlib.checkpoint.writer.TIMING_FIELDS`). One implementation for the
runner's three walks (layer-wise, without a forward pass, block-wise): each calls `begin` (in `quantize_model`),
`restore` after capturing block 0's inputs, `finished` after each block and keeps its disk streams in
`stream_folder`. The statistics walk the same way: forward (`fp_hessian`, `guided_hessian`), or from the last
block to the first (`gradients`' backward: `begin(..., reverse=True)`, the k blocks finished are the last k, and the
state after them is the gradient flowing into the block before). A training run (distillation) keeps its progress
the same way per optimiser step instead of per block (`StepProgress`, through `quantlib.runner.training.train`).

The folder `{parent}/.{name}.partial/`, beside the output `{parent}/{name}`, is hidden: not an artifact (the artifact
scans skip dot names, and an output's temporaries are `.{name}.tmp-*`), and Snakemake, which deletes a job's
incomplete output before running the job again (`--rerun-incomplete`), never touches it. It holds

  progress.json  the record, written atomically after each block, last: what made the progress (`identity`: the
                 short name, the code version `quantlib.artifacts.atomic.code_version`, the checksum records of the
                 inputs and the compute settings that change the result), `n_blocks`, `last_finished_block` (counted
                 from 1 in the walk's order; `order: backward` for a walk from the last block) and the SHA-256 of
                 every file that the state after that block is made of (a training run: `n_steps`,
                 `last_finished_step`);
  checkpoint/    the output being written: each finished block's shard; renamed to the output when the job succeeds
                 (a training run writes its output there once the training is done);
  state-{k}/     the state after block k: the streams of calibration activations the walk carries into block k+1 (one
                 file per chunk or window: the quantized model's, and block-wise the FP model's too), the diagnostics
                 of the finished blocks, the parts' state (the checkpoint writer's layers and index), the walk's own
                 JSON (`extra`: the gradients' losses) and the random generators' states (torch, CUDA, Python,
                 NumPy); a training run's state after step k: `training.pt` (the trainables, the optimiser's and the
                 schedule's state, the batch order's generator) and, in its JSON, the epoch's order and position and
                 the history; state-{k-1}/ goes once block k is recorded;
  streams/       the walk's streams when kept on disk (`compute.block_streams: disk`): state-{k}/ holds hard links to
                 their files, not copies, so the saved state costs no more disk than disk streams take today (in
                 memory, the streams are written once per block: the disk that disk streams would take).

A job started again goes on from the recorded block, logging "resuming at block k+1 of n" (a backward walk: "at block
n-k of n"; a training run: "at step k+1 of n"). A record made for another spec, by another code version, from other
inputs or settings, or whose files do not match their checksums is discarded, saying why, and the job starts at
block 1. When the job succeeds the folder is removed; a folder left by an earlier spec sits beside another output and
is ignored (removed when that output is built again). Test hooks: a job whose environment sets
QUANTLIB_KILL_AFTER_BLOCK=k (QUANTLIB_KILL_AFTER_STEP=k) kills itself (SIGKILL) once block k (numbered from 1, as
in the model) or step k is recorded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch

from quantlib.artifacts.atomic import code_version, write_json
from quantlib.artifacts.integrity import CHECKSUMS, sha256, sidecar
from quantlib.stats.capture import Stream

log = logging.getLogger("quantlib")

PROGRESS = "progress.json"
STATE = "state.json"
# Test hooks: a job whose environment sets one to k kills itself (SIGKILL) once block (step) k is recorded.
KILL_AFTER_BLOCK = "QUANTLIB_KILL_AFTER_BLOCK"
KILL_AFTER_STEP = "QUANTLIB_KILL_AFTER_STEP"


def partial_dir(out_dir) -> Path:
    """Where the job writing `out_dir` keeps its progress."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.partial"


def fingerprint(path) -> str:
    """What identifies an input artifact's content without reading it: the SHA-256 of its checksum record
    (`quantlib.artifacts.integrity`), or of the file itself when it has none."""
    path = Path(path)
    if path.is_dir():
        record = path / CHECKSUMS
        return sha256(record) if record.is_file() else "no record"
    side = sidecar(path)
    return sha256(side if side.is_file() else path)


class NoProgress:
    """A walk that keeps no progress (the default): it starts at block 1, and its disk streams live in a temporary
    folder removed when the walk ends."""

    start = 0

    def begin(self, n_blocks: int, report, reverse: bool = False) -> int:
        return 0

    def restore(self, where: str, folder: Path | None, device) -> dict | None:
        return None

    def finished(self, i: int, report, streams: dict | None = None, extra=None) -> None:
        pass

    @contextlib.contextmanager
    def stream_folder(self, where: str):
        folder = Path(tempfile.mkdtemp(prefix="quantlib-streams-")) if where == "disk" else None
        try:
            yield folder
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


class BlockProgress(NoProgress):
    """The progress of the job writing `out_dir`, kept in `partial_dir(out_dir)` (see the module's docstring).
    `inputs` (name -> artifact path) and `settings` (JSON) identify what the job computes from beside the spec's
    short name; `parts` (name -> object with `progress_state()` and `restore_progress(state)`, e.g. the checkpoint
    writer) are saved and restored with the walk's own state. The job writes its output into `checkpoint`, inside
    `with progress:`, which removes the folder when the output is in place (or no block was finished)."""

    def __init__(self, out_dir, spec_name: str, inputs: dict | None = None, settings: dict | None = None,
                 parts: dict | None = None):
        self.folder = partial_dir(out_dir)
        self.identity = {"spec": spec_name, "code": code_version(),
                         "inputs": {k: fingerprint(v) for k, v in sorted((inputs or {}).items())},
                         "settings": settings or {}}
        self.parts = parts or {}
        self.n_blocks = 0
        self.start = 0
        self.reverse = False
        self.extra = None  # the JSON the walk gave `finished` with the state restored (`begin`)
        self._sums: dict[str, str] = {}  # checkpoint file -> SHA-256, of those already recorded
        self._saved: tuple[int, dict] | None = None  # (k, state after block k) until `restore`

    unit = "block"  # what the walk counts, in the record's keys and the log

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint"

    @property
    def _order(self) -> str:
        return "backward" if self.reverse else "forward"

    def begin(self, n_blocks: int, report, reverse: bool = False) -> int:
        """Read the record: restore the report and the parts and return the number of blocks already finished, or
        discard the record (saying why) and return 0. With `reverse`, the walk goes from the last block to the first
        (a backward pass): the k blocks finished are the last k."""
        self.reverse = reverse
        k, state = self._begin(n_blocks)
        if state is None:
            return 0
        if report is not None and state.get("report") is not None:
            report.layers.update(state["report"]["layers"])
            report.blocks.extend(state["report"]["blocks"])
        for name, part in self.parts.items():
            part.restore_progress(state["parts"][name])
        self._saved = (k, state)
        return k

    def _begin(self, n: int) -> tuple[int, dict | None]:
        """The record's count of finished units and the state after the last, the files recorded kept and the rest
        removed; or (0, None), the record discarded saying why."""
        unit = self.unit
        self.n_blocks, self.start, self._sums, self._saved, self.extra = n, 0, {}, None, None
        record, why = self._valid_record(n)
        if record is None:
            if why:
                log.info("discarding the progress of an earlier attempt in %s: %s; starting at %s %d of %d",
                         self.folder, why, unit, n if self.reverse else 1, n)
            self._clear(keep=set())
            return 0, None
        k = record[f"last_finished_{unit}"]
        state = json.loads((self.folder / f"state-{k}" / STATE).read_text())
        self._sums = {f: s for f, s in record["files"].items() if f.startswith("checkpoint/")}
        self._clear(keep={PROGRESS, *record["files"]})  # gone: a shard written after the record, old streams
        self.start, self.extra = k, state.get("extra")
        if k >= n:
            log.info("all %d %ss were finished by an earlier attempt (%s): only the output is left to write", n,
                     unit, self.folder)
        elif self.reverse:
            log.info("resuming at %s %d of %d (the walk goes from the last to the first): %ss %d-%d were finished "
                     "by an earlier attempt (%s)", unit, n - k, n, unit, n - k + 1, n, self.folder)
        else:
            log.info("resuming at %s %d of %d: %ss 1-%d were finished by an earlier attempt (%s)", unit, k + 1, n,
                     unit, k, self.folder)
        return k, state

    def _valid_record(self, n_blocks: int) -> tuple[dict | None, str | None]:
        path = self.folder / PROGRESS
        if not path.is_file():
            return None, None
        try:
            record = json.loads(path.read_text())
            old, k, files = record["identity"], record[f"last_finished_{self.unit}"], record["files"]
        except (ValueError, KeyError, TypeError):
            return None, "its record is unreadable"
        new = self.identity
        if old.get("spec") != new["spec"]:
            return None, f"it was made for another spec ({old.get('spec')}, not {new['spec']})"
        if old.get("code") != new["code"]:
            return None, (f"it was made by another version of the code (quantlib sources {old.get('code')}, now "
                          f"{new['code']})")
        for key, what in (("inputs", "inputs"), ("settings", "compute settings")):
            changed = sorted(n for n in set(old.get(key, {})) | set(new[key])
                             if old.get(key, {}).get(n) != new[key].get(n))
            if changed:
                return None, f"it was made from other {what} ({', '.join(changed)})"
        unit = self.unit
        if record.get(f"n_{unit}s") != n_blocks:
            return None, f"it was made for {record.get(f'n_{unit}s')} {unit}s, not {n_blocks}"
        if record.get("order", "forward") != self._order:
            return None, f"it was made by a walk in another order ({record.get('order', 'forward')})"
        if not isinstance(k, int) or not 0 < k <= n_blocks or f"state-{k}/{STATE}" not in files:
            return None, f"it records no finished {unit}"
        for rel, want in files.items():
            if not (self.folder / rel).is_file():
                return None, f"{rel} is missing"
            if sha256(self.folder / rel) != want:
                return None, f"{rel} does not match its checksum"
        return record, None

    def _clear(self, keep: set[str]) -> None:
        """Remove every file of the folder but those in `keep` (relative paths); the checkpoint folder stays (the
        writer writes into it)."""
        self.checkpoint.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            rel = path.relative_to(self.folder).as_posix()
            if path.is_dir():
                if path != self.checkpoint and not any(path.iterdir()):
                    path.rmdir()
            elif rel not in keep:
                path.unlink()

    def restore(self, where: str, folder: Path | None, device) -> dict | None:
        """After a resumed `begin`: set the random generators as they were after the last finished block and return
        the walk's streams then (name -> `Stream` kept `where`, in `folder`); None when there is nothing to restore
        or no block is left."""
        if self._saved is None:
            return None
        k, state = self._saved
        self._saved = None
        _set_rng_state(state["rng"])
        if k >= self.n_blocks:
            return None
        streams = {}
        for name, files in state["streams"].items():
            stream = streams[name] = Stream(where, folder, device)
            for file in files:
                t = torch.load(self.folder / f"state-{k}" / file)
                stream.append(t.to(device) if where == "memory" else t)
        return streams

    def finished(self, i: int, report, streams: dict | None = None, extra=None) -> None:
        """Block `i` (from 0) is done and its shard written: save the state after it (`streams`: name -> `Stream`,
        what the walk carries into the next block; `extra`: JSON of the walk's own, `self.extra` when restored),
        then the record, then drop the state before it."""
        self._record(self.n_blocks - i if self.reverse else i + 1, i + 1, report, streams, extra)

    def _record(self, k: int, number: int, report, streams: dict | None, extra, tensors: dict | None = None
                ) -> None:
        """Save the state after the k-th unit of the walk (`number`: its own number, from 1) in state-{k}/:
        `streams`, the report, the parts, the random generators, `extra` (JSON) and `tensors` (file name -> object
        for `torch.save`); then the record; then drop the older states."""
        here = self.folder / f"state-{k}"
        shutil.rmtree(here, ignore_errors=True)
        here.mkdir(parents=True)
        names = {}
        for name, stream in (streams or {}).items():
            names[name] = [f"{name}-{j:05d}.pt" for j in range(len(stream))]
            for j, file in enumerate(names[name]):
                _save_window(stream, j, here / file)
        for file, obj in (tensors or {}).items():
            torch.save(obj, here / file)
        state = {"report": None if report is None else {"layers": report.layers, "blocks": report.blocks},
                 "parts": {name: part.progress_state() for name, part in self.parts.items()},
                 "rng": _rng_state(), "streams": names, "extra": extra}
        (here / STATE).write_text(json.dumps(state))
        if self.checkpoint.is_dir():
            for path in sorted(self.checkpoint.iterdir()):
                self._sums.setdefault(f"checkpoint/{path.name}", sha256(path))
        files = {**self._sums, **{f"{here.name}/{p.name}": sha256(p) for p in sorted(here.iterdir())}}
        record = {"identity": self.identity, f"n_{self.unit}s": self.n_blocks, f"last_finished_{self.unit}": k,
                  "files": files}
        if self.reverse:
            record["order"] = self._order
        write_json(self.folder / PROGRESS, record)
        for old in self.folder.glob("state-*"):
            if old != here:
                shutil.rmtree(old, ignore_errors=True)
        # the tests' way of killing a job run by Snakemake here
        if os.environ.get(KILL_AFTER_STEP if self.unit == "step" else KILL_AFTER_BLOCK) == str(number):
            os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def stream_folder(self, where: str):
        """Disk streams in the progress folder (the state's files are hard links to theirs), emptied when the walk
        ends: what the state needs is in state-{k}/."""
        folder = self.folder / "streams" if where == "disk" else None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> "BlockProgress":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        """Leaving the job: the progress goes when the output is in place, or when no block was finished."""
        if kind is None or not (self.folder / PROGRESS).is_file():
            shutil.rmtree(self.folder, ignore_errors=True)


class StepProgress(BlockProgress):
    """The progress of a training job (distillation) writing `out_dir`, kept as `BlockProgress` keeps a walk's, per
    optimiser step instead of per block: the state after step k, saved every `every` steps and after the last, is
    what `quantlib.runner.training.train` hands `step_finished` (the trainables, the optimiser's and the schedule's
    state, the batch order's generator, the epoch's order and position, the history) with the random generators.
    A job started again restores it (`resume_training`) and goes on at step k+1, logging "resuming at step k+1 of
    n"; foreign or damaged progress is discarded, saying why, as a walk's is."""

    unit = "step"
    TRAINING = "training.pt"

    def __init__(self, out_dir, spec_name: str, inputs: dict | None = None, settings: dict | None = None,
                 every: int = 8):
        super().__init__(out_dir, spec_name, inputs, settings)
        self.every = max(1, int(every))

    def resume_training(self, total: int) -> tuple[dict, dict] | None:
        """Read the record of a run of `total` steps: (the tensors `step_finished` saved, its JSON), the random
        generators set as they were then; or None (nothing to resume, or the record discarded)."""
        k, state = self._begin(total)
        if state is None:
            return None
        _set_rng_state(state["rng"])
        tensors = torch.load(self.folder / f"state-{k}" / self.TRAINING)
        return tensors, state["extra"]

    def step_finished(self, step: int, snapshot) -> None:
        """Step `step` (from 1) is done: every `every` steps and after the last, save `snapshot()` = (tensors, JSON)
        as the state after it. Cheap beside a step: the trainables and the optimiser's state, once per `every`."""
        if step % self.every and step != self.n_blocks:
            return
        tensors, extra = snapshot()
        self._record(step, step, None, None, extra, {self.TRAINING: tensors})


def _save_window(stream: Stream, j: int, path: Path) -> None:
    if stream.where == "disk":  # already a file of torch.save: linked (copied across filesystems)
        try:
            os.link(stream.items[j], path)
        except OSError:
            shutil.copyfile(stream.items[j], path)
    else:
        torch.save(stream[j].detach().cpu(), path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [kind, keys.tolist(), pos, has_gauss, gauss]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
