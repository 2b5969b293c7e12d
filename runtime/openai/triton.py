"""The af3 ensemble over Triton's gRPC streaming API (asyncio), as the HTTP endpoints use it: readiness, the
repository's limits, and streamed generation with cancellation. Errors come out as APIError with the HTTP status
of the code the stage that refused the request set (runtime/stages/errors.py)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from af3trt.runtime.stages import contract, lengths
from af3trt.runtime.client.library import (STATUS_WAIT_S, AF3Busy, AF3ConnectionError, AF3Error, ResponseReader, drain,
                                           lost_in_transport, send_cancel_async)
from af3trt.runtime.client.library import Request as Job
from af3trt.runtime.stages.errors import ErrorCode
from af3trt.runtime.stages.params import FusionParams, ParamError, PreprocessParams
from af3trt.runtime.openai.common import APIError, Piece

log = logging.getLogger("af3trt.openai")


@dataclass(frozen=True)
class EnsembleInfo:
    """What the HTTP layer needs to know about the served repository, read from Triton's model configs."""

    inputs: frozenset[str]  # the ensemble's request inputs (e.g. whether `messages` exists)
    models: tuple[str, ...]  # the ensemble and the models its steps run
    default_max_tokens: int  # fusion's default when a request gives none
    max_output_len: int
    max_audio_seconds: float


def _unavailable(url: str, e: BaseException | str) -> APIError:
    return APIError.of(ErrorCode.UNAVAILABLE, f"Triton at {url} is unavailable: {e}", code="triton_unavailable")


def rpc_error(url: str, e: grpc.aio.AioRpcError) -> APIError:
    """The APIError for a failed gRPC call to Triton: unavailable (a client may retry) when no answer came — nothing
    listening, a deadline, a connection lost or a stream reset under the call — else Triton's own status, as an
    internal error."""
    lost = lost_in_transport(e.code().name, e.details() or "")  # runtime/client/library.py: what a lost call reads
    if lost or e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return _unavailable(url, f"the connection was lost under the call ({e.details()})" if lost else e.details())
    return APIError.of(ErrorCode.INTERNAL, f"gRPC error from Triton: {e.code().name}: {e.details()}")


def _api_error(e: AF3Error) -> APIError:
    if isinstance(e, AF3ConnectionError):
        return APIError.of(ErrorCode.UNAVAILABLE, str(e), code="triton_unavailable")
    return APIError.of(e.code, str(e), code="server_busy" if isinstance(e, AF3Busy) else None)


class Triton:
    def __init__(self, url: str, model: str = contract.ENSEMBLE):
        self.url, self.model = url, model
        self.client = grpcaio.InferenceServerClient(url)
        self._info: EnsembleInfo | None = None
        self._cancels: set[asyncio.Task] = set()  # cancellations in flight (kept referenced until done)

    async def close(self) -> None:
        if self._cancels:  # let the last cancellations reach Triton (each has its own short timeout)
            await asyncio.wait(set(self._cancels))
        await self.client.close()

    async def info(self) -> EnsembleInfo:
        if self._info is None:
            try:
                ens = (await self.client.get_model_config(self.model, client_timeout=10)).config
                steps = tuple(s.model_name for s in ens.ensemble_scheduling.step)
                params = {}  # the stages' records (runtime/stages/params.py), as they load them
                for m, record in ((contract.FUSION, FusionParams), (contract.PREPROCESS, PreprocessParams)):
                    if m in steps:
                        cfg = (await self.client.get_model_config(m, client_timeout=10)).config
                        params[m] = record.parse({k: v.string_value for k, v in cfg.parameters.items()})
            except (InferenceServerException, grpc.RpcError, ParamError) as e:
                raise _unavailable(self.url, e) from None
            fusion, preprocess = params.get(contract.FUSION), params.get(contract.PREPROCESS)
            self._info = EnsembleInfo(
                inputs=frozenset(i.name for i in ens.input), models=(self.model, *steps),
                default_max_tokens=fusion.default_max_tokens if fusion else 0,
                max_output_len=fusion.max_output_len if fusion else 0,
                max_audio_seconds=float((preprocess.max_audio_windows if preprocess else lengths.MAX_WINDOWS)
                                        * lengths.WINDOW_SECONDS))
        return self._info

    async def ready(self) -> tuple[bool, str]:
        try:
            if not await self.client.is_server_ready(client_timeout=5):
                return False, "Triton is not ready"
            for m in (await self.info()).models:
                if not await self.client.is_model_ready(m, client_timeout=5):
                    return False, f"model {m} is not ready"
        except (InferenceServerException, grpc.RpcError, APIError) as e:
            return False, f"Triton at {self.url} is unavailable: {getattr(e, 'message', e)}"
        return True, "ready"

    async def generate(self, job: Job, request_id: str) -> AsyncIterator[Piece]:
        """The ensemble's responses for one request. Leaving the iteration early (a client that went away, a
        stop string) cancels the gRPC call, which Triton turns into a cancellation of the request, and sends the
        request id to the cancel model: Triton 2.51 does not pass the first on to the decoder inside the ensemble."""
        done = asyncio.Event()

        async def requests():
            yield {"model_name": self.model, "inputs": job.inputs(), "request_id": request_id,
                   "parameters": {"triton_enable_empty_final_response": True}}
            await done.wait()  # keep our half of the stream open until the last response

        call = self.client.stream_infer(requests())
        finished = False
        errored = False  # Triton answered an error: the request is over there
        reader = ResponseReader(self.url, self.model, running=True)
        try:
            async for result, error in call:
                errored = error is not None
                try:
                    chunk = reader.read(result, error)
                except AF3Error as e:
                    raise _api_error(e) from None
                if chunk is not None:
                    yield Piece(text=chunk.text, ids=chunk.token_ids, notices=chunk.notices,
                                prompt_tokens=chunk.prompt_tokens)
                if reader.final:
                    finished = True
                    return
            raise APIError.of(ErrorCode.INTERNAL, "Triton closed the stream before the final response")
        except grpc.aio.AioRpcError as e:
            raise rpc_error(self.url, e) from None
        finally:
            done.set()  # half-closes our side: Triton ends the stream with its status
            if finished:  # wait for that status rather than drop (and so cancel) a finished stream: AF3Client.responses
                try:
                    await asyncio.wait_for(drain(call), STATUS_WAIT_S)
                except (asyncio.TimeoutError, grpc.RpcError, InferenceServerException):
                    call.cancel()
            else:  # the client went away, a stop string matched, or an error: end it in Triton
                log.info("request %s: cancelling it in Triton", request_id)
                call.cancel()
                if not errored:
                    task = asyncio.ensure_future(send_cancel_async(self.client, request_id))
                    self._cancels.add(task)
                    task.add_done_callback(self._cancels.discard)
