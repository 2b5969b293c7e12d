"""What every python-backend stub (triton_repo/*/model.py) shares: tensor I/O and typed error responses, the
per-request context, config.pbtxt text, stopping a TensorRT-LLM request. Imports runtime/stages only."""
