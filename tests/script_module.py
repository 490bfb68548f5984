"""scripts/NAME.py imported as a module, for the tests that call a script's functions in-process (the scripts are
entry points, not a package)."""

import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    """A fresh module of scripts/`name`.py, as `import` would make it, without running its main."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
