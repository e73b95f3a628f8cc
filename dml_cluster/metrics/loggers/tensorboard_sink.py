"""TensorBoard: event files in `<dir>/<peer>/` (default `<run dir>/tb/`), the same tags in every
peer's folder so that TensorBoard overlays the cohort; the config and its hash as the run's
hyper-parameters (the HParams tab) and as text. A resumed run appends to the same folders and
purges what the interrupted attempt wrote after its checkpoint (`purge_step`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from dml_cluster.config import TensorBoardConfig
from dml_cluster.metrics.loggers.context import LoggerContext

FLUSH_S = 30  # at most this long between a value and its event file (a pod may be killed)


def _hparam(value: Any) -> int | float | str | bool:
    return value if isinstance(value, (int, float, str, bool)) else str(value)


class TensorBoardSink:
    def __init__(self, settings: TensorBoardConfig, context: LoggerContext) -> None:
        self.root = Path(settings.dir) if settings.dir else context.run_dir / "tb"
        self.context = context
        self.writers: dict[int, SummaryWriter] = {}

    def _writer(self, peer: int, step: int) -> SummaryWriter:
        writer = self.writers.get(peer)
        if writer is None:
            folder = self.root / self.context.peers[peer]
            resumed = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
            writer = SummaryWriter(
                str(folder), purge_step=step if resumed else None, flush_secs=FLUSH_S
            )
            if not resumed:
                params = {k: _hparam(v) for k, v in self.context.params.items()}
                for summary in hparams(params, {"eval/accuracy": 0.0}):
                    writer.file_writer.add_summary(summary)
                text = yaml.safe_dump(self.context.params, sort_keys=False)
                writer.add_text("config", f"```\n{text}```", 0)
            self.writers[peer] = writer
        return writer

    def log(self, peer: int, scalars: dict[str, float], step: int) -> None:
        writer = self._writer(peer, step)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)

    def close(self, finished: bool) -> None:
        for writer in self.writers.values():
            writer.close()
