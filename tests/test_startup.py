"""gpt2_common.startup: in a script's process (run_cli) the frameworks' imports run with the cyclic collector paused
and are frozen after; anywhere else (a notebook, these tests) nothing changes."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_script_imports_with_the_collector_paused_and_freezes_what_they_built():
    assert run("""
        import gc
        from gpt2_common import startup
        from gpt2_common.errors import run_cli

        def main():
            frozen = gc.get_freeze_count()
            with startup.imports_without_gc():
                paused = not gc.isenabled()
                import email.mime.multipart  # a package of some size that nothing here imported yet
            print(paused, gc.isenabled(), gc.get_freeze_count() > frozen)

        run_cli(main)
        """) == "True True True"


def test_outside_a_script_it_changes_nothing():
    assert run("""
        import gc
        from gpt2_common import startup

        frozen = gc.get_freeze_count()
        with startup.imports_without_gc():
            running = gc.isenabled()
            import email.mime.multipart
        print(running, gc.isenabled(), gc.get_freeze_count() == frozen)
        """) == "True True True"


def test_an_import_that_fails_resumes_the_collector():
    assert run("""
        import gc
        from gpt2_common import startup

        startup.script_process()
        try:
            with startup.imports_without_gc():
                import no_such_module_here  # noqa: F401
        except ImportError:
            pass
        print(gc.isenabled())
        """) == "True"
