#!/usr/bin/env bash
# One entry point for a fresh machine: sets everything up on first use, then runs the job.
#   bash scripts/dev.sh demo [--headless OUTDIR]   the GUI with the bundled sample slide
#   bash scripts/dev.sh test [pytest args]         the whole test suite
#   bash scripts/dev.sh lint                       ruff: lint and format check
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="${SDG_VENV:-$here/.venv}"

need_apt=()
for pkg in xvfb libxcb-icccm4 libxcb-keysyms1; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "[setup] apt packages: ${need_apt[*]}" >&2
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >&2
fi

# Reinstall when the package metadata changes; the stamp holds its hash.
stamp="$venv/.sdg-installed"
want="$(cat pyproject.toml scripts/dev.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] creating $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    # The CPU wheel of torch 2.13.0 is local on this kind of machine; unpinned, pip pulls several GB of CUDA.
    # Elsewhere, when that pin cannot be met, any torch >= 2.2 from the package's own requirements will do.
    "$venv/bin/python" -m pip install -q "torch==2.13.0" >&2 || echo "[setup] torch 2.13.0 unavailable; using pip's choice" >&2
    "$venv/bin/python" -m pip install -q -e ".[all,test]" >&2
    echo "$want" > "$stamp"
fi

export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d /tmp/sdg-xdg.XXXXXX)}"
chmod 700 "$XDG_RUNTIME_DIR" 2>/dev/null || true

cmd="${1:-demo}"; shift || true
case "$cmd" in
    demo)
        if [ -z "${DISPLAY:-}" ] && [[ " $* " != *" --headless "* ]]; then
            echo "[demo] no display: running under xvfb-run" >&2
            exec xvfb-run -a -s "-screen 0 1600x1000x24" "$venv/bin/spatial-deconv" demo "$@"
        fi
        exec "$venv/bin/spatial-deconv" demo "$@" ;;
    test)
        exec "$venv/bin/python" -m pytest "$@" ;;
    lint)
        "$venv/bin/ruff" check src tests benchmarks examples scripts
        exec "$venv/bin/ruff" format --check src tests benchmarks examples scripts ;;
    *)
        exec "$venv/bin/$cmd" "$@" ;;
esac
