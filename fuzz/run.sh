#!/usr/bin/env bash
# Runs one fuzz target on the nightly toolchain: fuzz/run.sh TARGET [SECONDS]
# Installs cargo-fuzz first if it is missing. New inputs land in fuzz/corpus/TARGET; crashes in
# fuzz/artifacts/TARGET. Targets: wire_messages wire_framing flow_stream registry_merge node
# signed_claims push_pull.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: fuzz/run.sh TARGET [SECONDS]}
seconds=${2:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
mkdir -p "corpus/$target"
cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1
