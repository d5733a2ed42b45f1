"""A one-line progress bar on stderr for long evaluations; silent unless stderr is a terminal."""
import sys
import time


class ProgressBar:
    WIDTH = 30

    def __init__(self, label: str, total: int, enabled: bool = True, stream=None, unit: str = "tokens"):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and total > 0 and _is_terminal(self.stream)
        self.label, self.total, self.done, self.unit = label, total, 0, unit
        self.started = self.drawn_at = time.perf_counter()

    def advance(self, n: int) -> None:
        """`n` more items (tokens) are done; redraws at most ten times a second, and at the end."""
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.drawn_at >= 0.1 or self.done >= self.total):
            self.drawn_at = now
            self._draw(now)

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")  # clear the line: the report follows on a clean terminal
            self.stream.flush()

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        filled = int(frac * self.WIDTH)
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        self.stream.write(f"\r{self.label:<9}[{'#' * filled}{'.' * (self.WIDTH - filled)}] {100 * frac:5.1f}% "
                          f"{self.done:,}/{self.total:,} {self.unit}  {rate:,.{0 if rate >= 10 else 1}f} "
                          f"{'tok' if self.unit == 'tokens' else self.unit}/s  eta {eta:4.0f} s")
        self.stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
