"""Peak resident memory of this process on Linux, for the benchmarks' memory ratios: free what
Python and the C heap hold, reset the high-water mark, read it back from /proc/self/status."""

from __future__ import annotations

import ctypes
import gc


def trim_heap() -> None:
    """Collect garbage and give freed heap pages back, so they do not pad the next measurement."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def status_kib(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM, RssAnon, ...)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
