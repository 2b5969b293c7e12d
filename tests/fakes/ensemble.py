"""A rendered model repository's `af3` ensemble, run in this process: each python model through the model.py the
repository holds (fakes.pb_utils as triton_python_backend_utils), the tensorrtllm model through the strict
fakes.trtllm_backend, wired by the rendered ensemble config's input and output maps.

What it reproduces of Triton (triton-inference-server/core r26.04 src/ensemble_scheduler/ensemble_scheduler.cc, and
python_backend r26.04 for the stubs):
  - a step's inputs are the ensemble tensors its input_map names; its outputs enter the pool by its output_map; a step
    output that is not sent leaves the next step's optional input unfed;
  - every response of a decoupled step runs the later steps once (so postprocess runs once per decoder response);
  - python models get their inputs in host memory unless their config sets FORCE_CPU_ONLY_INPUT_TENSORS "no"
    (python_backend README, "Input Tensor Device Placement"); a tensor a GPU model hands on by DLPack stays in GPU
    memory (fakes.pb_utils.GpuTensor) for a model that takes inputs where they are;
  - the ensemble's request id is every step's request id, and BLS calls from a python model reach the models of the
    same repository (fakes.pb_utils.BLS_MODELS).

    ens = Ensemble(repo, decoder=lambda cfg: FakeTrtllmDecoder(cfg, generate=True))
    responses = ens.infer({"text_input": ..., "audio": ...}, request_id="r1")   # [{output: array}] or raises
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

from fakes import pb_utils as fake_pb

FINAL = fake_pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class EnsembleError(RuntimeError):
    """A step answered with an error (the message is the step's)."""


def _params(cfg) -> dict:
    return {k: v.string_value for k, v in cfg.parameters.items()}


class Ensemble:
    def __init__(self, repo: Path, *, decoder, device_models=("encoder",), memory: dict | None = None,
                 timeout_s: float = 60.0):
        """repo: a rendered model repository; decoder: config → the tensorrtllm model (fakes.trtllm_backend);
        device_models: python models whose DLPack outputs are GPU-resident (the GPU target's encoder); memory:
        {python model: fakes.cuda_memory.FakeCudaMemory} in force while that stub loads and executes."""
        from af3trt.triton_repo import configs

        self.repo, self.timeout_s = Path(repo), timeout_s
        self.memory = dict(memory or {})
        self.configs = {d.name: configs.parse((d / "config.pbtxt").read_text())
                        for d in sorted(self.repo.iterdir()) if (d / "config.pbtxt").is_file()}
        self._decoder, self._models = decoder, {}
        for name, cfg in self.configs.items():  # every model is reachable by BLS (loaded when first used)
            if cfg.backend in ("python", "tensorrtllm"):
                fake_pb.BLS_MODELS[name] = self._bls(name)
        self.device_models = set(device_models)
        self.steps = [(s.model_name, dict(s.input_map), dict(s.output_map))
                      for s in self.configs["af3"].ensemble_scheduling.step]

    def _load_python(self, name: str, cfg):
        from google.protobuf import json_format

        sys.modules["triton_python_backend_utils"] = fake_pb
        path = self.repo / name / "1" / "model.py"
        spec = importlib.util.spec_from_file_location(f"_ensemble_model_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        model = mod.TritonPythonModel()
        gpu = any(g.kind == g.KIND_GPU for g in cfg.instance_group)
        with self._memory(name):
                model.initialize({
                "model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
                "model_name": name, "model_repository": str(self.repo / name), "model_version": "1",
                "model_instance_kind": "GPU" if gpu else "CPU", "model_instance_device_id": "0"})
        return model

    def model(self, name: str):
        """The loaded model (loaded now if it was not: Triton loads every model at start, a test may need one)."""
        if name not in self._models:
            cfg = self.configs[name]
            self._models[name] = self._decoder(cfg) if cfg.backend == "tensorrtllm" else self._load_python(name, cfg)
        return self._models[name]

    def _memory(self, name: str):
        import contextlib

        return self.memory.get(name) or contextlib.nullcontext()

    def _bls(self, name: str):
        def call(request_id, inputs):
            return [_as_bls(r) for r in self._run(name, {k: v for k, v in inputs.items()}, request_id)]
        return call

    # ---- one model ----------------------------------------------------------------------------------------------
    def _inputs_for(self, name: str, tensors: dict) -> dict:
        """What the model sees: host copies unless it takes inputs where they are; a python model sees an input with a
        config `reshape` as [batch] + that shape (the backend of a tensorrtllm model validates the shapes sent)."""
        cfg = self.configs[name]
        if cfg.backend == "python" and _params(cfg).get("FORCE_CPU_ONLY_INPUT_TENSORS", "yes") != "no":
            tensors = {k: fake_pb.Tensor(k, v._array) if isinstance(v, fake_pb.GpuTensor) else v
                       for k, v in tensors.items()}
        if cfg.backend == "python" and cfg.max_batch_size > 0:
            reshaped = {i.name: list(i.reshape.shape) for i in cfg.input if i.HasField("reshape")}
            tensors = {k: type(v)(k, v._array.reshape(v._array.shape[0], *reshaped[k])) if k in reshaped else v
                       for k, v in tensors.items()}
        return dict(tensors)

    def _run(self, name: str, tensors: dict, request_id: str) -> list:
        """The model's responses to one request: [(outputs {name: Tensor} | None, error | None, final)]."""
        model, tensors = self.model(name), self._inputs_for(name, tensors)
        if self.configs[name].backend == "tensorrtllm":
            out = model(request_id, tensors)
            return [(None if r.has_error() else dict(r.outputs), r.error().message() if r.has_error() else None,
                     i == len(out) - 1) for i, r in enumerate(out)]
        request = fake_pb.Request({}, request_id)
        request.inputs = {k: v if isinstance(v, fake_pb.Tensor) else fake_pb.Tensor(k, v) for k, v in tensors.items()}
        with self._memory(name):
            returned = model.execute([request])
        if returned is not None:  # not decoupled: one response
            sent = [(returned[0], FINAL)]
        else:
            if not request.sender.done.wait(self.timeout_s):
                raise EnsembleError(f"{name}: no final response within {self.timeout_s} s")
            sent = request.sender.sent
        out = []
        for response, flags in sent:
            if response is None:  # a final flag alone
                out.append((None, None, True))
                continue
            outputs = dict(response.outputs)
            if name in self.device_models:  # its DLPack outputs are on the GPU
                outputs = {k: fake_pb.GpuTensor(k, v._array) if not isinstance(v._array, np.ndarray) else v
                           for k, v in outputs.items()}
            out.append((None if response.has_error() else outputs,
                        response.error.message() if response.has_error() else None, bool(flags & FINAL)))
        return out

    def call(self, name: str, inputs: dict, request_id: str = "") -> list[dict]:
        """One model alone: its responses' outputs ({name: Tensor}); EnsembleError with its error."""
        tensors = {k: v if isinstance(v, fake_pb.Tensor) else fake_pb.Tensor(k, v) for k, v in inputs.items()}
        out = []
        for outputs, error, _ in self._run(name, tensors, request_id):
            if error is not None:
                raise EnsembleError(f"{name}: {error}")
            if outputs is not None:
                out.append(outputs)
        return out

    # ---- the ensemble ---------------------------------------------------------------------------------------------
    def infer(self, inputs: dict, request_id: str = "") -> list[dict]:
        """The ensemble's responses for one request: [{output name: numpy array or torch tensor}]; EnsembleError
        with the first step error."""
        pool = {k: fake_pb.Tensor(k, v) for k, v in inputs.items() if v is not None}
        return self._from(0, pool, request_id)

    def _from(self, first: int, pool: dict, request_id: str) -> list[dict]:
        for i in range(first, len(self.steps)):
            name, input_map, output_map = self.steps[i]
            tensors = {model_in: pool[ens] for model_in, ens in input_map.items() if ens in pool}
            responses = self._run(name, tensors, request_id)
            for _, error, _ in responses:
                if error is not None:
                    raise EnsembleError(f"{name}: {error}")
            if len(responses) == 1 and i < len(self.steps) - 1:
                pool = {**pool, **_mapped(responses[0][0], output_map)}
                continue
            results = []
            for outputs, _, _ in responses:
                if outputs is None:
                    continue  # a final flag without a response sends nothing on
                step_pool = {**pool, **_mapped(outputs, output_map)}
                if i == len(self.steps) - 1:
                    results.append({k: _plain(v) for k, v in step_pool.items()
                                    if k in {o.name for o in self.configs["af3"].output}})
                else:
                    results += self._from(i + 1, step_pool, request_id)
            return results
        return []


def _mapped(outputs: dict, output_map: dict) -> dict:
    return {output_map[k]: v for k, v in outputs.items() if k in output_map}


def _plain(t):
    return t._array


def _as_bls(item):
    outputs, error, _ = item
    return fake_pb.BlsResponse(list((outputs or {}).values()), error=error)
