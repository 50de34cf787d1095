#!/usr/bin/env bash
# Runs every fuzz target for SECS seconds (default 1800), one after another, starting from the
# committed seeds plus the local corpus, then minimizes each corpus back into fuzz/seeds.
# Needs a nightly toolchain and cargo-fuzz: `cargo +nightly fuzz` is how libFuzzer builds.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-1800}"
targets="${TARGETS:-$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v gorpc-fuzz)}"
for t in $targets; do
    mkdir -p "corpus/$t" "seeds/$t"
    echo "== $t for ${secs}s"
    cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 2>&1 | tail -n 25
done
for t in $targets; do
    # Merge into a fresh dir so the committed seeds are the minimal set covering all found edges.
    rm -rf "min/$t" && mkdir -p "min/$t"
    cargo +nightly fuzz run "$t" "min/$t" "seeds/$t" "corpus/$t" -- -merge=1 2>&1 | tail -n 2
    # Hand-named inputs (seed-*, regression-*) stay as they are; the merged set joins them.
    find "seeds/$t" -type f ! -name 'seed-*' ! -name 'regression-*' -delete
    cp "min/$t"/* "seeds/$t/"
done
rm -rf min
