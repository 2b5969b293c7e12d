"""Per-request context shared by the ensemble's python models, keyed by the request id.

Triton lets a step after a decoupled model (postprocess, after the decoder) read only that model's outputs. What
postprocess must know about the request itself (audio truncation notices, whether to strip AF3's transcription
prefix) is written here by preprocess and read back by postprocess. Entries are small JSON files in a directory
private to the tritonserver process (the models' common parent), removed when the request ends and purged when
stale. Requests without an id (e.g. perf_analyzer's) carry no context: they get the defaults.

Cancellation marks live beside the entries (`<hash>.cancelled`, separate from the entry that postprocess drops at
the request's first response): Triton 2.51 does not pass a client's cancellation of the af3 ensemble to the decoder
inside it, so the `cancel` model (triton_repo/cancel) marks the request here and the CPU decoder polls the mark.
File names are hashes of the request id: nothing a client sends names a path.

`running/<model>.<pid>` files count the requests each python stub is working on (RunningRequests): the supervisor's
drain sums those of live stubs (running_requests), so a stub that died takes its count with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from af3trt.runtime.host.proc import alive

# How long a request's entry here, or postprocess's held-back text of a stream, may stay before it counts as left
# over by a request that ended elsewhere (failed upstream, stream abandoned): the one TTL of per-request state.
STALE_SECONDS = 900.0


def server_root(server_pid: int) -> Path:
    """The context root of tritonserver `server_pid`'s stubs (keyed by their parent), in shared memory if there is."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"af3trt-context-{server_pid}"


def default_root() -> Path:
    return server_root(os.getppid())


class RequestContext:
    """Per-request entries as files under root. Every request crosses three of these calls (preprocess put, fusion
    update, postprocess get and drop), so they use os calls on precomputed paths: the root is made once, not per put."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else default_root()
        self._dir = str(self.root)
        self._made = False
        self._last_purge = 0.0

    def _path(self, request_id: str) -> Path:
        return self.root / hashlib.sha1(request_id.encode()).hexdigest()

    def _file(self, request_id: str) -> str:
        return f"{self._dir}/{hashlib.sha1(request_id.encode()).hexdigest()}"

    def _mkdir(self) -> None:
        if not self._made:
            os.makedirs(self._dir, exist_ok=True)
            self._made = True

    def put(self, request_id: str, data: dict) -> None:
        if not request_id:
            return
        self._mkdir()
        path = self._file(request_id)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except FileNotFoundError:  # the root was removed since (a test's tmp dir, a purge by hand): make it again
            self._made = False
            self._mkdir()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(data).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)  # a reader sees the old entry or the new one, never half of one
        self.purge()

    def update(self, request_id: str, **values) -> None:
        """Add keys to a request's entry (a later stage adding what it resolved, e.g. fusion's max_tokens and prompt length)."""
        if request_id:
            self.put(request_id, {**self.get(request_id), **values})

    def get(self, request_id: str) -> dict:
        if not request_id:
            return {}
        try:
            with open(self._file(request_id), "rb") as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            return {}

    def drop(self, request_id: str) -> None:
        if request_id:
            try:
                os.unlink(self._file(request_id))
            except FileNotFoundError:
                pass

    def _cancel_path(self, request_id: str) -> Path:
        return self._path(request_id).with_suffix(".cancelled")

    def cancel(self, request_id: str) -> None:
        """Mark a request cancelled by its client (kept until the decoder ends the request, or purged when stale)."""
        if request_id:
            self.root.mkdir(parents=True, exist_ok=True)
            self._cancel_path(request_id).touch()
            self.purge()

    def is_cancelled(self, request_id: str) -> bool:
        return bool(request_id) and self._cancel_path(request_id).exists()

    def clear_cancel(self, request_id: str) -> None:
        if request_id:
            self._cancel_path(request_id).unlink(missing_ok=True)

    def purge(self, older_than: float = STALE_SECONDS) -> None:
        """Remove entries of requests that never reached postprocess (failed upstream); at most once a minute."""
        now = time.time()
        if now - self._last_purge < 60 or not self.root.is_dir():
            return
        self._last_purge = now
        for p in self.root.iterdir():
            try:
                if now - p.stat().st_mtime > older_than:
                    p.unlink()
            except OSError:
                pass


class RunningRequests:
    """How many requests this python stub is working on (an execute in progress, or a decoder request still
    generating) and how many it has finished, kept as "<running> <finished>" in <root>/running/<model>.<pid> for the
    supervisor's drain (which tells a queue a live stub works through from one nobody serves by the second number).

        running = RunningRequests("encoder")
        with running.of(len(requests)): ...      # or running.add(+1) / running.add(-1) around async work

    The file is COUNT_WIDTH bytes, mapped into memory: add() stores the two counts as decimal text padded with spaces
    (a memory write, no system call: postprocess does it twice per streamed response), and a reader splits the file's
    text. A store is not atomic: stub_work reads the text until two reads agree.
    """

    COUNT_WIDTH = 40  # two 64-bit counts in decimal and a space

    def __init__(self, model: str, root: Path | None = None):
        import mmap

        self.path = (Path(root) if root else default_root()) / "running" / f"{model}.{os.getpid()}"
        self.n, self.finished, self._lock = 0, 0, threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # per stub: <model>.<pid>
        try:
            os.write(fd, b"0 0".ljust(self.COUNT_WIDTH))
            self._map = mmap.mmap(fd, self.COUNT_WIDTH)
        finally:
            os.close(fd)

    def add(self, k: int) -> None:
        with self._lock:
            self.n += k
            self.finished += max(0, -k)
            self._map[:] = f"{self.n} {self.finished}".encode().ljust(self.COUNT_WIDTH)

    def of(self, k: int) -> "_Of":
        """Context manager: k more requests while the block runs."""
        return _Of(self, k)


class _Of:
    __slots__ = ("running", "k")

    def __init__(self, running: RunningRequests, k: int):
        self.running, self.k = running, k

    def __enter__(self):
        self.running.add(self.k)

    def __exit__(self, *exc):
        self.running.add(-self.k)


def stub_work(server_pid: int, root: Path | None = None) -> dict[str, tuple[int, int]]:
    """{model: (requests its live stubs are working on, requests they have finished)} from the RunningRequests files
    of tritonserver `server_pid`'s stubs (their context root is keyed by their parent's pid); files of stubs that are
    gone are ignored and removed."""
    base = (Path(root) if root else server_root(server_pid)) / "running"
    out: dict[str, tuple[int, int]] = {}
    for f in base.glob("*.*") if base.is_dir() else []:
        model, _, pid = f.name.rpartition(".")
        if not pid.isdigit():
            continue
        if not alive(int(pid)):
            f.unlink(missing_ok=True)
            continue
        try:
            text, again = f.read_bytes(), None
            for _ in range(100):  # a store racing the read can mix two counts' digits (RunningRequests.add)
                if (again := f.read_bytes()) == text:
                    break
                text = again
            n, finished = (int(x) for x in text.split())
        except (OSError, ValueError):
            continue
        running, done = out.get(model, (0, 0))
        out[model] = (running + n, done + finished)
    return out


def running_requests(server_pid: int, root: Path | None = None) -> dict[str, int]:
    """{model: requests its live stubs are working on} (stub_work without the finished counts)."""
    return {model: n for model, (n, _) in stub_work(server_pid, root).items()}
