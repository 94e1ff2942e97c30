#!/usr/bin/env bash
# Primary/replica demo in two sqlite3 processes. Placeholder until replicas land.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "demo: primary/replica demo arrives with replicas (issue 3)"
