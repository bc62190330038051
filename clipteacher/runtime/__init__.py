"""An exported bundle on onnxruntime and numpy only (no torch). See `Bundle`."""
from clipteacher.runtime.bundle import BUNDLE_FORMAT, Bundle

__all__ = ["BUNDLE_FORMAT", "Bundle"]
