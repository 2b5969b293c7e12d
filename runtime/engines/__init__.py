"""What a stage runs: the CPU decoder and its LoRA rows, the encoder on ONNX Runtime or TensorRT, the stand-ins that
take the model's cost out, GPU detection. Imports runtime/stages only."""
