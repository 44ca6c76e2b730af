"""A run's log: `log.jsonl` (one JSON record a line: kind step / epoch / checkpoint / summary), and the same
figures as TensorBoard scalars when the `tensorboard` extra is installed.

Every record goes through one call (`RunLog.__call__`), and its scalars to TensorBoard at the record's
optimizer step, so both views show one curve. Only rank 0 writes. A resumed run starts where its
checkpoint is: `truncate_log` drops the JSON records after the checkpoint's step, and the TensorBoard
writer opens with `purge_step` one past it, which tells TensorBoard to hide the events a killed run
wrote after its checkpoint (torch.utils.tensorboard.SummaryWriter; TensorBoard's own purge).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import FastRSBError, missing_extra
from .runmeta import write_atomic

LOG = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"  # the default, inside the run folder

# log.jsonl record kind -> {record key: TensorBoard tag}, each written at the record's "step"
SCALARS = {
    "step": {"loss": "train/loss", "lr": "train/lr", "img_per_s": "train/img_per_s"},
    "epoch": {"loss": "epoch/train_loss", "img_per_s": "epoch/img_per_s", "res": "epoch/res",
              "top1": "eval/top1", "top5": "eval/top5", "ema_top1": "eval/ema_top1", "ema_top5": "eval/ema_top5"},
}


def _summary_writer():
    """torch's SummaryWriter, or None when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard raises it when tensorboard is not installed
        return None
    return SummaryWriter


def tensorboard_dir(option: str | os.PathLike | bool | None, out: Path) -> Path | None:
    """Where the run's TensorBoard events go, or None for nowhere.

    option None: out/tensorboard when tensorboard is installed, else nowhere; False or "": nowhere;
    True: out/tensorboard; a path: there. Asked for (True or a path) without the package: an error."""
    if option is False or option == "":
        return None
    if _summary_writer() is None:
        if option is None:
            return None
        raise FastRSBError(f"--tensorboard{'' if option is True else ' ' + str(option)}: "
                           f"{missing_extra('tensorboard', 'tensorboard')}; or leave --tensorboard out")
    return out / TENSORBOARD_DIR if option is None or option is True else Path(option)


def truncate_log(path: Path, step: int) -> None:
    """Drop the records a killed run wrote after its last checkpoint, so a resumed log has no repeats."""
    if not path.exists():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in records if r.get("step", 0) <= step and r.get("kind") != "summary"]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


class RunLog:
    """log(record) appends it to out/log.jsonl and its scalars (`SCALARS`) to TensorBoard; a no-op on
    ranks other than 0 (enabled False). resumed_at: the step of the checkpoint the run resumed from."""

    def __init__(self, out: Path, *, enabled: bool, tensorboard: Path | None = None, resumed_at: int | None = None):
        self.file = open(out / LOG, "a") if enabled else None
        self.writer = None
        if enabled and tensorboard is not None:
            purge_step = None if resumed_at is None else resumed_at + 1  # the events at resumed_at are kept
            self.writer = _summary_writer()(log_dir=str(tensorboard), purge_step=purge_step)

    def __call__(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is None:
            return
        for key, tag in SCALARS.get(record["kind"], {}).items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], global_step=record["step"])
        if record["kind"] in ("epoch", "checkpoint"):  # on disk with the checkpoint that follows or precedes
            self.writer.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
