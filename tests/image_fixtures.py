"""Small image files for tests: DICOM (uncompressed, 12-bit) and PNG/JPEG radiograph stand-ins."""

import numpy as np


def write_dicom(path, arr, photometric="MONOCHROME2"):
    """A 12-bit secondary-capture DICOM holding ``arr`` (2-D, 0..4095)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    fm = FileMetaDataset()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    fm.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=fm, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ViewPosition = "AP"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def marked_image(positive: bool, seed: int, shape=(40, 48), peak=255) -> np.ndarray:
    """Noise with a bright block in the left half when ``positive``: a finding a small model learns in steps."""
    rng = np.random.default_rng(seed)
    h, w = shape
    arr = rng.normal(0.35 * peak, 0.08 * peak, size=shape)
    if positive:
        arr[h // 4: 3 * h // 4, w // 8: w // 2] += 0.45 * peak
    return np.clip(arr, 0, peak)
