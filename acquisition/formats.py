"""Recording formats by file name (stdlib only: the configuration checks names with it)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["RECORDING_SUFFIXES", "recording_format"]

#: file name endings -> format ("ome-tiff" | "ome-zarr")
RECORDING_SUFFIXES: dict[str, str] = {
    ".ome.tif": "ome-tiff", ".ome.tiff": "ome-tiff", ".tif": "ome-tiff", ".tiff": "ome-tiff",
    ".ome.zarr": "ome-zarr", ".zarr": "ome-zarr",
}


def recording_format(path: str | Path) -> str:
    """"ome-tiff" or "ome-zarr" from the file name; ValueError for anything else."""
    name = Path(path).name.lower().rstrip("/")
    for suffix in sorted(RECORDING_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return RECORDING_SUFFIXES[suffix]
    raise ValueError(f"cannot tell the recording format of {str(path)!r}: name it "
                     "*.ome.tif (OME-TIFF) or *.ome.zarr (OME-Zarr)")
