#!/usr/bin/env bash
# Runs one fuzz target on the nightly toolchain: fuzz/run.sh TARGET [SECONDS]
# Installs cargo-fuzz first if it is missing.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: fuzz/run.sh TARGET [SECONDS]}
seconds=${2:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
mkdir -p "corpus/$target"
cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds"
