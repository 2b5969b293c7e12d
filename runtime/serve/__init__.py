"""Running a model repository: the tritonserver launcher (server.py), its supervisor and preflight (doctor.py),
replicas behind HAProxy, tensor-parallel launch. The top of runtime/ but for batch.py."""
