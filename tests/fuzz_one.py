"""Run qcow2 mutants through blockfs, each in a process of its own under limits.

What one mutant goes through (:func:`exercise`, in a child process):

1. ``open_image(path, read_only=True)`` (probing, as ``blockfs info`` does): a refusal must be a
   :class:`BlockfsError` whose message is one non-empty line; the rest is skipped.
2. reads of the first and last bytes, of a few random clusters and of a range spanning three
   clusters (each must return exactly the bytes asked for), ``block_status`` from 0 to the end
   of the disk (each extent must start where asked and make progress; at most
   :data:`STATUS_STEPS` steps), ``describe()`` and ``allocated_bytes()``;
3. on a copy of the mutant, opened read-write: writes of a few clusters (aligned and not),
   write_zeroes, discard, flush, and sometimes an internal snapshot taken and deleted, which
   exercises allocation on a hostile refcount table;
4. ``python -m blockfs info MUTANT`` (run as ``-m`` runs it, in another child): exit 0, or
   exit 1 with exactly one line on stderr that starts with ``blockfs: ``.

A BlockfsError met in steps 2-3 ends that step and is fine (corruption found at use); anything
else escaping is a failure, and so are: the wall-clock limit, the address-space limit
(``RLIMIT_AS``; a MemoryError), a child killed by a signal, a copy grown past
:data:`DISK_LIMIT`, and a CLI that breaks its contract.

Children are forked from a *fork server* (``python tests/fuzz_one.py --serve``) that imported
blockfs once: a fork costs milliseconds where a new interpreter costs a third of a second. The
server reads one JSON request per line on stdin and answers one JSON verdict per line; it never
runs trio itself, so forking is safe. ``python tests/fuzz_one.py MUTANT`` runs one mutant and
prints its verdict. Importing this module has no side effects.
"""

from __future__ import annotations

import json
import os
import random
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
MEM_LIMIT = 1024 * MiB
TIME_LIMIT = 20.0
DISK_LIMIT = 256 * MiB
STATUS_STEPS = 4096
#: verdict kinds that are not failures
GOOD = ("opened", "refused")


@dataclass
class Verdict:
    kind: (
        str  # opened, refused, or a failure: exception, memory, timeout, crash, contract, disk, cli
    )
    detail: str = ""
    seconds: float = 0.0
    maxrss_kib: int = 0
    #: what happened after a successful open: "ok", or the BlockfsError met in a step
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.kind in GOOD


class ContractBroken(Exception):
    """A node answered against its contract (a short read, a status that does not advance)."""


def _check_message(exc: BaseException) -> None:
    msg = str(exc)
    # a message ending in ':' lost the detail it interpolated (an empty str(MemoryError())...);
    # 8 KiB leaves room for two paths and a 1023-byte backing file name quoted in one line
    if not msg.strip() or "\n" in msg or len(msg) > 8192 or msg.rstrip().endswith(":"):
        raise ContractBroken(f"bad error message {msg!r} from {type(exc).__name__}")


async def _read_sample(node: Any, rng: random.Random) -> None:
    size = node.size
    cs = node.limits.cluster_size
    if not size:
        return
    ranges = [(0, min(size, cs)), (max(0, size - 4096), min(size, 4096))]
    for _ in range(3):
        ranges.append(((rng.randrange(size) // cs) * cs, cs))
    start = rng.randrange(size)
    ranges.append((start, 3 * cs))
    for off, n in ranges:
        n = min(n, size - off, 4 * MiB)
        if n <= 0:
            continue
        data = await node.read(off, n)
        if len(data) != n:
            raise ContractBroken(f"read({off}, {n}) returned {len(data)} bytes")


async def _walk_status(node: Any) -> None:
    from blockfs.nodes.base import chain_block_status

    off = 0
    for _ in range(STATUS_STEPS):
        if off >= node.size:
            return
        ext = await node.block_status(off, node.size - off)
        if ext.offset != off or not 0 < ext.length <= node.size - off:
            raise ContractBroken(f"block_status({off}) returned {ext}")
        off += ext.length
    if node.size:
        await chain_block_status(node, 0, node.size)


async def _write_sample(node: Any, rng: random.Random) -> None:
    size = node.size
    cs = node.limits.cluster_size
    if not size:
        return
    last = ((size - 1) // cs) * cs
    for off in (0, last, (rng.randrange(size) // cs) * cs):
        await node.write(off, bytes([rng.randrange(1, 256)]) * min(cs, size - off))
    odd = rng.randrange(size)
    await node.write(odd, b"\x5a" * min(cs + 7, size - odd))
    z = (rng.randrange(size) // cs) * cs
    await node.write_zeroes(z, min(2 * cs, size - z), may_unmap=rng.random() < 0.5)
    await node.discard(last, size - last)
    await node.flush()


async def _snapshot_cycle(node: Any, rng: random.Random) -> None:
    from blockfs.nodes.qcow2 import Qcow2Node, apply_snapshot, create_snapshot, delete_snapshot

    if not isinstance(node, Qcow2Node):
        return
    old = list(node.snapshots)
    snap = await create_snapshot(node, f"fuzz-{rng.randrange(1 << 30)}")
    if old and rng.random() < 0.5:
        await apply_snapshot(node, old[0].id)
    await delete_snapshot(node, snap.id)


async def exercise(
    path: str, rw_copy: str | None, seed: int, snapshot: bool | None = None
) -> tuple[str, str, list[str]]:
    """Steps 1-3 above; ``snapshot`` says whether step 3 takes a snapshot (None: sometimes).
    Returns (kind, detail, notes). :raise ContractBroken:"""
    from blockfs.errors import BlockfsError
    from blockfs.nodes.registry import close_chain, open_image

    rng = random.Random(seed)
    notes: list[str] = []
    try:
        node = await open_image(path, read_only=True)
    except BlockfsError as exc:
        _check_message(exc)
        return "refused", str(exc), notes
    try:
        await _read_sample(node, rng)
        await _walk_status(node)
        node.describe()
        await node.allocated_bytes()
        notes.append("read: ok")
    except BlockfsError as exc:
        _check_message(exc)
        notes.append(f"read: {exc}")
    finally:
        await close_chain(node)
    if rw_copy is None:
        return "opened", "", notes
    shutil.copyfile(path, rw_copy)
    try:
        node = await open_image(rw_copy, read_only=False)
    except BlockfsError as exc:
        _check_message(exc)
        notes.append(f"open rw: {exc}")
        return "opened", "", notes
    try:
        await _write_sample(node, rng)
        if snapshot if snapshot is not None else rng.random() < 0.3:
            await _snapshot_cycle(node, rng)
        notes.append("write: ok")
    except BlockfsError as exc:
        _check_message(exc)
        notes.append(f"write: {exc}")
    finally:
        try:
            await close_chain(node)
        except BlockfsError as exc:
            _check_message(exc)
            notes.append(f"close: {exc}")
    grown = os.stat(rw_copy).st_size
    if grown > DISK_LIMIT:
        return "disk", f"the read-write copy grew to {grown} bytes", notes
    return "opened", "", notes


def _limit_self(mem: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * DISK_LIMIT, 2 * DISK_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _child_exercise(req: dict[str, Any], out: str) -> None:
    """Body of a forked child: run :func:`exercise`, leave the verdict in ``out``."""
    import trio

    _limit_self(req.get("mem", MEM_LIMIT))
    probe = req.get("probe")
    try:
        if probe == "raise":
            raise RuntimeError("probe: an unexpected exception")
        if probe == "hog":
            hog = [bytearray(64 * MiB) for _ in range(64)]
            del hog
        if probe == "hang":
            time.sleep(3600)
        kind, detail, notes = trio.run(
            exercise, req["image"], req.get("rw_copy"), req["seed"], req.get("snapshot")
        )
    except ContractBroken as exc:
        kind, detail, notes = "contract", str(exc), []
    except BaseException as exc:  # everything else escaping is what the fuzzer looks for
        tb = traceback.format_exc()
        memory = isinstance(exc, MemoryError) or "MemoryError" in tb
        kind, detail, notes = ("memory" if memory else "exception"), tb, []
    with open(out, "w") as f:
        json.dump({"kind": kind, "detail": detail, "notes": notes}, f)


def _child_cli(req: dict[str, Any], out: str) -> None:
    """Body of a forked child: ``python -m blockfs info IMAGE``, stdout/stderr to files."""
    import runpy

    _limit_self(req.get("mem", MEM_LIMIT))
    fo = os.open(out + ".stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    fe = os.open(out + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fo, 1)
    os.dup2(fe, 2)
    sys.argv = ["blockfs", "info", req["image"]]
    code = 0
    try:
        runpy.run_module("blockfs", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _forked(body: Any, req: dict[str, Any], out: str, timeout: float) -> tuple[int, float, int]:
    """Fork, run ``body(req, out)`` in the child, wait at most ``timeout`` seconds.
    Returns (wait status, or -1 on timeout; seconds; peak RSS in KiB)."""
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child never returns into the server's code
        status = 0
        try:
            body(req, out)
        except BaseException:
            traceback.print_exc()
            status = 70
        finally:
            os._exit(status)
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        timed_out = not ready
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
    finally:
        os.close(pidfd)
    return (-1 if timed_out else status), time.monotonic() - t0, usage.ru_maxrss


def run_request(req: dict[str, Any]) -> Verdict:
    """Run one mutant (and the CLI on it) in forked children; the verdict of the first failure,
    else of the exercise."""
    timeout = float(req.get("timeout", TIME_LIMIT))
    with tempfile.TemporaryDirectory(prefix="fuzz-verdict-") as tmp:
        out = os.path.join(tmp, "verdict.json")
        status, secs, rss = _forked(_child_exercise, req, out, timeout)
        v = _judge(status, out, timeout)
        v.seconds, v.maxrss_kib = secs, rss
        if not v.ok or not req.get("cli", True):
            return v
        out = os.path.join(tmp, "cli")
        status, secs, rss = _forked(_child_cli, req, out, timeout)
        v.seconds += secs
        v.maxrss_kib = max(v.maxrss_kib, rss)
        problem = _judge_cli(status, out, timeout)
        if problem:
            return Verdict("cli", problem, v.seconds, v.maxrss_kib, v.notes)
        return v


def _judge(status: int, out: str, timeout: float) -> Verdict:
    if status == -1:
        return Verdict("timeout", f"no verdict after {timeout} s")
    if os.WIFSIGNALED(status):
        return Verdict("crash", f"killed by signal {os.WTERMSIG(status)}")
    try:
        with open(out) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return Verdict("crash", f"exit status {os.waitstatus_to_exitcode(status)}, no verdict")
    return Verdict(d["kind"], d["detail"], notes=d["notes"])


def check_cli_output(code: int, stdout: str, stderr: str) -> str:
    """What is wrong with the output of ``blockfs info`` ('' when nothing): exit 0 with
    something on stdout, or exit 1 with one line ``blockfs: MESSAGE`` on stderr."""
    if code == 0:
        return "" if stdout.strip() else "exit 0 with nothing on stdout"
    lines = stderr.splitlines()
    if code != 1:
        return f"exit {code}: {stderr[-2000:]!r}"
    if len(lines) != 1 or not lines[0].startswith("blockfs: ") or not lines[0][9:].strip():
        return f"stderr is not one 'blockfs: ' line: {stderr[-2000:]!r}"
    return ""


def _judge_cli(status: int, out: str, timeout: float) -> str:
    if status == -1:
        return f"blockfs info took more than {timeout} s"
    if os.WIFSIGNALED(status):
        return f"blockfs info killed by signal {os.WTERMSIG(status)}"
    with open(out + ".stdout", errors="replace") as f:
        stdout = f.read()
    with open(out + ".stderr", errors="replace") as f:
        stderr = f.read()
    return check_cli_output(os.waitstatus_to_exitcode(status), stdout, stderr)


def serve() -> None:
    """The fork server: one JSON request per line in, one JSON verdict per line out."""
    import blockfs.cli.main
    import blockfs.nodes.qcow2
    import blockfs.nodes.registry  # noqa: F401 (imported once, before any fork)

    for line in sys.stdin:
        v = run_request(json.loads(line))
        sys.stdout.write(json.dumps(asdict(v)) + "\n")
        sys.stdout.flush()


class FuzzServer:
    """The client side of :func:`serve`: ``with FuzzServer() as s: s.run(image, ...)``."""

    def __init__(self) -> None:
        env = dict(os.environ, MALLOC_ARENA_MAX="2", PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def run(
        self,
        image: Path,
        *,
        rw_copy: Path | None = None,
        seed: int = 0,
        cli: bool = True,
        **extra: Any,
    ) -> Verdict:
        req = {
            "image": str(image),
            "rw_copy": str(rw_copy) if rw_copy else None,
            "seed": seed,
            "cli": cli,
            **extra,
        }
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fuzz server died (exit {self.proc.wait()})")
        return Verdict(**json.loads(line))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> FuzzServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str]) -> int:
    if argv == ["--serve"]:
        serve()
        return 0
    if not argv or argv[0].startswith("-"):
        print("usage: fuzz_one.py MUTANT [SEED] | --serve", file=sys.stderr)
        return 2
    image = argv[0]
    seed = int(argv[1]) if len(argv) > 1 else 0
    rw = image + ".rw"  # beside the mutant, so that a relative backing file name resolves
    try:
        v = run_request({"image": image, "rw_copy": rw, "seed": seed})
    finally:
        if os.path.exists(rw):
            os.unlink(rw)
    print(json.dumps(asdict(v), indent=2))
    return 0 if v.ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
