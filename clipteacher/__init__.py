"""clipteacher: open-vocabulary semantic segmentation by a small student that a frozen CLIP teacher trained.

Rooms (the method is described in docs/METHOD.md):
    clipteacher.io          reading images and labels, resizing (numpy, PIL, OpenCV; no torch)
    clipteacher.pseudo      K-Means pseudo regions, mask fusion and their pictures (numpy; no torch)
    clipteacher.runtime     an exported ONNX bundle on onnxruntime (no torch)
    clipteacher.app         the Gradio app on the runtime (no torch)
    clipteacher.models      student and teachers (torch)
    clipteacher.predictor   a trained student from a checkpoint, and prediction with it (torch)
    clipteacher.train       config, data, losses, GLM, PLM and the training loop (torch)
    clipteacher.export      ONNX wrappers and the bundle writer (torch, onnx)
    clipteacher.cli         the command-line entry points (clipteacher-train, -eval, -pseudo, -export, -app)

Importing this package imports nothing heavy; each room imports what it needs.
"""
__version__ = "0.1.0"
