"""Run untrusted, model-written Python (HumanEval, MBPP) inside a bubblewrap sandbox.

Model output is never executed outside this sandbox. Each program runs in its own ``bwrap`` process:

* namespaces: ``--unshare-all`` plus an explicit user namespace (new net namespace with only a private
  loopback: no network; new pid namespace: killing bwrap kills everything inside), ``--disable-userns``
  (no nested namespaces), ``--new-session``, ``--die-with-parent``;
* filesystem: only what the program needs, read-only: ``/usr`` (with the ``/lib*``, ``/bin``, ``/sbin``
  links or directories of the host) and ``/etc/ld.so.cache`` for the shared libraries, the interpreter's real
  prefix (a venv's python resolved to its base installation) for the binary and its stdlib, every
  site-packages directory of that interpreter hidden under an empty read-only tmpfs (HumanEval and MBPP need
  the stdlib only); a fresh ``/dev`` and ``/proc``, and a size-capped private tmpfs on ``/tmp`` (cwd and HOME)
  as the only writable place; the program is copied in as ``/tmp/prog.py``. Home directories, the repository,
  its virtual environment, the host's ``/tmp`` and the rest of ``/etc`` do not exist inside;
* environment: cleared to PATH, HOME and LANG; the interpreter runs with ``-I`` (isolated mode);
* resources, set by a tiny launcher inside the sandbox just before it execs the program: RLIMIT_CPU
  (SIGXCPU at ``cpu_s``, SIGKILL a second later), RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_CORE=0, and
  ``oom_score_adj=1000`` so the kernel's OOM killer picks sandboxed code first; wall clock by the parent,
  which SIGKILLs bwrap's process group and so tears down the sandbox's pid namespace.

Fork bombs as root: the kernel never enforces RLIMIT_NPROC for real uid 0, so when the harness runs as
root it starts bwrap as an unprivileged uid (``SANDBOX_UID``, nobody). The user namespace bwrap then creates
is owned by that uid, the process count is kept per (namespace, uid), and ``max_procs`` caps the sandbox on
its own: concurrent sandboxes do not share the budget. When the harness is not root it needs no uid switch.
The interpreter must be reachable by that uid: ``sys.executable``'s base installation when it is, otherwise
the system ``python3.X`` of the same version (a pyenv under a 0700 ``/root`` is not).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import IO, Any

BWRAP = "bwrap"
SANDBOX_UID = 65534  # nobody/nogroup: used only when the harness itself runs as root
OUTPUT_LIMIT = 4096  # bytes kept of stdout and of stderr (head and tail)
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) and allow unprivileged user namespaces "
    "(sysctl user.max_user_namespaces > 0; in Docker, a seccomp/AppArmor profile that permits unshare/mount)"
)

# Runs inside the sandbox with -I -S: apply the limits, then exec the candidate program.
_LAUNCHER = """\
import os, resource as r, sys
cpu, mem, nproc, fsize = (int(a) for a in sys.argv[1:5])
for res, soft, hard in ((r.RLIMIT_CPU, cpu, cpu + 1), (r.RLIMIT_AS, mem, mem), (r.RLIMIT_NPROC, nproc, nproc),
                        (r.RLIMIT_FSIZE, fsize, fsize), (r.RLIMIT_CORE, 0, 0), (r.RLIMIT_NOFILE, 256, 256)):
    r.setrlimit(res, (soft, hard))
try:
    with open('/proc/self/oom_score_adj', 'w') as f:
        f.write('1000')
except OSError:
    pass
os.execv(sys.executable, [sys.executable, '-I', *sys.argv[5:]])
"""


@dataclass(frozen=True)
class Limits:
    """Per-program limits; mirrors ``cogumi_tasks.core.config.SandboxConfig``."""

    cpu_s: int = 10
    wall_s: float = 15.0
    memory_mb: int = 512
    max_procs: int = 32
    file_mb: int = 16

    @classmethod
    def from_config(cls, cfg: Any) -> Limits:
        """Build from any object with the same field names (e.g. a ``SandboxConfig``)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


@dataclass
class SandboxResult:
    """Outcome of one program; ``passed`` means exit code 0 within the limits."""

    passed: bool
    reason: str  # ok | timeout | cpu_limit | memory_limit | killed:<signal> | exit:<code> | sandbox_error:<...>
    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float


def _can_traverse(path: str, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` (no supplementary groups) can reach and read+execute ``path`` (symlinks too)."""
    for target in {os.path.abspath(path), os.path.realpath(path)}:
        parts = target.split(os.sep)
        for i in range(1, len(parts) + 1):
            p = os.sep.join(parts[:i]) or os.sep
            try:
                st = os.stat(p)
            except OSError:
                return False
            want = stat.S_IXOTH | (stat.S_IROTH if p == target else 0)
            shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
            if (st.st_mode >> shift) & want != want:
                return False
    return True


def _sandbox_identity() -> tuple[int | None, str]:
    """(uid to switch to or None, real interpreter path) for the sandbox."""
    exe = os.path.realpath(sys.executable)  # a venv's python is a link to its base installation's
    if os.geteuid() != 0:
        return None, exe
    uid = gid = SANDBOX_UID
    if _can_traverse(exe, uid, gid) and _can_traverse(sys.base_prefix, uid, gid):
        return uid, exe
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (f"/usr/bin/{minor}", f"/usr/local/bin/{minor}", shutil.which(minor)):
        if cand and os.path.exists(cand) and _can_traverse(cand, uid, gid):
            return uid, os.path.realpath(cand)
    raise RuntimeError(f"no {minor} interpreter readable by uid {uid} for the sandbox (tried {exe})")


@functools.lru_cache(maxsize=4)
def _interpreter_layout(python: str) -> tuple[str, tuple[str, ...]]:
    """(installation prefix, site-packages directories) of ``python``, asked once per interpreter."""
    code = "import json, site, sys; print(json.dumps([sys.base_prefix, site.getsitepackages([sys.base_prefix])]))"
    out = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=30, check=True)
    prefix, site_dirs = json.loads(out.stdout)
    return prefix, tuple(site_dirs)


def _filesystem(python: str) -> list[str]:
    """bwrap arguments that make the sandbox's whole filesystem: ``python``, its stdlib and the shared
    libraries, read-only; its site-packages hidden."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    prefix, site_dirs = _interpreter_layout(python)
    if not (prefix == "/usr" or prefix.startswith("/usr/")):
        args += ["--ro-bind", prefix, prefix]
    for site_dir in site_dirs:
        if os.path.isdir(site_dir):
            args += ["--tmpfs", site_dir, "--remount-ro", site_dir]
    return args


def _bwrap_argv(python: str, limits: Limits, prog_fd: int, status_fd: int) -> list[str]:
    tmp_bytes = max(4 * limits.file_mb, 16) << 20
    return [
        BWRAP,
        "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
        "--die-with-parent", "--new-session", "--hostname", "sandbox",
        *_filesystem(python), "--dev", "/dev", "--proc", "/proc",
        "--size", str(tmp_bytes), "--perms", "0700", "--tmpfs", "/tmp",
        "--size", str(tmp_bytes), "--perms", "1777", "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
        "--remount-ro", "/",  # the root tmpfs bwrap builds (with /etc, mount points) is read-only too
        "--perms", "0444", "--ro-bind-data", str(prog_fd), "/tmp/prog.py",
        "--chdir", "/tmp", "--json-status-fd", str(status_fd),
        "--", python, "-I", "-S", "-c", _LAUNCHER,
        str(limits.cpu_s), str(limits.memory_mb << 20), str(limits.max_procs), str(limits.file_mb << 20),
        "/tmp/prog.py",
    ]  # fmt: skip


def _read_capped(f: IO[bytes], limit: int = OUTPUT_LIMIT) -> str:
    """Head and tail of a captured stream, ``limit`` bytes in all, with a marker in between."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if size <= limit:
        return f.read().decode("utf-8", "replace")
    head = f.read(limit // 2)
    f.seek(size - limit // 2)
    tail = f.read()
    cut = size - limit
    return f"{head.decode('utf-8', 'replace')}\n...[{cut} bytes truncated]...\n{tail.decode('utf-8', 'replace')}"


def _wait_gone(pid: int, timeout: float = 3.0) -> bool:
    """Wait (bounded) until host pid ``pid`` (the sandbox's pid 1) has exited, i.e. its namespace is empty.

    A dead pid 1 may linger as a zombie until the host's init reaps it; by then the kernel has already
    killed and reaped everything else in its pid namespace.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in (b"Z", b"X"):
            return True
        time.sleep(0.005)
    return False


def _classify(rc: int, stderr: str) -> str:
    if rc == 0:
        return "ok"
    if rc > 128 and rc - 128 in signal.valid_signals():
        sig = signal.Signals(rc - 128)
        return "cpu_limit" if sig == signal.SIGXCPU else f"killed:{sig.name}"
    last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "")
    if last.startswith("MemoryError"):
        return "memory_limit"
    return f"exit:{rc}"


def _read_status(fd: int) -> dict[str, Any]:
    """Merge bwrap's --json-status-fd documents (one per line)."""
    os.set_blocking(fd, False)  # never hang on a writer that is still alive
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    merged: dict[str, Any] = {}
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        try:
            merged.update(json.loads(line))
        except ValueError:
            continue
    return merged


def run_python(program: str, limits: Limits = Limits()) -> SandboxResult:
    """Run ``program`` as ``python -I prog.py`` in a fresh sandbox and report how it ended."""
    start = time.monotonic()
    if shutil.which(BWRAP) is None:
        return SandboxResult(False, "sandbox_error:bwrap not found", None, "", "", 0.0)
    try:
        uid, python = _sandbox_identity()
    except RuntimeError as exc:
        return SandboxResult(False, f"sandbox_error:{exc}", None, "", "", 0.0)
    prog_fd = os.memfd_create("prog.py")
    status_r, status_w = os.pipe()
    timed_out = False
    try:
        os.write(prog_fd, program.encode("utf-8", "surrogatepass"))
        os.lseek(prog_fd, 0, os.SEEK_SET)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            ident: dict[str, Any] = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
            proc = subprocess.Popen(
                _bwrap_argv(python, limits, prog_fd, status_w),
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(prog_fd, status_w),
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"},
                start_new_session=True, close_fds=True, **ident,
            )  # fmt: skip
            os.close(status_w)
            status_w = -1
            try:
                rc = proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:  # timeout or an exception in the harness: kill bwrap, --die-with-parent empties the pid ns
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
            status = _read_status(status_r)
            if "child-pid" in status and not _wait_gone(pid1 := int(status["child-pid"])):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid1, signal.SIGKILL)
                _wait_gone(pid1)
            seconds = time.monotonic() - start
            stdout, stderr = _read_capped(out), _read_capped(err)
    finally:
        for fd in (prog_fd, status_r, status_w):
            if fd >= 0:
                os.close(fd)
    if timed_out:
        return SandboxResult(False, "timeout", None, stdout, stderr, seconds)
    if "child-pid" not in status:  # bwrap failed before starting the program
        first = stderr.strip().splitlines()[0] if stderr.strip() else f"bwrap exit {rc}"
        return SandboxResult(False, f"sandbox_error:{first}", rc, stdout, stderr, seconds)
    reason = _classify(rc, stderr)
    return SandboxResult(reason == "ok", reason, rc, stdout, stderr, seconds)


def run_many(programs: list[str], limits: Limits = Limits(), workers: int = 2) -> list[SandboxResult]:
    """Run programs concurrently (at most ``workers`` sandboxes at once); results keep the input order."""
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(programs)))) as pool:
        return list(pool.map(lambda p: run_python(p, limits), programs))


def check_available() -> None:
    """Raise RuntimeError (with an install hint) unless bwrap exists and can build a sandbox here."""
    if shutil.which(BWRAP) is None:
        raise RuntimeError(f"bubblewrap ({BWRAP}) not found: {INSTALL_HINT}")
    res = run_python("print('sandbox-ok')", Limits(cpu_s=5, wall_s=20.0))
    if not res.passed or res.stdout.strip() != "sandbox-ok":
        raise RuntimeError(
            f"bubblewrap cannot create a sandbox here ({res.reason}): {res.stderr.strip()[:500]}; {INSTALL_HINT}"
        )
