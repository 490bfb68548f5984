"""A script's start: its frameworks imported with Python's cyclic garbage collector paused, and frozen after."""

import contextlib
import gc

_in_script = False


def script_process() -> None:
    """Marks this process as a script's (gpt2_common.errors.run_cli does): what its framework imports build lives
    as long as the process, so imports_without_gc may freeze it."""
    global _in_script
    _in_script = True


@contextlib.contextmanager
def paused_then_frozen():
    """The cyclic collector paused for the body; what is alive after it frozen (gc.freeze: later collections skip
    it). For a body that builds objects meant to live as long as the process: imports."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


@contextlib.contextmanager
def imports_without_gc():
    """In a script's process, the imports inside run paused_then_frozen. Importing torch or JAX builds a few hundred
    thousand objects that live as long as the process, and the collector, on its usual schedule, scans the whole
    heap again each time it has grown by a quarter: 0.2-0.4 s of CPU for either framework, 1 s for both, in every
    script that loads them (the 2-core machine). Elsewhere (a notebook) it does nothing: there, a freeze would put
    the caller's own objects out of the collector's reach for good."""
    if not _in_script:
        yield
        return
    with paused_then_frozen():
        yield
