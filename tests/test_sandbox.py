"""sandbox.py and rewards.code_reward: hostile programs are contained, cleaned up and never hang the caller;
solutions are scored right. Short timeouts (1-2 s) keep the file fast; every run has a wall-clock bound."""
import glob
import json
import math
import os
import socket
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

import sandbox
from rewards import code_reward, extract_code
from sandbox import Sandbox

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox is POSIX-only")

SLACK = 3.0   # seconds of scheduling slack on a loaded 2-core machine, on top of a timeout


@pytest.fixture(scope="module")
def box():
    return Sandbox(timeout=2.0, memory_mb=256, file_size_mb=1, max_processes=16, max_output=1 << 20, max_parallel=2)


@pytest.fixture(scope="module")
def isolation(box):
    return sandbox.probe(box)


def processes_with(marker):
    """Host pids whose command line contains `marker` (zombies have an empty one and do not count)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def need(isolation, key):
    """Skip where the probe says this machine lacks `key`; run (and so fail) where it does not say."""
    if not isolation.get(key, True):
        pytest.skip(f"no {key} here (see sandbox.py, Limits / NOT guaranteed)")


def wait_until(cond, seconds):
    end = time.monotonic() + seconds
    while not cond() and time.monotonic() < end:
        time.sleep(0.05)
    return cond()


def sleeper(marker, ready_file=None):
    """Python source of a command that starts `python -c <sleep 30> marker`: findable in /proc by marker."""
    ready = f"open({ready_file!r}, 'w').close(); " if ready_file else ""
    return f"[sys.executable, '-c', {ready + 'import time; time.sleep(30)'!r}, {marker!r}]"


# -----------------------------------------------------------------------------
# What the machine gives

def test_probe_reports_the_isolation(isolation):
    """As root (these tests' usual case) we get every protection; elsewhere the probe says what is missing."""
    assert "error" not in isolation, isolation
    if os.geteuid() == 0:
        assert 60000 <= isolation["uid"] < 60000 + 2            # the uid of its slot (max_parallel = 2)
        assert isolation["network_isolated"] and isolation["pid_namespace"]
        assert isolation["private_filesystem"] and isolation["private_proc"]
    else:
        assert isolation["uid"] == os.getuid()


# -----------------------------------------------------------------------------
# Hostile programs

@pytest.mark.parametrize("code", ["while True: pass", "import time; time.sleep(100)"])
def test_infinite_loop_and_sleep_are_killed_at_the_timeout(box, code):
    r = box.run(code, timeout=1.0)
    assert r.started and r.timed_out and not r.ok
    assert 1.0 <= r.seconds < 1.0 + SLACK


def test_closing_stdout_does_not_end_the_wait(box):
    """A program that closes its stdout and stderr is waited for, not killed early; and still killed at
    the timeout if it never exits."""
    r = box.run("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(0.3)\nos._exit(3)")
    assert r.started and r.returncode == 3 and not r.timed_out and r.seconds >= 0.3
    r = box.run("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(100)", timeout=1.0)
    assert r.timed_out and 1.0 <= r.seconds < 1.0 + SLACK


def test_fork_bomb_is_capped_and_fully_killed(box):
    """Every process of a fork bomb sleeps (so none exits by itself) and announces itself on stdout. As
    root the run may have max_processes = 16 processes (its cgroup's pids.max, or RLIMIT_NPROC on its
    own uid); the bomb is bounded anyway (2**6 = 64) in case no limit holds. At the timeout all are
    gone, and the machine is fine: the next run works."""
    marker = f"forkbomb-{uuid.uuid4().hex}"
    code = ("import os, sys\n"
            "for _ in range(6):\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        break\n"
            "print('up', flush=True)\n"
            f"os.execv(sys.executable, {sleeper(marker)})\n")
    r = box.run(code, timeout=1.5)
    assert r.started and r.timed_out
    n = r.stdout.count("up")
    assert 1 <= n <= 64
    if os.geteuid() == 0:
        assert n <= 16
    assert r.seconds < 1.5 + SLACK
    assert wait_until(lambda: not processes_with(marker), 3.0), processes_with(marker)
    assert box.run("print(6 * 7)").stdout == "42\n"


def test_memory_bomb_gets_memory_error(box):
    """RLIMIT_AS = 256 MiB: allocating without end raises MemoryError inside the program, quickly."""
    r = box.run("x = []\nwhile True:\n    x.append(bytearray(32 << 20))\n")
    assert r.started and not r.timed_out
    assert r.returncode == 1 and "MemoryError" in r.stderr
    r = box.run("x = bytearray(8 << 30)")
    assert r.returncode == 1 and "MemoryError" in r.stderr


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_printing_gigabytes_is_cut_at_the_cap_fast(box, stream):
    """An endless print is killed as soon as it passes max_output (1 MiB): the caller holds at most the
    cap in memory and does not wait for the timeout."""
    r = box.run(f"import sys\nchunk = 'x' * (1 << 16)\nwhile True:\n    sys.{stream}.write(chunk)\n", timeout=10.0)
    out = getattr(r, stream)
    assert r.truncated and not r.timed_out and not r.ok
    assert len(out) == 1 << 20 and set(out) == {"x"}
    assert r.seconds < 10.0


def test_environment_secrets_are_not_inherited(box, monkeypatch):
    """A secret in the trainer's environment is not in the program's environment; as root (program runs
    as another uid) it cannot read the trainer's /proc/PID/environ either (not there at all where the
    run has its own /proc)."""
    secret = f"hunter2-{uuid.uuid4().hex}"
    monkeypatch.setenv("SANDBOX_TEST_SECRET", secret)
    code = ("import json, os\n"
            "try:\n"
            f"    theirs = open('/proc/{os.getpid()}/environ', 'rb').read().decode(errors='replace')\n"
            "except OSError as e:\n"
            "    theirs = type(e).__name__\n"
            "print(json.dumps({'env': dict(os.environ), 'theirs': theirs}))\n")
    r = box.run(code)
    assert r.ok, r.stderr
    seen = json.loads(r.stdout)
    assert set(seen["env"]) == {"PATH", "LANG", "HOME", "TMPDIR"}
    assert secret not in json.dumps(seen["env"])
    if os.geteuid() == 0:
        assert seen["theirs"] in ("PermissionError", "FileNotFoundError") and secret not in r.stdout


def test_working_directory_is_fresh_and_removed(box, monkeypatch, tmp_path):
    """Each run starts in a directory holding only main.py; what one run leaves there, the next does not
    see; and on the host nothing of either stays (the host work dirs are made under tmp_path here)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    r1 = box.run("import os; print(sorted(os.listdir('.'))); open('left.txt', 'w').write('x')")
    r2 = box.run("import os; print(sorted(os.listdir('.')))")
    assert r1.ok and r2.ok, (r1.stderr, r2.stderr)
    assert r1.stdout == r2.stdout == "['main.py']\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="as a non-root user the program writes wherever that user can")
def test_writing_outside_the_work_dir_is_denied_as_root(box, tmp_path):
    """As root the program runs as an unprivileged uid: the trainer's directories (root-owned, not
    world-writable; absent from its file system where it has one) refuse it. /tmp is writable, up to the
    file-size limit (1 MiB) per file."""
    os.chmod(tmp_path, 0o755)
    target = tmp_path / "escaped.txt"
    code = ("import errno, os\n"
            "try:\n"
            f"    open({str(target)!r}, 'w').write('x')\n"
            "    print('wrote')\n"
            "except (PermissionError, FileNotFoundError):\n"
            "    print('denied')\n"
            "try:\n"
            "    open('/tmp/big', 'w').write('x' * (2 << 20))\n"
            "except OSError as e:\n"
            "    print(errno.errorcode[e.errno], os.path.getsize('/tmp/big'))\n"
            "os.remove('/tmp/big')\n")
    r = box.run(code)
    assert r.stdout.split() == ["denied", "EFBIG", str(1 << 20)], r.stderr
    assert not target.exists()


def test_concurrent_runs_cannot_touch_each_other(box):
    """Two runs at once (max_parallel = 2). The victim writes a file in its work dir and in /tmp, waits,
    then reads both back. Meanwhile the attacker looks for the victim's files everywhere it might find
    them (host /tmp work dirs, through /proc/PID/cwd, in /tmp) and overwrites or deletes each one. The
    victim reads its own data, and the attacker found nothing. (Before: same uid, host /tmp and /proc
    shared: the attacker rewrote the victim's files.) The attacker only touches files named by this
    test's marker."""
    name = f"victim-{uuid.uuid4().hex}"
    victim = ("import os, time\n"
              f"open({name!r}, 'w').write('mine')\n"
              f"open('/tmp/' + {name!r}, 'w').write('mine')\n"
              "time.sleep(1.5)\n"
              f"print(open({name!r}).read(), open('/tmp/' + {name!r}).read())\n")
    attacker = ("import glob, os, shutil, time\n"
                "hits = set()\n"
                "end = time.time() + 1.2\n"
                "while time.time() < end:\n"
                f"    for p in glob.glob('/tmp/sandbox-*/{name}') + glob.glob('/proc/[0-9]*/cwd/{name}') + "
                f"glob.glob('/tmp/{name}'):\n"
                "        try:\n"
                "            open(p, 'w').write('pwned')\n"
                "            hits.add(p)\n"
                "            if p.startswith('/tmp/sandbox-'):\n"
                "                shutil.rmtree(os.path.dirname(p))\n"
                "        except OSError:\n"
                "            pass\n"
                "    time.sleep(0.01)\n"
                "print(len(hits))\n")
    v, a = box.map([(victim, ""), (attacker, "")], timeout=5.0)
    for p in glob.glob(f"/tmp/{name}"):   # the old sandbox left it on the host
        os.remove(p)
    assert v.ok and v.stdout == "mine mine\n", (v.stdout, v.stderr[-300:])
    assert a.ok and a.stdout == "0\n", (a.stdout, a.stderr[-300:])


def test_children_that_outlive_the_program_are_killed(box, isolation):
    """The program starts two sleepers that leave its process group (start_new_session, and a setsid
    double fork), waits until both run, then exits. While it runs we see them; once run() returns, both
    are gone (the PID namespace dies with its first process), and run() did not wait for the timeout."""
    if not isolation.get("pid_namespace"):
        pytest.skip("no PID namespace here: a setsid() child escapes (see sandbox.py, NOT guaranteed)")
    marker = f"outlive-{uuid.uuid4().hex}"
    code = ("import os, subprocess, sys, time\n"
            f"subprocess.Popen({sleeper(marker, 'ready1')}, start_new_session=True)\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            f"        os.execv(sys.executable, {sleeper(marker, 'ready2')})\n"
            "    os._exit(0)\n"
            "while not (os.path.exists('ready1') and os.path.exists('ready2')):\n"
            "    time.sleep(0.01)\n"
            "time.sleep(1.0)\n"
            "print('spawned')\n")
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(box.run, code, "", 5.0)
        assert wait_until(lambda: len(processes_with(marker)) == 2 or fut.done(), 5.0)
        seen_alive = len(processes_with(marker))
        r = fut.result()
    assert r.ok and r.stdout == "spawned\n" and r.seconds < 5.0, (r.error, r.stderr[-500:])
    assert seen_alive == 2
    assert wait_until(lambda: not processes_with(marker), 3.0), processes_with(marker)


def test_no_network_not_even_loopback(box, isolation):
    """A server listening on the trainer's 127.0.0.1 is unreachable from the program."""
    if not isolation.get("network_isolated"):
        pytest.skip("no network namespace here (see sandbox.py, NOT guaranteed)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    code = ("import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    print('connected')\n"
            "except OSError as e:\n"
            "    print('failed', type(e).__name__)\n")
    r = box.run(code)
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()
    assert r.ok and r.stdout.startswith("failed"), r.stdout


def test_no_unix_socket_of_the_host_and_no_host_proc(box, isolation):
    """A Unix socket on the host file system, writable by anyone (a network namespace does not cover
    those), and one in the abstract namespace: the program reaches neither. Its /proc lists its own
    processes only (before: every host pid, and their command lines)."""
    need(isolation, "private_filesystem")
    d = tempfile.mkdtemp()
    os.chmod(d, 0o755)
    path, abstract = os.path.join(d, "s.sock"), f"\0sandbox-test-{uuid.uuid4().hex}"
    servers = []
    for address in (path, abstract):
        server = socket.socket(socket.AF_UNIX)
        server.bind(address)
        server.listen(1)
        server.settimeout(0.2)
        servers.append(server)
    os.chmod(path, 0o777)
    code = ("import json, os, socket\n"
            "out = []\n"
            f"for address in ({path!r}, {abstract!r}):\n"
            "    try:\n"
            "        s = socket.socket(socket.AF_UNIX)\n"
            "        s.connect(address)\n"
            "        s.sendall(b'hello')\n"
            "        out.append('connected')\n"
            "    except OSError as e:\n"
            "        out.append(type(e).__name__)\n"
            "procs = [p for p in os.listdir('/proc') if p.isdigit()] if os.path.isdir('/proc') else []\n"
            "print(json.dumps([out, procs]))\n")
    try:
        r = box.run(code)
        for server in servers:
            with pytest.raises(socket.timeout):
                server.accept()
    finally:
        for server in servers:
            server.close()
        os.remove(path)
        os.rmdir(d)
    assert r.ok, r.stderr
    reached, procs = json.loads(r.stdout)
    assert "connected" not in reached, reached
    assert procs in ([], ["1"]), procs[:10]


def test_a_program_cannot_fake_a_sandbox_failure(box):
    """Exit code 125 is the launcher's 'could not start'; a program exiting 125 is still a program that
    ran (started = True), so it cannot turn its failure into an abstention."""
    r = box.run("import os; os._exit(125)")
    assert r.started and r.returncode == 125 and not r.ok


def test_memory_is_bounded_for_the_run_as_a_whole(box, isolation):
    """memory_mb = 256 for the run: four children that each hold 100 MB (each under the per-process
    RLIMIT_AS) cannot all hold it at once; the kernel kills inside this run only. Before: all four held
    their 400 MB (the limit was per process)."""
    if "memory" not in isolation.get("cgroup", ["memory"]):
        pytest.skip("no memory cgroup here: memory is bounded per process only (see sandbox.py, Limits)")
    code = ("import os, sys, time\n"
            "for _ in range(4):\n"
            "    if os.fork() == 0:\n"
            "        x = b'x' * (100 << 20)\n"
            "        print('held', flush=True)\n"
            "        time.sleep(1.0)\n"
            "        print('still', flush=True)\n"
            "        os._exit(0)\n"
            "for _ in range(4):\n"
            "    os.wait()\n")
    r = box.run(code, timeout=8.0)
    assert r.started and not r.timed_out, r.error
    assert r.stdout.count("still") <= 2, r.stdout


def test_a_fork_bomb_does_not_starve_a_concurrent_run(box):
    """While a fork bomb holds every process it may have, a run beside it starts and forks three
    children of its own: the process limit is the run's own (its cgroup, or its own uid). Before, as
    root, every run was nobody under one RLIMIT_NPROC for all: the neighbour's fork failed."""
    marker = f"starve-{uuid.uuid4().hex}"
    bomb = ("import os, sys\n"
            "for _ in range(6):\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        break\n"
            f"os.execv(sys.executable, {sleeper(marker)})\n")
    neighbour = ("import os\n"
                 "kids = []\n"
                 "for _ in range(3):\n"
                 "    pid = os.fork()\n"
                 "    if pid == 0:\n"
                 "        os._exit(0)\n"
                 "    kids.append(pid)\n"
                 "print(sum(os.waitpid(k, 0)[1] == 0 for k in kids))\n")
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(box.run, bomb, "", 3.0)
        assert wait_until(lambda: len(processes_with(marker)) >= 12 or fut.done(), 3.0)
        time.sleep(0.3)   # let it take the rest
        r = box.run(neighbour)
        fut.result()
    assert r.ok and r.stdout == "3\n", (r.error, r.stderr[-300:])
    assert wait_until(lambda: not processes_with(marker), 3.0), processes_with(marker)


def test_disk_is_bounded_for_the_run_and_nothing_is_left_behind(isolation):
    """disk_mb = 8 for the run: 1 MiB files (the per-file limit) written in turn to the work dir, /tmp,
    /var/tmp and /dev/shm stop at 8 MiB in all (ENOSPC). After the run none of them is on the host.
    Before: 40 MiB written, and left in /tmp, /var/tmp and /dev/shm."""
    need(isolation, "private_filesystem")
    marker = f"leftover-{uuid.uuid4().hex}"
    code = ("import errno\n"
            "n = 0\n"
            "for i in range(40):\n"
            "    try:\n"
            f"        open(['.', '/tmp', '/var/tmp', '/dev/shm'][i % 4] + '/{marker}-' + str(i), 'w')"
            ".write('x' * (1 << 20))\n"
            "        n += 1\n"
            "    except OSError as e:\n"
            "        print(errno.errorcode[e.errno])\n"
            "        break\n"
            "print(n)\n")
    try:
        r = Sandbox(timeout=5.0, disk_mb=8, file_size_mb=1, max_parallel=1).run(code)
        left = [p for d in ("/tmp", "/var/tmp", "/dev/shm") for p in glob.glob(f"{d}/{marker}-*")]
    finally:
        for d in ("/tmp", "/var/tmp", "/dev/shm"):
            for p in glob.glob(f"{d}/{marker}-*"):
                os.remove(p)
    assert r.ok, r.stderr
    error, n = r.stdout.split()
    assert error == "ENOSPC" and int(n) <= 8
    assert left == []


@pytest.mark.parametrize("bad", [{"disk_mb": 8.5}, {"memory_mb": 0}, {"max_parallel": 0}, {"timeout": -1}])
def test_bad_limits_are_refused_with_their_name(bad):
    """A fractional disk_mb would make the tmpfs refuse to mount: refused here, by name, instead."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        Sandbox(**bad)


def test_sandbox_failure_is_reported_not_raised():
    r = Sandbox(python="/nonexistent/python").run("print(1)")
    assert not r.started and "nonexistent" in r.error


def test_parallel_executions_are_bounded(box):
    """Six threads call run() at once with max_parallel = 2: each program records its start and end,
    and at no moment do more than two overlap (and two do, so the bound is what limits them)."""
    code = "import time\na = time.time()\ntime.sleep(0.4)\nprint(a, time.time())"
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: box.run(code, timeout=5.0), range(6)))
    spans = [tuple(map(float, r.stdout.split())) for r in results]
    overlap = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert overlap == 2


# -----------------------------------------------------------------------------
# code_reward

ADD_TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(10, 5) == 15", "assert add(0, 0) == 0"]


def fenced(code, lang="python"):
    return f"<think>easy</think>\n```{lang}\n{code}\n```"


def test_extract_code_takes_the_last_python_block():
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("```\nc = 3\n```") == "c = 3\n"
    assert extract_code("```cpp\nint x;\n```") is None
    assert extract_code("no code") is None


def test_code_reward_assert_tests_fractions(box):
    """Fraction of asserts passed, each hand-checked against add's four tests: a + b passes 4/4;
    abs(a) + b fails add(-1, 1) (2 != 0): 3/4; a * b passes only add(0, 0): 1/4; no code block: 0;
    sys.exit(0) before the tests and an endless loop: 0; no tests: None (abstain)."""
    completions = [fenced("def add(a, b):\n    return a + b"),
                   fenced("def add(a, b):\n    return abs(a) + b"),
                   fenced("def add(a, b):\n    return a * b"),
                   "def add(a, b): return a + b",
                   fenced("import sys\nsys.exit(0)"),
                   fenced("def add(a, b):\n    while True:\n        pass"),
                   fenced("def add(a, b):\n    return a + b")]
    tests = [ADD_TESTS] * 6 + [None]
    out = code_reward(["p"] * 7, completions, tests=tests, sandbox=Sandbox(timeout=1.0, max_parallel=2))
    assert out == [1.0, 0.75, 0.25, 0.0, 0.0, 0.0, None]


def test_code_reward_stdin_stdout_tests(box):
    """Output compared after stripping trailing whitespace per line and trailing blank lines."""
    tests = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4", "output": "6"}]
    completions = [fenced("a, b = map(int, input().split())\nprint(a + b, '  ')\nprint()"),
                   fenced("a, b = map(int, input().split())\nprint(a - b)"),        # 2-3=-1 no, 10+4=14 no
                   fenced("print(5)")]                                             # right once by luck
    assert code_reward(["p"] * 3, completions, tests=[tests] * 3, sandbox=box) == [1.0, 0.0, 0.5]


def test_code_reward_abstains_when_the_sandbox_fails():
    """No interpreter: the fraction is unknown, so None (not 0, which would punish the sample)."""
    broken = Sandbox(python="/nonexistent/python")
    out = code_reward(["p", "p"], [fenced("def add(a, b):\n    return a + b"), "no code"],
                      tests=[ADD_TESTS, ADD_TESTS], sandbox=broken)
    assert out == [None, 0.0]


def test_code_reward_names_a_malformed_test(box):
    with pytest.raises(ValueError, match=r"tests\[1\] of sample 0"):
        code_reward(["p"], [fenced("x = 1")], tests=[["assert x == 1", {"input": "1"}]], sandbox=box)


CALLS = [{"call": "add", "args": [2, 3], "expected": 5}, {"call": "add", "args": [10, 5], "expected": 15},
         {"call": "add", "kwargs": {"a": -4, "b": 1}, "expected": -3}]


def test_code_reward_call_tests(box):
    """Calls decided by the trainer, hand-checked against CALLS (5, 15, -3): a + b passes 3/3; a * b
    (6, 50, -4) 0/3; abs(a) + b (5, 15, 5) 2/3; float(a + b) (5.0 is not 5) 0/3; a program that hangs
    on the second call keeps the first: 1/3; a top-level `if __name__ == "__main__"` block does not run
    (the program is imported); calls mixed with an assert and a stdin/stdout test (each its own run)."""
    completions = [fenced("def add(a, b):\n    return a + b"),
                   fenced("def add(a, b):\n    return a * b"),
                   fenced("def add(a, b):\n    return abs(a) + b"),
                   fenced("def add(a, b):\n    return float(a + b)"),
                   fenced("def add(a, b):\n    while a == 10:\n        pass\n    return a + b"),
                   fenced("def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    add = None"),
                   fenced("def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(add(*map(int, input().split())))")]
    tests = [CALLS] * 6 + [CALLS + ["assert add(1, 1) == 2", {"input": "2 3", "output": "5"}]]
    out = code_reward(["p"] * 7, completions, tests=tests, sandbox=box)
    assert out == [1.0, 0.0, 2 / 3, 0.0, 1 / 3, 1.0, 0.8]


# Programs written to cheat, each against a call form and an assert form of the same three tests. The call
# form gives none of them anything; the assert form is fooled by each (as code_reward's docstring says).
ASSERTS = ["assert add(2, 3) == 5", "assert add(10, 5) == 15", "assert add(a=-4, b=1) == -3"]
FORGERS = {
    # Reads the marker without reading a file: the assert form's is a constant of the module's code; the
    # call harness's is a local of the caller's frame, where it prints every plausible answer to every
    # call (one line per call only: more count as none). Then exits before any test runs.
    "constants": ("import os, sys\n"
                  "caller = sys._getframe().f_back\n"
                  "if caller is not None and 'marker' in caller.f_locals:\n"
                  "    for k in range(3):\n"
                  "        for v in (5, 15, -3):\n"
                  "            print('\\n' + caller.f_locals['marker'], [k, 'value', v], flush=True)\n"
                  "else:\n"
                  "    consts = sys._getframe().f_code.co_consts\n"
                  "    print([c for c in consts if isinstance(c, str) and c.startswith('all tests ran')][0], flush=True)\n"
                  "os._exit(0)\n"),
    # A wrong add, and an excepthook that prints the marker (a constant of the failing frame's code)
    # and exits 0 when an assert fails.
    "excepthook": ("import os, sys\n"
                   "def add(a, b):\n"
                   "    return a + b + 1\n"
                   "def hook(kind, exc, tb):\n"
                   "    consts = tb.tb_frame.f_code.co_consts\n"
                   "    print([c for c in consts if isinstance(c, str) and c.startswith('all tests ran')][0], flush=True)\n"
                   "    os._exit(0)\n"
                   "sys.excepthook = hook\n"),
    # Returns an object equal to everything.
    "always equal": ("class Anything:\n"
                     "    def __eq__(self, other):\n"
                     "        return True\n"
                     "def add(a, b):\n"
                     "    return Anything()\n"),
}


@pytest.mark.parametrize("name", list(FORGERS))
def test_call_tests_resist_forgery_assert_tests_do_not(box, name):
    forger = fenced(FORGERS[name])
    out = code_reward(["p", "p"], [forger, forger], tests=[CALLS, ASSERTS], sandbox=box)
    assert out == [0.0, 1.0]


def test_code_reward_names_a_malformed_call_test(box):
    for bad in ({"call": "add", "args": [1]}, {"call": "1x", "expected": 1}, {"call": "f", "args": 5, "expected": 1},
                {"call": "f", "kwargs": {"a": 1}, "expected": 1, "extra": 0}, {"call": "f", "expected": {1, 2}}):
        with pytest.raises(ValueError, match=r"tests\[1\] of sample 0"):
            code_reward(["p"], [fenced("x = 1")], tests=[[CALLS[0], bad]], sandbox=box)


def test_a_batch_of_sleepers_does_not_serialise():
    """Programs that sleep past the timeout cost no CPU: the default max_parallel runs 4 per core, so
    8 x cores of them (timeout 1 s) take about two timeouts, not 4 x cores timeouts as with one run per
    core. The timeouts are counted in the reward's metrics."""
    cores = len(os.sched_getaffinity(0))
    box = Sandbox(timeout=1.0, memory_mb=64)   # max_parallel: the default for this machine
    n = 8 * cores
    t0 = time.monotonic()
    out = code_reward(["p"] * n, [fenced("import time\ntime.sleep(100)")] * n, tests=[CALLS] * n, sandbox=box)
    seconds = time.monotonic() - t0
    assert out == [0.0] * n
    assert out.metrics["timeouts"] == out.metrics["runs"] == n
    assert seconds < math.ceil(n / box.max_parallel) * 1.0 + SLACK < n / cores * 1.0, seconds
