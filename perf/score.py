"""`af3trt score OUTPUT.jsonl --key KEY.json`: multiple-choice accuracy of a batch run (af3trt batch), overall and
per category, scored the way MMAU and MMAR score.

The answer is matched as both benchmarks' evaluation scripts do (Sakshi113/MMAU evaluation.py, ddlBoJack/MMAR
code/evaluation.py, the same `string_match` in both, read 2026-12-01): the prediction and each choice are lower-cased
and cut into word tokens (regex \\b\\w+\\b, as sets); a prediction is right when it contains every token of the
answer and none of the tokens that only wrong choices have (a choice's tokens minus the answer's); an empty
prediction is wrong. Categories: every category field the key has — MMAU's task, difficulty and sub-category,
MMAR's modality, category and sub-category — each reported value by value, as their scripts print them.

The key: a JSON list (MMAU's mmau-test-mini.json) or JSON lines (MMAR's MMAR-meta.jsonl) of items with "id"
(= the batch line's custom_id), "choices" and "answer". A key item with no output line, or whose line is an error,
counts as wrong and is reported as having no prediction (MMAU's script skips items without output; we count them,
so a partly failed run cannot look better than it is).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

CATEGORY_FIELDS = ("task", "difficulty", "modality", "category", "sub-category")


def tokens(text: str) -> set[str]:
    return set(re.findall(r"\b\w+\b", text.lower()))


def matches(answer: str, prediction: str, choices: list[str]) -> bool:
    """MMAU/MMAR's rule: every answer token in the prediction, no token only a wrong choice has."""
    said, right = tokens(prediction), tokens(answer)
    if not said:
        return False
    wrong: set[str] = set()
    for choice in choices:
        t = tokens(choice)
        if t != right:
            wrong |= t - right
    return right <= said and said.isdisjoint(wrong)


def prediction(line: dict) -> str | None:
    """The answer text of a batch output line: the chat message's content (or a transcription's text); None for an
    error line or an HTTP error."""
    resp = line.get("response") or {}
    body = resp.get("body")
    if line.get("error") or resp.get("status_code") != 200 or not isinstance(body, dict):
        return None
    if "choices" in body:
        return (body["choices"][0].get("message") or {}).get("content") or ""
    return body.get("text")


def read_key(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    items = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    for i, item in enumerate(items):
        missing = [k for k in ("id", "choices", "answer") if k not in item]
        if missing:
            raise ValueError(f"{path}: item {i} lacks {', '.join(missing)}")
    return items


def score(outputs: dict[str, str | None], key: list[dict]) -> dict:
    """{"total", "correct", "accuracy", "no_prediction", "by": {field: {value: {"correct", "total", "accuracy"}}}}."""
    by: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    correct = missing = 0
    for item in key:
        said = outputs.get(item["id"])
        missing += said is None
        ok = said is not None and matches(item["answer"], said, item["choices"])
        correct += ok
        for f in CATEGORY_FIELDS:
            if item.get(f) is not None:
                cell = by[f][str(item[f])]
                cell[0] += ok
                cell[1] += 1
    total = len(key)

    def acc(c: int, n: int) -> float:
        return 100.0 * c / n if n else 0.0

    return {"total": total, "correct": correct, "accuracy": acc(correct, total), "no_prediction": missing,
            "by": {f: {v: {"correct": c, "total": n, "accuracy": acc(c, n)} for v, (c, n) in sorted(vals.items())}
                   for f, vals in by.items()}}


def read_outputs(path: Path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.strip():
            line = json.loads(raw)
            if line.get("custom_id"):
                out[line["custom_id"]] = prediction(line)
    return out


def report(result: dict) -> str:
    rows = [f"accuracy {result['accuracy']:.2f}% ({result['correct']}/{result['total']}), "
            f"no prediction {result['no_prediction']}"]
    for f, vals in result["by"].items():
        rows.append(f"{f}:")
        rows += [f"  {v:<28} {r['accuracy']:6.2f}%  ({r['correct']}/{r['total']})" for v, r in vals.items()]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="af3trt score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path, help="af3trt batch's OUTPUT.jsonl")
    ap.add_argument("--key", type=Path, required=True, help="answer key: JSON list or JSON lines (id, choices, answer)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    try:
        result = score(read_outputs(args.output), read_key(args.key))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
