#!/usr/bin/env bash
# Every Rust source file's production code (what comes before its first
# `#[cfg(test)]`) stays under LIMIT lines: past it, split the file by job.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-550}
status=0
while IFS= read -r f; do
  n=$(awk '/^#\[cfg\(test\)\]/ { exit } { c++ } END { print c + 0 }' "$f")
  if [ "$n" -ge "$LIMIT" ]; then
    echo "$f: $n lines of production code (at most $((LIMIT - 1))): split it by job" >&2
    status=1
  fi
done < <(find src crates/*/src -name '*.rs' ! -name tests.rs | sort)
exit $status
