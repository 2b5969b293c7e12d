"""Clips bundled with af3trt: a 5-s spoken sentence (espeak-ng, 16 kHz mono FLAC)."""

from pathlib import Path

HERE = Path(__file__).parent


def speech_path() -> Path:
    return HERE / "speech.flac"
