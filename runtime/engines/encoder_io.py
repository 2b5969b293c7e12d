"""The encoder stage's tensor contract, shared by both backends and the engine builder.

Names only, no runtime: the CPU backend (runtime/engines/encoder.py, ONNX Runtime), the GPU backend (runtime/engines/trt_runner.py,
TensorRT) and the TensorRT engine build (build/trt_encoder.py) import these, and the GPU side must import nothing
that the serving container lacks (onnxruntime is not in nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3).
The tensors are the encoder step's (runtime/stages/contract.py ENCODER_STAGE), with the window axis W as the graph's batch:

    input_features       float32 [W, 128, T]   log-mel windows (T = 3000 frames for a full 30-s window)
    input_features_mask  int32   [W, T]        1 for valid frames
    audio_embeds         float32 [W, T/4, H]   projector output, H = the text hidden size
"""

from af3trt.runtime.stages.contract import AUDIO_EMBEDS as OUTPUT_EMBEDS  # noqa: F401 - the graph's names, read from here
from af3trt.runtime.stages.contract import INPUT_FEATURES, INPUT_FEATURES_MASK as INPUT_MASK  # noqa: F401

# metadata_props written at export
META_HIDDEN_SIZE = "af3trt.hidden_size"  # text hidden size H (width of audio_embeds)
META_CHECKPOINT_DTYPE = "af3trt.checkpoint_dtype"  # dtype the checkpoint stores the exported weights in
META_EXPORT_DTYPE = "af3trt.export_dtype"  # dtype of the graph's weights and activations
META_QUANTIZATION = "af3trt.quantization"  # absent for the plain export, e.g. "int8-dynamic"
META_MAX_FRAMES = "af3trt.max_frames"  # largest T of a dynamic frame axis (3000)
