"""`python -m tune_xray.data synth OUT --images N --size S --seed K`: write the synthetic NIH-format dataset, and
over its images `--table` a CheXpert-style label table (OUT/labels.csv, for csv:), `--chexpert` CheXpert-v1.0-small's
layout (OUT/CheXpert-v1.0-small, for chexpert:), `--mimic` MIMIC-CXR-JPG 2.0.0's (OUT/mimic-cxr-jpg/2.0.0, for
mimic:)."""

import argparse
import sys
import time

from .synthetic import chexpert_layout, generate, label_table, mimic_layout


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
    synth.add_argument("--chexpert", action="store_true", help="also OUT/CheXpert-v1.0-small: train.csv, valid.csv "
                       "and patientNNNNN/studyK/view1_frontal.jpg files, as CheXpert ships")
    synth.add_argument("--mimic", action="store_true", help="also OUT/mimic-cxr-jpg/2.0.0: the metadata, chexpert "
                       "and split tables and files/pXX/pSUBJECT/sSTUDY/*.jpg, as MIMIC-CXR-JPG ships")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = generate(args.out, args.images, args.size, args.seed, args.workers)
    print(f"wrote {args.images} images at {args.size}² to {out} in {time.perf_counter() - start:.1f} s")
    if args.table:
        print(f"wrote the label table {label_table(out, args.seed)}")
    if args.chexpert:
        print(f"wrote the CheXpert layout: chexpert:{chexpert_layout(out, out, args.seed)}")
    if args.mimic:
        print(f"wrote the MIMIC-CXR-JPG layout: mimic:{mimic_layout(out, out, args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
