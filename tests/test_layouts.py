"""cheapnet_jax.layouts: the annotation tools' exports read as masks equal to an independent
rasterisation (pycocotools' annToMask for COCO, LabelMe's own shape_to_mask for LabelMe, the
painted pixels for colour masks), written as the tools write them; recognition and its refusals;
evaluate.py on a COCO export of the real samples equal to evaluate.py on the DAGM folder."""

from __future__ import annotations

import base64
import json
import math
import shutil

import numpy as np
import pytest
from conftest import checkpoint_path, run_tool
from PIL import Image, ImageDraw
from pycocotools import mask as coco_masks
from pycocotools.coco import COCO

from cheapnet_jax import data, layouts
from cheapnet_jax.errors import DataError


def save_gray(path, pixels) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), np.uint8)


def masks_of(samples) -> dict[str, np.ndarray]:
    return {s.image_path.name: data.read_sample(s)[1] for s in samples}


# COCO ---------------------------------------------------------------------------------------


def write_coco_export(folder, *, height=40, width=56):
    """A COCO export as CVAT and Label Studio write one: images/ and annotations.json with a
    polygon, an ``iscrowd`` uncompressed RLE, a compressed RLE, an image without annotations,
    and a second category ("stain") besides "scratch"."""
    names = ["a.png", "b.png", "c.png", "good.png"]
    for index, name in enumerate(names):
        save_gray(folder / "images" / name, texture(height, width, index))
    crowd = np.zeros((height, width), np.uint8)
    crowd[5:15, 30:50] = 1
    crowd_rle = coco_masks.encode(np.asfortranarray(crowd))
    # uncompressed RLE, as COCO writes iscrowd regions: run lengths, column-major
    flat = crowd.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]])) if flat.size else []
    counts = np.diff(np.r_[0, changes]).tolist()
    compressed = np.zeros((height, width), np.uint8)
    compressed[20:30, 3:9] = 1
    compressed_rle = coco_masks.encode(np.asfortranarray(compressed))
    compressed_rle["counts"] = compressed_rle["counts"].decode("ascii")
    annotations = [
        # a triangle and a quadrilateral of one object
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": [[3.5, 4.0, 20.2, 6.0, 10.0, 25.7], [30, 30, 45, 30, 45, 38, 30, 38]]},
        {"id": 2, "image_id": 2, "category_id": 1, "iscrowd": 1,
         "segmentation": {"size": [height, width], "counts": counts}},
        {"id": 3, "image_id": 3, "category_id": 2, "iscrowd": 0, "segmentation": compressed_rle},
        {"id": 4, "image_id": 3, "category_id": 1, "iscrowd": 0,
         "segmentation": [[40, 2, 50, 2, 50, 12]]},
    ]  # fmt: skip
    assert counts and sum(counts) == height * width and crowd_rle is not None
    document = {
        "images": [
            {"id": i + 1, "file_name": name, "height": height, "width": width}
            for i, name in enumerate(names)
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "scratch"}, {"id": 2, "name": "stain"}],
    }
    (folder / "annotations.json").write_text(json.dumps(document))
    return folder / "annotations.json"


def coco_reference(json_path, category_names=None) -> dict[str, np.ndarray]:
    """Each image's union of ``COCO.annToMask`` over its annotations (of those categories)."""
    coco = COCO(str(json_path))
    category_ids = coco.getCatIds(catNms=category_names or [])
    result = {}
    for image in coco.loadImgs(coco.getImgIds()):
        mask = np.zeros((image["height"], image["width"]), bool)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image["id"], catIds=category_ids)):
            mask |= coco.annToMask(annotation).astype(bool)
        result[image["file_name"]] = mask
    return result


def test_coco_masks_equal_pycocotools_ann_to_mask(tmp_path):
    json_path = write_coco_export(tmp_path / "export")
    assert layouts.recognise(tmp_path / "export") == "coco"
    assert layouts.recognise(json_path) == "coco"
    samples = layouts.list_samples(tmp_path / "export")
    reference = coco_reference(json_path)
    got = masks_of(samples)
    assert got.keys() == reference.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], reference[name], err_msg=name)
    assert [s.label_path is not None for s in samples] == [True, True, True, False]
    assert got["b.png"].sum() == 200 and got["a.png"].sum() > 100  # not vacuous

    only_stain = masks_of(layouts.list_samples(json_path, ["stain"]))
    stain_reference = coco_reference(json_path, ["stain"])
    for name in only_stain:
        np.testing.assert_array_equal(only_stain[name], stain_reference[name], err_msg=name)
    assert only_stain["c.png"].sum() == 60 and not only_stain["a.png"].any()
    with pytest.raises(DataError, match=r"no class 'dent' .*scratch, stain"):
        layouts.list_samples(json_path, ["dent"])


def test_a_coco_export_is_not_read_as_a_plain_folder_and_two_layouts_are_refused(tmp_path):
    """The reported bug: images/ beside annotations.json was read as the plain layout, every
    image defect-free. Now it is COCO; with masks/ as well, both are named."""
    write_coco_export(tmp_path / "export")
    assert layouts.recognise(tmp_path / "export") == "coco"
    (tmp_path / "export" / "masks").mkdir()
    with pytest.raises(DataError, match=r"matches several layouts: .*coco .*plain"):
        layouts.recognise(tmp_path / "export")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"not a data folder of any known layout \(tried dagm, "):
        layouts.list_samples(tmp_path / "nothing")


def test_coco_boxes_alone_and_missing_images_are_refused(tmp_path):
    json_path = write_coco_export(tmp_path / "export")
    document = json.loads(json_path.read_text())
    document["annotations"][0]["segmentation"] = []
    json_path.write_text(json.dumps(document))
    with pytest.raises(DataError, match="annotation 1 has no segmentation"):
        layouts.list_samples(json_path)
    document["annotations"][0]["segmentation"] = [[1, 1, 5, 1, 5, 5]]
    document["images"][0]["file_name"] = "absent.png"
    json_path.write_text(json.dumps(document))
    with pytest.raises(DataError, match=r"image 'absent\.png' not found"):
        layouts.list_samples(json_path)


# LabelMe ------------------------------------------------------------------------------------


def labelme_shape_to_mask(image_shape, points, shape_type) -> np.ndarray:
    """LabelMe's own ``labelme.utils.shape.shape_to_mask`` (polygon, rectangle, circle), the
    reference the issue names."""
    mask = Image.fromarray(np.zeros(image_shape[:2], dtype=np.uint8))
    draw = ImageDraw.Draw(mask)
    xy = [tuple(point) for point in points]
    if shape_type == "circle":
        (cx, cy), (px, py) = xy
        d = math.sqrt((cx - px) ** 2 + (cy - py) ** 2)
        draw.ellipse([cx - d, cy - d, cx + d, cy + d], outline=1, fill=1)
    elif shape_type == "rectangle":
        # LabelMe keeps the corners in the order they were dragged; Pillow wants them sorted
        (x1, y1), (x2, y2) = xy
        draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=1, fill=1)
    else:
        draw.polygon(xy=xy, outline=1, fill=1)
    return np.array(mask, dtype=bool)


def labelme_document(image_name, shapes, height, width, embedded: bytes | None):
    return {
        "version": "5.4.1",
        "flags": {},
        "shapes": [
            {"label": label, "points": points, "group_id": None, "description": "",
             "shape_type": kind, "flags": {}, "mask": None}
            for label, kind, points in shapes
        ],
        "imagePath": image_name,
        "imageData": None if embedded is None else base64.b64encode(embedded).decode("ascii"),
        "imageHeight": height,
        "imageWidth": width,
    }  # fmt: skip


def test_labelme_masks_equal_labelme_shape_to_mask(tmp_path):
    height, width = 48, 64
    folder = tmp_path / "labelme"
    shapes = {
        "one.png": [
            ("scratch", "polygon", [[5.2, 3.1], [30.7, 8.0], [18.0, 30.4], [4.0, 20.0]]),
            ("dent", "circle", [[45.0, 30.0], [45.0, 39.5]]),
        ],
        "two.png": [("scratch", "rectangle", [[50, 40], [10, 22]])],
        "three.png": [("dent", "polygon", [[1, 1], [10, 1], [10, 10]])],
    }
    for index, name in enumerate([*shapes, "good.png"]):
        save_gray(folder / name, texture(height, width, index))
    for index, (name, image_shapes) in enumerate(shapes.items()):
        # one export embeds the image (imageData), the others leave it null
        embedded = (folder / name).read_bytes() if index == 0 else None
        document = labelme_document(name, image_shapes, height, width, embedded)
        (folder / f"{name[:-4]}.json").write_text(json.dumps(document))
    assert layouts.recognise(folder) == "labelme"

    def reference(name, labels):
        mask = np.zeros((height, width), bool)
        for label, kind, points in shapes.get(name, []):
            if label in labels:
                mask |= labelme_shape_to_mask((height, width), points, kind)
        return mask

    for chosen in ([], ["scratch"]):
        samples = layouts.list_samples(folder, chosen)
        got = masks_of(samples)
        assert sorted(got) == ["good.png", "one.png", "three.png", "two.png"]
        for name, mask in got.items():
            expected = reference(name, chosen or ["scratch", "dent"])
            np.testing.assert_array_equal(mask, expected, err_msg=f"{name} {chosen}")
        good = {s.image_path.name for s in samples if s.label_path is None}
        assert good == ({"good.png"} if not chosen else {"good.png", "three.png"})
    # a known answer: the rectangle's pixels, its edges included
    rectangle = masks_of(layouts.list_samples(folder))["two.png"]
    assert rectangle.sum() == 19 * 41 and rectangle[22:41, 10:51].all()

    document = json.loads((folder / "two.json").read_text())
    document["shapes"].append(
        {"label": "scratch", "points": [[1, 1], [5, 5]], "shape_type": "line"}
    )
    (folder / "two.json").write_text(json.dumps(document))
    with pytest.raises(DataError, match=r"two\.json: shape 'scratch' is a line of 2 points"):
        masks_of(layouts.list_samples(folder))


# CVAT's segmentation masks, MVTec AD, KolektorSDD2 -------------------------------------------


def test_cvat_segmentation_mask_export_reads_the_chosen_labels_colours(tmp_path):
    folder = tmp_path / "cvat"
    (folder / "SegmentationClass").mkdir(parents=True)
    (folder / "JPEGImages").mkdir()
    (folder / "labelmap.txt").write_text(
        "# label:color_rgb:parts:actions\nbackground:0,0,0::\nscratch:250,50,83::\n"
        "stain:36,179,83::\n"
    )
    colours = np.zeros((32, 40, 3), np.uint8)
    colours[2:9, 3:12] = (250, 50, 83)
    colours[20:30, 25:39] = (36, 179, 83)
    colours[0, 0] = (250, 50, 84)  # a colour of no label: not a defect
    Image.fromarray(colours).save(folder / "SegmentationClass" / "frame1.png")
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(
        folder / "SegmentationClass" / "frame2.png"
    )
    for name in ("frame1", "frame2"):
        Image.fromarray(texture(32, 40)).convert("RGB").save(folder / "JPEGImages" / f"{name}.jpg")
    assert layouts.recognise(folder) == "cvat-mask"
    samples = layouts.list_samples(folder)
    assert [s.label_path is not None for s in samples] == [True, False]  # an empty mask: good
    mask = masks_of(samples)["frame1.jpg"]
    expected = np.zeros((32, 40), bool)
    expected[2:9, 3:12] = expected[20:30, 25:39] = True
    np.testing.assert_array_equal(mask, expected)
    only_scratch = masks_of(layouts.list_samples(folder, ["scratch"]))["frame1.jpg"]
    assert only_scratch.sum() == 7 * 9 and only_scratch[2:9, 3:12].all()
    with pytest.raises(DataError, match="no class 'background'"):
        layouts.list_samples(folder, ["background"])


def test_mvtec_and_kolektorsdd2_layouts(tmp_path):
    mvtec = tmp_path / "bottle"
    save_gray(mvtec / "train/good/000.png", texture(32, 32, 1))
    save_gray(mvtec / "test/good/000.png", texture(32, 32, 2))
    save_gray(mvtec / "test/crack/000.png", texture(32, 32, 3))
    crack = np.zeros((32, 32), np.uint8)
    crack[4:9, 10:20] = 255
    save_gray(mvtec / "ground_truth/crack/000_mask.png", crack)
    assert layouts.recognise(mvtec) == "mvtec"
    samples = layouts.list_samples(mvtec)
    assert [s.label_path is not None for s in samples] == [False, False, True]
    np.testing.assert_array_equal(data.read_sample(samples[2])[1], crack > 0)

    kolektor = tmp_path / "ksdd2"
    for stem, region in (("10000", (slice(30, 60), slice(5, 9))), ("10001", None)):
        save_gray(kolektor / f"{stem}.png", texture(230, 70))
        truth = np.zeros((230, 70), np.uint8)
        if region:
            truth[region] = 255
        save_gray(kolektor / f"{stem}_GT.png", truth)
    assert layouts.recognise(kolektor) == "kolektorsdd2"
    samples = layouts.list_samples(kolektor)
    assert [s.label_path is not None for s in samples] == [True, False]
    assert data.read_sample(samples[0])[1].sum() == 30 * 4
    (kolektor / "10002_GT.png").write_bytes((kolektor / "10001_GT.png").read_bytes())
    with pytest.raises(DataError, match=r"10002_GT\.png: a mask without an image"):
        layouts.list_samples(kolektor)


# The user's flow -----------------------------------------------------------------------------


def test_evaluate_on_a_coco_export_of_the_real_samples_equals_the_dagm_folder(
    tmp_path, samples_folder
):
    """The reported case: the 10 real DAGM samples exported as COCO (compressed RLE of their
    labels) gave defect IoU 0.0; evaluate.py must give the DAGM folder's own figures."""
    export = tmp_path / "coco"
    (export / "images").mkdir(parents=True)
    images, annotations = [], []
    for index, sample in enumerate(data.list_dagm_samples(samples_folder), start=1):
        shutil.copy(sample.image_path, export / "images" / sample.image_path.name)
        image, mask = data.read_sample(sample)
        images.append({"id": index, "file_name": sample.image_path.name,
                       "height": image.shape[0], "width": image.shape[1]})  # fmt: skip
        if mask.any():
            rle = coco_masks.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": index, "image_id": index, "category_id": 1,
                                "iscrowd": 0, "segmentation": rle})  # fmt: skip
    categories = [{"id": 1, "name": "defect"}]
    document = {"images": images, "annotations": annotations, "categories": categories}
    (export / "annotations.json").write_text(json.dumps(document))

    figures = {}
    for name, folder in (("dagm", samples_folder), ("coco", export)):
        out = tmp_path / f"{name}.json"
        done = run_tool(
            "evaluate.py", "--checkpoint", str(checkpoint_path(2)), "--data", str(folder),
            "--json", str(out), "--no-progress",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        figures[name] = json.loads(out.read_text())
    assert figures["coco"]["iou_defect"] > 0.3
    for key in ("miou", "iou_defect", "map_paper", "map_component", "confusion"):
        assert figures["coco"][key] == figures["dagm"][key], key
