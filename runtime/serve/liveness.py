"""Liveness that means a request gets through: one tiny inference through the ensemble, with a deadline.

    af3trt probe [--url 127.0.0.1:8001] [--deadline-s 20] [--status-file F]   exit 0: an answer came in time; 1: not

Triton's /v2/health/ready (and /v2/health/live) answer 200 while a stage is wedged: seen here, a SIGSTOPped decoder
stub leaves readiness at 200 while every request fails "Stub process 'decoder_0_0' is not healthy" for ever, and
upstream reports tritonserver wedged with readiness green (triton-inference-server/server #8841, open) and aborts in
its heap under per-token streaming (#7517; tensorrtllm_backend #587). So liveness here is an answer: the bundled
speech clip (the same bytes every time, so the preprocess and encoder caches answer it after the first probe) with
max_tokens 1 and a deadline on the whole request (the server cancels it past the deadline too). A busy answer (a
queue full: Triton's queue policy or the decoder's) is a live server that answered; every other error, no answer
in time, or a refused connection is not. The launcher's watchdog (runtime/serve/supervisor.py) probes this way and
restarts tritonserver after `failures` failed probes in a row; the Kubernetes liveness probe runs `af3trt probe`
(deploy/base/deployment.yaml), which restarts the container when the launcher could not heal it.

The OpenAI front's liveness is an answer to GET /live within the deadline (it does not ask Triton, so a front is
never restarted for its Triton's sake): a wedged front (SIGSTOP) answers nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

DEADLINE_S = 20.0  # one token for a cached clip takes well under a second on an idle CPU; margin for a loaded one
PERIOD_S = 10.0
FAILURES = 3  # failed probes in a row before the launcher restarts tritonserver


@lru_cache(maxsize=1)
def probe_clip() -> bytes:
    """The probe's audio: the bundled speech clip, the same bytes every time (cached by the server after once)."""
    from af3trt.runtime import assets

    return assets.speech_path().read_bytes()


def probe_triton(url: str, deadline_s: float = DEADLINE_S, client=None) -> str | None:
    """None when one request with the probe clip and max_tokens 1 got its whole answer (or a busy answer) within
    deadline_s; else why not, in a few words. `client`: an AF3Client to send it with (a private connection of its
    own otherwise, closed after)."""
    from af3trt.runtime.client.library import AF3Busy, AF3Client, AF3Error

    own = client is None
    client = AF3Client(url, timeout=deadline_s, private_connection=True) if own else client
    try:
        answer = client.ask("What is said?", [probe_clip()], max_tokens=1, deadline_s=deadline_s, stream=False)
        return None if answer.token_ids else "an answer without a token"
    except AF3Busy:
        return None  # a full queue answered: the server is working
    except AF3Error as e:
        return str(e)[:300]
    finally:
        if own:
            client.close()


def probe_http(url: str, deadline_s: float = DEADLINE_S) -> str | None:
    """None when GET `url` answered with any HTTP status within deadline_s; else why not."""
    try:
        with urllib.request.urlopen(url, timeout=deadline_s):
            return None
    except urllib.error.HTTPError:
        return None  # an answer (503: Triton not ready behind it) from a front that runs
    except OSError as e:
        return f"no answer from {url} within {deadline_s:g} s: {e}"


def write_status(path: Path | None, healing: str | None, until_s: float = 0.0) -> None:
    """The launcher's status for `af3trt probe --status-file`: what it is healing and until when it may take (a
    restart of tritonserver on a GPU loads the engines again, minutes); written whole, then renamed into place."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"healing": healing, "until": time.time() + until_s if healing else 0.0}))
    os.replace(tmp, path)


def healing(path: Path | None) -> str | None:
    """What the launcher says it is healing now (None: nothing, no status file, or past the time it allowed)."""
    try:
        status = json.loads(Path(path).read_text())
    except (OSError, TypeError, ValueError):
        return None
    return status.get("healing") if status.get("until", 0) > time.time() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="127.0.0.1:8001", help="tritonserver's gRPC address")
    ap.add_argument("--deadline-s", type=float, default=DEADLINE_S, help="the whole answer must come within this")
    ap.add_argument("--status-file", type=Path, default=None,
                    help="`af3trt serve --status-file`: a failed probe still passes while the launcher says it is "
                         "restarting tritonserver (within its start timeout), so the orchestrator does not kill a "
                         "heal in progress")
    args = ap.parse_args(argv)
    why = probe_triton(args.url, args.deadline_s)
    if why is None:
        print("live: an answer came back", flush=True)
        return 0
    if (what := healing(args.status_file)) is not None:
        print(f"live: no answer ({why}), but af3trt serve is healing: {what}", flush=True)
        return 0
    print(f"not live: {why}", flush=True)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
