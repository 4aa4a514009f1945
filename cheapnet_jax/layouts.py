"""The layouts a data folder can have, recognised from its contents, and their samples.

=============  =====================================================================
layout         what marks it
=============  =====================================================================
dagm           ``Label/Labels.txt`` (a DAGM 2007 class folder)
plain          ``images/`` with ``masks/`` (or with no annotation file beside it)
coco           a COCO JSON (``images``, ``annotations``, ``categories``): the file
               itself, or at the folder's top or in its ``annotations/``
labelme        LabelMe JSON files (``shapes``, ``imagePath``) beside their images
cvat-mask      ``labelmap.txt`` and ``SegmentationClass/`` (CVAT's segmentation
               mask export; Pascal VOC's layout)
mvtec          ``train/good/``, ``test/`` and ``ground_truth/`` (an MVTec AD category)
kolektorsdd2   ``*_GT.png`` beside each image (a KolektorSDD2 split folder)
=============  =====================================================================

A folder that matches two layouts is refused naming both (a COCO JSON beside ``images/`` and
``masks/`` would otherwise be silently ignored by one reading or the other); one that matches
none is refused naming the layouts tried. Annotated layouts name their classes: the defect
classes are all of them (but a CVAT map's ``background``) unless ``defect_classes`` picks some
by name. Images of every layout but dagm may be of any size (`data.DagmSample.any_size`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cheapnet_jax import data
from cheapnet_jax.data import IMAGE_SUFFIXES, DagmSample
from cheapnet_jax.errors import DataError

LAYOUTS = ("dagm", "plain", "coco", "labelme", "cvat-mask", "mvtec", "kolektorsdd2")
COCO_KEYS = {"images", "annotations", "categories"}
LABELME_KEYS = {"shapes", "imagePath"}
CVAT_BACKGROUND = "background"


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read as JSON ({err})") from err


def _json_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.json") if p.is_file())


def _is_coco(path: Path) -> bool:
    document = _read_json(path)
    return isinstance(document, dict) and document.keys() >= COCO_KEYS


def _coco_files(source: Path) -> list[Path]:
    """The COCO JSONs that make ``source`` a COCO layout: itself, or those at its top or in its
    ``annotations/``."""
    if source.is_file():
        return [source] if source.suffix.lower() == ".json" and _is_coco(source) else []
    candidates = _json_files(source)
    if (source / "annotations").is_dir():
        candidates += _json_files(source / "annotations")
    return [path for path in candidates if _is_coco(path)]


def _labelme_files(folder: Path) -> list[Path]:
    files = []
    for path in _json_files(folder):
        document = _read_json(path)
        if isinstance(document, dict) and document.keys() >= LABELME_KEYS:
            files.append(path)
    return files


def _ground_truth_pairs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*_GT.png")) if folder.is_dir() else []


def _signatures(source: Path) -> dict[str, str]:
    """Every layout ``source`` matches, with the file or folder that marks it."""
    if source.is_file():
        return {"coco": str(source)} if _coco_files(source) else {}
    found: dict[str, str] = {}
    if (source / data.LABELS_FILE).is_file():
        found["dagm"] = str(source / data.LABELS_FILE)
    coco = _coco_files(source)
    if coco:
        found["coco"] = str(coco[0])
    labelme = _labelme_files(source)
    if labelme:
        found["labelme"] = str(labelme[0])
    if (source / "images").is_dir() and ((source / "masks").is_dir() or not (coco or labelme)):
        found["plain"] = str(source / "images")
    if (source / "labelmap.txt").is_file() and (source / "SegmentationClass").is_dir():
        found["cvat-mask"] = str(source / "labelmap.txt")
    if all((source / part).is_dir() for part in ("train/good", "test", "ground_truth")):
        found["mvtec"] = str(source / "ground_truth")
    pairs = _ground_truth_pairs(source)
    if pairs:
        found["kolektorsdd2"] = str(pairs[0])
    return found


def recognise(source: str | os.PathLike) -> str:
    """The layout of a data folder (or COCO JSON file); DataError when none or several match."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such folder or file")
    return _layout_of(source, _signatures(source))


def _layout_of(source: Path, found: dict[str, str]) -> str:
    """The one layout of `_signatures`' ``found``; DataError when none or several."""
    if not found:
        raise DataError(
            f"{source}: not a data folder of any known layout (tried {', '.join(LAYOUTS)}; "
            "see the guide to your own data)"
        )
    if len(found) > 1:
        marks = "; ".join(f"{layout} ({mark})" for layout, mark in found.items())
        raise DataError(
            f"{source}: matches several layouts: {marks}: keep one layout's files in the folder, "
            "or name a COCO JSON file itself"
        )
    return next(iter(found))


def list_samples(source: str | os.PathLike, defect_classes: Sequence[str] = ()) -> list[DagmSample]:
    """The samples of a data folder of any layout (`recognise`), sorted by image path but for
    DAGM's (``Labels.txt`` order)."""
    source = Path(source)
    return _listed(source, recognise(source), tuple(defect_classes))


def _listed(source: Path, layout: str, defect_classes: tuple[str, ...]) -> list[DagmSample]:
    if layout in ("dagm", "plain") and defect_classes:
        raise DataError(f"{source}: a {layout} folder names no classes to pick defects by")
    listers: dict[str, Callable[[Path, tuple[str, ...]], list[DagmSample]]] = {
        "dagm": lambda folder, _: data.list_dagm_samples(folder),
        "plain": lambda folder, _: data.list_plain_samples(folder),
        "coco": _coco_samples,
        "labelme": _labelme_samples,
        "cvat-mask": _cvat_samples,
        "mvtec": _mvtec_samples,
        "kolektorsdd2": _kolektor_samples,
    }
    samples = listers[layout](source, defect_classes)
    if not samples:
        raise DataError(f"{source}: no images ({layout} layout)")
    return samples


def training_splits(
    source: str | os.PathLike,
    classes: list[int],
    protocol: str,
    seed: int,
    defect_classes: Sequence[str] = (),
) -> tuple[dict[str, list[DagmSample]], str]:
    """A training run's train and validation samples and their description: a DAGM root by
    ``protocol`` (`data.paper_split` or `data.dagm_split`), else any layout's images,
    defective and good alike, split 8:2 by ``seed`` (`data.random_split`)."""
    source = Path(source)
    # A folder's layout files are read once here (a COCO JSON can be large).
    found = _signatures(source) if source.is_dir() else None
    if found is None or found:
        layout = recognise(source) if found is None else _layout_of(source, found)
        samples = _listed(source, layout, tuple(defect_classes))
        return data.random_split(samples, seed=seed, name=source), f"{source} ({layout})"
    if protocol == "dagm":
        splits = data.dagm_split(source, classes, seed=seed)
        return splits, f"DAGM {source} classes {classes}, Train folders (dagm protocol)"
    if protocol != "paper":
        raise ValueError(f"protocol must be 'paper' or 'dagm', got {protocol!r}")
    return data.paper_split(source, classes, seed=seed), f"DAGM {source} classes {classes} (paper)"


def _chosen(available: Sequence[str], wanted: tuple[str, ...], source: Path) -> set[str]:
    """The defect classes: ``wanted`` (each must exist), else every available one."""
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise DataError(
            f"{source}: no class {unknown[0]!r} (its classes: {', '.join(sorted(available))})"
        )
    return set(wanted or available)


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _check_shape(source: Path, expected: tuple[int, int], shape: tuple[int, int]) -> None:
    if tuple(expected) != tuple(shape[:2]):
        raise DataError(
            f"{source}: annotated for an image of {expected[0]}x{expected[1]}, but the image is "
            f"{shape[0]}x{shape[1]}"
        )


# COCO ---------------------------------------------------------------------------------------


def coco_mask(annotations: Sequence[dict], height: int, width: int) -> np.ndarray:
    """The union of COCO annotations' segmentations (polygons, RLE or compressed RLE) as a bool
    ``[H, W]`` mask, rasterised by pycocotools as its ``COCO.annToMask`` does."""
    from pycocotools import mask as coco_masks

    mask = np.zeros((height, width), bool)
    for annotation in annotations:
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):  # polygons
            rle = coco_masks.merge(coco_masks.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE (iscrowd)
            rle = coco_masks.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        mask |= coco_masks.decode(rle).astype(bool)
    return mask


def _coco_image_path(json_path: Path, file_name: str) -> Path:
    """Where a COCO image is: beside the JSON, in ``images/`` beside it or beside its folder."""
    folder = json_path.parent
    candidates = [folder, folder / "images", folder.parent / "images", folder.parent]
    for candidate in candidates:
        if (candidate / file_name).is_file():
            return candidate / file_name
    raise DataError(
        f"{json_path}: image {file_name!r} not found beside it, in images/ or in ../images/"
    )


def _coco_mask_of(
    json_path: Path, image_name: str, annotations: tuple, size: tuple[int, int], shape: tuple
) -> np.ndarray:
    _check_shape(json_path.with_name(f"{json_path.name}: {image_name}"), size, shape)
    return coco_mask([json.loads(a) for a in annotations], *size)


def _coco_samples(source: Path, defect_classes: tuple[str, ...]) -> list[DagmSample]:
    files = _coco_files(source)
    if len(files) > 1:
        raise DataError(
            f"{source}: several COCO JSONs ({', '.join(p.name for p in files)}): name one as --data"
        )
    json_path = files[0]
    document = _read_json(json_path)
    names = {category["id"]: category["name"] for category in document["categories"]}
    chosen = _chosen(list(names.values()), defect_classes, json_path)
    by_image: dict[int, list[dict]] = {}
    for annotation in document["annotations"]:
        if names.get(annotation["category_id"]) not in chosen:
            continue
        segmentation = annotation.get("segmentation")
        if not segmentation:
            raise DataError(
                f"{json_path}: annotation {annotation.get('id')} has no segmentation (boxes "
                "alone cannot train a segmentation network): export polygons or masks"
            )
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    samples = []
    for image in sorted(document["images"], key=lambda image: image["file_name"]):
        path = _coco_image_path(json_path, image["file_name"])
        annotations = by_image.get(image["id"])
        if not annotations:
            samples.append(DagmSample(path, None, 0, any_size=True))
            continue
        # The annotations as JSON text: the sample stays hashable and small.
        mask_of = partial(
            _coco_mask_of,
            json_path,
            image["file_name"],
            tuple(json.dumps(a) for a in annotations),
            (image["height"], image["width"]),
        )
        samples.append(DagmSample(path, json_path, 0, any_size=True, mask_of=mask_of))
    return samples


# LabelMe ------------------------------------------------------------------------------------


def labelme_mask(shapes: Sequence[dict], height: int, width: int, source: Path) -> np.ndarray:
    """LabelMe shapes (polygons, rectangles, circles) filled as LabelMe's ``shape_to_mask``
    fills them (PIL's ``ImageDraw``, outline included) into one bool ``[H, W]`` mask."""
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for shape in shapes:
        points = [tuple(point) for point in shape["points"]]
        kind = shape.get("shape_type") or "polygon"
        if kind == "polygon" and len(points) >= 3:
            draw.polygon(points, outline=1, fill=1)
        elif kind == "rectangle" and len(points) == 2:
            (x1, y1), (x2, y2) = points
            draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=1, fill=1)
        elif kind == "circle" and len(points) == 2:
            (cx, cy), (px, py) = points
            radius = math.hypot(cx - px, cy - py)
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=1, fill=1)
        else:
            raise DataError(
                f"{source}: shape {shape.get('label')!r} is a {kind} of {len(points)} points; "
                "defects are read from polygons, rectangles and circles"
            )
    return np.asarray(canvas, dtype=bool)


def _labelme_mask_of(json_path: Path, defect_classes: frozenset, shape: tuple) -> np.ndarray:
    document = _read_json(json_path)
    size = (document.get("imageHeight") or shape[0], document.get("imageWidth") or shape[1])
    _check_shape(json_path, size, shape)
    shapes = [s for s in document["shapes"] if s.get("label") in defect_classes]
    return labelme_mask(shapes, shape[0], shape[1], json_path)


def _labelme_samples(source: Path, defect_classes: tuple[str, ...]) -> list[DagmSample]:
    files = _labelme_files(source)
    documents = {path: _read_json(path) for path in files}
    labels = sorted({s.get("label") for d in documents.values() for s in d["shapes"]})
    chosen = frozenset(_chosen(labels, defect_classes, source))
    annotated: dict[Path, Path] = {}
    for json_path, document in documents.items():
        # imagePath is relative to the JSON file; imageData (embedded or null) is not read.
        image_path = (json_path.parent / document["imagePath"]).resolve()
        if not image_path.is_file():
            raise DataError(f"{json_path}: its image {document['imagePath']!r} is missing")
        if image_path in annotated:
            raise DataError(
                f"{json_path}: a second annotation of {image_path} ({annotated[image_path]})"
            )
        annotated[image_path] = json_path
    samples = []
    for image_path in sorted({*_images_in(source), *annotated}, key=str):
        image_path = image_path.resolve()
        json_path = annotated.get(image_path)
        has_defect = json_path is not None and any(
            s.get("label") in chosen for s in documents[json_path]["shapes"]
        )
        if not has_defect:
            samples.append(DagmSample(image_path, None, 0, any_size=True))
            continue
        mask_of = partial(_labelme_mask_of, json_path, chosen)
        samples.append(DagmSample(image_path, json_path, 0, any_size=True, mask_of=mask_of))
    return samples


# CVAT's segmentation mask export -------------------------------------------------------------


def read_label_map(path: Path) -> dict[str, tuple[int, int, int]]:
    """A CVAT / Pascal VOC ``labelmap.txt``: ``name:r,g,b:parts:actions`` per line."""
    colours = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        try:
            rgb = tuple(int(value) for value in rest.split(":")[0].split(","))
        except ValueError:
            rgb = ()
        if len(rgb) != 3:
            raise DataError(f"{path}:{number}: expected 'name:r,g,b:parts:actions', got {line!r}")
        colours[name] = rgb
    return colours


def colour_mask(path: Path, colours: Sequence[tuple[int, int, int]], shape: tuple) -> np.ndarray:
    """The pixels of a colour (or palette) mask that have one of ``colours``."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
    except OSError as err:
        raise DataError(f"{path}: cannot decode mask ({err})") from err
    _check_shape(path, rgb.shape[:2], shape)
    mask = np.zeros(rgb.shape[:2], bool)
    for colour in colours:
        mask |= (rgb == np.array(colour, np.uint8)).all(-1)
    return mask


def _cvat_samples(source: Path, defect_classes: tuple[str, ...]) -> list[DagmSample]:
    label_map = read_label_map(source / "labelmap.txt")
    names = [name for name in label_map if name != CVAT_BACKGROUND]
    colours = tuple(label_map[name] for name in sorted(_chosen(names, defect_classes, source)))
    masks = {mask.stem: mask for mask in (source / "SegmentationClass").glob("*.png")}
    images = _images_in(source / "JPEGImages")
    stems = {image.stem for image in images}
    orphans = sorted(set(masks) - stems)
    if orphans:
        raise DataError(f"{masks[orphans[0]]}: a mask without an image in {source / 'JPEGImages'}")
    samples = []
    for image in images:
        mask = masks.get(image.stem)
        if mask is None:  # not annotated in the task: good
            samples.append(DagmSample(image, None, 0, any_size=True))
        else:
            samples.append(_sample_with_mask(image, mask, partial(colour_mask, mask, colours)))
    return samples


def _sample_with_mask(
    image: Path, mask: Path, mask_of: Callable[[tuple[int, int]], np.ndarray]
) -> DagmSample:
    """A sample of a layout that gives good images a mask too (empty): good when it is empty."""
    with Image.open(mask) as opened:
        size = opened.height, opened.width
    if not mask_of(size).any():
        return DagmSample(image, None, 0, any_size=True)
    return DagmSample(image, mask, 0, any_size=True, mask_of=mask_of)


# MVTec AD and KolektorSDD2 -------------------------------------------------------------------


def _nonzero_mask(path: Path, shape: tuple) -> np.ndarray:
    """A 0 / non-zero mask of any 8-bit mode (`data.read_mask`)."""
    mask = data.read_mask(path)
    _check_shape(path, mask.shape, shape)
    return mask


def _mvtec_samples(source: Path, defect_classes: tuple[str, ...]) -> list[DagmSample]:
    kinds = sorted(p.name for p in (source / "test").iterdir() if p.is_dir() and p.name != "good")
    chosen = _chosen(kinds, defect_classes, source / "test")
    samples = [DagmSample(p, None, 0, any_size=True) for p in _images_in(source / "train/good")]
    samples += [DagmSample(p, None, 0, any_size=True) for p in _images_in(source / "test/good")]
    for kind in kinds:
        for image in _images_in(source / "test" / kind):
            mask = source / "ground_truth" / kind / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise DataError(f"{image}: its mask {mask} is missing")
            if kind in chosen:
                mask_of = partial(_nonzero_mask, mask)
                samples.append(DagmSample(image, mask, 0, any_size=True, mask_of=mask_of))
            else:
                samples.append(DagmSample(image, None, 0, any_size=True))
    return samples


def _kolektor_samples(source: Path, defect_classes: tuple[str, ...]) -> list[DagmSample]:
    if defect_classes:
        raise DataError(f"{source}: a KolektorSDD2 folder names no classes to pick defects by")
    masks = {p.name.removesuffix("_GT.png"): p for p in _ground_truth_pairs(source)}
    images = [p for p in _images_in(source) if not p.name.endswith("_GT.png")]
    stems = {image.stem for image in images}
    orphans = sorted(set(masks) - stems)
    if orphans:
        raise DataError(f"{masks[orphans[0]]}: a mask without an image in {source}")
    missing = [image for image in images if image.stem not in masks]
    if missing:
        raise DataError(f"{missing[0]}: its mask {missing[0].stem}_GT.png is missing")
    return [
        _sample_with_mask(image, masks[image.stem], partial(_nonzero_mask, masks[image.stem]))
        for image in images
    ]
