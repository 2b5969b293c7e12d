#!/usr/bin/env bash
# Writes constraints.txt, the lock scripts/setup.sh installs with (`pip install -c constraints.txt`): every package
# of the venv, pinned with ==, from `pip freeze --all --exclude-editable`.
#   bash scripts/lock.sh            move the lock forward: install the newest releases pyproject.toml allows into a
#                                   scratch venv (.venv-lock, through scripts/setup.sh) and lock what it got
#   bash scripts/lock.sh --from V   lock the packages venv V holds now, installing nothing
# Lines marked `# held` are moved by hand and carried over as they are: torch (the CPU wheel on this project's
# machines' disk; a release pip would pick by itself is a CUDA build of several GB) and the ONNX helpers setup.sh
# installs --no-deps beside nvidia-modelopt. Then run `bash scripts/test.sh` (setup sees the new lock and
# reinstalls .venv to it) and commit constraints.txt when the suite is green; docs/install.md says more.
set -euo pipefail
cd "$(dirname "$0")/.."
lock=constraints.txt

held=$(mktemp)
trap 'rm -f "$held"' EXIT
grep -E '^[^#].*#[[:space:]]*held' "$lock" > "$held" || true  # pin lines marked held (not the header)

if [ "${1:-}" = "--from" ]; then
  venv=${2:?usage: scripts/lock.sh --from VENV}
else
  venv=.venv-lock
  rm -rf "$venv"
  # setup.sh with the held pins alone as its lock: everything else resolves to the newest release allowed
  AF3TRT_VENV=$venv AF3TRT_LOCK=$held AF3TRT_SETUP_SKIP_CHECK=1 bash scripts/setup.sh
fi

"$venv/bin/pip" freeze --all --exclude-editable --disable-pip-version-check | "$venv/bin/python" -c '
import re, sys
# PEP 503 names: "cloudcoil.models.prometheus_operator" and "cloudcoil-models-prometheus-operator" are one package
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
held_lines = [l.rstrip("\n") for l in open(sys.argv[1]) if l.strip()]
held_names = {norm(re.split(r"[=<>!~ ]", l, 1)[0]) for l in held_lines}
frozen = []
for line in sys.stdin:
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    name, version = line.split("==")
    if norm(name) in held_names:
        continue
    frozen.append(name + "==" + version.split("+")[0])  # 2.13.0+cpu: == without the local label matches it
print("# The lock: the versions the test suite last passed with. scripts/setup.sh installs with `pip install -c`"
      " this file;\n# scripts/lock.sh writes it (docs/install.md: regenerate, run the suite, commit). Lines marked"
      " `# held` move by hand.")
print("\n".join(held_lines))
print("\n".join(sorted(frozen, key=str.lower)))
' "$held" > "$lock.new"
mv "$lock.new" "$lock"
echo "== wrote $lock: $(grep -c '^[^#]' "$lock") pins from $venv"
if [ "${1:-}" != "--from" ]; then rm -rf "$venv"; fi  # the scratch venv (several GB) has served
