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

# How long a request's entry here, or postprocess's held-back text of a stream, may stay before it counts as left
# over by a request that ended elsewhere (failed upstream, stream abandoned): the one TTL of per-request state.
STALE_SECONDS = 900.0


def default_root() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"af3trt-context-{os.getppid()}"


class RequestContext:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else default_root()
        self._last_purge = 0.0

    def _path(self, request_id: str) -> Path:
        return self.root / hashlib.sha1(request_id.encode()).hexdigest()

    def put(self, request_id: str, data: dict) -> None:
        if not request_id:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(request_id)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
        self.purge()

    def update(self, request_id: str, **values) -> None:
        """Add keys to a request's entry (a later stage adding what it resolved, e.g. fusion's max_tokens and prompt length)."""
        if request_id:
            self.put(request_id, {**self.get(request_id), **values})

    def get(self, request_id: str) -> dict:
        if not request_id:
            return {}
        try:
            return json.loads(self._path(request_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def drop(self, request_id: str) -> None:
        if request_id:
            self._path(request_id).unlink(missing_ok=True)

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
    """

    def __init__(self, model: str, root: Path | None = None):
        self.path = (Path(root) if root else default_root()) / "running" / f"{model}.{os.getpid()}"
        self.n, self.finished, self._lock = 0, 0, threading.Lock()
        self.add(0)

    def add(self, k: int) -> None:
        with self._lock:
            self.n += k
            self.finished += max(0, -k)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")  # per stub: two instances of a model write apart
            tmp.write_text(f"{self.n} {self.finished}")
            tmp.replace(self.path)

    def of(self, k: int):
        """Context manager: k more requests while the block runs."""
        running = self

        class _Of:
            def __enter__(self):
                running.add(k)

            def __exit__(self, *exc):
                running.add(-k)

        return _Of()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def stub_work(server_pid: int, root: Path | None = None) -> dict[str, tuple[int, int]]:
    """{model: (requests its live stubs are working on, requests they have finished)} from the RunningRequests files
    of tritonserver `server_pid`'s stubs (their context root is keyed by their parent's pid); files of stubs that are
    gone are ignored and removed."""
    base = (Path(root) if root else default_root().with_name(f"af3trt-context-{server_pid}")) / "running"
    out: dict[str, tuple[int, int]] = {}
    for f in base.glob("*.*") if base.is_dir() else []:
        model, _, pid = f.name.rpartition(".")
        if not pid.isdigit():
            continue
        if not _alive(int(pid)):
            f.unlink(missing_ok=True)
            continue
        try:
            n, finished = (int(x) for x in f.read_text().split())
        except (OSError, ValueError):
            continue
        running, done = out.get(model, (0, 0))
        out[model] = (running + n, done + finished)
    return out


def running_requests(server_pid: int, root: Path | None = None) -> dict[str, int]:
    """{model: requests its live stubs are working on} (stub_work without the finished counts)."""
    return {model: n for model, (n, _) in stub_work(server_pid, root).items()}
