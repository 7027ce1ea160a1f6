"""Checkpoint -> bundle: split, ONNX, verification, FP16, TensorRT build (torch, onnx)."""
