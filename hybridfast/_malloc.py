"""Process memory tuning for the training commands (train, demo, study): freed memory is kept for
reuse instead of being handed back to the kernel after every step.

Why: each training step allocates large buffers afresh, above all the gradient of the word
embedding table (250k x 384 fp32 = 384 MB for multilingual-e5-small). glibc's malloc serves
blocks over 32 MB with mmap and returns them with munmap when freed, so the next step faults the
same memory in again page by page: about 190k page faults per step (bf16, batch 16 x 48 tokens),
and on the 2-core development VM the kernel time of those faults (0.3-3.8 s per step) was as
large as the step's compute. With mmap off (M_MMAP_MAX = 0; glibc still falls back to mmap
where the heap cannot grow) and trimming only above 2 GiB free, the blocks are reused from the
heap: steps 3-6 of that run took 50-200 faults each and 0.52-0.64 s instead of 0.79-3.3 s; the
peak resident memory of a 4-step demo rose from 3.6 to 4.3 GB (freed blocks stay mapped).

This is what PyTorch's CPU performance guides get from jemalloc or tcmalloc, done with glibc's
own knobs (mallopt). It is applied only when hybridfast owns the process (the console script,
`python -m hybridfast`, torchrun) for the commands in COMMANDS, never on import; it is skipped
when the user chose an allocator setup (LD_PRELOAD, glibc's MALLOC_* or GLIBC_TUNABLES variables)
and when HYBRIDFAST_MALLOC=system.
"""
import ctypes
import os
import sys

COMMANDS = ("train", "demo", "study")
ENV = "HYBRIDFAST_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4    # glibc's mallopt parameters (malloc.h)
_TRIM_THRESHOLD = (1 << 31) - 1            # the largest int: give memory back only above 2 GiB free
_USER_SETTINGS = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                  "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def plan(environ=None, platform=None):
    """(apply?, why) for this process's environment."""
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    choice = environ.get(ENV, "").strip().lower()
    if choice not in ("", "keep", "system"):
        raise ValueError(f"${ENV} must be 'keep' or 'system', got {environ[ENV]!r}")
    if choice == "system":
        return False, f"the system's default (${ENV}=system)"
    if not platform.startswith("linux"):
        return False, "the system's default (glibc's malloc only, on Linux)"
    chosen = [k for k in _USER_SETTINGS if environ.get(k)]
    if chosen:
        return False, f"the system's default (left to your {', '.join(chosen)})"
    return True, f"freed memory kept for reuse by train, demo and study (${ENV}=system: off)"


def keep_freed_memory():
    """Apply the tuning when plan() says so; returns whether it is now in effect."""
    apply, _ = plan()
    if not apply:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; both or neither
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_MAX, 0))
