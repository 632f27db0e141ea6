"""Datasets in the formats VLM data ships in, with planted faults and the counts they must give.

Used by tests/unit/test_data_import.py, tests/unit/test_parquet_source.py, the integration test of
`vlmctl data import` and bench/import_bench.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

COLOURS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]


def image_bytes(colour: str, fmt: str = "PNG", size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format=fmt)
    return buf.getvalue()


def write_images(folder: Path, n: int = 40) -> list[str]:
    """n small images (PNG and JPEG alternately) under folder/coco/; their paths relative to folder."""
    (folder / "coco").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        ext, fmt = ("png", "PNG") if i % 2 == 0 else ("jpg", "JPEG")
        name = f"coco/{i:06d}.{ext}"
        (folder / name).write_bytes(image_bytes(COLOURS[i % len(COLOURS)], fmt))
        names.append(name)
    return names


def _turns(colour: str, marker: bool = True, images: int = 1) -> list[dict[str, str]]:
    head = "<image>\n" * images if marker else ""
    return [{"from": "human", "value": f"{head}what colour is it?"}, {"from": "gpt", "value": f"it is {colour}"}]


def llava_dataset(root: Path, n: int = 1000) -> tuple[Path, Path, dict[str, Any]]:
    """A LLaVA JSON of n records with an image folder: 3 images missing, 1 corrupt, 1 record without
    `<image>` (its marker is added), 1 text-only record, 1 record with two images. Returns (json, image root,
    what the import must report)."""
    images = root / "images"
    names = write_images(images)
    (images / "coco" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    records: list[dict[str, Any]] = []
    for i in range(n):
        name = names[i % len(names)]
        records.append({"id": f"rec-{i}", "image": name, "conversations": _turns(COLOURS[i % len(names) % 8])})
    missing = [5, 17, min(300, n - 3)]
    for i in missing:
        records[i]["image"] = f"coco/missing-{i}.jpg"
    records[42]["image"] = "coco/corrupt.jpg"
    records[77]["conversations"] = _turns("red", marker=False)
    records[99] = {"id": "rec-99", "conversations": _turns("blue", marker=False)}  # text-only
    records[123 % n] = {"id": f"rec-{123 % n}", "image": [names[0], names[1]], "conversations": _turns("red", images=2)}
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    expected = {
        "records": n, "samples": n - 5, "markers_added": 1,
        "skipped": {"image_missing": 3, "image_unreadable": 1, "no_image": 1},
        "skipped_ids": {"image_missing": [f"rec-{i}" for i in missing], "image_unreadable": ["rec-42"],
                        "no_image": ["rec-99"]},
        "multi_image": f"rec-{123 % n}", "no_marker": "rec-77",
    }
    return path, images, expected


def sharegpt4v_file(root: Path, images: Path, n: int = 24) -> tuple[Path, dict[str, Any]]:
    """A ShareGPT4V-style JSONL (ShareGPT4V records, LLaMA-Factory `messages` + `images`, a system prompt), with
    one record whose two markers meet one image."""
    names = sorted(p.relative_to(images).as_posix() for p in (images / "coco").glob("0*"))
    lines = []
    for i in range(n):
        if i % 2:
            rec: dict[str, Any] = {"id": f"sg-{i}", "image": names[i % len(names)],
                                   "conversations": [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                                                     {"from": "gpt", "value": f"A plain {COLOURS[i % 8]} square."}]}
        else:
            rec = {"messages": [{"role": "user", "content": "<image>what is it?"},
                                {"role": "assistant", "content": "a square"}],
                   "images": [names[i % len(names)]], "system": "You are a helpful assistant."}
        lines.append(rec)
    lines[3]["conversations"][0]["value"] = "<image><image> two markers, one image"
    path = root / "sharegpt4v.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path, {"records": n, "samples": n - 1, "skipped": {"image_mismatch": 1}}


def preference_file(root: Path, images: Path, n: int = 20) -> tuple[Path, dict[str, Any]]:
    """A preference JSON (chosen/rejected + image), RLAIF-V (`question`) and LLaMA-Factory-style (`conversations`
    + chosen/rejected turns) records; one pair with identical answers."""
    names = sorted(p.relative_to(images).as_posix() for p in (images / "coco").glob("0*"))
    recs: list[dict[str, Any]] = []
    for i in range(n):
        colour = COLOURS[i % 8]
        if i % 3 == 0:
            recs.append({"id": f"pref-{i}", "image": names[i % len(names)], "prompt": "<image>\nwhat colour is it?",
                         "chosen": f"it is {colour}", "rejected": "it is grey"})
        elif i % 3 == 1:
            recs.append({"id": f"pref-{i}", "image": names[i % len(names)], "question": "what colour is it?",
                         "chosen": f"it is {colour}", "rejected": "no idea"})
        else:
            recs.append({"id": f"pref-{i}", "images": [names[i % len(names)]],
                         "conversations": [{"from": "human", "value": "<image>what colour is it?"}],
                         "chosen": {"from": "gpt", "value": f"it is {colour}"},
                         "rejected": {"from": "gpt", "value": "it is a dog"}})
    recs[4]["rejected"] = recs[4]["chosen"]
    path = root / "preference.json"
    path.write_text(json.dumps(recs))
    return path, {"records": n, "samples": n - 1, "skipped": {"identical_pair": 1}}


def parquet_rows(n: int = 60) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """HF-style rows (`images` as {bytes, path} + `messages` with {type: image}/{type: text} parts), with bad rows:
    a corrupt image, a text-only row, a path-only image, two image parts for one image. Returns (rows, the
    reasons the importer and the trainer's Parquet source give)."""
    rows = []
    for i in range(n):
        colour = COLOURS[i % 8]
        rows.append({
            "images": [{"bytes": image_bytes(colour, "PNG" if i % 2 else "JPEG"), "path": f"{i}.png"}],
            "messages": [
                {"role": "user", "content": [{"type": "image", "text": None},
                                             {"type": "text", "text": "what colour is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"it is {colour}"}]},
            ],
        })
    rows[7]["images"] = [{"bytes": b"not an image at all", "path": "x.png"}]
    rows[19]["images"] = []
    rows[31]["images"] = [{"bytes": None, "path": "somewhere/else.png"}]
    rows[44]["messages"][0]["content"].insert(0, {"type": "image", "text": None})
    bad_rows = {7, 19, 31, 44}
    return rows, {
        "good_rows": [i for i in range(n) if i not in bad_rows],
        "import_skipped": {"image_unreadable": 1, "no_image": 1, "image_missing": 1, "image_mismatch": 1},
        "source_bad": {"image_decode": 1, "no_image": 1, "image_missing": 1, "image_mismatch": 1},
    }


def write_parquet(path: Path, rows: list[dict[str, Any]], row_group_size: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    message = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    schema = pa.schema([("images", pa.list_(image)), ("messages", pa.list_(message))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def rlaif_parquet(path: Path, n: int = 12) -> Path:
    """RLAIF-V-style preference rows: `image` {bytes, path}, `question`, `chosen`, `rejected`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"image": {"bytes": image_bytes(COLOURS[i % 8]), "path": None}, "question": "what colour is it?",
             "chosen": f"it is {COLOURS[i % 8]}", "rejected": "it is grey", "ds_name": "test"} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    return path
