"""Load a module of the session's starting commit (c8b3244) beside the current one, for paired timings."""

import importlib.util
import pathlib
import subprocess
import sys
import tempfile

START = "c8b3244"


def old_module(path: str, commit: str = START):
    """``src/bmojo/<path>`` as it was at ``commit``, as a module of its own (run from the repository)."""
    source = subprocess.run(["git", "show", f"{commit}:src/bmojo/{path}"], check=True, capture_output=True,
                            text=True).stdout
    name = "old_" + path.replace("/", "_").removesuffix(".py")
    file = pathlib.Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
