"""What both build targets share: the error a user sees as a clean message, step progress, the versions recorded in
a manifest, and command-line flags generated from a dataclass's fields (add_flags / from_flags: `af3trt build`'s
serving and GPU flags, `af3trt k8s overlay`'s). Imported by build_engines.py (the CPU target and the entry point),
gpu_build.py (the GPU target) and k8s.py; it imports nothing of af3trt's, so neither target has to import the other
for it."""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import MISSING, Field, fields
from importlib import metadata


class BuildError(RuntimeError):
    """A build that cannot go on; `af3trt build` prints it as one line (exit 2), no traceback."""


class Progress:
    """`[2/5] exporting encoder … done in 3.1 s` lines, and the timings for the manifest."""

    def __init__(self, total: int):
        self.total, self.n, self.timings = total, 0, {}

    def step(self, name: str):
        self.n += 1
        prog = self

        class _Step:
            def __enter__(self):
                print(f"[{prog.n}/{prog.total}] {name} …", flush=True)
                self.t0 = time.perf_counter()
                return self

            def __exit__(self, exc_type, *_):
                dt = time.perf_counter() - self.t0
                prog.timings[name] = round(dt, 3)
                print(f"[{prog.n}/{prog.total}] {name}: {'failed' if exc_type else 'done'} in {dt:.1f} s", flush=True)

        return _Step()


VERSIONED_PACKAGES = ("af3trt", "torch", "transformers", "onnx", "onnxruntime", "numpy", "tokenizers", "safetensors",
                      "tritonclient", "nvidia-pytriton", "nvidia-modelopt", "tensorrt", "tensorrt_llm")


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages a build or a benchmark depends on (absent ones left out)."""
    out = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def flag(help: str, **kw) -> dict:
    """Field metadata that makes a dataclass field a command-line flag (add_flags): its help, and `type` or
    `choices` where the default does not say them."""
    return {"help": help, **kw}


def flag_fields(cls: type) -> list[Field]:
    """The fields of the dataclass `cls` that are command-line flags (a `help` in their metadata)."""
    return [f for f in fields(cls) if "help" in f.metadata]


def add_flags(ap: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One flag per field of the dataclass `cls` that has a `help` in its metadata: `--field-name` of the default's
    type (metadata `type` and `choices` override), a True boolean as `--no-field-name`, a False one as
    `--field-name` (the help says what the flag does), a boolean defaulting to None (metadata type bool) as both,
    a list as a repeatable `--field-name`, a field without a
    default as a required one."""
    for f in flag_fields(cls):
        default = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
        name, meta = "--" + f.name.replace("_", "-"), f.metadata
        if isinstance(default, bool):
            ap.add_argument(name.replace("--", "--no-") if default else name, dest=f.name,
                            action="store_false" if default else "store_true", help=meta["help"])
        elif meta.get("type") is bool:  # None: decided later (e.g. per target); --field-name / --no-field-name
            ap.add_argument(name, dest=f.name, default=default, action=argparse.BooleanOptionalAction,
                            help=meta["help"])
        elif default is MISSING:
            ap.add_argument(name, dest=f.name, required=True, help=meta["help"], type=meta.get("type", str),
                            choices=meta.get("choices"))
        else:
            shown = "" if default in (None, []) else " (default: %(default)s)"
            ap.add_argument(name, dest=f.name, default=default, help=meta["help"] + shown,
                            type=meta.get("type", type(default)), choices=meta.get("choices"),
                            **({"action": "append"} if isinstance(default, list) else {}))


def from_flags(cls: type, args: argparse.Namespace, **extra):
    """The `cls` of parsed flags (those add_flags made), with `extra` fields."""
    return cls(**{f.name: getattr(args, f.name) for f in flag_fields(cls)}, **extra)
