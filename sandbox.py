"""Run untrusted Python (model-written code) for a reward function, without letting it harm the trainer.

    from sandbox import Sandbox
    box = Sandbox(timeout=2.0)
    r = box.run("print(sum(map(int, input().split())))", stdin="2 3\\n")
    r.ok, r.stdout            # True, "5\\n"
    box.map([(code, stdin), ...])   # many at once, at most box.max_parallel at a time

A policy trained with a code-execution reward (ReTool, CodeV-R1, DeepSeek-R1's code tasks) writes programs
that loop forever, allocate everything, fork, print gigabytes or, sooner or later, probe their
surroundings. Each execution here gets, and why:

 1. Its own process, session and process group (start_new_session=True), so one killpg(SIGKILL)
    reaches the program and everything it started in that group.
 2. A wall-clock timeout. Past it the whole group is killed with SIGKILL (not SIGTERM, which the program
    could catch). The caller's thread waits at most `timeout` plus the time the kernel takes to reap.
 3. Resource limits (setrlimit, inherited by every child): CPU seconds, address space (a memory bomb gets
    MemoryError, not the machine's RAM), file size (a write past it fails with EFBIG), open files,
    processes, and no core dumps.
 4. Linux namespaces where the kernel lets us create them (as root, or through an unprivileged user
    namespace): a network namespace with no interfaces at all (no network, not even loopback), and a PID
    namespace whose process 1 is the program: when it exits or is killed, the kernel kills every
    process left in the namespace, including ones that left the process group with setsid() or
    double-forked. That is what makes "a child that outlives its parent" impossible.
 5. When the trainer runs as root: the program runs as an unprivileged user (`user`, default nobody),
    so RLIMIT_NPROC is enforced (the kernel does not enforce it for root) and the file permissions of
    the machine apply (no writing to the trainer's files, its checkpoints, /root, /etc, ...).
 6. A fresh temporary directory as working directory, HOME and TMPDIR, removed afterwards.
 7. A minimal environment (PATH, LANG, HOME, TMPDIR): nothing of the trainer's environment (API keys,
    tokens, cluster credentials) is inherited.
 8. `python -I -S`: isolated mode ignores PYTHON* variables and the user site directory, -S skips
    site-packages, so the program sees the standard library only (no torch, no trainer modules). As
    root the interpreter may be the system's python3 (see Sandbox.python). -I also ignores
    PYTHONHASHSEED: set and dict-of-str orders vary between runs, as in any plain `python` run.
 9. stdout and stderr read in chunks and capped at `max_output` bytes each; past the cap the program is
    killed, so printing gigabytes costs the trainer at most the cap in memory.
10. At most `max_parallel` executions at a time (a bounded semaphore), however many threads call run().

Why RLIMIT_NPROC is not enough against a fork bomb: it counts every process (and thread) of the user,
not of this execution, and for root it is not enforced at all. As root, all executions run as `user`
and share one budget of max_processes + max_parallel (while a bomb holds it, a concurrent execution
may fail to start: it is reported as not started, and code_reward abstains for it). As a non-root user
inside a user namespace the count is per execution; without one it includes the trainer's own
processes and threads. So the bomb is stopped by the combination: the limit slows it (and, with a
dropped user, caps it), the PID namespace and the process-group kill end all of it at the timeout, and
RLIMIT_CPU ends any busy straggler.

What is NOT guaranteed (this is process isolation, not a VM or gVisor):
- Without namespaces (an unprivileged user on a kernel or container that forbids user namespaces, root
  without CAP_SYS_ADMIN as in a default Docker container, any non-Linux system) there is no network
  isolation, and a process that calls setsid() escapes the group kill
  (RLIMIT_CPU still ends it once it has used its CPU seconds; a sleeping one lives on). `probe()` says
  which protections this machine actually gives.
- The file system is the machine's: the program can read every world-readable file and write to
  world-writable places (/tmp, /dev/shm) up to the file-size limit per file. When the trainer is not
  root the program runs as the trainer's own user and can write wherever that user can.
- As a non-root user, /proc is the host's and the program has the trainer's uid: it can read the
  trainer's /proc/PID/environ (secrets passed in the environment), and signal or ptrace the trainer's
  processes that it can see (none, with a PID namespace). As root (program as nobody) all are denied.
- Executions that run as the same user can leave files in /tmp for later ones (a sample could pass
  data to another sample). Without namespaces, a leftover child that keeps stdout open makes run()
  wait until the timeout.
- Kernel exploits, timing side channels, CPU/memory-bandwidth contention with the trainer.
- Integrity of the reward: the tests run in the same process as the solution, so a program that reads
  its own source file can forge a pass. See rewards.code_reward for the cheap defences used.
"""
import functools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# The launcher: a tiny Python program that runs first in the new session, sets up the namespaces and
# limits, then forks and execs the program. It runs as a separate interpreter (not a preexec_fn) because
# preexec_fn runs Python in a forked copy of a multi-threaded trainer, which can deadlock on a lock that
# another thread held at fork time. It reports "ok" on a status pipe right before exec (the pipe is
# close-on-exec, so the program never sees it): anything else means the sandbox failed, not the program,
# and a program cannot fake that by choosing its exit code (the launcher's own failures exit 125, as `env`
# and `timeout` do, but the status pipe, not the code, is what counts).
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
status = cfg["status_fd"]
os.set_inheritable(status, False)
libc = ctypes.CDLL(None, use_errno=True)
NEWUSER, NEWPID, NEWNET = 0x10000000, 0x20000000, 0x40000000
try:
    if cfg["namespaces"] and libc.unshare(NEWPID | NEWNET) != 0 and cfg["user"] is None:  # root: CAP_SYS_ADMIN
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(NEWUSER | NEWPID | NEWNET) == 0:            # unprivileged: a user namespace first
            # map our own ids to themselves, so files in the work dir keep their owner
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
    for name, value in cfg["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    pid = os.fork()   # in a new PID namespace the child is its process 1
except BaseException as e:
    os.write(status, f"launcher: {type(e).__name__}: {e}".encode())
    os._exit(125)
if pid == 0:
    try:
        if cfg["user"] is not None:
            os.setgroups([])
            os.setgid(cfg["user"])
            os.setuid(cfg["user"])
        libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG (after setuid, which clears it): die with the launcher
        os.write(status, b"ok")
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as e:
        os.write(status, f" exec: {type(e).__name__}: {e}".encode())
    os._exit(125)
os.close(status)
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
os._exit(code if code >= 0 else 128 - code)   # killed by signal s -> 128 + s, as shells report it
"""


@dataclass
class Result:
    started: bool        # False: the sandbox could not run the program (see `error`); judge nothing
    returncode: int      # exit status: 128 + s when the program died of signal s; -9 when we killed it
    stdout: str
    stderr: str
    timed_out: bool      # killed at the wall-clock timeout
    truncated: bool      # killed for printing more than max_output bytes
    seconds: float
    error: str = ""

    @property
    def ok(self):
        """The program ran to completion by itself and exited 0."""
        return self.started and self.returncode == 0 and not self.timed_out and not self.truncated


class Sandbox:
    def __init__(self, timeout=5.0, memory_mb=1024, file_size_mb=16, max_processes=64, max_open_files=64,
                 max_output=1 << 20, max_parallel=None, user=65534, namespaces=True, python=None):
        self.timeout, self.max_output = timeout, max_output
        self.max_parallel = max_parallel or len(os.sched_getaffinity(0))
        self.limits = {
            "RLIMIT_AS": memory_mb << 20,
            "RLIMIT_FSIZE": file_size_mb << 20,
            # Counted per user, not per execution. As root every program runs as `user`, so the
            # concurrent ones share one budget: each needs one process, a fork bomb may take the rest.
            "RLIMIT_NPROC": max_processes + (self.max_parallel if os.geteuid() == 0 else 0),
            "RLIMIT_NOFILE": max_open_files,
            "RLIMIT_CORE": 0,
        }
        self.user = user if os.geteuid() == 0 else None   # only root can (and needs to) change user
        self.namespaces = namespaces
        self._python = python
        self._slots = threading.BoundedSemaphore(self.max_parallel)
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------

    def run(self, code, stdin="", timeout=None):
        """Run `code` as a Python program with `stdin` as its input. Never raises for anything the
        program does; returns a Result. Blocks while max_parallel executions are already running."""
        python = self.python()
        with self._slots:
            return self._run(python, code, stdin, self.timeout if timeout is None else timeout)

    def map(self, jobs, timeout=None):
        """Run many (code, stdin) jobs, max_parallel at a time; results in order."""
        with ThreadPoolExecutor(self.max_parallel) as pool:
            return list(pool.map(lambda job: self.run(*job, timeout=timeout), jobs))

    def python(self):
        """The interpreter for the programs: the trainer's own, or, when the sandbox user cannot run it
        (a Python installed under /root while the program runs as nobody), the system's python3."""
        with self._lock:
            if self._python is None:
                candidates = [sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")]
                for exe in filter(None, candidates):
                    r = self._run(exe, "print(1)", "", 10.0)
                    if r.ok and r.stdout == "1\n":
                        self._python = exe
                        break
                else:
                    raise RuntimeError(f"sandbox: no Python interpreter runs in the sandbox ({r.error or r.stderr})")
            return self._python

    # -------------------------------------------------------------------------

    def _run(self, python, code, stdin, timeout):
        t0 = time.monotonic()
        workdir = tempfile.mkdtemp(prefix="sandbox-")
        status_r, status_w = os.pipe()
        proc = None
        try:
            main = os.path.join(workdir, "main.py")
            with open(main, "w", encoding="utf-8") as f:   # Python's source encoding, whatever the locale
                f.write(code)
            with open(os.path.join(workdir, "stdin"), "w", encoding="utf-8") as f:   # a file: never blocks us
                f.write(stdin)
            if self.user is not None:   # the program runs as `user`: give it its directory
                for p in (workdir, main):
                    os.chown(p, self.user, self.user)
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
            limits = {**self.limits, "RLIMIT_CPU": math.ceil(timeout) + 1}   # CPU seconds: a backstop
            cfg = {"status_fd": status_w, "namespaces": self.namespaces, "limits": limits, "user": self.user,
                   "argv": [python, "-I", "-S", "main.py"], "env": env}
            with open(os.path.join(workdir, "stdin"), "rb") as fin:
                proc = subprocess.Popen([python, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)], cwd=workdir,
                                        env=env, stdin=fin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        pass_fds=(status_w,), start_new_session=True)
            os.close(status_w)
            status_w = None
            out, err, timed_out, truncated = self._collect(proc, t0 + timeout)
            _kill_group(proc)
            proc.wait()
            status = _read_all(status_r)
            started = status == b"ok"
            return Result(started, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                          timed_out, truncated, time.monotonic() - t0,
                          "" if started else (status.decode(errors="replace") or "launcher did not start"))
        except OSError as e:   # no fork, no disk, ...: the sandbox failed, not the program
            return Result(False, -1, "", "", False, False, time.monotonic() - t0, f"{type(e).__name__}: {e}")
        finally:
            if proc is not None:
                _kill_group(proc)   # whatever is left of the group, then reap the launcher
                proc.wait()
                proc.stdout.close()
                proc.stderr.close()
            for fd in (status_r, status_w):
                if fd is not None:
                    os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)

    def _collect(self, proc, deadline):
        """Read stdout/stderr in chunks until both close, the deadline passes or one exceeds max_output.
        Returns (stdout bytes, stderr bytes, timed_out, truncated)."""
        bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
        sel = selectors.DefaultSelector()
        for f in bufs:
            sel.register(f, selectors.EVENT_READ)
        truncated = False
        try:
            while sel.get_map() and not truncated and time.monotonic() < deadline:
                for key, _ in sel.select(max(0.0, min(deadline - time.monotonic(), 0.1))):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    buf = bufs[key.fileobj]
                    buf += chunk
                    if len(buf) > self.max_output:
                        del buf[self.max_output:]
                        truncated = True
                if _exited(proc):
                    # The program is done. Anything still holding the pipes is a leftover child: kill the
                    # group now (the PID namespace already did, if we have one) and read to EOF.
                    _kill_group(proc)
            # Pipes closed (a program may close its stdout and keep working): wait for it, up to the deadline.
            while not truncated and not _exited(proc) and time.monotonic() < deadline:
                time.sleep(0.01)
            timed_out = not truncated and not _exited(proc)
        finally:
            sel.close()
        return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), timed_out, truncated


def _exited(proc):
    """Has the launcher exited? Checked without reaping it (WNOWAIT): while it is an unreaped zombie its
    pid cannot be reused, so killpg(pid) can only ever reach our own group."""
    return proc.returncode is not None or \
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(proc):
    """SIGKILL the program's whole process group (the launcher's pid is the group id). Killing the
    launcher also kills the program (PR_SET_PDEATHSIG) and, with it, its PID namespace. Only before the
    launcher is reaped (see _exited)."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _read_all(fd):
    """The launcher's status message: it has exited, so the pipe's write ends are closed (the program's
    copy was closed at exec)."""
    os.set_blocking(fd, False)
    out = b""
    try:
        while chunk := os.read(fd, 4096):
            out += chunk
    except BlockingIOError:   # a write end still open somewhere (it should not be): take what is there
        pass
    return out


def probe(box=None):
    """What this machine's sandbox actually gives, measured by running a program in it."""
    box = box or Sandbox(timeout=5.0)
    r = box.run("import json, os, socket\n"
                "print(json.dumps([[n for _, n in socket.if_nameindex()], os.getpid(), os.getuid()]))")
    if not r.ok:
        return {"error": r.error or r.stderr}
    interfaces, pid, uid = json.loads(r.stdout)
    return {"network_isolated": not [n for n in interfaces if n != "lo"], "pid_namespace": pid == 1, "uid": uid,
            "python": box.python()}


@functools.lru_cache(maxsize=1)
def default_sandbox():
    """The shared sandbox rewards.code_reward uses (one semaphore for the whole process)."""
    return Sandbox()
