"""GDCM for 12-bit JPEG Extended: the one transfer syntax pydicom's own GDCM plugin refuses.

pydicom decodes uncompressed, deflated and RLE pixel data itself and every JPEG, JPEG-LS and
JPEG 2000 syntax through GDCM (python-gdcm, a base dependency), except JPEG Extended
(1.2.840.10008.1.2.4.51) at 12 bits, which its plugin turns away although GDCM decodes it
(within 1 grey level of libjpeg on pydicom-data's JPGExtended.dcm). This module is a pydicom
decoder plugin for that syntax; `register` adds it once. (GDCM first tries its 8-bit codec and
libjpeg prints "Unsupported JPEG data precision 12" on stderr before the 12-bit one succeeds.)
"""

from __future__ import annotations

import gdcm
from pydicom.pixels.decoders import JPEGExtended12BitDecoder
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.uid import UID, JPEGExtended12Bit

LABEL = "unimedi-gdcm-12bit"
# What pydicom's plugin interface asks a module for: the syntaxes it decodes, their packages.
DECODER_DEPENDENCIES = {JPEGExtended12Bit: ("gdcm",)}


def is_available(uid: UID) -> bool:
    """pydicom's plugin hook: gdcm is imported above, so every listed syntax is."""
    return uid in DECODER_DEPENDENCIES


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One encoded frame -> its pixel bytes, as pydicom's GDCM plugin does for other syntaxes."""
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    kind = gdcm.PhotometricInterpretation.GetPIType(runner.photometric_interpretation)
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(kind))
    if runner.samples_per_pixel > 1:
        image.SetPlanarConfiguration(runner.planar_configuration)
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
    bits = runner.bits_stored
    image.SetPixelFormat(
        gdcm.PixelFormat(
            runner.samples_per_pixel,
            runner.bits_allocated,
            bits,
            bits - 1,
            runner.pixel_representation,
        )
    )
    return image.GetBuffer().encode("utf-8", "surrogateescape")  # GDCM hands bytes as str


def register() -> None:
    """Add the plugin to pydicom's 12-bit JPEG Extended decoder (once per process)."""
    if LABEL not in JPEGExtended12BitDecoder.available_plugins:
        JPEGExtended12BitDecoder.add_plugin(LABEL, (__name__, "decode_frame"))
