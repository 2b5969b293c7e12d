#!/bin/sh
# Write the versions of every package the container's Python already holds, as pip constraints, so that
# installing af3trt's serving dependencies cannot move them (torch, numpy, grpcio, protobuf, TensorRT-LLM's pins).
#
#   sh docker/container-pins.sh PINS [PYTHON]        (PYTHON defaults to python3)
#
# `pip freeze` is not usable here: it prints editable installs as `-e <path>` and direct-URL installs as
# `name @ file:///…`, and pip refuses both as constraints ("Editable requirements are not allowed as constraints",
# "Unnamed requirements are not allowed as constraints" — pip 23.2; the NGC images hold such installs).
# `pip list --format=freeze --exclude-editable` prints `name==version` for every other distribution, whatever
# it was installed from. tests/test_docker.py runs this script against a venv holding both kinds of install.
set -eu
pins="$1"
python="${2:-python3}"
"$python" -m pip list --format=freeze --exclude-editable --disable-pip-version-check > "$pins"
echo "container-pins: $(wc -l < "$pins") packages pinned in $pins"
