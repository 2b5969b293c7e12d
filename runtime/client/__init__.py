"""The gRPC client of the af3 ensemble: library.py (AF3Client, AsyncAF3Client) and ask.py (`af3trt ask`)."""
