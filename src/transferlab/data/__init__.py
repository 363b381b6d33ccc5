"""Data: a source (the CIFAR-10 URL, an archive, an image folder) -> uint8
arrays, class names and a manifest in data/prepared/ (the prepare stage,
`transferlab.stages.prepare`), read back by every later stage.

    sources.py   data.source -> a Dataset and its checksum: download, archive or folder
    archives.py  tar and zip extracted safely, once per archive content
    cifar.py     the canonical CIFAR-10 batches, through an unpickler that admits only arrays
    folders.py   an image-folder tree decoded into memory-mapped files
    arrays.py    the Dataset, seeded splits, rows not copied, memory released as it is read
    prepared.py  data/prepared/ written atomically, read back memory-mapped

Nothing here knows of the model: a new backbone reuses the prepared data.
"""

from transferlab.data.arrays import Dataset, Rows, release, split_rows, stratified_split
from transferlab.data.folders import FEW_IMAGES, decode_image, image_files, load_image_folder
from transferlab.data.prepared import Prepared, load_prepared, write_prepared
from transferlab.data.sources import download, is_url, load_source

__all__ = [
    "FEW_IMAGES", "Dataset", "Prepared", "Rows", "decode_image", "download", "image_files", "is_url",
    "load_image_folder", "load_prepared", "load_source", "release", "split_rows", "stratified_split",
    "write_prepared",
]
