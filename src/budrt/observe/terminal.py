"""What a person at a terminal sees of the logs: coloured lines (rich), and progress records
(observe/progress.py) drawn as bars, one per process, model and phase, below the lines.

One handler draws both on one rich `Console`, so a line logged while bars are shown is printed
above them instead of through them. Imported only by a process whose logs are for people.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TaskID, TimeElapsedColumn
from rich.text import Text

from budrt.observe.progress import BYTE_PHASES, END, progress_fields


class _Amount(ProgressColumn):
    """`4.2/9.0 MB` for phases counted in bytes, `3/9` for the others."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = DownloadColumn()

    def render(self, task: Task) -> Text:
        if task.fields.get("phase") in BYTE_PHASES:
            return self.bytes.render(task)
        return Text(f"{int(task.completed)}/{int(task.total or 0)}", style="progress.download")


class ProgressBars:
    """Bars of the long work in progress. Shown (a rich live display) from the first record
    until every bar is full or closed; the finished block stays on the screen, above what follows."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bars: Progress | None = None
        self._tasks: dict[tuple[str, str, str], TaskID] = {}

    def update(self, proc: str, model: str, phase: str, done: int, total: int) -> None:
        if phase == END:
            self.close_bars(proc, model)
            return
        bars = self._bars or self._start()
        key = (proc, model, phase)
        task = self._tasks.get(key)
        if task is None:
            description = f"{proc}  {model}  {phase}"
            task = self._tasks[key] = bars.add_task(description, total=total, phase=phase)
        elif done < _task(bars, task).completed:  # loaded again while other bars are shown
            bars.reset(task, total=total)
        bars.update(task, total=total, completed=done)  # marks the bar finished at its total
        self._stop_when_done()

    def close_bars(self, proc: str, model: str = "") -> None:
        """Drop the unfinished bars of `model` (an empty one: all of `proc`'s): its load ended,
        or the process exited."""
        if self._bars is None:
            return
        for key, task in list(self._tasks.items()):
            if key[0] == proc and (not model or key[1] == model):
                if not _task(self._bars, task).finished:
                    self._bars.remove_task(task)
                    del self._tasks[key]
        self._stop_when_done()

    def close(self) -> None:
        """Stop drawing (the cursor comes back)."""
        if self._bars is not None:
            self._bars.stop()
        self._bars = None
        self._tasks.clear()

    def _start(self) -> Progress:
        columns = (
            "{task.description}",
            BarColumn(),
            "{task.percentage:>3.0f}%",
            _Amount(),
            TimeElapsedColumn(),
        )
        self._bars = Progress(*columns, console=self.console)
        self._bars.start()
        return self._bars

    def _stop_when_done(self) -> None:
        if self._bars is not None and all(t.finished for t in self._bars.tasks):
            self.close()


def _task(bars: Progress, task_id: TaskID) -> Task:
    return next(t for t in bars.tasks if t.id == task_id)


class TextHandler(RichHandler):
    """Lines for a person: time, level, process, message, fields. On a terminal, progress
    records update bars instead; a relayed process's lines that were not log records (`raw`: a
    traceback, a compiler's message) are printed as they came."""

    def __init__(self, process_name: str, console: Console) -> None:
        super().__init__(
            console=console, show_path=False, markup=False, rich_tracebacks=False, log_time_format="%H:%M:%S"
        )
        self.process_name = process_name
        self.bars = ProgressBars(console) if console.is_terminal else None

    def emit(self, record: logging.LogRecord) -> None:
        proc = getattr(record, "proc", None) or self.process_name
        progress = progress_fields(record)
        if progress is None and not getattr(record, "raw", False):
            super().emit(record)
            return
        try:
            if progress is None:
                self.console.print(Text(f"{proc:<12} {record.getMessage()}"), soft_wrap=True)
            elif self.bars is not None:
                self.bars.update(proc, *progress)
            elif progress[1] != END:  # no bars (not a terminal): a line, as throttled as the records
                super().emit(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        if self.bars is not None:
            self.bars.close()
        super().close()
