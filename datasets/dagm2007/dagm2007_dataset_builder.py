"""tensorflow-datasets builder for DAGM 2007 (manual download; no TensorFlow needed).

Put the extracted download in the manual directory (default
``~/tensorflow_datasets/downloads/manual/dagm2007``), laid out as ``Class1 .. Class10``, each
with ``Train/`` and ``Test/`` holding ``NNNN.PNG`` and ``Label/Labels.txt``. Then::

    python -m datasets.dagm2007.build --manual-dir /data/DAGM2007 --config class6

Configs: ``class1`` .. ``class10`` and ``all``. Splits: ``train`` / ``validation`` (the paper's
protocol: defective images, 8:2 per class by a fixed seed) and ``dagm_train`` / ``dagm_test``
(DAGM's own folders, defect-free images included; absent when the folders are). Images and
masks are stored as zlib-encoded uint8 tensors in array_record files, read with
`tfds.data_source` without TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from cheapnet_jax import data

CLASSES = tuple(range(1, 11))
SPLIT_SEED = 0


class Dagm2007Config(tfds.core.BuilderConfig):
    """One DAGM class, or all of them."""

    def __init__(self, *, classes: tuple[int, ...], **kwargs):
        super().__init__(**kwargs)
        self.classes = classes


class Builder(tfds.core.GeneratorBasedBuilder):
    """DAGM 2007 defect segmentation (manual download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First release: paper split and DAGM's own Train/Test."
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download DAGM 2007 (the 'Weakly Supervised Learning for Industrial Optical Inspection' "
        "competition data) and extract it so that the manual directory holds Class1 .. Class10, "
        "each with Train/ and Test/ (NNNN.PNG and Label/Labels.txt)."
    )
    BUILDER_CONFIGS = [
        Dagm2007Config(name=f"class{c}", classes=(c,), description=f"DAGM class {c}")
        for c in CLASSES
    ] + [Dagm2007Config(name="all", classes=CLASSES, description="all ten classes")]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(None, None), dtype=np.uint8, encoding="zlib"
                    ),
                    "mask": tfds.features.Tensor(
                        shape=(None, None), dtype=np.uint8, encoding="zlib"
                    ),
                    "class_id": np.int32,
                    "defective": np.bool_,
                    "file_name": tfds.features.Text(),
                }
            ),
            homepage="https://hci.iwr.uni-heidelberg.de/content/weakly-supervised-learning-industrial-optical-inspection",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = Path(dl_manager.manual_dir)
        classes = list(self.builder_config.classes)
        paper = data.paper_split(root, classes, seed=SPLIT_SEED)
        folders = {
            name: [root / f"Class{c}" / part for c in classes]
            for name, part in (("dagm_train", "Train"), ("dagm_test", "Test"))
        }
        own = {
            name: [s for folder in paths if folder.is_dir() for s in data.list_dagm_samples(folder)]
            for name, paths in folders.items()
        }
        return {
            "train": self._generate_examples(paper["train"]),
            "validation": self._generate_examples(paper["validation"]),
            # A DAGM folder that is absent (e.g. only Train/ was downloaded) gives no split.
            **{name: self._generate_examples(found) for name, found in own.items() if found},
        }

    def _generate_examples(self, samples: list[data.DagmSample]):
        for sample in samples:
            image, mask = data.read_sample(sample)
            key = f"class{sample.class_id}/{sample.image_path.parent.name}/{sample.name}"
            yield (
                key,
                {
                    "image": image,
                    "mask": mask.astype(np.uint8),
                    "class_id": sample.class_id,
                    "defective": sample.label_path is not None,
                    "file_name": key,
                },
            )
