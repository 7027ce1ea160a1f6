"""One small interface over inference backends: ONNX Runtime CPU/CUDA, TensorRT. Never imports torch."""
