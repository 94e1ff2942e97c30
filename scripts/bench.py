#!/usr/bin/env python3
"""Benchmarks for sqlite-replica (commit overhead on a primary, apply rate on a replica).

Placeholder: run with `make bench` once capture and apply are in.
"""


def main() -> int:
    print("bench: TODO")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
