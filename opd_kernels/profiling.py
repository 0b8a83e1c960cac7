"""Peak-memory measurement helpers for CPU processes (Linux), used by the demo, tests and benchmarks.

The peak resident set size (VmHWM) of a process can be reset by writing "5" to /proc/self/clear_refs, so
the peak extra memory of one region is ``peak after − current before`` with the high-water mark reset at
the start of the region (allocations freed earlier do not hide the region's own peak).
"""

from __future__ import annotations

import gc


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS; returns the current RSS in bytes."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass                                  # not Linux / not permitted: the peak then includes earlier history
    return current_rss_bytes()


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.extra_bytes`` = peak RSS inside the block − RSS at its start."""

    def __enter__(self):
        self.start = reset_peak_rss()
        return self

    def __exit__(self, *exc):
        self.extra_bytes = max(0, peak_rss_bytes() - self.start)
        return False
