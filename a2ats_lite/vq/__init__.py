"""Query-aware vector quantization of keys (A2ATS section 2): k-means (kmeans.py), the
metric and codebooks scored at run time (codebook.py), the calibration sidecar file
(sidecar.py) and the calibration driver that runs the model (calibrate.py).

Imports run one way: calibrate -> sidecar -> codebook -> kmeans; only calibrate
touches the model and the KV cache.
"""
from .calibrate import QKRecorder, calibrate_from_samples, calibrate_model, record_samples
from .codebook import Codebook, estimate_H, parse_codes, train_codebook
from .kmeans import KMeansResult, kmeans, kmeans_pp_init, nearest
from .sidecar import (SIDECAR_LIMITS, SIDECAR_VERSION, Calibration, fingerprint,
                      load_sidecar_for, sidecar_path)

__all__ = [
    "Calibration", "Codebook", "KMeansResult", "QKRecorder", "SIDECAR_LIMITS",
    "SIDECAR_VERSION", "calibrate_from_samples", "calibrate_model", "estimate_H",
    "fingerprint", "kmeans", "kmeans_pp_init", "load_sidecar_for", "nearest", "parse_codes",
    "record_samples", "sidecar_path", "train_codebook",
]
