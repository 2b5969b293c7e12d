"""The gRPC client of the af3 ensemble: library.py (AF3Client, AsyncAF3Client) and ask.py (`af3trt ask`); and
listen.py (`af3trt listen`), which streams a file to the OpenAI front's WS /v1/realtime."""
