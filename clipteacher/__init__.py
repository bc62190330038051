"""clipteacher: open-vocabulary semantic segmentation by a small student that a frozen CLIP teacher trained.

Rooms, bottom layer first (imports point down the list only; docs/METHOD.md describes the method):
    clipteacher.config      typed configs of every box of the method (dataclasses; no torch)
    clipteacher.checkpoint  checkpoints (.pt, safe loader) and model folders (safetensors + config.json + card)
    clipteacher.io          reading images and labels, resizing, file digests (numpy, PIL, OpenCV; no torch)
    clipteacher.prompts     prompt templates and the training-vocabulary test (no torch)
    clipteacher.request     what a person sends and gets back: caps, parsing, UserError, mask PNG (no torch)
    clipteacher.pseudo      K-Means pseudo regions, mask fusion and their pictures (numpy; no torch)
    clipteacher.models      student and teachers (torch)
    clipteacher.predictor   a trained student from a checkpoint or model folder, and prediction with it (torch)
    clipteacher.runtime     an exported ONNX bundle on onnxruntime, and which bundle to serve (no torch)
    clipteacher.batch       batch prediction's files: inputs, output names, atomic writes, summary (no torch)
    clipteacher.app         the Gradio app on the runtime (no torch)
    clipteacher.train       data, losses, GLM, PLM, gamma rule and the training loop (torch)
    clipteacher.export      ONNX wrappers and the bundle writer (torch, onnx)
    clipteacher.cli         the commands: clipteacher-train, -eval, -pseudo, -export, -app, -predict

Importing this package imports nothing heavy; each room imports what it needs. Inference (models,
predictor, runtime, app, request) never imports clipteacher.train (tests/test_layout.py).
"""
__version__ = "0.1.0"
