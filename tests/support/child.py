"""Running code in a child interpreter, so that a crash (a use-after-free) shows as a
negative return code and a hang as a timeout of one test, instead of killing pytest."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path


def child_argv(code, impl):
    """argv running ``code`` (dedented) in a fresh interpreter; sys.argv[1] is the name of
    the module ``impl``."""
    return [sys.executable, "-c", textwrap.dedent(code), impl.__name__]


def child_env(impl):
    """The environment of a child interpreter: the directory ``impl`` was imported from
    first on PYTHONPATH, so the child tests the same build as this process."""
    root = Path(impl.__file__).resolve().parents[1]  # spte_fast/<module>.py -> checkout
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def run_child(code, impl, timeout=60):
    """Run ``code`` in a child interpreter; a crash shows as a negative returncode instead
    of killing pytest."""
    return subprocess.run(child_argv(code, impl), env=child_env(impl), capture_output=True,
                          text=True, timeout=timeout)
