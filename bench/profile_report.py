"""Summarise a py-spy ``--format raw`` profile: top functions by self and total time.

    python bench/profile_report.py bench/results/profiles/gateway_broadcast_1000.txt [--top 30]
"""

from __future__ import annotations

import argparse
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    with open(args.path) as handle:
        for line in handle:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            samples += count
            frames = stack.split(";")
            own[frames[-1]] += count
            for frame in set(frames):
                total[frame] += count
    print(f"{samples} samples")
    print("-- self --")
    for frame, count in own.most_common(args.top):
        print(f"{count / samples:6.1%}  {frame}")
    print("-- total --")
    for frame, count in total.most_common(args.top):
        print(f"{count / samples:6.1%}  {frame}")


if __name__ == "__main__":
    main()
