"""Structured output on the CPU (issue 29, item 5): what a guide costs, and which grammar engine to use.

    python -m af3trt.perf.structured --out perf/results/latest      # writes structured.json and structured.md

Two parts, one run each:

1. Grammar engines at AF3's vocabulary size: xgrammar (the one TensorRT-LLM 1.2's C++ runtime runs) and llguidance,
   on a synthetic byte-level vocabulary of 151,672 tokens (AF3's text vocab_size; the real tokenizer is not on this
   machine: 256 byte symbols, 2- and 3-letter strings, numbers, JSON punctuation and random words, with and without a
   leading space, and AF3's special tokens). Per schema: the time to compile it (once per distinct guide: the engine
   caches it), and the time to compute one token's mask while following a fixed answer token by token (median, mean
   and max over its tokens), both engines compiled for compact JSON (", " and ": "). Plus the cost of applying a mask
   to [B, 151672] float32 logits (xgrammar's CPU kernel).
2. The CPU decoder (runtime/engines/decoder.py) on the `af3` preset (perf/decode_step.py's LM, about 37M parameters;
   its vocabulary is the synthetic tokenizer's, a few hundred tokens, recorded by the run), fp32, one continuous batch of B requests of a 300-token prompt decoding `steps` tokens:
   tokens per second of decode without a guide and with a JSON schema (one string field of up to 2,000 characters,
   so that no guided row ends before `steps`), unguided and guided batches interleaved `repeats` times (median and
   range), and the share of the decode time spent on masks (the engine's guide_seconds / decode_seconds).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import sys
import threading
import time
from pathlib import Path

import numpy as np

from af3trt.build.tables import Column, markdown_table

AF3_VOCAB = 151672  # AF3's text vocab_size (platform facts), the width of its logits
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *[f"<|extra_{i}|>" for i in range(23)], "<sound>",
            "<|sound_bos|>", "<|sound_eos|>"]
SCHEMAS = {  # name → (schema, an answer that follows it, written compact)
    "choice of 4": ({"type": "object", "properties": {"answer": {"enum": ["A", "B", "C", "D"]}},
                     "required": ["answer"]}, {"answer": "C"}),
    "caption + tags": ({"type": "object", "properties": {"caption": {"type": "string"}, "tags": {
        "type": "array", "items": {"type": "string"}}, "confidence": {"type": "number"}},
        "required": ["caption", "tags", "confidence"]},
        {"caption": "a dog barks twice near a busy road while cars pass by", "tags": ["dog", "traffic", "outdoor"],
         "confidence": 0.87}),
    "sound events": ({"type": "object", "properties": {"speaker": {"type": "string"}, "events": {
        "type": "array", "items": {"type": "object", "properties": {"start": {"type": "number"}, "end": {
            "type": "number"}, "label": {"type": "string"}}, "required": ["start", "end", "label"]}}},
        "required": ["speaker", "events"]},
        {"speaker": "female adult", "events": [{"start": 0.5, "end": 1.75, "label": "speech"},
                                               {"start": 2.0, "end": 3.5, "label": "door closes"}]}),
}
LONG_STRING = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 2000}}, "required": ["text"]}


def synthetic_tokenizer(n: int = AF3_VOCAB, seed: int = 0):
    """A byte-level BPE `tokenizers.Tokenizer` of exactly n tokens (n - specials learned-looking ones, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    rng = random.Random(seed)
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    words = {a + b for a in string.ascii_lowercase for b in string.ascii_lowercase}
    words |= {w + c for w in list(words) for c in string.ascii_lowercase}
    words |= {str(i) for i in range(1000)} | {'{"', '":', '",', '"}', '":"', " {", "},", "[", "],", "true", "false"}
    while len(words) < 2 * n:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.choice([4, 5, 6, 7, 8, 10, 12]))))
    for w in sorted(words, key=lambda _: rng.random()):
        if len(vocab) >= n - len(SPECIALS):
            break
        u = rng.random()
        vocab.setdefault(w if u < 0.4 else "Ġ" + (w if u < 0.85 else w.capitalize()), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() == n, tok.get_vocab_size()
    return tok


def _stats_us(seconds: list[float]) -> dict:
    return {"median_us": 1e6 * statistics.median(seconds), "mean_us": 1e6 * statistics.mean(seconds),
            "max_us": 1e6 * max(seconds), "tokens": len(seconds)}


def measure_engines(tok, tok_path: Path) -> dict:
    """Compile time and per-token mask time of each schema, for xgrammar and llguidance (module docstring, part 1)."""
    import llguidance
    import llguidance.torch as llt
    import torch
    import xgrammar as xgr

    from af3trt.runtime.engines.grammar import tokenizer_info

    eos = tok.token_to_id("<|im_end|>")
    from importlib.metadata import version

    out = {"xgrammar": {"version": version("xgrammar"), "schemas": {}},
           "llguidance": {"version": version("llguidance"), "schemas": {}}}
    t0 = time.perf_counter()
    info = tokenizer_info(tok_path, AF3_VOCAB, (eos,))
    out["xgrammar"]["tokenizer_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok.to_str(), n_vocab=AF3_VOCAB, eos_token=eos)
    out["llguidance"]["tokenizer_s"] = time.perf_counter() - t0
    for name, (schema, answer) in SCHEMAS.items():
        ids = tok.encode(json.dumps(answer), add_special_tokens=False).ids  # ", " and ": ", as both compile it
        comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        t0 = time.perf_counter()
        compiled = comp.compile_json_schema(json.dumps(schema), any_whitespace=False)
        compile_s = time.perf_counter() - t0
        m, bm, per = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, AF3_VOCAB), []
        for tid in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(bm)
            per.append(time.perf_counter() - t0)
            assert m.accept_token(tid), (name, tid)
        out["xgrammar"]["schemas"][name] = {"compile_ms": 1e3 * compile_s, **_stats_us(per)}

        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        t0 = time.perf_counter()
        lm = llguidance.LLMatcher(lt, grammar)
        bm = llt.allocate_token_bitmask(1, AF3_VOCAB)
        llt.fill_next_token_bitmask(lm, bm, 0)  # llguidance compiles lazily: its first mask is part of compiling
        compile_s = time.perf_counter() - t0
        assert not lm.get_error(), lm.get_error()
        lm, per = llguidance.LLMatcher(lt, grammar), []
        for tid in ids:
            t0 = time.perf_counter()
            llt.fill_next_token_bitmask(lm, bm, 0)
            per.append(time.perf_counter() - t0)
            assert lm.consume_token(tid), (name, tid, lm.get_error())
        out["llguidance"]["schemas"][name] = {"compile_ms": 1e3 * compile_s, **_stats_us(per)}
    apply = {}
    for batch in (1, 8):
        logits, mask = torch.randn(batch, AF3_VOCAB), xgr.allocate_token_bitmask(batch, AF3_VOCAB)
        mask[:, ::3] = 0
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            xgr.apply_token_bitmask_inplace(logits, mask)
            times.append(time.perf_counter() - t0)
        apply[batch] = 1e6 * statistics.median(times)
    out["apply_mask_us"] = apply
    return out


def measure_decoder(lm_dir: str, batches: list[int], prompt: int, steps: int, threads: int,
                    repeats: int) -> list[dict]:
    """Decode tokens/s without and with a guide (module docstring, part 2): per batch size a warm-up pair, then
    `repeats` pairs, unguided and guided interleaved (a neighbour's load falls on both alike); the median and range."""
    from af3trt.runtime.engines.decoder import DecoderEngine, GenerationRequest
    from af3trt.runtime.stages.guided import Guide

    guide = Guide("json_schema", json.dumps(LONG_STRING))
    rng = np.random.default_rng(0)
    rows = []
    with DecoderEngine(Path(lm_dir), max_batch_size=max(batches), threads=threads) as eng:
        end_id = eng.eos_ids[0]
        vocab = eng.vocab_size

        def one_batch(batch: int, guided: bool) -> dict:
            before = dict(eng.stats)
            done, queued = threading.Semaphore(0), threading.Event()
            for i in range(batch):
                ids = rng.integers(0, eng.vocab_size - 64, prompt).astype(np.int32)
                req = GenerationRequest(input_ids=ids, max_new_tokens=steps, end_id=end_id if guided else None,
                                        guide=guide if guided else None)
                eng.submit(req, lambda new, final: final and done.release(),
                           cancelled=(lambda: not queued.wait(60)) if i == 0 else None)
            queued.set()
            for _ in range(batch):
                assert done.acquire(timeout=1200)
            return {k: eng.stats[k] - before[k] for k in ("decode_seconds", "decode_rows", "guide_seconds")}

        for batch in batches:
            one_batch(batch, False), one_batch(batch, True)  # warm-up
            runs = {False: [], True: []}
            for _ in range(repeats):
                for guided in (False, True):
                    runs[guided].append(one_batch(batch, guided))
            for guided, rs in runs.items():
                tps = [d["decode_rows"] / d["decode_seconds"] for d in rs]
                rows.append({"batch": batch, "guided": guided, "vocab_size": vocab,
                             "decode_tokens_per_s": statistics.median(tps),
                             "min": min(tps), "max": max(tps),
                             "guide_share": sum(d["guide_seconds"] for d in rs) / sum(d["decode_seconds"] for d in rs),
                             "guide_us_per_row": 1e6 * sum(d["guide_seconds"] for d in rs)
                             / max(sum(d["decode_rows"] for d in rs), 1)})
    return rows


ENGINES = [Column("engine"), Column("schema"), Column("compile ms", "compile_ms", "{:.1f}"),
           Column("mask µs/token median", "median_us", "{:.1f}"), Column("mean", "mean_us", "{:.1f}"),
           Column("max", "max_us", "{:.1f}"), Column("tokens")]


def decoder_columns(repeats: int) -> list[Column]:
    return [Column("batch"), Column("guide", "guided", lambda v: "JSON schema" if v else "none"),
            Column(f"decode tokens/s (median of {repeats})", "decode_tokens_per_s", "{:.1f}"),
            Column("min-max", lambda row: f"{row['min']:.1f}-{row['max']:.1f}"),
            Column("share of decode time in masks", "guide_share", lambda v: f"{100 * v:.1f} %"),
            Column("mask µs per row per step", "guide_us_per_row", "{:.0f}")]


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Structured output on the CPU ({r['started_utc']})", "",
             f"{m.get('cpu', {}).get('Model name', '?')}, {m.get('logical_cpus', '?')} CPUs: 2 cores shared with other "
             f"sessions while this ran (load average {r['load_average_start']} at start, {r['load_average_end']} at "
             f"end); one run of each figure. Commit {m.get('commit', '?')}.", "",
             f"## Grammar engines at AF3's vocabulary ({AF3_VOCAB:,} tokens, synthetic byte-level vocabulary)", "",
             *markdown_table(ENGINES, [{"engine": f"{engine} {r['engines'][engine]['version']}", "schema": name, **s}
                                       for engine in ("xgrammar", "llguidance")
                                       for name, s in r["engines"][engine]["schemas"].items()])]
    lines += ["", f"Tokenizer set-up: xgrammar {r['engines']['xgrammar']['tokenizer_s']:.2f} s, llguidance "
                  f"{r['engines']['llguidance']['tokenizer_s']:.2f} s (once per process). Applying a mask to "
                  f"float32 logits [B, {AF3_VOCAB:,}] (xgrammar's CPU kernel): "
                  + ", ".join(f"B={b}: {us:.0f} µs" for b, us in r["engines"]["apply_mask_us"].items()) + ".",
              "", f"## CPU decoder, `{r['preset']}` preset ({r['decoder'][0]['vocab_size']}-token vocabulary), fp32, "
                  f"{r['threads']} threads, {r['prompt']}-token prompts, {r['steps']} tokens each", "",
              *markdown_table(decoder_columns(r["repeats"]), r["decoder"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m af3trt.perf.structured", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/af3trt-structured"))
    ap.add_argument("--preset", default="af3")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from af3trt.perf import machine
    from af3trt.perf.decode_step import prepare

    args.work.mkdir(parents=True, exist_ok=True)
    result = {"started_utc": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), "preset": args.preset,
              "prompt": args.prompt, "steps": args.steps, "threads": args.threads, "repeats": args.repeats,
              "machine": machine.describe(Path(__file__).resolve().parent.parent),
              "load_average_start": machine.load_average()}
    tok = synthetic_tokenizer()
    tok_path = args.work / "tokenizer.json"
    tok.save(str(tok_path))
    result["engines"] = measure_engines(tok, tok_path)
    lm_dir, _ = prepare(args.work, args.preset, ["fp32"])["fp32"]
    result["decoder"] = measure_decoder(lm_dir, [int(b) for b in args.batches.split(",")], args.prompt, args.steps,
                                        args.threads, args.repeats)
    result["load_average_end"] = machine.load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.json").write_text(json.dumps(result, indent=1))
    (args.out / "structured.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
