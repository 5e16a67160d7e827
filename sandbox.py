"""Run untrusted Python (model-written code) for a reward function, without letting it harm the trainer
or the other runs.

    from sandbox import Sandbox
    box = Sandbox(timeout=2.0)
    r = box.run("print(sum(map(int, input().split())))", stdin="2 3\\n")
    r.ok, r.stdout            # True, "5\\n"
    box.map([(code, stdin), ...])   # many at once, at most box.max_parallel at a time

A policy trained with a code-execution reward (ReTool, CodeV-R1, DeepSeek-R1's code tasks) writes programs
that loop forever, allocate everything, fork, print gigabytes or, sooner or later, probe their
surroundings, including the other samples of its own group that run at the same time (one sample that
spoils its siblings' rewards changes the group's advantages). Each execution ("run") gets, and why:

 1. Its own process, session and process group (start_new_session=True), so one killpg(SIGKILL)
    reaches the program and everything it started in that group.
 2. A wall-clock timeout. Past it the whole group is killed with SIGKILL (not SIGTERM, which the program
    could catch). The caller's thread waits at most `timeout` plus the time the kernel takes to reap.
 3. Limits for the run as a whole, in a cgroup of its own (see "Limits" below): memory (`memory_mb`,
    all its processes and its files together) and number of processes (`max_processes`). Per process
    (setrlimit, inherited by every child): CPU seconds, address space (a memory bomb gets MemoryError,
    not the machine's RAM), file size (a write past it fails with EFBIG), open files, no core dumps.
 4. Linux namespaces where the kernel lets us create them (as root, or through an unprivileged user
    namespace): a network namespace with no interfaces at all (no network, not even loopback, nor
    abstract Unix sockets); an IPC namespace (no System V shared memory or queues shared with anyone,
    none left behind); a PID namespace whose process 1 is the program: when it exits or is killed, the
    kernel kills every process left in the namespace, including ones that left the process group with
    setsid() or double-forked; and a mount namespace with a file system of its own:
      /            a tmpfs of `disk_mb` (its pages count as the run's memory too), holding
      /work        the working directory (main.py only), HOME; /tmp, /var/tmp, /dev/shm: writable,
                   all in that one tmpfs, so `disk_mb` bounds everything the run writes
      /usr /bin /lib /lib64 /sbin, the interpreter's installation: read-only bind mounts, nosuid
      /proc        a fresh one: the run's own processes only (none at all where the kernel refuses it)
      /dev         null, zero, full, random, urandom
    Nothing else of the machine exists there: not the trainer's files, nor other runs' directories, nor a
    Unix socket anywhere on the host (the network namespace does not cover sockets on the file system),
    nor the host's /proc. The whole tree vanishes with the namespace: nothing is left behind.
 5. When the trainer runs as root: the program runs as an unprivileged uid of its own, uid_base + the
    slot it runs in (uid 60000.. as in IOI's isolate), so two concurrent runs never share a uid: file
    permissions separate them even without a mount namespace, and RLIMIT_NPROC (the fallback process
    limit) is per run. no_new_privs: no setuid program can give a privilege back.
 6. A minimal environment (PATH, LANG, HOME, TMPDIR): nothing of the trainer's environment (API keys,
    tokens, cluster credentials) is inherited.
 7. `python -I -S`: isolated mode ignores PYTHON* variables and the user site directory, -S skips
    site-packages, so the program sees the standard library only (no torch, no trainer modules). -I also
    ignores PYTHONHASHSEED: set and dict-of-str orders vary between runs, as in any plain `python` run.
 8. stdout and stderr read in chunks and capped at `max_output` bytes each; past the cap the program is
    killed, so printing gigabytes costs the trainer at most the cap in memory.
 9. At most `max_parallel` runs at a time, however many threads call run(). The default is sized to the
    machine: 4 per CPU core (a program that sleeps or blocks until the timeout costs no CPU, so a batch
    of them must not be served two at a time), at most as many as half the RAM holds at memory_mb +
    disk_mb each. The price: when more runs than cores are busy computing, each gets a share of a core,
    so a CPU-bound program's wall time can stretch up to 4x: give `timeout` that margin, or set
    max_parallel to the number of cores when timing must not depend on what runs beside it.

Limits, by mechanism (probe() says which this machine gives):
- cgroup v2, when the trainer's own cgroup has the memory and pids controllers enabled for its children
  (its cgroup.subtree_control, i.e. delegated to us): one child cgroup per run with memory.max,
  memory.swap.max = 0 and pids.max. cgroup v1 (root, memory and pids hierarchies mounted): one child of
  the trainer's cgroup in each, memory.limit_in_bytes (+ memsw) and pids.max. Past the memory limit the
  kernel's OOM killer ends a process of that run only; past pids.max fork() fails with EAGAIN.
- Without a usable cgroup: RLIMIT_NPROC = max_processes. As root it counts the run's own uid, so it is
  per run; as a non-root user it counts every process of that user (the trainer's too): a loose bound.
  Memory is then bounded per process only: a run may hold up to memory_mb x max_processes.
- Without a mount namespace (no CAP_SYS_ADMIN and no user namespaces, e.g. a default Docker container):
  the program runs in a fresh host directory (mode 0700, owned by its uid as root, removed afterwards),
  sees the machine's file system (every world-readable file, the host /proc, Unix sockets it may write
  to), can write to world-writable places (/tmp, /dev/shm: left there after the run, readable by later
  runs if it makes them so), and its disk use is bounded per file only (file_size_mb).
- Without namespaces at all: also no network isolation, and a process that calls setsid() escapes the
  group kill (RLIMIT_CPU still ends it once it has used its CPU seconds; a sleeping one lives on).
- As a non-root user the program has the trainer's uid (inside a user namespace): runs are separated by
  their namespaces only, and without a mount namespace the program can write wherever the trainer can.

What is NOT guaranteed (this is process isolation, not a VM or gVisor): kernel exploits; timing side
channels; CPU, memory-bandwidth and cache contention with the trainer and the other runs (a run's speed,
so a timeout near the limit, depends on what runs beside it); reading the read-only system directories
above. Several trainer processes on one machine (torchrun) share the uids uid_base..: give each its own
uid_base if they run without cgroups and namespaces. The integrity of the reward is the test's business:
see rewards.code_reward for which test forms a program can forge.
"""
import functools
import json
import math
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

# The launcher: a tiny Python program that runs first in the new session, joins the run's cgroup, sets up
# the namespaces and limits, then forks and execs the program. It runs as a separate interpreter (not a
# preexec_fn) because preexec_fn runs Python in a forked copy of a multi-threaded trainer, which can
# deadlock on a lock that another thread held at fork time. It reports "ok" on a status pipe right before
# exec (the pipe is close-on-exec, so the program never sees it): anything else means the sandbox failed,
# not the program, and a program cannot fake that by choosing its exit code (the launcher's own failures
# exit 125, as `env` and `timeout` do, but the status pipe, not the code, is what counts).
_LAUNCHER = r"""
import ctypes, json, os, platform, resource, signal, sys
cfg = json.loads(sys.argv[1])
status = cfg["status_fd"]
os.set_inheritable(status, False)
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 0x1000, 0x4000, 0x40000
KEEP = NOEXEC | 0x400 | 0x800 | 0x1000   # noexec, noatime, nodiratime, relatime: a user namespace may not drop them
MNT_DETACH = 2
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine())   # syscall numbers; elsewhere chroot

def check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")

def mount(src, dst, fstype=None, flags=0, data=None):
    b = lambda s: None if s is None else s.encode()
    check(libc.mount(b(src), b(dst), b(fstype), ctypes.c_ulong(flags), b(data)), f"mount {dst}")

def private_root(top, code, uid):
    # The program's own file system (sandbox.py, point 4), built in `top`, the host work dir, which a tmpfs
    # covers in this mount namespace only. False (and the host's view, undone) where the kernel refuses.
    try:
        check(libc.unshare(NEWNS), "unshare(CLONE_NEWNS)")
        mount(None, "/", None, REC | PRIVATE)     # nothing mounted here propagates to the host
        mount("sandbox", top, "tmpfs", NOSUID | NODEV, f"size={cfg['disk_mb']}m,nr_inodes=16384,mode=755")
    except OSError:
        return False
    try:
        for path in cfg["read_only"]:
            dst = top + path
            os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
            if os.path.islink(path):          # /bin -> usr/bin on merged-/usr systems
                os.symlink(os.readlink(path), dst)
            elif os.path.isdir(path):
                os.mkdir(dst)
                mount(path, dst, None, BIND | REC)
                mount(None, dst, None, BIND | REMOUNT | RDONLY | NOSUID | NODEV | (os.statvfs(path).f_flag & KEEP))
        for d in ("dev/shm", "tmp", "var/tmp", "work", "proc"):
            os.makedirs(f"{top}/{d}", mode=0o755)
        for name in ("null", "zero", "full", "random", "urandom"):
            open(f"{top}/dev/{name}", "w").close()
            mount(f"/dev/{name}", f"{top}/dev/{name}", None, BIND)
        for i, name in enumerate(("stdin", "stdout", "stderr")):
            os.symlink(f"/proc/self/fd/{i}", f"{top}/dev/{name}")
        os.symlink("/proc/self/fd", f"{top}/dev/fd")
        try:   # this PID namespace's processes only; where refused (some containers), no /proc at all
            mount("proc", f"{top}/proc", "proc", NOSUID | NODEV | NOEXEC)
        except OSError:
            pass
        with open(f"{top}/work/main.py", "wb") as f:
            f.write(code)
        for d, mode in (("tmp", 0o1777), ("var/tmp", 0o1777), ("dev/shm", 0o1777), ("work", 0o700)):
            os.chmod(f"{top}/{d}", mode)
            if uid is not None:
                os.chown(f"{top}/{d}", uid, uid)
        os.chdir(top)
        if PIVOT_ROOT:   # the old root is unmounted: not reachable even by a process that could chroot
            check(libc.syscall(PIVOT_ROOT, b".", b"."), "pivot_root")
            check(libc.umount2(b".", MNT_DETACH), "umount the old root")
        else:
            os.chroot(".")
        os.chdir("/work")
        return True
    except OSError:
        os.chdir("/")
        libc.umount2(top.encode(), MNT_DETACH)   # back to the host's view of the work dir
        return False

try:
    for procs in cfg["cgroups"]:   # before forking: every process of the run is in the run's cgroup
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    ns = NEWPID | NEWNET | NEWIPC
    if cfg["namespaces"] and libc.unshare(ns) != 0 and cfg["uid"] is None:   # root: CAP_SYS_ADMIN
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(NEWUSER | ns) == 0:            # unprivileged: a user namespace first
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
        env = cfg["env"]
        os.chdir(cfg["workdir"])
        with open("main.py", "rb") as f:
            code = f.read()
        os.umask(0o022)   # the directories built for the program must be readable by its uid
        if cfg["namespaces"] and private_root(cfg["workdir"], code, cfg["uid"]):
            env = {**env, "HOME": "/work", "TMPDIR": "/tmp"}
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        libc.prctl(38, 1, 0, 0, 0)      # PR_SET_NO_NEW_PRIVS: setuid programs cannot raise privileges
        libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG (after setuid, which clears it): die with the launcher
        os.write(status, b"ok")
        os.execve(cfg["argv"][0], cfg["argv"], env)
    except BaseException as e:
        os.write(status, f" exec: {type(e).__name__}: {e}".encode())
    os._exit(125)
os.close(status)
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
os._exit(code if code >= 0 else 128 - code)   # killed by signal s -> 128 + s, as shells report it
"""

# Read-only in the program's file system: what an interpreter and its shared libraries need (plus the
# interpreter's own installation, added per run). Not /etc, /home, /root, /run, /var, /sys, /work, ...
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


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
    def __init__(self, timeout=5.0, memory_mb=1024, disk_mb=64, file_size_mb=16, max_processes=16,
                 max_open_files=64, max_output=1 << 20, max_parallel=None, uid_base=60000, namespaces=True,
                 cgroups=True, python=None):
        sizes = {"memory_mb": memory_mb, "disk_mb": disk_mb, "file_size_mb": file_size_mb, "max_processes":
                 max_processes, "max_open_files": max_open_files, "max_output": max_output, "max_parallel": max_parallel}
        for name, v in sizes.items():   # integers: they become rlimits, cgroup files and a tmpfs size
            if not (type(v) is int and v > 0 or name == "max_parallel" and v is None):
                raise ValueError(f"Sandbox: {name} must be a positive integer, got {v!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"Sandbox: timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout, self.max_output = timeout, max_output
        self.memory_mb, self.disk_mb, self.max_processes = memory_mb, disk_mb, max_processes
        self.max_parallel = max_parallel or default_parallelism(memory_mb + disk_mb)
        self.cgroup = _cgroup_parents() if cgroups else None   # {controller: dir} or None
        self.limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": file_size_mb << 20,
                       "RLIMIT_NOFILE": max_open_files, "RLIMIT_CORE": 0}
        if not (self.cgroup and "pids" in self.cgroup):   # the fallback process limit (see "Limits")
            self.limits["RLIMIT_NPROC"] = max_processes
        self.uid_base = uid_base if os.geteuid() == 0 else None   # only root can (and needs to) change uid
        self.namespaces = namespaces
        self._python = python and os.path.realpath(python)   # venv links resolved: the real installation
        self._slots = queue.SimpleQueue()   # slot k runs as uid uid_base + k: never two runs at once
        for k in range(self.max_parallel):
            self._slots.put(k)
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------

    def run(self, code, stdin="", timeout=None):
        """Run `code` as a Python program with `stdin` as its input. Never raises for anything the
        program does; returns a Result. Blocks while max_parallel executions are already running."""
        python = self.python()
        with self._slot() as uid:
            return self._run(python, code, stdin, self.timeout if timeout is None else timeout, uid)

    def map(self, jobs, timeout=None):
        """Run many (code, stdin) jobs, max_parallel at a time; results in order."""
        with ThreadPoolExecutor(self.max_parallel) as pool:
            return list(pool.map(lambda job: self.run(*job, timeout=timeout), jobs))

    def python(self):
        """The interpreter for the programs: the trainer's own, or, when the sandbox user cannot run it
        (a Python installed under /root while the program runs as another uid and without a file
        system of its own), the system's python3. Its real path (venv links resolved): the program's
        file system holds the installation, not the venv."""
        with self._lock:
            if self._python is None:
                candidates = [sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")]
                for exe in filter(None, candidates):
                    exe = os.path.realpath(exe)
                    with self._slot() as uid:
                        r = self._run(exe, "print(1)", "", 10.0, uid)
                    if r.ok and r.stdout == "1\n":
                        self._python = exe
                        break
                else:
                    raise RuntimeError(f"sandbox: no Python interpreter runs in the sandbox ({r.error or r.stderr})")
            return self._python

    @contextmanager
    def _slot(self):
        k = self._slots.get()
        try:
            yield None if self.uid_base is None else self.uid_base + k
        finally:
            self._slots.put(k)

    # -------------------------------------------------------------------------

    def _run(self, python, code, stdin, timeout, uid):
        t0 = time.monotonic()
        workdir = tempfile.mkdtemp(prefix="sandbox-")   # mode 0700: no other uid gets in
        status_r, status_w = os.pipe()
        proc, cgroups = None, []
        try:
            with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:   # Python's source encoding
                f.write(code)
            if uid is not None:   # without a file system of its own the program runs here, as `uid`
                for p in (workdir, os.path.join(workdir, "main.py")):
                    os.chown(p, uid, uid)
            cgroups = self._make_cgroups()
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
            limits = {**self.limits, "RLIMIT_CPU": math.ceil(timeout) + 1}   # CPU seconds: a backstop
            prefix = os.path.dirname(os.path.dirname(python))   # the interpreter's installation: .../bin/python
            cfg = {"status_fd": status_w, "namespaces": self.namespaces, "limits": limits, "uid": uid,
                   "argv": [python, "-I", "-S", "main.py"], "env": env, "workdir": workdir,
                   "disk_mb": self.disk_mb, "cgroups": [os.path.join(d, "cgroup.procs") for d in cgroups],
                   "read_only": [*SYSTEM_DIRS, *([prefix] if not prefix.startswith(SYSTEM_DIRS) else [])]}
            with tempfile.TemporaryFile() as fin:   # stdin from an unnamed file: never blocks us, never seen
                fin.write(stdin.encode("utf-8"))
                fin.seek(0)
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
        except OSError as e:   # no fork, no disk, no cgroup: the sandbox failed, not the program
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
            _remove_cgroups(cgroups)
            shutil.rmtree(workdir, ignore_errors=True)

    def _make_cgroups(self):
        """One cgroup per run (per hierarchy: one for v2, one each for memory and pids in v1) with the
        run's limits; the launcher joins them. Returns their directories."""
        made = []
        try:
            for parent in sorted(set((self.cgroup or {}).values())):   # v2: one directory for both
                d = os.path.join(parent, f"sandbox-{uuid.uuid4().hex}")
                os.mkdir(d)
                made.append(d)
                for name, value in _cgroup_limits(d, self.memory_mb << 20, self.max_processes + 1):  # +1: launcher
                    with open(os.path.join(d, name), "w") as f:
                        f.write(str(value))
            return made
        except OSError:
            _remove_cgroups(made)
            raise

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


def default_parallelism(run_mb):
    """Runs at a time: 4 per core, at most what half the RAM holds at run_mb each (sandbox.py, point 9)."""
    ram_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    return max(1, min(4 * len(os.sched_getaffinity(0)), ram_mb // 2 // run_mb))


def _cgroup_limits(d, memory, processes):
    """(file, value) pairs for a run's cgroup directory d: the v2 and v1 names, whichever d has. The swap
    limits (only where swap accounting is on) keep the run from spilling into swap."""
    names = [("memory.max", memory), ("memory.swap.max", 0),                               # v2
             ("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memory),  # v1, in this order
             ("pids.max", processes)]                                                      # both
    return [(n, v) for n, v in names if os.path.exists(os.path.join(d, n))]


@functools.lru_cache(maxsize=None)
def _cgroup_parents():
    """Where this process may create per-run cgroups with memory and pids limits: {controller: directory}
    (one directory for both in v2), only controllers where creating a child was tried and works; None if
    there is none. v2: the trainer's own cgroup, if its cgroup.subtree_control enables memory and pids
    (delegated to us). v1: the trainer's own cgroup in the memory and pids hierarchies."""
    try:
        own = {}                  # controller ("" for v2) -> this process's cgroup path
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    own[c] = path
        found = {}
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, right = line.split(" - ", 1)
                root, mnt = left.split()[3:5]
                fstype, _, options = right.split()[:3]
                if fstype == "cgroup2" and "" in own:
                    d = os.path.normpath(os.path.join(mnt, os.path.relpath(own[""], root)))
                    with open(os.path.join(d, "cgroup.subtree_control")) as sc:
                        if {"memory", "pids"} <= set(sc.read().split()):
                            found = {"memory": d, "pids": d}
                            break
                elif fstype == "cgroup":
                    for c in {"memory", "pids"} & set(options.split(",")) & set(own):
                        found[c] = os.path.normpath(os.path.join(mnt, os.path.relpath(own[c], root)))
    except (OSError, ValueError):
        return None
    usable = {}
    for c, d in found.items():   # try it: a read-only cgroupfs (Docker) or no permission rules it out
        try:
            probe_dir = os.path.join(d, f"sandbox-probe-{uuid.uuid4().hex}")
            os.mkdir(probe_dir)
            os.rmdir(probe_dir)
            usable[c] = d
        except OSError:
            pass
    return usable or None


def _remove_cgroups(dirs):
    """rmdir each run cgroup. Its processes are dead by now (PID namespace, group kill), but the kernel
    may take a moment to release them: retry for up to a second, then leave it (empty, harmless)."""
    for d in dirs:
        for _ in range(100):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)


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
    """What this machine's sandbox actually gives, measured by running a program in it (limits: what
    the sandbox found and tested at construction)."""
    box = box or Sandbox(timeout=5.0)
    fd, host_file = tempfile.mkstemp(prefix="sandbox-probe-")   # is the host's /tmp visible?
    os.close(fd)
    try:
        r = box.run("import json, os, socket\n"
                    "procs = [p for p in os.listdir('/proc') if p.isdigit()] if os.path.isdir('/proc') else []\n"
                    f"print(json.dumps([[n for _, n in socket.if_nameindex()], os.getpid(), os.getuid(), "
                    f"os.path.exists({host_file!r}), procs]))")
    finally:
        os.remove(host_file)
    if not r.ok:
        return {"error": r.error or r.stderr}
    interfaces, pid, uid, host_visible, procs = json.loads(r.stdout)
    return {"network_isolated": not [n for n in interfaces if n != "lo"], "pid_namespace": pid == 1, "uid": uid,
            "private_filesystem": not host_visible, "private_proc": procs in ([], ["1"]),
            "cgroup": sorted(box.cgroup or ()), "python": box.python()}


@functools.lru_cache(maxsize=1)
def default_sandbox():
    """The shared sandbox rewards.code_reward uses (one set of slots for the whole process)."""
    return Sandbox()
