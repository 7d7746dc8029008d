"""A sandbox for untrusted, model-written Python programs (the code reward's test runs).

GRPO on coding problems runs thousands of model-written programs a step; they are
hostile by default (an RL policy finds every hole that pays). Each run is a process tree

  trainer thread --Popen(new session)--> launcher (this file, `python -I -S`)
      unshare(mount, net, pid, ipc, uts [, user]) + fork --> harness (pid 1 of the new pid
      namespace: builds a minimal root, drops to an unprivileged uid, then for every
      test case) --fork--> the program, with per-test rlimits and a wall-clock kill

What is enforced, and how (`Sandbox.check()` runs a probe program and refuses a host
where any of the first four does not hold: no capabilities, no_new_privs, only a
loopback, the host's files unseen, own pid namespace, RLIMIT_NPROC binding):
  * no privileges: started as root, each worker slot runs as its own unused uid (root
    is exempt from RLIMIT_NPROC, so programs must not be root); started as a user, a
    user namespace maps that uid to itself. Either way every capability is dropped
    (and checked), no_new_privs is set (setuid binaries do nothing), and the harness
    is non-dumpable (programs of the same uid cannot ptrace it or read its memory);
  * no network: a new network namespace (only a loopback, down);
  * no view of the host: a new mount namespace whose root is a fresh tmpfs holding
    read-only binds of /usr, /lib*, the interpreter's prefix and a few /etc files,
    /dev/{null,zero,full,random,urandom}, a fresh /proc, and size-capped tmpfs at /tmp,
    /dev/shm and /sandbox (the working directory, gone with the namespace). The host
    root is detached (pivot_root); checkpoints, the run's workdir, the repository and
    $HOME are not there at all. The harness then chroots one level down, which makes
    the kernel refuse nested user namespaces (the way back to capabilities and to
    tmpfs mounts of any size);
  * processes: a new pid namespace (programs see neither the trainer nor the launcher;
    when the harness, its pid 1, exits, the kernel kills everything left), RLIMIT_NPROC
    per run, kill(-1) of every stray process after each test, a process-group kill on
    timeout, and SIGKILL of the whole tree when the launcher dies (PR_SET_PDEATHSIG);
  * resources: RLIMIT_CPU, RLIMIT_AS and RLIMIT_DATA, RLIMIT_FSIZE (which also caps the
    captured stdout, stderr and result: they are files with no path, memfds),
    RLIMIT_NOFILE, RLIMIT_CORE = 0; a wall clock per test (harness) and per run
    (trainer side, then a process-group kill); reads of the harness' report are capped;
  * environment: the launcher gets only PATH, LANG, LC_ALL, HOME, TMPDIR; `-I` keeps
    PYTHON* variables and the user site out; other processes' environments are not
    visible (pid namespace, and the harness is non-dumpable).

Not enforced: no seccomp filter (a program can make any system call its uid allows:
the kernel is the remaining attack surface); no cgroup, so memory is bounded per process
(worst case per run: max_processes x memory_mb, plus the tmpfs sizes); timing side
channels; and assert-style tests run inside the program's process, so a program can
forge their result (stdin/stdout and call tests are compared outside the sandbox, which
never sees expected outputs).

Modes: 'namespaces' needs root or unprivileged user namespaces. Without them the
Sandbox refuses to run (SandboxUnavailable) unless `allow_unsandboxed=True`, which gives
mode 'none': rlimits, a temporary directory, a scrubbed environment, process-group and
(as root, with a dedicated uid) kill(-1) clean-up, but the host filesystem, network and
processes are reachable. Programs get the interpreter's standard library only (`-S`).

This file runs in three roles: imported by the trainer (Sandbox), and as a script that
is the launcher and then the harness. The script side imports the standard library
only, and trainer-only modules are imported where used: every run pays this file's
start-up time.
"""

from __future__ import annotations

import builtins
import ctypes
import dataclasses
import errno
import itertools
import json
import math
import os
import resource
import select
import signal
import sys
import time
import traceback

MODES = ("namespaces", "none")
EXIT_NO_NAMESPACES = 3  # launcher exit codes, read by the trainer side
EXIT_SETUP_FAILED = 4
_STDERR_CAP = 16384     # bytes of launcher stderr kept (set-up errors only)
_ERR_TAIL = 1000        # characters of a program's stderr returned per test


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-run limits. CPU time per test is timeout_s rounded up."""
  timeout_s: float = 2.0         # wall clock per test case
  memory_mb: int = 512           # RLIMIT_AS and RLIMIT_DATA of every process
  max_processes: int = 8         # processes + threads of the program, itself included
  max_open_files: int = 64       # RLIMIT_NOFILE
  max_output_bytes: int = 65536  # per test: stdout, stderr, every file (RLIMIT_FSIZE)
  disk_mb: int = 32              # size of each tmpfs: /sandbox, /tmp, /dev/shm
  startup_s: float = 10.0        # per run: interpreter start and set-up
  stop_after_timeouts: int = 1   # then the run's remaining tests count as timeouts (0: never)

  def run_budget_s(self, n_tests: int) -> float:
    return self.startup_s + n_tests * (self.timeout_s + 0.5)


class SandboxUnavailable(RuntimeError):
  """The isolation this host can give is not what was asked for."""


# ==========================================================================================
# Trainer side
# ==========================================================================================


@dataclasses.dataclass
class TestRun:
  """What happened to one test case. status: ran (exited 0; compare outside), error
  (exception or non-zero exit), timeout (wall or CPU), memory, output_limit, crash
  (killed by a signal), sandbox_error (the run itself failed)."""
  status: str
  stdout: str = ""
  value: str | None = None  # call tests: JSON of the return value; asserts: "true"
  stderr: str = ""
  seconds: float = 0.0


@dataclasses.dataclass
class RunResult:
  tests: list[TestRun]
  status: str = "ok"        # ok | timeout | output_limit | sandbox_error (the whole run)
  detail: str = ""
  seconds: float = 0.0


_INSTANCES = itertools.count()  # each Sandbox of a process gets its own uid range


class Sandbox:
  """Runs programs against test cases, `n_workers` runs at a time.

  A test case (inputs only; expected values stay here, in the caller) is one of
    {"stdin": str}                     run the program as __main__ on that input
    {"call": name, "args": [...]}      import the program, return json(name(*args))
    {"assert": code}                   import the program, then exec the statement
  """

  def __init__(self, limits: Limits | None = None, n_workers: int | None = None,
               allow_unsandboxed: bool = False, python: str | None = None,
               uid_base: int | None = None):
    self.limits = limits or Limits()
    self.n_workers = max(1, min(64, n_workers or min(8, os.cpu_count() or 1)))
    self.allow_unsandboxed = allow_unsandboxed
    self.python = os.path.realpath(python or sys.executable)
    # Root mode runs slot k as uid_base + k: uids no account uses, one per concurrent
    # run so that RLIMIT_NPROC counts a single run. Processes (by pid) and the
    # sandboxes of one process (by a counter) get disjoint ranges of 64.
    self.uid_base = uid_base or (1_500_000_000 + (os.getpid() % 20_000) * 4096
                                 + (next(_INSTANCES) % 64) * 64)
    self._mode: str | None = None
    self.facts: dict = {}
    import queue
    import threading
    self._slots = queue.SimpleQueue()
    for slot in range(self.n_workers):
      self._slots.put(slot)
    self._check_lock = threading.Lock()  # held while probing (which runs a program)
    self._lock = threading.Lock()        # counters and the executor
    self._executor = None
    self.in_flight = self.max_in_flight = 0
    self.n_runs = self.n_parent_kills = 0

  # ---------------------------------------------------------------- public
  @property
  def mode(self) -> str:
    """'namespaces' or 'none'; probes the host on first use."""
    if self._mode is None:
      self.check()
    return self._mode

  def check(self) -> dict:
    """Runs a probe program and decides the mode; raises SandboxUnavailable."""
    with self._check_lock:
      if self._mode is not None:
        return self.facts
      facts, problems = self._probe("namespaces")
      self.facts = facts
      if not problems:
        self._mode = "namespaces"
        return facts
      if not self.allow_unsandboxed:
        raise SandboxUnavailable(
            "cannot isolate untrusted programs on this host: " + "; ".join(problems) +
            ". Run as root or enable unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces), or "
            "accept weak isolation with allow_unsandboxed=True.")
      if os.geteuid() == 0 and not _world_readable(self.python):
        raise SandboxUnavailable(
            f"{'; '.join(problems)}; and mode 'none' runs programs as uid "
            f"{self.uid_base}+, which cannot read the interpreter {self.python}: pass "
            f"python= a world-readable one (e.g. /usr/bin/python3)")
      self._mode = "none"
      self.facts = dict(facts, fallback_reason="; ".join(problems))
      return self.facts

  def run(self, program: str, tests: list[dict]) -> RunResult:
    """Runs one program against its test cases (in order)."""
    mode = self.mode
    slot = self._slots.get()
    try:
      return self._run(program, tests, slot, mode)
    finally:
      self._slots.put(slot)

  def run_many(self, jobs: list[tuple[str, list[dict]]]) -> list[RunResult]:
    """[(program, tests)] -> [RunResult], same order, n_workers runs at a time."""
    self.mode  # noqa: B018  (probe once, before the threads)
    if not jobs:
      return []
    with self._lock:
      if self._executor is None:
        from concurrent.futures import ThreadPoolExecutor
        self._executor = ThreadPoolExecutor(self.n_workers, thread_name_prefix="sandbox")
    return list(self._executor.map(lambda job: self.run(*job), jobs))

  def close(self) -> None:
    if self._executor is not None:
      self._executor.shutdown(wait=True)
      self._executor = None

  # ---------------------------------------------------------------- internals
  def _probe(self, mode: str) -> tuple[dict, list[str]]:
    launcher = os.path.abspath(__file__)
    probe = _PROBE.replace("LAUNCHER", repr(launcher))
    probe = probe.replace("MAX_PROCESSES", str(self.limits.max_processes))
    result = self._run(probe, [{"stdin": ""}], slot=0, mode=mode)
    run = result.tests[0]
    if run.status != "ran":
      detail = result.detail or run.stderr or run.status
      return {}, [f"the sandbox did not start ({detail.strip()[-400:]})"]
    facts = json.loads(run.stdout)
    problems = []
    if facts["uid"] == 0:
      problems.append("programs would run as root")
    if facts.get("cap_eff") != 0:
      problems.append(f"programs keep capabilities {facts.get('cap_eff')}")
    if facts.get("no_new_privs") != 1:
      problems.append("no_new_privs is not set")
    if facts.get("interfaces") != ["lo"]:
      problems.append(f"programs see network interfaces {facts.get('interfaces')}")
    if facts.get("sees_host"):
      problems.append("programs see the host filesystem")
    if facts.get("ppid") != 1:
      problems.append("programs are not in their own pid namespace")
    if facts.get("forks", math.inf) > self.limits.max_processes - 1:
      problems.append(f"RLIMIT_NPROC does not bind ({facts.get('forks')} forks allowed)")
    return facts, problems

  def _spec(self, program, tests, slot, mode, workdir) -> dict:
    uid = os.geteuid()
    limits = dataclasses.asdict(self.limits)
    prefix = os.path.dirname(os.path.dirname(self.python))  # .../bin/python -> ...
    return {"mode": mode, "program": program, "tests": tests, "limits": limits,
            "uid": self.uid_base + slot if uid == 0 else uid,
            "gid": self.uid_base + slot if uid == 0 else os.getegid(),
            "dedicated_uid": uid == 0, "parent_pid": os.getpid(), "workdir": workdir,
            "ro_paths": [prefix],
            "budget_s": self.limits.run_budget_s(len(tests))}

  def _run(self, program: str, tests: list[dict], slot: int, mode: str) -> RunResult:
    import tempfile
    started = time.monotonic()
    workdir = "/sandbox"
    if mode == "none":  # namespaces mode builds its own, in memory
      workdir = tempfile.mkdtemp(prefix="r1jax-sandbox-")
    spec = self._spec(program, tests, slot, mode, workdir)
    with self._lock:
      self.in_flight += 1
      self.max_in_flight = max(self.max_in_flight, self.in_flight)
      self.n_runs += 1
    try:
      out, err, killed, code = self._launch(spec)
    finally:
      with self._lock:
        self.in_flight -= 1
      if mode == "none":
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    if killed:
      with self._lock:
        self.n_parent_kills += 1
      if os.geteuid() == 0:
        _wait_uid_gone(spec["uid"], timeout_s=2.0)  # so the slot's next run starts clean
    result = _parse_report(out, len(tests))
    result.seconds = time.monotonic() - started
    if killed:
      result.status, result.detail = killed, f"the run was killed: {killed}"
    elif code != 0 and any(t is None for t in result.tests):
      result.status = "sandbox_error"
      result.detail = f"launcher exit {code}: {err.decode(errors='replace')[-2000:]}"
    # Tests without a line: the run's clock ran out (harness or trainer side), or it broke.
    missing = "timeout" if killed == "timeout" or code == 0 else "sandbox_error"
    result.tests = [t or TestRun(missing, stderr=result.detail[-_ERR_TAIL:]) for t in result.tests]
    return result

  def _launch(self, spec) -> tuple[bytes, bytes, str | None, int]:
    import subprocess
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "HOME": spec["workdir"], "TMPDIR": "/tmp"}
    cap = 8192 + len(spec["tests"]) * (6 * self.limits.max_output_bytes + 4 * _ERR_TAIL + 512)
    proc = subprocess.Popen(
        [self.python, "-I", "-S", "-B", os.path.abspath(__file__)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/",
        start_new_session=True)  # the whole tree is one process group: killpg
    deadline = time.monotonic() + spec["budget_s"] + 2.0
    try:
      proc.stdin.write(json.dumps(spec).encode())
      proc.stdin.close()
    except (BrokenPipeError, OSError):
      pass  # the launcher died at once: its stderr says why
    out, err, killed = _collect(proc, deadline, cap)
    return out, err, killed, proc.returncode


def _collect(proc, deadline: float, out_cap: int) -> tuple[bytes, bytes, str | None]:
  """Reads the launcher's stdout and stderr until EOF, a deadline or a size cap."""
  import selectors
  buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
  caps = {proc.stdout: out_cap, proc.stderr: _STDERR_CAP}
  killed = None
  with selectors.DefaultSelector() as selector:
    for pipe in buffers:
      selector.register(pipe, selectors.EVENT_READ)
    while selector.get_map() and not killed:
      left = deadline - time.monotonic()
      if left <= 0:
        killed = "timeout"
        break
      for key, _ in selector.select(left):
        chunk = os.read(key.fd, 65536)
        if not chunk:
          selector.unregister(key.fileobj)
        elif key.fileobj is proc.stderr:
          buffers[proc.stderr] += chunk[:max(0, _STDERR_CAP - len(buffers[proc.stderr]))]
        else:
          buffers[key.fileobj] += chunk
          if len(buffers[key.fileobj]) > caps[key.fileobj]:
            killed = "output_limit"
  if killed:
    try:  # the launcher's group; its death SIGKILLs the namespace (PR_SET_PDEATHSIG)
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  proc.wait()
  proc.stdout.close()
  proc.stderr.close()
  return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), killed


def _parse_report(out: bytes, n_tests: int) -> RunResult:
  """The harness' JSON lines -> RunResult with None where a test has no line."""
  tests: list = [None] * n_tests
  for line in out.splitlines():
    try:
      record = json.loads(line)
      i = int(record.pop("i"))
      if 0 <= i < n_tests:
        tests[i] = TestRun(**record)
    except (ValueError, TypeError, KeyError):
      continue
  return RunResult(tests)


def _wait_uid_gone(uid: int, timeout_s: float) -> bool:
  """Waits until no process of `uid` exists (root mode, after a killed run)."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if not processes_of(uid):
      return True
    time.sleep(0.02)
  return False


def _world_readable(python: str) -> bool:
  """Whether any uid can run `python` and read its prefix (every directory on the way
  searchable by others)."""
  prefix = os.path.dirname(os.path.dirname(python))
  path = "/"
  for part in prefix.strip("/").split("/"):
    path = os.path.join(path, part)
    if not os.stat(path).st_mode & 0o001:
      return False
  return bool(os.stat(python).st_mode & 0o005 == 0o005)


def processes_of(uid: int) -> list[int]:
  """Pids of the host's processes owned by uid (for checks and tests)."""
  pids = []
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        if os.stat(f"/proc/{name}").st_uid == uid:
          pids.append(int(name))
      except OSError:
        pass
  return pids


_PROBE = """
import json, os, socket
facts = {"uid": os.getuid(), "pid": os.getpid(), "ppid": os.getppid()}
try:
  status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
  facts["cap_eff"] = int(status["CapEff"], 16)
  facts["no_new_privs"] = int(status["NoNewPrivs"])
except (OSError, KeyError, ValueError) as e:
  facts["proc"] = repr(e)
try:
  facts["interfaces"] = sorted(name for _, name in socket.if_nameindex())
except OSError as e:
  facts["interfaces"] = repr(e)
facts["sees_host"] = os.path.exists(LAUNCHER)
forks = 0  # children exit at once, unreaped: zombies still count against RLIMIT_NPROC
for _ in range(MAX_PROCESSES + 2):
  try:
    if os.fork() == 0:
      os._exit(0)
  except OSError:
    break
  forks += 1
facts["forks"] = forks
print(json.dumps(facts))
"""


# ==========================================================================================
# Launcher (root or a user-namespace owner): namespaces, a minimal root, privileges
# ==========================================================================================

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
# statvfs flag -> mount flag: a remount must repeat the flags a user namespace locked
_STATVFS_TO_MS = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: 1024, 2048: 2048,
                  4096: 1 << 21}
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "localtime", "passwd", "group", "nsswitch.conf")
_DEVICES = ("null", "zero", "full", "random", "urandom")
_libc = None


def _c(name):
  global _libc
  if _libc is None:
    _libc = ctypes.CDLL(None, use_errno=True)
  return getattr(_libc, name, None)


def _check(ret: int, what: str) -> None:
  if ret != 0:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(source, target, fstype, flags, data=None) -> None:
  enc = lambda s: None if s is None else s.encode()  # noqa: E731
  _check(_c("mount")(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                     enc(data)), f"mount {source} on {target}")


def _prctl(option: int, value: int) -> None:
  _check(_c("prctl")(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def _launcher_main() -> None:
  spec = json.loads(sys.stdin.buffer.read())
  os.umask(0o022)  # directories we create must be traversable by the program's uid
  # Die with the trainer thread that started us; and never outlive the run's budget
  # (SIGALRM's default action ends the launcher, which SIGKILLs the namespace).
  _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != spec["parent_pid"]:
    os._exit(EXIT_SETUP_FAILED)
  signal.alarm(int(math.ceil(spec["budget_s"])) + 1)
  if spec["mode"] == "namespaces":
    userns = os.geteuid() != 0
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    try:
      _check(_c("unshare")(flags | (CLONE_NEWUSER if userns else 0)), "unshare")
      if userns:  # map only ourselves: allowed without privileges
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    except OSError as e:
      print(f"sandbox: no namespaces on this host: {e}", file=sys.stderr, flush=True)
      os._exit(EXIT_NO_NAMESPACES)
  pid = os.fork()  # in namespaces mode: pid 1 of the new pid namespace
  if pid == 0:
    try:
      _init(spec)
    except BaseException:  # noqa: BLE001
      traceback.print_exc()
    finally:
      os._exit(EXIT_SETUP_FAILED)
  _, status = os.waitpid(pid, 0)
  os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _init(spec) -> None:
  """The run's first process: root, working directory, privileges, then the harness."""
  os.setsid()  # a group of its own inside the namespace: the program cannot signal ours
  if spec["mode"] == "namespaces":
    _build_root(spec)
  else:  # orphans of the program become our children (pid 1 gets them by itself)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
  workdir = spec["workdir"]
  os.chdir(workdir)
  with open("solution.py", "w", encoding="utf-8") as f:  # for tracebacks and __file__
    f.write(spec["program"])
  if os.geteuid() == 0:
    for path in (workdir, "solution.py"):
      os.chown(path, spec["uid"], spec["gid"])
  _set_run_limits(spec)
  _drop_privileges(spec)
  report = os.dup(1)
  devnull = os.open("/dev/null", os.O_RDWR)
  os.dup2(devnull, 0)
  _harness(spec, report)
  os._exit(0)


def _write(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def _build_root(spec) -> None:
  """A new root in this mount namespace; the host's is detached (or unreachable)."""
  limits = spec["limits"]
  _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks to the host
  base = "/tmp"  # any directory: this mount is private to the namespace
  _mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
  top = base + "/r"
  os.mkdir(top, 0o755)
  for name in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
    host = "/" + name
    if os.path.islink(host):
      os.symlink(os.readlink(host), top + host)
    elif os.path.isdir(host):
      _bind(host, top + host, readonly=True)
  for path in spec["ro_paths"]:
    if os.path.isdir(path) and not _covered(path):
      _bind(path, top + path, readonly=True)
  os.mkdir(top + "/etc", 0o755)
  for name in _ETC_FILES:
    if os.path.isfile("/etc/" + name):
      _bind("/etc/" + name, f"{top}/etc/{name}", readonly=True)
  _build_dev(top + "/dev", limits)
  os.mkdir(top + "/proc", 0o555)
  try:
    _mount("proc", top + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
  except OSError:
    pass  # some container runtimes forbid it; Python needs no /proc
  owner = f"uid={spec['uid']},gid={spec['gid']}" if os.geteuid() == 0 else ""
  size = f"size={limits['disk_mb']}m,nr_inodes=4096"
  _tmpfs(top + "/tmp", f"{size},mode=1777")
  _tmpfs(top + spec["workdir"], f"{size},mode=0700" + (f",{owner}" if owner else ""))
  # pivot_root detaches the host's tree from this namespace; then chroot one level down:
  # the kernel refuses to create user namespaces for a chrooted process.
  os.mkdir(base + "/old")
  pivot = _c("pivot_root")
  if pivot is not None and pivot(base.encode(), (base + "/old").encode()) == 0:
    os.chdir("/")
    _check(_c("umount2")(b"/old", MNT_DETACH), "umount /old")
    os.rmdir("/old")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot("/r")
  else:  # e.g. a root filesystem that cannot be pivoted: chroot alone
    _mount(None, base, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(top)
  os.chdir("/")


def _build_dev(dev: str, limits) -> None:
  os.mkdir(dev, 0o755)
  for name in _DEVICES:
    if os.path.exists("/dev/" + name):
      _bind("/dev/" + name, f"{dev}/{name}", readonly=False)
  for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                       ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
    os.symlink(target, f"{dev}/{name}")
  _tmpfs(dev + "/shm", f"size={limits['disk_mb']}m,nr_inodes=1024,mode=1777")


def _tmpfs(path: str, options: str) -> None:
  os.makedirs(path, 0o755, exist_ok=True)
  _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options)


def _covered(path: str) -> bool:
  parts = os.path.normpath(path).split("/")
  return len(parts) > 1 and parts[1] in ("usr", "bin", "sbin", "lib", "lib32", "lib64")


def _bind(source: str, target: str, readonly: bool) -> None:
  if os.path.isdir(source):
    os.makedirs(target, 0o755, exist_ok=True)
  else:
    os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
    open(target, "a").close()
  _mount(source, target, None, MS_BIND | MS_REC)
  flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (MS_RDONLY if readonly else 0)
  locked = os.statvfs(target).f_flag
  flags |= sum(ms for st, ms in _STATVFS_TO_MS.items() if locked & st)
  if not readonly:
    flags |= MS_NOEXEC
  _mount(None, target, None, flags)


def _set_run_limits(spec) -> None:
  """Limits of the harness and, inherited, of every program (set while privileged, so
  hard limits the program cannot raise)."""
  limits = spec["limits"]
  memory = limits["memory_mb"] * 2**20
  inputs = max([len(t.get("stdin", "").encode()) for t in spec["tests"]] + [0])
  file_size = max(limits["max_output_bytes"] + 1, inputs + 1, len(spec["program"].encode()) + 1)
  cpu = int(math.ceil(spec["budget_s"]))
  for name, value in (("RLIMIT_NPROC", _nproc_limit(spec)),
                      ("RLIMIT_NOFILE", limits["max_open_files"]),
                      ("RLIMIT_CORE", 0), ("RLIMIT_AS", memory), ("RLIMIT_DATA", memory),
                      ("RLIMIT_FSIZE", file_size), ("RLIMIT_CPU", cpu)):
    resource.setrlimit(getattr(resource, name), (value, value))


def _nproc_limit(spec) -> int:
  """RLIMIT_NPROC counts every task of the uid (in its user namespace): the run's uid
  holds the harness (and, in a user namespace, the launcher) besides the program."""
  if spec["dedicated_uid"]:
    return spec["limits"]["max_processes"] + 1
  if spec["mode"] == "namespaces":
    return spec["limits"]["max_processes"] + 2
  # Mode 'none' without root: the count is the user's, trainer threads included, so the
  # limit can only be relative to now (racy with concurrent runs; documented as weak).
  return _tasks_of(os.getuid()) + spec["limits"]["max_processes"] + 2


def _tasks_of(uid: int) -> int:
  n = 0
  for name in os.listdir("/proc"):
    try:
      if name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid:
        n += len(os.listdir(f"/proc/{name}/task"))
    except OSError:
      pass
  return n


class _CapHeader(ctypes.Structure):
  _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
  _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
              ("inheritable", ctypes.c_uint32)]


def _capabilities(new: int | None = None) -> int:
  """capget (or capset to `new` = 0): effective|permitted|inheritable as one mask."""
  header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
  if new is not None:
    _check(_c("capset")(ctypes.byref(header), data), "capset")
  _check(_c("capget")(ctypes.byref(header), data), "capget")
  return sum((d.effective | d.permitted | d.inheritable) << (32 * i) for i, d in enumerate(data))


def _drop_privileges(spec) -> None:
  if os.geteuid() == 0:
    os.setgroups([])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
  _capabilities(new=0)  # in a user namespace we kept every capability until here
  _prctl(PR_SET_NO_NEW_PRIVS, 1)
  _prctl(PR_SET_DUMPABLE, 0)  # programs (same uid) cannot ptrace or /proc/1/mem us
  _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # cleared by the uid change: set again
  if os.getuid() == 0 or os.geteuid() == 0 or _capabilities() != 0:
    raise RuntimeError(f"privileges not dropped: uid {os.getuid()}, caps {_capabilities():x}")
  if spec["mode"] == "none" and os.getpid() == 1:
    raise RuntimeError("mode 'none' must not be pid 1")


# ==========================================================================================
# Harness (unprivileged): one forked child per test, results as JSON lines
# ==========================================================================================


def _harness(spec, report: int) -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # pid 1 only gets signals it handles
  limits, program = spec["limits"], spec["program"]
  # kill(-1) reaches exactly the run's processes as pid 1 of the namespace, or as the
  # only user of a dedicated uid; never in mode 'none' under the trainer's own uid.
  kill_all = os.getpid() == 1 or spec["dedicated_uid"]
  deadline = time.monotonic() + spec["budget_s"]
  timeouts, stop = 0, limits["stop_after_timeouts"]
  for i, test in enumerate(spec["tests"]):
    if time.monotonic() > deadline:
      break
    if stop and timeouts >= stop:  # a program that hangs on one input mostly hangs on all
      record = {"status": "timeout", "stderr": f"skipped after {timeouts} timed-out tests"}
    else:
      record = _run_test(i, program, test, limits, kill_all)
      timeouts += record["status"] == "timeout"
    os.write(report, (json.dumps(dict(record, i=i)) + "\n").encode())


def _run_test(i: int, program: str, test: dict, limits: dict, kill_all: bool) -> dict:
  if "stdin" in test:
    stdin = _scratch_file(test["stdin"].encode("utf-8"))
  else:
    stdin = os.open("/dev/null", os.O_RDONLY)
  fds = [stdin] + [_scratch_file() for _ in ("out", "err", "res")]
  started = time.monotonic()
  try:
    pid = os.fork()
  except OSError as e:  # e.g. EAGAIN: what a previous test left holds the process limit
    for fd in fds:
      os.close(fd)
    return {"status": "sandbox_error", "stderr": f"fork: {e}", "seconds": 0.0}
  if pid == 0:
    try:
      _child(program, test, fds, limits)
    finally:
      os._exit(70)  # never return into the harness loop
  waited = _wait(pid, limits["timeout_s"])
  timed_out = waited is None
  if timed_out:
    _kill_group(pid)
    waited = os.wait4(pid, 0)[1:]
  _kill_strays(kill_all, pid)
  seconds = time.monotonic() - started
  cap = limits["max_output_bytes"]
  outputs = {k: _read(fd, cap) for k, fd in zip(("out", "err", "res"), fds[1:])}
  for fd in fds:
    os.close(fd)
  status = _classify(waited, timed_out, outputs, test, limits)
  record = {"status": status, "stderr": outputs["err"][0][-_ERR_TAIL:],
            "seconds": round(seconds, 4)}
  result = _loads(outputs["res"][0])
  if "stdin" in test:
    record["stdout"] = outputs["out"][0]
  elif status == "ran":
    record["value"] = result.get("value")
  return record


def _classify(waited, timed_out: bool, outputs: dict, test: dict, limits: dict) -> str:
  status, usage = waited
  if timed_out:
    return "timeout"
  if any(over for _, over in outputs.values()):
    return "output_limit"
  if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    cpu = usage.ru_utime + usage.ru_stime
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= math.ceil(limits["timeout_s"])):
      return "timeout"
    return "output_limit" if sig == signal.SIGXFSZ else "crash"
  result = _loads(outputs["res"][0])
  if result.get("exc") == "MemoryError":
    return "memory"
  if result.get("exc") == "FileTooLarge":
    return "output_limit"
  if os.waitstatus_to_exitcode(status) != 0:
    return "error"
  if "stdin" not in test and not isinstance(result.get("value"), str):
    return "error"
  return "ran"


def _child(program: str, test: dict, fds: list[int], limits: dict) -> None:
  """The forked test process: its own group, files for 0-3, limits, then the program."""
  os.setpgid(0, 0)
  for target, fd in enumerate(fds):
    os.dup2(fd, target)
  os.closerange(4, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
  signal.signal(signal.SIGINT, signal.default_int_handler)
  memory = limits["memory_mb"] * 2**20
  cpu = int(math.ceil(limits["timeout_s"]))
  cap = limits["max_output_bytes"] + 1  # a full file means "more than allowed"
  for name, (soft, hard) in (("RLIMIT_AS", (memory, memory)), ("RLIMIT_DATA", (memory, memory)),
                             ("RLIMIT_CPU", (cpu, cpu + 1)), ("RLIMIT_FSIZE", (cap, cap))):
    which = getattr(resource, name)
    ceiling = resource.getrlimit(which)[1]  # the harness' hard limit cannot be raised
    if ceiling != resource.RLIM_INFINITY:
      soft, hard = min(soft, ceiling), min(hard, ceiling)
    resource.setrlimit(which, (soft, hard))
  sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", errors="replace", closefd=False)
  sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
  sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace",
                                     closefd=False)
  record, code = _execute(program, test)
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except BaseException:  # noqa: BLE001  (EFBIG: over the output limit)
      code = code or 1
  try:
    os.write(3, json.dumps(record).encode())
  except BaseException:  # noqa: BLE001
    pass
  os._exit(code)


def _execute(program: str, test: dict) -> tuple[dict, int]:
  io_test = "stdin" in test
  scope = {"__name__": "__main__" if io_test else "solution", "__file__": "solution.py",
           "__builtins__": builtins}
  try:
    exec(compile(program, "solution.py", "exec"), scope)  # noqa: S102  (the point)
    if "call" in test:
      return {"value": json.dumps(scope[test["call"]](*test["args"]))}, 0
    if "assert" in test:
      exec(compile(test["assert"], "test.py", "exec"), scope)  # noqa: S102
      return {"value": "true"}, 0
    return {}, 0
  except SystemExit as e:
    if not io_test:
      return {"exc": "SystemExit"}, 1
    if e.code is None or isinstance(e.code, int):
      return {}, (e.code or 0) & 0xFF
    print(e.code, file=sys.stderr)
    return {}, 1
  except MemoryError:
    return {"exc": "MemoryError"}, 1
  except OSError as e:
    if e.errno == errno.EFBIG:  # a file (or stdout) over RLIMIT_FSIZE
      return {"exc": "FileTooLarge"}, 1
    _print_exception(e)
    return {"exc": type(e).__name__}, 1
  except BaseException as e:  # noqa: BLE001
    _print_exception(e)
    return {"exc": type(e).__name__}, 1


def _print_exception(e: BaseException) -> None:
  try:  # the program's frames only
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
  except BaseException:  # noqa: BLE001
    pass


def _wait(pid: int, timeout_s: float):
  """(status, rusage) of the child, or None after timeout_s."""
  deadline = time.monotonic() + timeout_s
  try:
    pidfd = os.pidfd_open(pid)
  except (AttributeError, OSError):
    pidfd = None
  try:
    while True:
      done, status, usage = os.wait4(pid, os.WNOHANG)
      if done:
        return status, usage
      left = deadline - time.monotonic()
      if left <= 0:
        return None
      if pidfd is not None:
        select.select([pidfd], [], [], left)
      else:
        time.sleep(min(left, 0.005))
  finally:
    if pidfd is not None:
      os.close(pidfd)


def _kill_group(pid: int) -> None:
  for kill, target in ((os.killpg, pid), (os.kill, pid)):
    try:
      kill(target, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass


def _kill_strays(kill_all: bool, pid: int) -> None:
  """After each test: nothing the program started survives into the next one."""
  try:  # the child is reaped; its group lives on while a member does
    os.killpg(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  if not kill_all:
    return
  try:
    os.kill(-1, signal.SIGKILL)  # every process we may signal but us (and pid 1)
  except ProcessLookupError:
    pass
  while True:
    try:
      os.waitpid(-1, 0)
    except ChildProcessError:
      return
    except InterruptedError:
      continue


def _scratch_file(content: bytes = b"") -> int:
  """A file with no path (memfd; RLIMIT_FSIZE applies): whatever a program does to the
  working folder (chmod, fill it, plant FIFOs) cannot reach the next test's files."""
  if hasattr(os, "memfd_create"):
    fd = os.memfd_create("sandbox", os.MFD_CLOEXEC)
  else:  # unlinked at once, read back through our own fd
    path = f".scratch-{os.urandom(8).hex()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.unlink(path)
  view = memoryview(content)
  while view:
    view = view[os.write(fd, view):]
  os.lseek(fd, 0, os.SEEK_SET)
  return fd


def _read(fd: int, limit: int) -> tuple[str, bool]:
  """(at most `limit` bytes of the file as text, whether it held more)."""
  data = b""
  while len(data) <= limit:
    chunk = os.pread(fd, limit + 1 - len(data), len(data))
    if not chunk:
      break
    data += chunk
  return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def _loads(text: str) -> dict:
  try:
    value = json.loads(text)
  except ValueError:
    return {}
  return value if isinstance(value, dict) else {}


if __name__ == "__main__":
  _launcher_main()
