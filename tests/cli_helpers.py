"""Run a console script as a user would, without a fresh interpreter's ~20 s of megatron imports per call (2-core CI).

:func:`run_cli` runs the script's ``main`` in a process forked from the fork server that already imported megatron
(:func:`evo2_recipe.utils.spawn.fork_server_context`): a new process with its own exit status, stdout and stderr,
environment and exit handlers. Only import-time output differs from a fresh interpreter (the server imported
quietly), so tests of clean default output pass ``fresh=True`` for a real subprocess.
"""

import atexit
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

BIN = Path(sys.executable).parent


def _exit_code(value) -> int:
    """What ``sys.exit(value)`` leaves as the process's status (a message goes to stderr, status 1)."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _cli_entry(tool: str, argv: list[str], env: dict[str, str], out_path: str, err_path: str) -> None:
    from evo2_recipe.utils.spawn import start_like_a_fresh_process

    start_like_a_fresh_process(env)
    if "OMP_NUM_THREADS" in env:  # read by a fresh interpreter at start; the forked one has the server's setting
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    for fd, path in ((1, out_path), (2, err_path)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = [tool, *argv]
    code = 1
    try:
        (script,) = importlib.metadata.entry_points(group="console_scripts", name=tool)
        code = _exit_code(script.load()())
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # multiprocessing children skip them; an interpreter exit runs them
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def run_cli(tool: str, *args, env: dict[str, str] | None = None, timeout: float = 600,
            fresh: bool = False) -> subprocess.CompletedProcess:
    """``tool *args`` -> CompletedProcess (text stdout/stderr). ``fresh``: a real subprocess of the console script."""
    argv = [str(a) for a in args]
    env = {**os.environ, **(env or {})}
    if fresh:
        return subprocess.run([str(BIN / tool), *argv], capture_output=True, text=True, timeout=timeout, env=env)
    from evo2_recipe.utils.spawn import fork_server_context

    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = fork_server_context().Process(target=_cli_entry, args=(tool, argv, env, out, err))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([tool, *argv], timeout)
        return subprocess.CompletedProcess([tool, *argv], proc.exitcode, Path(out).read_text(errors="replace"),
                                           Path(err).read_text(errors="replace"))
