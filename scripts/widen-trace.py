#!/usr/bin/env python3
"""Makes a held-out variant of a trace: each 1-GPU job becomes a wider one by a fixed, seeded rule.

Usage: widen-trace.py IN.csv OUT.csv SEED GPUS:PROB [GPUS:PROB ...]
e.g.   widen-trace.py itp-cluster09.csv c09mix.csv 7 2:0.2 4:0.05 8:0.02

For each row in order one number is drawn from Python's random.Random(SEED); a 1-GPU row becomes
the first GPUS whose cumulative PROB exceeds it, else stays 1-GPU. Other columns are unchanged.
The mixes in docs/scheduling.md ("Held-out mixes") were made with it.
"""
import random
import sys


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    src, dst, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mix = [(int(g), float(p)) for g, p in (a.split(":") for a in sys.argv[4:])]
    rnd = random.Random(seed)
    with open(src) as f:
        lines = f.read().strip().split("\n")
    out = [lines[0]]
    for line in lines[1:]:
        cols = line.split(",")
        if cols[3] == "1":
            r, acc = rnd.random(), 0.0
            for gpus, prob in mix:
                acc += prob
                if r < acc:
                    cols[3] = str(gpus)
                    break
        out.append(",".join(cols))
    with open(dst, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
