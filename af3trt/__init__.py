"""af3trt: Audio Flamingo 3 from a Hugging Face checkpoint to Triton serving (TensorRT / TensorRT-LLM on GPU,
ONNX Runtime / PyTorch reference backends on CPU)."""

__version__ = "0.1.0"
