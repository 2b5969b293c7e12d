"""What the host's kernel says (proc.py: processes, their tree, CPU time and memory, from /proc). Imports nothing of
af3trt: any layer may use it."""
