"""Long-form transcription benchmark: one long spoken file (default 1 hour) through /v1/audio/transcriptions with
chunking_strategy "auto", against `af3trt serve --openai-port` on a model repository (the tiny CPU build by default).

    python -m af3trt.perf.longform --model-repository out/af3-tiny/model_repository --seconds 3600 \
        --out perf/results/latest

The file: espeak-ng sentences with 0.4-1.6 s pauses (perf/clips.py talk), written as Ogg Vorbis to a temporary
folder (never committed). Reported: wall time of the one request, RTFx (audio seconds / wall seconds), segments,
and the peak RSS (VmHWM) of each server process — the OpenAI front (which decodes and cuts the upload), tritonserver
and its python stubs — read from /proc before the server stops. Writes longform.json and longform.md to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import soundfile as sf

from af3trt.build.tables import Column, markdown_table
from af3trt.perf import clips
from af3trt.runtime.batch import Served
from af3trt.runtime.host.proc import children, cmdline, peak_rss_mb, stub_names


def server_peaks(serve_pid: int) -> dict[str, float]:
    """{process: peak RSS MB} under `af3trt serve`: the OpenAI front, tritonserver, each python stub."""
    out = {}
    for pid in children(serve_pid):
        cmd = " ".join(cmdline(pid))
        if "openai_server" in cmd:
            out["openai front"] = peak_rss_mb(pid)
        elif "tritonserver" in cmd:
            out["tritonserver"] = peak_rss_mb(pid)
            out.update({f"stub {name}": peak_rss_mb(p) for name, p in stub_names(pid).items()})
    return out


PEAKS = [Column("process"), Column("peak RSS at start (MB)", "start", "{:.0f}"),
         Column("peak RSS after (MB)", "after", "{:.0f}")]


def render(r: dict) -> str:
    """longform.md of a longform.json record."""
    peaks = [{"process": k, "start": r["peak_rss_mb_at_start"].get(k, 0), "after": v}
             for k, v in r["peak_rss_mb"].items()]
    return "\n".join([
        f"# Long-form transcription: {r['audio_seconds'] / 3600:.2f} h of espeak-ng speech, one request", "",
        f"chunking_strategy auto, verbose_json; {r['segments']} segments (longest {r['longest_segment_s']} s); "
        f"transcription concurrency {r['concurrency']}; upload {r['upload_mb']} MB Ogg Vorbis; "
        f"model repository {r['repository']} (CPU).", "",
        f"- wall time: {r['wall_s']:.1f} s", f"- RTFx: {r['rtfx']}", "", *markdown_table(PEAKS, peaks)]) + "\n"


def main(argv=None) -> int:
    import httpx

    ap = argparse.ArgumentParser(prog="python -m af3trt.perf.longform", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-repository", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=3600.0, help="length of the spoken file")
    ap.add_argument("--concurrency", type=int, default=4, help="the server's --transcription-concurrency")
    ap.add_argument("--out", type=Path, default=Path("perf/results/latest"))
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    wave, sentences = clips.talk(args.seconds, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="af3trt-longform-"))
    path = tmp / "talk.ogg"
    with sf.SoundFile(path, "w", clips.SR, 1, format="OGG", subtype="VORBIS") as f:  # libsndfile 1.2 crashed on
        for i in range(0, len(wave), 10 * clips.SR):  # one hour written at once (seen): 10-s blocks
            f.write(wave[i:i + 10 * clips.SR])
    del wave
    made_s = time.monotonic() - t0
    size = path.stat().st_size
    print(f"{args.seconds:.0f} s of speech ({len(sentences)} sentences), {size / 2**20:.1f} MB Ogg Vorbis, "
          f"made in {made_s:.0f} s", flush=True)

    served = Served(args.model_repository.resolve(), 300, [
        "--max-upload-bytes", str(max(64 * 2**20, 2 * size)), "--transcription-concurrency", str(args.concurrency)])
    try:
        before = server_peaks(served.proc.pid)
        t1 = time.monotonic()
        with open(path, "rb") as f:
            r = httpx.post(served.url + "/v1/audio/transcriptions", timeout=None,
                           files={"file": ("talk.ogg", f, "audio/ogg")},
                           data={"model": "af3", "chunking_strategy": "auto", "response_format": "verbose_json",
                                 "timestamp_granularities[]": "segment"})
        wall = time.monotonic() - t1
        peaks = server_peaks(served.proc.pid)
    finally:
        served.stop()
    r.raise_for_status()
    body = r.json()
    segs = body["segments"]
    result = {
        "audio_seconds": body["duration"], "upload_mb": round(size / 2**20, 2), "wall_s": round(wall, 1),
        "rtfx": round(body["duration"] / wall, 1), "segments": len(segs),
        "longest_segment_s": round(max(s["end"] - s["start"] for s in segs), 2),
        "transcript_chars": len(body["text"]), "concurrency": args.concurrency,
        "peak_rss_mb": {k: round(v, 1) for k, v in peaks.items()},
        "peak_rss_mb_at_start": {k: round(v, 1) for k, v in before.items()},
        "repository": str(args.model_repository),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "longform.json").write_text(json.dumps(result, indent=1))
    (args.out / "longform.md").write_text(render(result))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
