"""The run folder: what may be written where, resumable checkpoints, and the refusal to clobber.

Layout of ``<output_dir>``: ``checkpoints/step_N/`` (``accelerator.save_state`` plus ``trainer_state.json``,
written last, so a checkpoint without it is incomplete), ``model/`` (the trained weights), ``results.json``
(written atomically at the end), ``logs/`` (trackers).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from .errors import UsageError
from .files import write_json_atomic
from .results import PassCounts

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
RESULTS_FILE = "results.json"
KEEP_CHECKPOINTS = 2


@dataclass
class _Progress:
    """The fields of :class:`TrainState` before the pass counts (a base class, so the file keeps its key order)."""

    step: int = 0
    train_wall_s: float = 0.0


@dataclass
class TrainState(PassCounts, _Progress):
    """What a checkpoint records besides Accelerate's state (``trainer_state.json``).

    Fields in file order: ``step``, ``train_wall_s`` (:class:`_Progress`), the four
    :class:`~samat.common.results.PassCounts`, ``train_examples``, ``task``."""

    train_examples: int = 0
    task: str = ""              # the task that wrote the checkpoint ("" in checkpoints of older versions)

    @classmethod
    def read(cls, checkpoint: Path) -> "TrainState":
        values = json.loads((checkpoint / STATE_FILE).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (their state file is written last), oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator: Any, output_dir: Path, state: TrainState) -> None:
    """``accelerator.save_state`` into ``checkpoints/step_<step>``, then the state file; keeps the newest
    :data:`KEEP_CHECKPOINTS`."""
    path = output_dir / CHECKPOINTS / f"step_{state.step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        write_json_atomic(path / STATE_FILE, asdict(state))
        for old in list_checkpoints(output_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


DAMAGED_PREFIX = "damaged-"  # a checkpoint that could not be read is moved aside under this name, never deleted


def _damaged_file(checkpoint: Path) -> str:
    """The first file of ``checkpoint`` whose header cannot be read (safetensors headers, the JSON state),
    else the folder's name: what the error line names."""
    from safetensors import safe_open

    try:
        json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError):
        return str(checkpoint / STATE_FILE)
    for path in sorted(checkpoint.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
        except Exception:  # safetensors raises its own SafetensorError, not a subclass of OSError
            return str(path)
    return str(checkpoint)


def set_aside(checkpoint: Path) -> Path:
    """Move an unreadable checkpoint out of the ``step_*`` names (so rotation never deletes it and no save
    overwrites it); returns where it now is."""
    target = checkpoint.with_name(DAMAGED_PREFIX + checkpoint.name)
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"{DAMAGED_PREFIX}{checkpoint.name}-{n}")
    checkpoint.rename(target)
    return target


def load_newest_readable(accelerator: Any, output_dir: Path) -> tuple[Optional[Path], Optional[TrainState],
                                                                      list[str]]:
    """``accelerator.load_state`` from the newest complete checkpoint that reads, falling back to older ones.

    Returns ``(checkpoint, state, warnings)``; each unreadable checkpoint is moved aside (:func:`set_aside`,
    named in a warning). ``UsageError`` naming the damaged files when none reads (nothing is moved then)."""
    damaged: list[tuple[Path, str]] = []
    for checkpoint in reversed(list_checkpoints(output_dir)):
        try:
            state = TrainState.read(checkpoint)
            accelerator.load_state(str(checkpoint))
        except Exception as err:  # torch.load, safetensors, pickle and json fail with many types
            damaged.append((checkpoint, f"{_damaged_file(checkpoint)}: {type(err).__name__}: "
                                        f"{str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")))
            continue
        accelerator.wait_for_everyone()  # every process has read before the main one moves a folder
        warnings = []
        for bad, why in damaged:
            moved = set_aside(bad) if accelerator.is_main_process else bad.with_name(DAMAGED_PREFIX + bad.name)
            warnings.append(f"--resume: checkpoint {bad} cannot be read ({why}); resumed from the previous one, "
                            f"{checkpoint.name}; the damaged one is kept as {moved}")
        accelerator.wait_for_everyone()
        return checkpoint, state, warnings
    if not damaged:
        return None, None, []
    listing = "; ".join(f"{c.name} ({why})" for c, why in damaged)
    raise UsageError(f"--resume: no checkpoint in {output_dir / CHECKPOINTS} can be read: {listing}; move the "
                     "damaged folder(s) out of checkpoints/ and rerun with --resume to start from scratch (or "
                     "--overwrite)")


def _task_in_folder(output_dir: Path) -> Optional[str]:
    """The task that wrote the run in ``output_dir`` (from results.json, else the newest checkpoint), or
    ``None`` when the folder holds no run or does not say."""
    results = output_dir / RESULTS_FILE
    if results.is_file():
        try:
            task = json.loads(results.read_text()).get("task")
        except (ValueError, AttributeError):
            raise UsageError(f"--output_dir {output_dir}: {RESULTS_FILE} there is not a samat results file; "
                             "choose another --output_dir") from None
        return task if isinstance(task, str) else None
    for checkpoint in reversed(list_checkpoints(output_dir)):
        try:  # a damaged state file says nothing; an older checkpoint may
            return TrainState.read(checkpoint).task or None
        except (OSError, ValueError, TypeError):
            continue
    return None


def check_output_dir(output_dir: Path, task: str) -> None:
    """Refuse, before anything is deleted or written, a ``--output_dir`` that is a file or that holds a run
    of another task (``--overwrite`` replaces only a run of the same task)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file, not a folder; choose a folder")
    for parent in output_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"--output_dir {output_dir}: {parent} is a file, not a folder")
    other = _task_in_folder(output_dir) if output_dir.is_dir() else None
    if other is not None and other != task:
        raise UsageError(f"--output_dir {output_dir} holds a {other!r} run, not a {task!r} one; choose another "
                         "--output_dir (--overwrite replaces only a run of the same task)")


def prepare_output_dir(run: Any, output_dir: Path, is_main: bool) -> Optional[Path]:
    """Decide between fresh start, resume and refusal; call after :func:`check_output_dir`. Returns the
    checkpoint to resume from, if any. Only here, after every check, does ``--overwrite`` delete."""
    results = output_dir / RESULTS_FILE
    checkpoints = list_checkpoints(output_dir)
    if run.overwrite:
        if is_main:
            shutil.rmtree(output_dir / CHECKPOINTS, ignore_errors=True)
            results.unlink(missing_ok=True)
        return None
    if results.exists() and not run.resume:
        raise UsageError(f"--output_dir {output_dir} holds a finished run ({RESULTS_FILE}); pass --overwrite "
                         "to start over or choose another --output_dir")
    if checkpoints and not run.resume:
        raise UsageError(f"--output_dir {output_dir} holds checkpoints; pass --resume to continue or "
                         "--overwrite to start over")
    return checkpoints[-1] if run.resume and checkpoints else None
