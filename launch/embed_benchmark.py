"""Files/s of ``python -m unimedi_jax.embed`` on real-size inputs: 1,000 chest X-rays and 50 CT
series in JPEG Lossless, built once under --root from pydicom-data's real files.

    python launch/embed_benchmark.py --workdir=runs/demo --root=/tmp/embed_bench [--code=DIR]

X-rays: RG1_UNCR.dcm (1955 x 1841, 15 bits) as DICOM and as 2k PNG and JPEG, in turn (hard
links: the same decoding work under other names). CT: the
real slice 693_UNCR.dcm (512 x 512), shifted a few rows a slice, 100 slices a series, GDCM's
JPEG Lossless (.70). Each set is embedded with --read_workers=0 and the default, and a
one-file run of each kind gives the fixed cost (load, compile) taken off: files/s =
files / (seconds - one-file seconds). ``--code`` runs another checkout's command (its
``unimedi_jax``, e.g. an older commit's ``git archive``) on the same inputs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

N_XRAYS, N_SERIES, DEPTH = 1000, 50, 100


def _xrays(folder: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm", download=False))
    pixels = ds.pixel_array.astype(np.float64)
    grey = np.rint((pixels - pixels.min()) / np.ptp(pixels) * 255).astype(np.uint8)
    image = Image.fromarray(grey).resize((2048, 2176))
    folder.mkdir(parents=True)
    ds.save_as(folder / "0000.dcm")
    image.save(folder / "0001.png")
    image.save(folder / "0002.jpg", quality=90)
    for k in range(3, N_XRAYS):  # the same files under other names: same decoding work
        source = folder / f"{k % 3:04d}{('.dcm', '.png', '.jpg')[k % 3]}"
        os.link(source, folder / f"{k:04d}{source.suffix}")


def _series(folder: Path) -> None:
    import gdcm

    ds = pydicom.dcmread(get_testdata_file("693_UNCR.dcm", download=False))
    stored = ds.pixel_array
    first = folder / "s000"
    first.mkdir(parents=True)
    for k in range(DEPTH):
        ds.PixelData = np.roll(stored, 3 * k, axis=0).tobytes()
        ds.SOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [-160.0, -160.0, 3.0 * k]
        plain = first / "plain.dcm"
        ds.save_as(plain)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(plain))
        reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(first / f"{k:03d}.dcm"))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.Write()
        plain.unlink()
    for s in range(1, N_SERIES):  # the same files under other names: same decoding work
        shutil.copytree(first, folder / f"s{s:03d}", copy_function=os.link)


def _embed(code: Path, workdir: str, out: Path, paths: list[Path], workers: int | None) -> float:
    flag = [] if workers is None else [f"--read_workers={workers}"]
    command = [sys.executable, "-m", "unimedi_jax.embed", f"--workdir={workdir}"]
    command += [f"--out={out}", *flag, *map(str, paths)]
    env = {**os.environ, "PYTHONPATH": str(code), "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=code)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--workers", type=int, nargs="*", default=[0, -1])
    args = parser.parse_args()
    xrays, cts = args.root / "xrays", args.root / "cts"
    if not xrays.exists():
        _xrays(xrays)
    if not cts.exists():
        _series(cts)
    sets = {
        "X-rays": (sorted(xrays.iterdir()), N_XRAYS),
        "CT series": (sorted(cts.iterdir()), N_SERIES),
    }
    out = args.root / "out.npz"
    for name, (paths, n) in sets.items():
        for workers in args.workers:
            chosen = None if workers < 0 else workers
            fixed = _embed(args.code, args.workdir, out, paths[:1], chosen)
            total = _embed(args.code, args.workdir, out, paths, chosen)
            label = "default" if chosen is None else str(chosen)
            print(
                f"{name}: {n} in {total:.1f} s (one: {fixed:.1f} s), "
                f"{n / max(total - fixed, 1e-9):.2f} files/s, read_workers={label}",
                flush=True,
            )


if __name__ == "__main__":
    main()
