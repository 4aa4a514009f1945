"""Build the DAGM 2007 dataset from a manual download (no TensorFlow needed).

python -m datasets.dagm2007.build --manual-dir /data/DAGM2007 --config class6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tensorflow_datasets as tfds

from cheapnet_jax import cli
from cheapnet_jax.errors import DataError
from datasets.dagm2007.dagm2007_dataset_builder import Builder


def build(manual_dir: str, config: str, data_dir: str | None = None) -> Builder:
    """Prepare one config in array_record files; returns the builder (``as_data_source()``).

    DataError when ``manual_dir`` does not hold the download (TFDS would raise an assertion).
    """
    folder = Path(manual_dir)
    if not folder.is_dir() or not any(folder.glob("Class*")):
        raise DataError(
            f"{manual_dir}: no DAGM 2007 download there (--manual-dir must hold Class1 .. "
            "Class10, each with Train/ and Test/)"
        )
    builder = Builder(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manual-dir", required=True, help="holds Class1 .. Class10")
    parser.add_argument("--config", default="class6", help="class1 .. class10 or all")
    parser.add_argument("--data-dir", help="where TFDS keeps datasets (default: its own)")
    args = parser.parse_args(argv)
    builder = build(args.manual_dir, args.config, args.data_dir)
    print(f"built {builder.info.full_name} in {builder.data_dir}: {builder.info.splits}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:]))
