"""`af3trt soak --heal`: how long `af3trt serve` takes to start and to heal each stage, and where that time goes.

    af3trt soak --heal --model-repository OUT/model_repository [--rounds 3] [--out perf/results/latest]

Starts `af3trt serve` (perf/chaos.py Service), then, `--rounds` times in turn, SIGKILLs each python stub and
tritonserver on a server with no requests in flight and waits until it answers again: Triton ready, the front up and
a liveness probe through the ensemble answered, probes sent every 0.1 s side by side (first_answer). For each it
records the time from the signal to that answer and the launcher's own phases (serve.log: a stub's unload and load; a
restart's kill, start and each model's load, from tritonserver's log). The start of each stage is taken apart too:
the CPU seconds each process spent from its start until the server answered (/proc/PID/stat utime + stime; stubs
tritonserver reaped, the launcher and the OpenAI front too), which depend much less on how loaded the machine is,
beside the wall seconds, which do. heal.md and
heal.json hold the figures with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from af3trt.perf.chaos import Service, heal_lines
from af3trt.build.tables import Column, markdown_table
from af3trt.runtime.host import proc



def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used; None when it is gone (runtime/host/proc.py)."""
    try:
        return proc.cpu_seconds(pid) if pid is not None else None
    except ProcessLookupError:
        return None


HEALS = [Column("SIGKILL of", "target"),
         Column("heals", lambda s: f"{s['n']}" + (f" ({s['unhealed']} not answering)" if s.get("unhealed") else "")),
         Column("to answering again, median (max) s", lambda s: f"{s['median_s']:.1f} ({s['max_s']:.1f})"),
         Column("load", "load_median", "{:.1f}"),
         Column("launcher: unload / load s", lambda s: f"{s['unload_s']:.1f} / {s['load_s']:.1f}" if "load_s" in s
                else "—"),
         Column("launcher: kill / start s", lambda s: f"{s['kill_s']:.2f} / {s['start_s']:.1f}" if "start_s" in s
                else "—"),
         Column("model loads in the restart (median s)",
                lambda s: ", ".join(f"{m} {v:.1f}" for m, v in s.get("model_loads_s", {}).items()) or "—")]


def reaped_cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds of the children a process has reaped (/proc/PID/stat fields 16 and 17, cutime + cstime): for
    tritonserver, the stubs that ended before it was ready (with auto-complete on, the python backend started and
    ended one per model load, runtime/serve/server.py); None when it is gone."""
    fields = proc.stat(pid) if pid is not None else None
    return None if fields is None else (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")

START = [Column("process", "process"),
         Column("load in tritonserver's log, s", lambda r: "—" if r.get("load_s") is None else f"{r['load_s']:.1f}"),
         Column("CPU s from its start to healthy", "cpu_s", "{:.2f}")]


def start_cpu(service: Service, launcher: bool = False) -> dict[str, float]:
    """{process: CPU seconds since it started}: tritonserver, the stubs it reaped, and each live stub, right after a
    start or restart answered; `launcher`: also `af3trt serve` itself and its OpenAI front (a cold start)."""
    from af3trt.runtime.host.proc import stub_pids

    triton = service.pid_of("tritonserver")
    out = {"tritonserver": cpu_seconds(triton), "reaped stubs": reaped_cpu_seconds(triton)}
    for model, pids in sorted(stub_pids(triton).items()):
        out[model] = cpu_seconds(min(pids))
    if launcher:
        out["launcher"], out["openai front"] = cpu_seconds(service.proc.pid), cpu_seconds(service.pid_of("openai"))
    return {k: round(v, 2) for k, v in out.items() if v is not None}


def first_answer(service: Service, t0: float, timeout: float, every_s: float = 0.1) -> float | None:
    """Seconds from t0 until a probe first got its answer (Service.healthy: Triton ready, the front, one token through
    the ensemble); None when none did within `timeout`. A probe goes out every `every_s`, each on a thread of its
    own: one sent to a dead python stub fails only after about a second (the python backend's timed wait on that
    stub's health), so probing one at a time counted that second into every heal (seen: fusion back after 0.3 s in
    the launcher's log, answering again after 1.4 s)."""
    answered: list[float] = []
    done = threading.Event()

    def probe() -> None:
        if service.healthy(probe_deadline_s=30.0):
            answered.append(time.monotonic() - t0)
            done.set()

    probes = []
    while not done.wait(every_s) and time.monotonic() - t0 < timeout:
        probes.append(threading.Thread(target=probe, name="af3trt-heal-probe", daemon=True))
        probes[-1].start()
    for th in probes:  # none left to load the server when the next stage is killed
        th.join(60)
    return min(answered, default=None)


def heal_once(service: Service, target: str, timeout: float = 600.0) -> dict:
    pid = service.pid_of(target)
    lines_before = len(service.log.read_text(errors="replace").splitlines())
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    seconds = first_answer(service, t0, timeout)
    deadline = time.monotonic() + 10.0  # the launcher logs its heal just after readiness: a probe may answer first
    while True:
        launcher = heal_lines("\n".join(service.log.read_text(errors="replace").splitlines()[lines_before:]))
        if launcher["reload"] or launcher["restart"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    out = {"target": target, "seconds": None if seconds is None else round(seconds, 2), "launcher": launcher,
           "load": round(os.getloadavg()[0], 1)}
    if target in ("decoder", "tritonserver"):
        out["cpu_s"] = start_cpu(service)
    return out


def run(repo: Path, out: Path, rounds: int = 3, targets=("preprocess", "encoder", "fusion", "postprocess", "decoder",
                                                          "tritonserver"), log=print) -> dict:
    logs = Path(tempfile.mkdtemp(prefix="af3trt-heal-"))
    service = Service(repo, logs / "serve", liveness=(10.0, 20.0, 3))
    try:
        first = heal_lines(service.log.read_text(errors="replace"))
        start = {"seconds_to_healthy": round(service.start_s, 2), "cpu_s": start_cpu(service, launcher=True),
                 "launcher": first["start"], "load": round(os.getloadavg()[0], 1)}
        log(f"[heal] start: {start}")
        heals = []
        for r in range(rounds):
            for target in targets:
                h = heal_once(service, target)
                heals.append(h)
                log(f"[heal] round {r + 1}: {target} healed after {h['seconds']} s (load {h['load']})")
                time.sleep(2.0)
    finally:
        stopped = service.stop()
    res = {"repo": str(repo), "rounds": rounds, "cpus": os.cpu_count(),
           "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "start": start, "heals": heals,
           "stopped": stopped, "summary": summarize(heals)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "heal.json").write_text(json.dumps(res, indent=1))
    (out / "heal.md").write_text(report_md(res))
    return res


def summarize(heals: list[dict]) -> dict:
    out = {}
    for target in dict.fromkeys(h["target"] for h in heals):
        hs = [h for h in heals if h["target"] == target]
        secs = [h["seconds"] for h in hs if h["seconds"] is not None]  # None: not answering within the timeout
        s = {"n": len(hs), "unhealed": len(hs) - len(secs),
             "median_s": float(np.median(secs)) if secs else float("nan"), "max_s": max(secs, default=float("nan")),
             "load_median": float(np.median([h["load"] for h in hs]))}
        reloads = [r for h in hs for r in h["launcher"]["reload"]]
        restarts = [r for h in hs for r in h["launcher"]["restart"]]
        if reloads:
            s["unload_s"] = float(np.median([r["unload_s"] for r in reloads]))
            s["load_s"] = float(np.median([r["load_s"] for r in reloads]))
        if restarts:
            s["kill_s"] = float(np.median([r["kill_s"] for r in restarts]))
            s["start_s"] = float(np.median([r["start_s"] for r in restarts]))
            models = {m for r in restarts for m in r["model_loads_s"]}
            s["model_loads_s"] = {m: float(np.median([r["model_loads_s"][m] for r in restarts
                                                       if m in r["model_loads_s"]])) for m in sorted(models)}
            cpus = [h["cpu_s"] for h in hs if "cpu_s" in h]
            s["cpu_s"] = {k: float(np.median([c[k] for c in cpus if k in c])) for k in cpus[0]} if cpus else {}
        out[target] = s
    return out


def report_md(res: dict) -> str:
    st = res["start"]
    loads = st["launcher"][0]["model_loads_s"] if st["launcher"] else {}
    rows = [{"process": k, "load_s": loads.get(k), "cpu_s": v} for k, v in st["cpu_s"].items()]
    when = (f", measured {res['measured_at']} on {res['cpus']} CPUs" if "cpus" in res else "") + (
        f" ({res['code']})" if "code" in res else "")
    lines = [f"# Start and heal times per stage (`af3trt soak --heal`, {res['rounds']} rounds)", "",
             f"Build `{res['repo']}`{when}. Wall seconds depend on the machine's load (the load average is beside each "
             f"figure: this machine's 2 cores were shared with other work); CPU seconds (utime + stime of each "
             f"process from its start until the server answered, one probe included) depend on it much less "
             f"(not at all only on an idle machine: the cores share caches).", "",
             f"- start: healthy (ready, a probe answered, the front up) {st['seconds_to_healthy']} s after launch at "
             f"load {st['load']}; tritonserver {st['launcher'][0]['seconds'] if st['launcher'] else '?'} s to ready; "
             f"model loads " + (", ".join(f"{m} {s} s" for m, s in st["launcher"][0]["model_loads_s"].items())
                                if st["launcher"] else "?"),
             "", "Start, per process (\"reaped stubs\": stubs tritonserver started and ended before it was ready):", "",
             *markdown_table(START, rows), "",
             f"Heals: each stage SIGKILLed in turn, no requests in flight, {res['rounds']} rounds; from the signal to a "
             f"liveness probe answered through the ensemble.", "",
             *markdown_table(HEALS, [{"target": t, **s} for t, s in res["summary"].items()])]
    cpus = {t: s["cpu_s"] for t, s in res["summary"].items() if s.get("cpu_s")}
    if cpus:
        lines += ["", "CPU seconds of each process of a restarted tritonserver, from its start until it answered (median): "
                  + "; ".join(f"after {t}: " + ", ".join(f"{k} {v:.2f}" for k, v in c.items())
                              for t, c in cpus.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt soak --heal", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heal", action="store_true", help="(this mode)")
    ap.add_argument("--model-repository", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("perf/results/heal"))
    args = ap.parse_args(argv)
    res = run(args.model_repository.resolve(), args.out, args.rounds)
    print(report_md(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
