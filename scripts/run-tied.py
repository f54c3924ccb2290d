#!/usr/bin/env python3
"""Run a command until this process's stdin closes, then stop it.

Test binaries start emulators through this wrapper with a piped stdin. When
the test process exits, for whatever reason, the pipe closes and the emulator
goes with it, so no emulator outlives the tests.

    run-tied.py [--env K=V ...] -- COMMAND [ARG...]
"""
import os
import signal
import subprocess
import sys
import threading


def main() -> int:
    args = sys.argv[1:]
    env = dict(os.environ)
    while args and args[0] == "--env":
        key, _, value = args[1].partition("=")
        env[key] = value
        args = args[2:]
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    child = subprocess.Popen(args, env=env, start_new_session=True)

    def watch_stdin() -> None:
        sys.stdin.buffer.read()
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    threading.Thread(target=watch_stdin, daemon=True).start()
    code = child.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
