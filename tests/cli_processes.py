"""Real `sparkkv` CLI processes for tests that kill them (tests/test_eval_resume.py).

Importing torch and transformers costs about 8 s of CPU here, so a test that starts dozens of CLI
processes uses a fork server: one process imports `sparkkv.cli`, loads the C++ kernels, and then
forks a child per run; each child runs `sparkkv.cli.main(argv)` exactly as `python -m sparkkv.cli`
does, with its own stdout and stderr files, and is a real process that a test can SIGKILL.
`ExecLauncher` starts `python -m sparkkv.cli` itself for every run instead (slow, the same API).

Fork server protocol (stdin/stdout, one JSON object per line):
    {"run": argv, "stdout": path, "stderr": path}  -> {"pid": pid}
    {"wait": pid}                                   -> {"code": exit code, negative: killed by that signal}
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path


def _serve() -> None:
    import traceback

    from sparkkv import cli
    from sparkkv.kernels import cpu, cpu_compress

    cpu.load()  # built or loaded once here; the children inherit them
    cpu_compress.available()
    reply = sys.stdout
    reply.write(json.dumps({"ready": os.getpid()}) + "\n")
    reply.flush()
    for line in sys.stdin:
        msg = json.loads(line)
        if "run" in msg:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    for fd, path in ((1, msg["stdout"]), (2, msg["stderr"])):
                        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                    code = cli.main(msg["run"])
                except BaseException:  # noqa: BLE001 - the child reports and exits, never returns
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            reply.write(json.dumps({"pid": pid}) + "\n")
        elif "wait" in msg:
            _, status = os.waitpid(msg["wait"], 0)
            reply.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


class Run:
    def __init__(self, pid: int, stdout: Path, stderr: Path, popen=None) -> None:
        self.pid, self.stdout, self.stderr, self.popen = pid, stdout, stderr, popen

    def output(self) -> str:
        return f"stdout:\n{_tail(self.stdout)}\nstderr:\n{_tail(self.stderr)}"


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.is_file() else "(none)"


class ForkServer:
    def __init__(self, env: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "import cli_processes; cli_processes._serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(Path(__file__).parent), bufsize=1)
        ready = self._reply(600)
        self.pid = ready["ready"]

    def _reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("the fork server did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server ended (code {self.proc.wait()})")
        return json.loads(line)

    def start(self, argv: list[str], logs: Path) -> Run:
        out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
        self.proc.stdin.write(json.dumps({"run": argv, "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        return Run(self._reply(60)["pid"], out, err)

    def alive(self, run: Run) -> bool:
        try:
            state = Path(f"/proc/{run.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")

    def kill(self, run: Run) -> None:
        os.kill(run.pid, signal.SIGKILL)  # a child that ended is a zombie until `wait`: never a reused pid

    def wait(self, run: Run, timeout: float = 120) -> int:
        """The exit code (negative: the signal that ended it); a run still going after `timeout`
        seconds is killed and reported as hung (AssertionError)."""
        self.proc.stdin.write(json.dumps({"wait": run.pid}) + "\n")
        self.proc.stdin.flush()
        try:
            return self._reply(timeout)["code"]
        except TimeoutError:
            os.kill(run.pid, signal.SIGKILL)
            self._reply(60)
            raise AssertionError(f"sparkkv run {run.pid} hung for {timeout} s\n{run.output()}") from None

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()  # nothing to flush; its interpreter shutdown alone takes seconds
        self.proc.wait()


class ExecLauncher:
    """`python -m sparkkv.cli ARGV` per run (what a user starts); same API as ForkServer."""

    def __init__(self, env: dict) -> None:
        self.env = env

    def start(self, argv: list[str], logs: Path) -> Run:
        out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
        with open(out, "w") as o, open(err, "w") as e:
            popen = subprocess.Popen([sys.executable, "-m", "sparkkv.cli", *argv], stdout=o, stderr=e, env=self.env)
        return Run(popen.pid, out, err, popen)

    def alive(self, run: Run) -> bool:
        return run.popen.poll() is None

    def kill(self, run: Run) -> None:
        run.popen.send_signal(signal.SIGKILL)  # nothing if it has ended and been reaped

    def wait(self, run: Run, timeout: float = 120) -> int:
        try:
            return run.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            run.popen.kill()
            run.popen.wait()
            raise AssertionError(f"sparkkv run {run.pid} hung for {timeout} s\n{run.output()}") from None

    def close(self) -> None:
        pass


def wait_until(condition, timeout: float, interval: float = 0.001) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
