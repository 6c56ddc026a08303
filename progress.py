"""Progress bars: tqdm's on a terminal, plain lines off one (a log file, a cluster's job log).

    bar = progress_bar(desc="train", unit="step", total=125, every=None)   # lines at set_postfix only
    bar.update(1); bar.set_postfix(loss="0.6931"); bar.close()
    for batch in progress_bar(batches, desc="evaluate", unit="batch"): ...

A bar redraws itself with carriage returns: in a file, every redraw stays, and a log fills with
frames. Where stderr is not a terminal, a bar is Lines instead: one plain line whenever the caller
sets its postfix (the training loop does at each log interval), one every `every` seconds of a
long task, and a last one when it ends if it said anything before. A short task says nothing.
"""
import sys
import time

from tqdm import tqdm

# seconds between two lines of a long task off a terminal
EVERY_SECONDS = 30


def progress_bar(iterable=None, *, desc, unit, every=EVERY_SECONDS, **options):
    """A tqdm bar on stderr when it is a terminal, else Lines. options are tqdm's own (total,
    initial, disable, leave, position, delay, dynamic_ncols); every: seconds between lines off a
    terminal (None: only when the postfix is set)."""
    file = sys.stderr
    if options.get("disable") or (hasattr(file, "isatty") and file.isatty()):
        return tqdm(iterable, desc=desc, unit=unit, file=file, **options)
    return Lines(iterable, desc, unit, options.get("total"), options.get("initial", 0), every, file)


class Lines:
    """A progress bar as plain lines: `desc: unit n/total (share), elapsed, time left, postfix` (no
    time left on the line that ends it: a run may end before its total, stopped early)."""

    def __init__(self, iterable, desc, unit, total, initial, every, file):
        self.iterable, self.desc, self.unit, self.every, self.file = iterable, desc, unit, every, file
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n = self.initial = self.said_n = initial
        self.start = self.said_at = time.monotonic()
        self.postfix, self.said, self.closed = "", False, False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        self.n += n
        if self.every is not None and time.monotonic() - self.said_at >= self.every:
            self.say()

    def set_postfix(self, **values):
        self.postfix = " ".join(f"{name}={value}" for name, value in values.items())
        self.say()

    def close(self):
        if self.said and not self.closed and self.n != self.said_n:  # where it ended, if it said anything
            self.say(ended=True)
        self.closed = True

    def say(self, ended=False):
        elapsed = time.monotonic() - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        where = f"{self.n}/{self.total} ({self.n / self.total:.0%})" if self.total else f"{self.n}"
        left = f", {tqdm.format_interval((self.total - self.n) / rate)} left" if self.total and rate > 0 and not ended else ""
        # one write: processes that share this stream do not split each other's lines
        self.file.write(f"{self.desc}: {self.unit} {where}, {tqdm.format_interval(elapsed)}{left}"
                        f"{', ' + self.postfix if self.postfix else ''}\n")
        self.file.flush()
        self.said, self.said_at, self.said_n = True, time.monotonic(), self.n
