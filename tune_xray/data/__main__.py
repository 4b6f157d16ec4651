"""`python -m tune_xray.data synth OUT --images N --size S --seed K`: write the synthetic NIH-format dataset
(`--table`: and a CheXpert-style label table, OUT/labels.csv, over its images)."""

import argparse
import sys
import time

from .synthetic import generate, label_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_xray.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write a synthetic ChestX-ray14 look-alike in the NIH layout")
    synth.add_argument("out")
    synth.add_argument("--images", type=int, default=2000)
    synth.add_argument("--size", type=int, default=256)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=None)
    synth.add_argument("--table", action="store_true", help="also OUT/labels.csv: CheXpert-style, with patients, a "
                       "train/valid split, AP/PA views and uncertain (-1) and blank entries")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = generate(args.out, args.images, args.size, args.seed, args.workers)
    print(f"wrote {args.images} images at {args.size}² to {out} in {time.perf_counter() - start:.1f} s")
    if args.table:
        print(f"wrote the label table {label_table(out, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
