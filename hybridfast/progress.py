"""Progress of long work, one helper for every command (encoding, shards, training).

On a terminal: a tqdm bar. Elsewhere (a log file, a batch job, CI) a bar's carriage returns make
an unreadable log, so plain lines instead: "encode passage texts: 1280/3446 (37%), 412 texts/s,
ETA 0:05", at most every `every` seconds and at the end, or when the caller asks (training prints
one per log row). Nothing at all when disabled (--no-progress)."""
import sys
import time

from tqdm.auto import tqdm


def _clock(seconds):
    return "?" if seconds == float("inf") else f"{int(seconds // 60)}:{int(seconds % 60):02d}"


class Progress:
    """total: items to do; initial: items already done (a resumed run), left out of the rate;
    unit: "text", "step" (plural: its plural, unit + "s" by default); every: seconds between
    automatic lines (None: only line() prints); label: a word before the count ("step" gives
    "train: step 40/72"); digits: of the rate."""

    def __init__(self, total, desc, unit, enabled=True, initial=0, every=10.0, stream=None, label="",
                 digits=0, plural=None):
        self.stream = stream if stream is not None else sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total, self.desc, self.units, self.every = total, desc, plural or f"{unit}s", every
        self.label, self.digits = f"{label} " if label else "", digits
        self.lines = enabled and not tty
        self.start = self.done = initial
        self.t0 = self.last = time.perf_counter()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                        disable=not (enabled and tty))

    def update(self, n=1):
        self.bar.update(n)
        self.done += n
        if self.lines and self.every is not None:
            now = time.perf_counter()
            if now - self.last >= self.every or self.done >= self.total:
                self.line()

    def line(self, done=None, extra=""):
        """Print the plain line now (off a terminal): `done` overrides the count, `extra` is
        added after the rate (", loss 1.2345")."""
        if not self.lines:
            return
        self.last = now = time.perf_counter()
        done = self.done if done is None else done
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else (0.0 if done >= self.total else float("inf"))
        print(f"{self.desc}: {self.label}{done}/{self.total} ({100 * done / max(self.total, 1):.0f}%), "
              f"{rate:.{self.digits}f} {self.units}/s{extra}, ETA {_clock(eta)}", file=self.stream, flush=True)

    def close(self):
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
