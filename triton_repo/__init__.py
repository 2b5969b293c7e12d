"""Sources of the Triton model repository: one thin python model per stage (Triton I/O on top, a call into
af3trt.runtime below) and the typed config definitions in configs.py. build/repository.py renders them."""
