"""`dtn-prepare`: convert Ali-CCP (or logs in the same shapes) into the Parquet dataset +
schema.json that `dtn-train` reads. See ``dtn_torchrec.data.prepare`` and ``formats``."""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

from dtn_torchrec.data.formats import FORMATS
from dtn_torchrec.data.idmap import DEFAULT_HASH_SIZE
from dtn_torchrec.data.prepare import (
    DEFAULT_VALID_FRACTION,
    ID_MAPPINGS,
    PrepareOptions,
    format_summary,
    prepare_dataset,
)
from dtn_torchrec.data.prepare_lines import PrepareError

_EPILOG = """\
inputs (--input):
  aliccp-raw  a directory with the Tianchi files sample_skeleton_{train,test}.csv and
              common_features_{train,test}.csv (or in DIR/train/, DIR/test/), or one
              sample_skeleton_*.csv file (its common_features_* sibling is used).
  fdn, paddlerec, csv
              a directory with files whose names contain train / test / val(id) / dev and end in
              .csv, .txt or a split name (train.csv, train_small.txt, ali_ccp_val_sample.csv,
              ctr_cvr.dev), optionally + .gz/.bz2/.zst/.lz4; or one file with --split. Other files
              are listed as ignored; the files taken are printed and kept in schema.json.

formats:
  aliccp-raw  skeleton: sample_id,click,conversion,common_feature_index,feature_num,feature_list
              common:   common_feature_index,feature_num,feature_list
              feature_list: field\\x02id\\x03value joined by \\x01; value -> per-id weight column
  fdn         sample_id,click,purchase,101:id#id,...  (23 fields in fixed order, 0 = missing)
  paddlerec   sample_id,click,purchase,field:id,field:id,...  (a field repeats per id)
  csv         header line; labels click + conversion (or purchase, stored as conversion) unless
              --labels; optional sample_id column; column D<name> = weight of field <name>
              (--weight-prefix); every other column is a single-valued sparse field. A headerless
              file uses the train file's header.
  Missing ids: raw id 0 means missing in aliccp-raw, fdn and paddlerec; in csv every id is an
  ordinary id (0-based encodings) and an empty cell is missing. --missing-id V|none overrides.
  Negative ids are errors. Labels must be 0/1. Rows with click=0, conversion=1 are dropped and
  counted as click0_conversion1. A split with 0 rows left is an error.
  The valid split: --valid-fraction (default 0.1 when the input has train and no valid split) of
  the train rows, chosen by a seeded hash of the sample id; --valid-fraction 0 turns it off.

outputs:
  DIR/schema.json, DIR/<split>/part-*.parquet (train, test[, valid]), DIR/vocab/<field>.parquet
  (vocab mapping: columns raw_id, count; the raw id in row r maps to r + 1; 0 = missing/OOV).
  hash mapping: 1 + (raw mod (size - 1)), 0 = missing.
  raw mapping: the raw ids exactly (missing ids removed), num_embeddings 0; schema.json gives
  per-field distinct-id estimates (KMV sketch, relative standard error 1.6% above 4096 ids,
  exact below). dtn-train needs a table that takes raw ids (not available yet).
"""


def _csv_list(text: str) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _hash_sizes(text: str) -> Dict[str, int]:
    sizes = {}
    for item in _csv_list(text):
        name, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r}: expected FIELD=SIZE")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: size is not an integer") from None
    return sizes


def _missing_id(text: str) -> int | str:
    if text in ("none", "default"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an integer, 'none' or 'default'"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dtn-prepare",
        description="Convert Ali-CCP (raw Tianchi files, FDN, PaddleRec "
        "or header CSV) into a Parquet dataset with schema.json, streaming.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="input format")
    p.add_argument(
        "--input", required=True, metavar="PATH", help="input directory, or one file (see below)"
    )
    p.add_argument("--output", required=True, metavar="DIR", help="dataset directory to create")
    p.add_argument(
        "--split",
        metavar="NAME",
        help="only this split of a directory, or the split of a single "
        "input file (train, valid/val/dev, test)",
    )
    p.add_argument(
        "--id-mapping",
        choices=ID_MAPPINGS,
        default="vocab",
        help="vocab: train-split vocabulary, ids 1..V, 0 = missing/OOV; "
        "hash: 1 + raw mod (size-1); raw: the raw 64-bit ids, no vocabulary pass, "
        "distinct ids estimated (default: vocab)",
    )
    p.add_argument(
        "--min-count",
        type=int,
        default=1,
        metavar="K",
        help="vocab: keep ids seen at least K times in train (default: 1)",
    )
    p.add_argument(
        "--hash-size",
        type=int,
        default=DEFAULT_HASH_SIZE,
        metavar="N",
        help=f"hash: table size per field, row 0 reserved (default: {DEFAULT_HASH_SIZE})",
    )
    p.add_argument(
        "--hash-sizes",
        type=_hash_sizes,
        default={},
        metavar="F=N,...",
        help="hash: per-field table sizes, e.g. 101=500000,205=4000037",
    )
    p.add_argument(
        "--vocab-from",
        metavar="DATASET",
        help="reuse the fields and id mapping of an existing dataset (e.g. to convert new test data)",
    )
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=None,
        metavar="F",
        help="move this share of train rows to a valid split, by a seeded hash of the "
        f"sample id (default: {DEFAULT_VALID_FRACTION} when the input has no valid "
        "split; 0: none)",
    )
    p.add_argument(
        "--missing-id",
        type=_missing_id,
        default="default",
        metavar="V|none",
        help="the raw id that means missing (default: 0 for aliccp-raw, fdn, "
        "paddlerec; none for csv)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the valid-split hash (default: 0)")
    p.add_argument(
        "--labels",
        type=_csv_list,
        metavar="A,B,...",
        help="csv: label columns in task order (default: click and conversion/purchase)",
    )
    p.add_argument(
        "--fields",
        type=_csv_list,
        metavar="F,G,...",
        help="aliccp-raw/fdn/paddlerec: field names (default: the 23 Ali-CCP fields)",
    )
    p.add_argument(
        "--weight-prefix",
        default="D",
        metavar="P",
        help="csv: column P<name> is the weight of field <name> ('' for none; default: D)",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed lines and count them per reason instead of stopping",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty --output"
    )
    p.add_argument(
        "--block-mb",
        type=float,
        default=8.0,
        metavar="MB",
        help="input parsed per block (default: 8)",
    )
    p.add_argument(
        "--row-group-rows",
        type=int,
        default=65536,
        metavar="N",
        help="most rows per Parquet row group (default: 65536)",
    )
    p.add_argument(
        "--max-row-group-values",
        type=int,
        default=1 << 23,
        metavar="N",
        help="most ids per Parquet row group, bounds memory (default: 8388608)",
    )
    p.add_argument(
        "--rows-per-file",
        type=int,
        default=1 << 20,
        metavar="N",
        help="rows per Parquet part file (default: 1048576)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress and no summary")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    options = PrepareOptions(
        split=args.split,
        id_mapping=args.id_mapping,
        min_count=args.min_count,
        hash_size=args.hash_size,
        hash_sizes=args.hash_sizes,
        vocab_from=args.vocab_from,
        valid_fraction=args.valid_fraction,
        seed=args.seed,
        missing_id=args.missing_id,
        labels=args.labels,
        fields=args.fields,
        weight_prefix=args.weight_prefix,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        block_bytes=max(1, int(args.block_mb * (1 << 20))),
        row_group_rows=args.row_group_rows,
        max_row_group_values=args.max_row_group_values,
        rows_per_file=args.rows_per_file,
        progress=False if args.quiet else None,
    )
    try:
        schema = prepare_dataset(args.format, args.input, args.output, options)
    except (PrepareError, OSError, ValueError) as e:
        print("dtn-prepare: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dtn-prepare: interrupted; nothing written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(format_summary(schema, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
