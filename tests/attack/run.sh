#!/usr/bin/env bash
# Attacks both nodes, running as processes, from an independent QUIC and
# TLS 1.3 stack (aioquic) and independently made certificates
# (`cryptography`): see attack.py. Needs Python 3 and PyPI; takes about
# six minutes with the release build (the checks: about 90 s, most of it
# the slowloris checks, which wait for the nodes' 30 s stream timeout). Usage: bash tests/attack/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -c "import aioquic, cryptography" 2>/dev/null || python3 -m pip install -q -r tests/attack/requirements.txt
cargo build --locked --release -p cleanroom-cli
work=$(mktemp -d)
target/release/cleanroom demo --rows 2000 --dir "$work/demo" > /dev/null
if python3 tests/attack/attack.py --dir "$work/demo" --cleanroom target/release/cleanroom; then
    rm -rf "$work"
else
    echo "kept $work for its node logs"
    exit 1
fi
