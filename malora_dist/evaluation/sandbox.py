"""Run untrusted generated code (a HumanEval completion and its tests) and say whether it passed.

Each program runs in a fresh ``python -I -B`` subprocess, in its own session (so a timeout kills
everything it started), with a new empty scratch directory as its working directory, HOME and
TMPDIR, an environment holding nothing of the caller's, and resource limits (address space, CPU
seconds, file size, open files, no core dumps). Inside, before the program starts, an audit hook
(PEP 578, which the program cannot remove) ends the process at once — ``os._exit``, which no
``try`` can catch — on any of:

- opening a file for writing, or creating, deleting, renaming, linking or changing the mode of a
  path, outside the scratch directory;
- creating a socket (no network);
- starting a process (``subprocess``, ``os.system``, ``fork``, ``exec``, ``spawn``), sending a
  signal, or loading a C library through ``ctypes``.

The program passed only if it ran to the end — after its tests — and printed a random token the
caller chose; a program that exits early (``sys.exit(0)``, ``os._exit(0)``), crashes, hangs, runs out
of memory or is stopped by the hook failed. Each ``SandboxResult`` says which.

This is a guard against the mistakes of generated code, not a security boundary against code
written to escape it: run evaluations of untrusted models in a container or VM as well.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

TIMEOUT_S = 10.0
MEMORY_BYTES = 1 << 30
FILE_BYTES = 1 << 20
OPEN_FILES = 64
VIOLATION_EXIT = 86

# Runs first in the sandboxed interpreter: reads the token and the program from stdin, sets the
# limits, installs the hook, runs the program, and prints the token only if the program returned.
_RUNNER = r"""
import os, resource, sys
_cpu, _mem, _fsize, _nofile, _violation = (int(a) for a in sys.argv[1:6])
_token = sys.stdin.readline().strip()
_source = sys.stdin.read()
for _limit, _value in ((resource.RLIMIT_CPU, _cpu), (resource.RLIMIT_AS, _mem), (resource.RLIMIT_FSIZE, _fsize),
                       (resource.RLIMIT_NOFILE, _nofile), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(_limit, (_value, _value))

def _make_guard(scratch, violation, write=os.write, exit_now=os._exit, fspath=os.fspath, realpath=os.path.realpath,
                join=os.path.join, getcwd=os.getcwd, sep=os.sep):
    writing_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    path_events = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.link", "os.symlink", "os.chmod",
                   "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile",
                   "shutil.copytree", "shutil.chown"}
    forbidden = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                 "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "pty.spawn")

    def stop(reason):
        write(2, f"\nsandbox: {reason}\n".encode(errors="replace"))
        exit_now(violation)

    def inside(path):
        if isinstance(path, int):
            return True  # an already open descriptor
        try:
            path = fspath(path)
        except TypeError:
            return True
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        full = realpath(join(getcwd(), path))
        return full == scratch or full.startswith(scratch + sep)

    def guard(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & writing_flags)
            if writes and not inside(path):
                stop(f"writes {path!r} outside its scratch directory")
        elif event in path_events:
            for path in args[:2] if event in ("os.rename", "os.link", "os.symlink", "shutil.move",
                                               "shutil.copyfile", "shutil.copytree") else args[:1]:
                if path is not None and not inside(path):
                    stop(f"{event} on {path!r} outside its scratch directory")
        elif event.startswith(forbidden):
            stop(f"{event} is not allowed (no network, processes, signals or C libraries)")

    return guard

sys.addaudithook(_make_guard(os.path.realpath(os.getcwd()), _violation))
del _make_guard
exec(compile(_source, "<program>", "exec"), {"__name__": "__main__"})
print("\n" + _token, flush=True)
"""


@dataclass
class SandboxResult:
    """passed: the program ran to its end. status: ``passed``, ``failed`` (an exception or a
    non-zero exit), ``exited early``, ``timed out``, ``killed`` (a signal: memory or CPU limit),
    ``violation`` (the hook stopped it). detail: the tail of its stderr."""

    passed: bool
    status: str
    detail: str = ""


def run_program(source: str, timeout_s: float = TIMEOUT_S) -> SandboxResult:
    """Run ``source`` in the sandbox (module docstring) and report how it ended."""
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="malora-sandbox-") as scratch, \
            tempfile.TemporaryDirectory(prefix="malora-sandbox-out-") as out_dir:
        stdout_path, stderr_path = os.path.join(out_dir, "stdout"), os.path.join(out_dir, "stderr")
        argv = [sys.executable, "-I", "-B", "-c", _RUNNER, str(int(timeout_s) + 1), str(MEMORY_BYTES),
                str(FILE_BYTES), str(OPEN_FILES), str(VIOLATION_EXIT)]
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, cwd=scratch,
                                       env=env, start_new_session=True)
            try:
                process.communicate(f"{token}\n{source}".encode(), timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_session(process)
        printed = _tail(stdout_path)
        detail = _tail(stderr_path).decode(errors="replace").strip()
    if timed_out:
        return SandboxResult(False, "timed out", detail)
    code = process.returncode
    if code == VIOLATION_EXIT:
        return SandboxResult(False, "violation", detail)
    if code < 0:
        return SandboxResult(False, "killed", f"signal {signal.Signals(-code).name}; {detail}")
    if code != 0:
        return SandboxResult(False, "failed", detail)
    if printed.rstrip().endswith(token.encode()):
        return SandboxResult(True, "passed")
    return SandboxResult(False, "exited early", detail)


def _kill_session(process: subprocess.Popen) -> None:
    """Kill the program's whole session (its own process group) and reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _tail(path: str, size: int = 2000) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - size))
        return f.read()
