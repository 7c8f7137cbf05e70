"""Loaded by ``.ci/install_paths.py`` through PYTHONPATH into every process it starts.

Records each attempt to import a module named in INSTALL_CHECK_FORBID into the file
INSTALL_CHECK_IMPORT_LOG, with the stack that made it, then fails that import. The record
is kept even when the code catches the ImportError, so a path that merely tries to import
an optional dependency it does not need is caught too. A probe (``importlib.util.find_spec``,
which libraries use to see what is installed) imports nothing and is let through.
"""

import os
import sys
import traceback

_FORBIDDEN = {name for name in os.environ.get("INSTALL_CHECK_FORBID", "").split(",") if name}
_LOG = os.environ.get("INSTALL_CHECK_IMPORT_LOG")


def _is_probe():
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "find_spec" and code.co_filename.endswith(("importlib/util.py", "importlib.util>")):
            return True
        frame = frame.f_back
    return False


class _Forbid:
    @staticmethod
    def find_spec(name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in _FORBIDDEN or _is_probe():
            return None
        if _LOG:
            stack = "".join(traceback.format_stack(limit=12)[:-1])
            with open(_LOG, "a", encoding="utf-8") as log:
                log.write(f"pid {os.getpid()} imported {name}:\n{stack}\n")
        raise ImportError(f"{name} is forbidden on this install path")


if _FORBIDDEN:
    sys.meta_path.insert(0, _Forbid())
