#!/usr/bin/env python
"""Rewrite the boxes in a LLaMA-Factory sharegpt dataset's answers between CytoChat's <region> pixels and a
Qwen VL family's native convention (see slidechat.evaluation.boxes), using each row's image size.

examples:
  python tools/convert_boxes.py data/cyto_train.jsonl --from region --to qwen2_5_vl --out data/cyto_train.q25.jsonl
  python tools/convert_boxes.py data/cyto_train.q25.jsonl --from qwen2_5_vl --to region --out back.jsonl
"""

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    from slidechat.data.image_sizes import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS
    from slidechat.evaluation.boxes import BOX_FORMATS
    from slidechat.utils.errors import SlideChatError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path, help="LLaMA-Factory sharegpt file (.json list or .jsonl)")
    p.add_argument("--from", dest="src", required=True, choices=BOX_FORMATS)
    p.add_argument("--to", dest="dst", required=True, choices=BOX_FORMATS)
    p.add_argument("--out", type=Path, required=True, help="output file (same layout as the input)")
    p.add_argument("--image-dir", type=Path, default=None,
                   help="folder relative image paths are under (default: the dataset's folder, as LF's media_dir)")
    p.add_argument("--image-max-pixels", type=int, default=IMAGE_MAX_PIXELS)
    p.add_argument("--image-min-pixels", type=int, default=IMAGE_MIN_PIXELS)
    args = p.parse_args(argv)
    try:
        n = convert(args)
    except SlideChatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{n} answer(s) rewritten from {args.src} to {args.dst}: {args.out}")
    return 0


def convert(args: argparse.Namespace) -> int:
    from slidechat.data.llamafactory import read_raw_rows
    from slidechat.evaluation.boxes import convert_dataset_rows
    from slidechat.utils.atomic import atomic_path
    from slidechat.utils.errors import SlideChatError
    from slidechat.wsi.imageio import image_size

    raw = read_raw_rows(args.dataset)
    rows, is_list = [], False
    for _, lineno, obj, err in raw:
        if err is not None:
            raise SlideChatError(f"line {lineno}: {err}", args.dataset)
        if not isinstance(obj, dict):
            raise SlideChatError(f"{'line ' + str(lineno) if lineno else 'an item'}: not a JSON object", args.dataset)
        is_list = is_list or lineno is None
        rows.append(obj)
    base = args.image_dir or args.dataset.parent

    def size_of(row: dict):
        ims = row.get("images") or []
        ims = [ims] if isinstance(ims, str) else ims
        if not ims:
            raise SlideChatError("a row with boxes has no images: its image size is unknown", args.dataset)
        path = Path(ims[0])
        path = path if path.is_absolute() else base / path
        return image_size(path, check_limit=False)

    out, n = convert_dataset_rows(rows, args.src, args.dst, size_of, source=str(args.dataset),
                                  image_max_pixels=args.image_max_pixels, image_min_pixels=args.image_min_pixels)
    with atomic_path(args.out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            if is_list:
                json.dump(out, f, ensure_ascii=False, indent=2)
            else:
                for r in out:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return n


if __name__ == "__main__":
    sys.exit(main())
