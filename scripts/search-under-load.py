#!/usr/bin/env python3
"""How often `precision = "auto"` makes its quiet choice while something else loads the machine.

Runs `kiln bench-raw --precision auto` on one model again and again. Beside each run, SPINNERS
busy processes spin from START seconds after kiln starts for WIDTH seconds; START steps by 50 ms
from 0.2 s over RUNS runs, so the load begins or ends at a different point of each search. Prints
how many searches chose what.

    scripts/search-under-load.py [--kiln target/release/kiln] [--model digits]
        [--spinners 4] [--runs 24] [--width W | --ends]

`--ends`: the load runs from kiln's start until START instead (load that goes away mid-search).
Needs a built kiln and the examples' models (scripts/serve.sh makes both).
"""

import argparse
import collections
import multiprocessing
import subprocess
import time


def spin(until):
    while time.time() < until:
        pass


def search_once(kiln, config, model, begin, width, spinners):
    run = subprocess.Popen(
        [kiln, "bench-raw", "-c", config, "--model", model, "--batch-sizes", "1",
         "--duration", "10ms", "--precision", "auto"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(begin)
    load = [multiprocessing.Process(target=spin, args=(time.time() + width,)) for _ in range(spinners)]
    for p in load:
        p.start()
    out, _ = run.communicate()
    for p in load:
        p.join()
    if run.returncode != 0:
        raise SystemExit(f"kiln bench-raw failed ({run.returncode}):\n{out}")
    summary = next((l for l in out.splitlines() if l.startswith("precision search: ")), None)
    if summary is None:
        raise SystemExit(f"no 'precision search:' line in kiln's output:\n{out}")
    # "precision search: MODEL: CHOICE, 1.2× fp32, ..." or "...: MODEL: fp32 (bf16: ...)" -> CHOICE
    return summary.split(": ", 2)[2].split(",")[0].split(" (")[0]


def main():
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--kiln", default="target/release/kiln")
    args.add_argument("--config", default="examples/kiln.toml")
    args.add_argument("--model", default="digits")
    args.add_argument("--spinners", type=int, default=4)
    args.add_argument("--runs", type=int, default=24)
    mode = args.add_mutually_exclusive_group()
    mode.add_argument("--width", type=float, default=0.1, help="seconds each burst of load lasts")
    mode.add_argument("--ends", action="store_true", help="load from the start until START")
    a = args.parse_args()
    chosen = collections.Counter()
    for i in range(a.runs):
        start = 0.2 + 0.05 * i
        begin, width = (0.0, start) if a.ends else (start, a.width)
        chosen[search_once(a.kiln, a.config, a.model, begin, width, a.spinners)] += 1
    for choice, n in chosen.most_common():
        print(f"{n:4}  {choice}")


if __name__ == "__main__":
    main()
