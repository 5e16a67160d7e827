"""sandbox.py and rewards.code_reward: hostile programs are contained, cleaned up and never hang the caller;
solutions are scored right. Short timeouts (1-2 s) keep the file fast; every run has a wall-clock bound."""
import json
import os
import socket
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
        assert isolation["uid"] == 65534                       # dropped to nobody
        assert isolation["network_isolated"] and isolation["pid_namespace"]
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
    root the program runs as nobody with RLIMIT_NPROC = 16 + max_parallel (2) for all of nobody's
    processes, so at most 18 exist; the bomb is bounded anyway (2**6 = 64) in case no limit holds. At
    the timeout all are gone, and the machine is fine: the next run works."""
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
        assert n <= 16 + 2
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
    as nobody) it cannot read the trainer's /proc/PID/environ either."""
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
        assert seen["theirs"] == "PermissionError" and secret not in r.stdout


def test_working_directory_is_fresh_and_removed(box):
    r1 = box.run("import os; print(os.getcwd()); print(sorted(os.listdir('.')))")
    r2 = box.run("import os; print(os.getcwd())")
    cwd1, listing = r1.stdout.splitlines()
    assert listing == "['main.py', 'stdin']"                  # only what we put there
    assert cwd1 != r2.stdout.strip()
    assert not os.path.exists(cwd1) and not os.path.exists(r2.stdout.strip())


@pytest.mark.skipif(os.geteuid() != 0, reason="as a non-root user the program writes wherever that user can")
def test_writing_outside_the_work_dir_is_denied_as_root(box, tmp_path):
    """As root the program runs as nobody: the trainer's directories (root-owned, not world-writable)
    refuse it. World-writable places (/tmp) are not refused: there the file-size limit (1 MiB) holds."""
    os.chmod(tmp_path, 0o755)
    target = tmp_path / "escaped.txt"
    marker = f"/tmp/sandbox-test-{uuid.uuid4().hex}"
    code = ("import errno\n"
            "try:\n"
            f"    open({str(target)!r}, 'w').write('x')\n"
            "    print('wrote')\n"
            "except PermissionError:\n"
            "    print('denied')\n"
            "try:\n"
            f"    open({marker!r}, 'w').write('x' * (2 << 20))\n"
            "except OSError as e:\n"
            "    print(errno.errorcode[e.errno])\n")
    try:
        r = box.run(code)
        assert r.stdout.split() == ["denied", "EFBIG"], r.stderr
        assert not target.exists()
        assert os.path.getsize(marker) == 1 << 20
    finally:
        if os.path.exists(marker):
            os.remove(marker)


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


def test_a_program_cannot_fake_a_sandbox_failure(box):
    """Exit code 125 is the launcher's 'could not start'; a program exiting 125 is still a program that
    ran (started = True), so it cannot turn its failure into an abstention."""
    r = box.run("import os; os._exit(125)")
    assert r.started and r.returncode == 125 and not r.ok


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
