"""Peak resident memory of a stretch of a process (Linux), shared by the benchmarks.

    how = reset_peak()        # zero the kernel's peak-RSS counter (VmHWM) here
    ...                       # the work to measure
    peak_kb(how) - rss_kb()   # its peak growth (rss_kb() read at the reset)

Children should run with MALLOC_MMAP_THRESHOLD_=131072 so glibc returns freed blocks >= 128 KiB
at once and RSS follows live memory. Without a writable /proc/self/clear_refs the fallback is the
process's lifetime peak (ru_maxrss), which setup peaks can hide: the method's name says which.
"""

from __future__ import annotations

import resource


def status_kb(field: str) -> int:
    """A /proc/self/status field in KiB (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_kb() -> int:
    return status_kb("VmRSS")


def reset_peak() -> str:
    """Reset VmHWM; returns the method ``peak_kb`` must use ("VmHWM" or "ru_maxrss")."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def peak_kb(method: str) -> int:
    return status_kb("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
