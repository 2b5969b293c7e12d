"""Triton model configs as text: config.pbtxt ⇄ `model_config_pb2.ModelConfig` (tritonclient's copy of Triton's
protobuf), and a repository's configs read back.

triton_repo/configs.py renders the configs it builds with `render`; the serving side (runtime/serve/supervisor.py,
runtime/serve/doctor.py) reads a built repository with `parse` / `repository_configs`. Both sides live here, under
runtime, so that runtime never imports triton_repo.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc


def render(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def repository_configs(repo: Path) -> dict[str, mc.ModelConfig]:
    """{model directory name: its parsed config.pbtxt} for every model of a repository, in name order."""
    return {p.parent.name: parse(p.read_text(encoding="utf-8")) for p in sorted(Path(repo).glob("*/config.pbtxt"))}
