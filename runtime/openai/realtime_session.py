"""One Realtime session: its configuration, its conversation, the turn being heard, and the requests it sends the af3
ensemble — answers (a realtime session) or transcripts (a transcription session), and the windows it encodes ahead.

    session = RealtimeSession(generate=triton.generate, info=info, model_id="af3", send=queue.put, limits=limits)
    await session.start()                       # session.created
    await session.handle(kind, event_id, ev)    # each client event (realtime_events.parse_event)
    await session.close()                       # cancels what is running (Triton stops it)

A committed turn is a user item whose clip is the turn's audio as the client sent it, in a WAV at its own rate
(runtime/stages/live.py Turn.clip; sent as the 16-kHz samples preprocess decodes from it, Turn.clip16); an answer is
the ensemble's request for the conversation's messages (consecutive items of one role are one message, system items
join the instructions: AF3's template alternates user and assistant after one system message) — the same request
POST /v1/chat/completions sends for those messages, which is the reference its answers equal. While a turn is heard,
each time a 30-s window completes the session sends that request ahead with the turn so far (its complete windows as
a 16-kHz clip) and max_tokens 1: preprocess and the encoder keep those windows by content and the decoder the
prompt's blocks up to the end of that audio (runtime/stages/audio_cache.py), so at the commit only the last, partial
window is new. What is sent ahead changes no answer: a window it left different from the clip's is a cache miss.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

import soundfile as sf

from af3trt.runtime.client.library import Request as Job
from af3trt.runtime.openai.common import Answer, APIError, Piece, RealtimeOptions, deltas
from af3trt.runtime.openai.realtime_events import (EventError, Item, Part, ResponseParams, SessionConfig, event, new_id,
                                                   parse_item, parse_response, update_session)
from af3trt.runtime.openai.triton import EnsembleInfo
from af3trt.runtime.stages import lengths, live
from af3trt.runtime.stages.audio import truncation_notice
from af3trt.runtime.stages.contract import MESSAGES, THINKING
from af3trt.runtime.stages.longform import TRANSCRIPTION_PROMPT
from af3trt.runtime.stages.resample import StreamResampler

log = logging.getLogger("af3trt.openai")

MIN_COMMIT_MS = 100  # OpenAI's: a commit needs at least 100 ms of audio
IDLE_KEEP_S = 2.0  # with voice activity detection, audio kept before speech beyond prefix_padding_ms


class RealtimeSession:
    def __init__(self, *, generate: Callable[[Job, str], AsyncIterator[Piece]], info: EnsembleInfo, model_id: str,
                 send: Callable[[dict], Awaitable[None]], limits: RealtimeOptions = RealtimeOptions(),
                 kind: str = "realtime",
                 clock: Callable[[], float] = time.monotonic):
        self.generate, self.info, self.send, self.limits, self.clock = generate, info, send, limits, clock
        self.id = new_id("sess")
        self.cfg = SessionConfig(kind=kind, model=model_id)
        self.model_id = model_id
        self.max_windows = int(info.max_audio_seconds // lengths.WINDOW_SECONDS)
        self.items: list[Item] = []
        self.pace = live.Pace(limits.max_speed, limits.burst_s, clock())
        self.turn: live.Turn | None = None
        self.turn_start = 0  # input sample (since the VAD's start) where the turn begins
        self.turn_item = ""  # the id the turn's item will have
        self.told_truncated = False
        self.response: asyncio.Task | None = None
        self.response_id: str | None = None
        self.cancel_reason = "client_cancelled"
        self.tasks: set[asyncio.Task] = set()  # transcriptions and requests sent ahead
        self.ahead: asyncio.Task | None = None
        self.ahead_windows = 0  # windows of this turn sent ahead
        self.answers: collections.deque = collections.deque(maxlen=16)  # (response id, token ids): logs and tests
        self.ms_base = 0  # audio ms heard under earlier formats / detectors
        self.typed = False  # a session.update named the session's type: it is fixed from then on
        self._reset_vad()

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.send(event("session.created", session=self.cfg.describe(self.id)))

    async def close(self) -> None:
        """Cancel what is running: the generate() of each closes its gRPC stream and Triton stops the request."""
        running = [t for t in (self.response, *self.tasks) if t is not None and not t.done()]
        for t in running:
            t.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    async def handle(self, kind: str, eid: str | None, ev: dict) -> None:
        """One client event (parsed by realtime_events.parse_event). EventError: answered with an error event."""
        try:
            await getattr(self, "on_" + kind.replace(".", "_"))(ev)
        except EventError as e:
            await self.send(e.event(eid))

    # ------------------------------------------------------------------------------------------ events

    async def on_session_update(self, ev: dict) -> None:
        fresh = not (self.typed or self.items or self.turn is not None or self.idle or self.heard)
        cfg = update_session(self.cfg, ev.get("session"), self.model_id, fresh)
        if (cfg.fmt != self.cfg.fmt or cfg.vad != self.cfg.vad) and (self.turn is not None or self.idle):
            raise EventError("commit or clear the input audio buffer before changing its format or turn_detection",
                             code="input_audio_buffer_not_empty", param="session.audio.input")
        changed = cfg.fmt != self.cfg.fmt or cfg.vad != self.cfg.vad
        if changed:
            self.ms_base = self._ms(self.heard)
        self.cfg, self.typed = cfg, self.typed or "type" in ev["session"]
        if changed:
            self._reset_vad()
        await self.send(event("session.updated", session=self.cfg.describe(self.id)))

    async def on_input_audio_buffer_append(self, ev: dict) -> None:
        fmt = self.cfg.fmt
        try:
            raw = live.decode_base64_audio(ev.get("audio"), fmt) if isinstance(ev.get("audio"), str) else None
        except ValueError as e:
            raise EventError(f"audio: {e}", code="invalid_audio", param="audio") from None
        if raw is None:
            raise EventError("audio must be a base64 string", param="audio")
        seconds = len(raw) / fmt.sample_bytes / fmt.rate
        if not self.pace.admit(seconds, self.clock()):
            raise EventError(f"audio arrives faster than real time: {self.pace.seconds + seconds:.1f} s in "
                             f"{self.clock() - self.pace.start:.1f} s; this server accepts at most "
                             f"{self.limits.max_speed:g}x real time after the first {self.limits.burst_s:g} s "
                             "(this append was dropped)",
                             code="rate_limit_exceeded", param="audio")
        self.heard += len(raw) // fmt.sample_bytes
        if self.cfg.vad is None:
            self._heard(raw)
        else:
            await self._heard_with_vad(raw)
        await self._tell_truncated()
        self._send_ahead()

    async def on_input_audio_buffer_commit(self, ev: dict) -> None:
        await self._commit()

    async def on_input_audio_buffer_clear(self, ev: dict) -> None:
        self.turn, self.idle, self.vad_turn = None, bytearray(), False
        if self.vad is not None:
            self.vad.reset()
        await self.send(event("input_audio_buffer.cleared"))

    async def on_conversation_item_create(self, ev: dict) -> None:
        if self.cfg.kind == "transcription":
            raise EventError("a transcription session takes audio through input_audio_buffer, not items",
                             param="item")
        item = parse_item(ev.get("item"), self._audio_part)
        if any(i.id == item.id for i in self.items):
            raise EventError(f"item.id {item.id!r} is already in the conversation", param="item.id")
        self._check_budget(sum(p.windows for p in item.parts))
        prev = ev.get("previous_item_id")
        if prev is None:
            at = len(self.items)
        elif prev == "root":
            at = 0
        else:
            at = next((i + 1 for i, x in enumerate(self.items) if x.id == prev), None)
            if at is None:
                raise EventError(f"previous_item_id {prev!r} is not in the conversation", param="previous_item_id")
        self.items.insert(at, item)
        before = self.items[at - 1].id if at else None
        await self.send(event("conversation.item.added", previous_item_id=before, item=item.describe()))
        await self.send(event("conversation.item.done", previous_item_id=before, item=item.describe()))

    async def on_conversation_item_delete(self, ev: dict) -> None:
        item = self._item(ev.get("item_id"))
        self.items.remove(item)
        await self.send(event("conversation.item.deleted", item_id=item.id))

    async def on_conversation_item_retrieve(self, ev: dict) -> None:
        await self.send(event("conversation.item.retrieved", item=self._item(ev.get("item_id")).describe()))

    async def on_response_create(self, ev: dict) -> None:
        if self.cfg.kind == "transcription":
            raise EventError("a transcription session gives transcripts, not responses", param="type")
        await self._respond(parse_response(ev.get("response")))

    async def on_response_cancel(self, ev: dict) -> None:
        rid = ev.get("response_id")
        if self.response is None or self.response.done() or rid not in (None, self.response_id):
            raise EventError("no response in progress" + (f" with id {rid!r}" if rid else ""),
                             code="response_cancel_not_active", param="response_id" if rid else None)
        await self._cancel_response("client_cancelled")

    # ------------------------------------------------------------------------------------------ hearing

    def _reset_vad(self) -> None:
        fmt, vad = self.cfg.fmt, self.cfg.vad
        self.vad = None if vad is None else live.ServerVad(vad)
        resample = vad is not None and fmt.rate != lengths.SAMPLE_RATE
        self.detect = StreamResampler(fmt.rate, lengths.SAMPLE_RATE) if resample else None
        self.heard = 0  # input samples since this format / detector was set (VAD sample indices count from here)
        self.idle = bytearray()  # with VAD, before speech: the latest input (prefix padding)
        self.idle_start = 0  # input sample of idle[0]
        self.vad_turn = False

    def _new_turn(self) -> live.Turn:
        self.turn = live.Turn(self.cfg.fmt, self.max_windows)
        self.turn_item, self.told_truncated, self.ahead_windows = new_id("item"), False, 0
        return self.turn

    def _heard(self, raw: bytes) -> None:
        (self.turn or self._new_turn()).append(raw)

    async def _heard_with_vad(self, raw: bytes) -> None:
        fmt, vad = self.cfg.fmt, self.cfg.vad
        sb = fmt.sample_bytes
        if self.vad_turn:
            self.turn.append(raw)
        else:
            self.idle += raw
            keep = int((vad.prefix_padding_ms / 1000 + IDLE_KEEP_S) * fmt.rate) * sb
            if len(self.idle) > keep:
                self.idle_start += (len(self.idle) - keep) // sb
                del self.idle[: len(self.idle) - keep]
        x = fmt.decode(raw)
        for kind, at16 in self.vad.feed(self.detect.feed(x) if self.detect else x):
            at = at16 * fmt.rate // lengths.SAMPLE_RATE  # input sample (10-ms frames: exact at 8, 16 and 24 kHz)
            if kind == "started" and not self.vad_turn:
                start = max(self.idle_start, at - vad.prefix_padding_ms * fmt.rate // 1000)
                self._new_turn().append(bytes(self.idle[(start - self.idle_start) * sb:]))
                self.turn_start, self.idle, self.vad_turn = start, bytearray(), True
                await self.send(event("input_audio_buffer.speech_started", audio_start_ms=self._ms(start),
                                      item_id=self.turn_item))
                if vad.interrupt_response and self.response is not None and not self.response.done():
                    await self._cancel_response("turn_detected")
            elif kind == "stopped" and self.vad_turn:
                self.idle, self.idle_start = bytearray(self.turn.cut(at - self.turn_start)), at
                self.vad_turn = False
                await self.send(event("input_audio_buffer.speech_stopped", audio_end_ms=self._ms(at),
                                      item_id=self.turn_item))
                await self._commit(respond=vad.create_response)

    def _ms(self, sample: int) -> int:
        """ms since the session's audio began, for an input sample counted since this detector started."""
        return self.ms_base + sample * 1000 // self.cfg.fmt.rate

    async def _tell_truncated(self) -> None:
        """Once per turn: the turn is longer than AF3 reads (the ensemble's notice; the rest is dropped)."""
        if self.turn is not None and self.turn.truncated and not self.told_truncated:
            self.told_truncated = True
            limit = self.max_windows * lengths.WINDOW_SECONDS
            await self.send(EventError(truncation_notice(0, self.turn.seconds, limit) + " (the input audio buffer "
                                       "keeps them; the rest of this turn is dropped)", code="audio_too_long",
                                       param="audio").event())

    def _audio_part(self, data: str, where: str) -> Part:
        try:
            raw = live.decode_base64_audio(data, self.cfg.fmt)
        except ValueError as e:
            raise EventError(f"{where}: {e}", code="invalid_audio", param=where) from None
        turn = live.Turn(self.cfg.fmt, self.max_windows)
        turn.append(raw)
        if turn.truncated:
            raise EventError(f"{where}: {turn.seconds:.1f} s of audio; this server reads at most "
                             f"{self.max_windows * lengths.WINDOW_SECONDS} s", code="audio_too_long", param=where)
        return self._part(turn)

    def _part(self, turn: live.Turn) -> Part:
        windows, _ = lengths.window_count(turn.samples16, self.max_windows)
        return Part(clip=turn.clip16(), seconds=turn.samples / turn.fmt.rate, windows=windows)

    def _check_budget(self, windows: int) -> None:
        """A request reads at most max_windows windows of audio in all: the conversation must fit one."""
        used = sum(p.windows for i in self.items for p in i.parts) if self.cfg.kind == "realtime" else 0
        if used + windows > self.max_windows:
            raise EventError(f"the conversation would hold {used + windows} windows of 30 s of audio; AF3 reads at "
                             f"most {self.max_windows} in one request (delete items, or start another session)",
                             code="conversation_audio_limit")

    async def _commit(self, respond: bool = False) -> None:
        turn = self.turn
        if turn is None or turn.samples * 1000 < MIN_COMMIT_MS * turn.fmt.rate:
            have = 0 if turn is None else turn.samples * 1000 // turn.fmt.rate
            raise EventError(f"buffer too small: {have} ms of audio; a commit needs at least {MIN_COMMIT_MS} ms",
                             code="input_audio_buffer_commit_empty")
        part = self._part(turn)
        self._check_budget(part.windows)
        if self.ahead is not None and not self.ahead.done():
            # windows that completed just now: the commit's own request computes them, and would otherwise wait
            # behind this one (its encoder and decoder work are the commit's too)
            self.ahead.cancel()
        self.turn, self.vad_turn = None, False
        if self.vad is not None:
            self.vad.reset()  # a commit ends what the detector heard as one turn
        item = Item(self.turn_item, "user", [part])
        before = self.items[-1].id if self.items else None
        self.items.append(item)
        await self.send(event("input_audio_buffer.committed", previous_item_id=before, item_id=item.id))
        await self.send(event("conversation.item.added", previous_item_id=before, item=item.describe()))
        await self.send(event("conversation.item.done", previous_item_id=before, item=item.describe()))
        if self.cfg.kind == "transcription":
            self._spawn(self._transcribe(item))
        elif respond:
            await self._respond(ResponseParams())

    def _item(self, item_id) -> Item:
        found = next((i for i in self.items if i.id == item_id), None)
        if found is None:
            raise EventError(f"item_id {item_id!r} is not in the conversation", code="item_not_found",
                             param="item_id")
        return found

    # ------------------------------------------------------------------------------------------ requests

    def messages(self, items: list[Item], instructions: str) -> tuple[list[dict], list[bytes]]:
        """The conversation as the ensemble's `messages` and clips: system items join the instructions in one system
        message; consecutive items of one role are one message (their parts in order)."""
        system = "\n".join(t for t in [instructions] + [p.text or "" for i in items if i.role == "system"
                                                          for p in i.parts] if t)
        messages, clips = ([{"role": "system", "content": system}] if system else []), []
        for item in (i for i in items if i.role != "system"):
            parts = []
            for p in item.parts:
                if p.clip is not None:
                    parts.append({"type": "audio", "audio_index": len(clips)})
                    clips.append(p.clip)
                else:
                    parts.append({"type": "text", "text": p.text})
            if messages and messages[-1]["role"] == item.role:
                messages[-1]["content"] += parts
            else:
                messages.append({"role": item.role, "content": parts})
        return messages, clips

    def answer_job(self, params: ResponseParams, items: list[Item] | None = None) -> Job:
        """The ensemble's request for an answer to the conversation (items: the session's)."""
        items = self.items if items is None else items
        instructions = self.cfg.instructions if params.instructions is None else params.instructions
        messages, clips = self.messages(items, instructions)
        if not messages or messages[-1]["role"] != "user":
            raise EventError("nothing to answer: the conversation must end with a user item",
                             code="conversation_not_ready")
        if MESSAGES not in self.info.inputs:
            raise EventError("this model repository predates conversations (`messages`): rebuild it with this "
                             "version of af3trt")
        max_tokens = self.cfg.max_output_tokens if params.max_output_tokens == "session" else params.max_output_tokens
        effort = self.cfg.reasoning if params.reasoning is False else params.reasoning
        job = Job(messages=messages, audio=clips, stream=True,
                  max_tokens=max_tokens if max_tokens is not None else (self.info.max_output_len or None))
        if effort in ("low", "medium", "high"):
            if THINKING not in self.info.inputs:
                raise EventError("this model repository has no thinking input (rebuild it with this version of "
                                 "af3trt, from a checkpoint with think/)", param="reasoning")
            job.thinking = True
        return job

    def transcription_job(self, clip: bytes) -> Job:
        """AF3's transcription request for one turn: what POST /v1/audio/transcriptions sends for that clip."""
        return Job(prompt=self.cfg.transcription_prompt or TRANSCRIPTION_PROMPT, audio=[clip], stream=True,
                   strip_prefix=True, max_tokens=self.info.max_output_len or None)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _respond(self, params: ResponseParams) -> None:
        if self.response is not None and not self.response.done():
            raise EventError(f"the conversation already has a response in progress ({self.response_id})",
                             code="conversation_already_has_active_response")
        job = self.answer_job(params)
        self.response_id = new_id("resp")
        self.response = asyncio.ensure_future(self._answer(job, self.response_id, params))

    async def _cancel_response(self, reason: str) -> None:
        if self.response is None or self.response.done():
            return
        self.cancel_reason = reason
        self.response.cancel()
        await asyncio.gather(self.response, return_exceptions=True)

    async def _answer(self, job: Job, rid: str, params: ResponseParams) -> None:
        """response.created … response.done, the answer's text streamed between; the assistant item joins the
        conversation (incomplete when cancelled)."""
        head = {"id": rid, "object": "realtime.response", "conversation_id": self.id, "output_modalities": ["text"],
                "max_output_tokens": "inf" if job.max_tokens is None else job.max_tokens, "metadata": params.metadata}
        await self.send(event("response.created", response={**head, "status": "in_progress", "output": [],
                                                            "status_details": None, "usage": None}))
        answer, ids, item = Answer(), [], None
        where = {"response_id": rid, "output_index": 0, "content_index": 0}

        async def begin() -> Item:
            new = Item(new_id("item"), "assistant", [Part(text="")], status="in_progress")
            before = self.items[-1].id if self.items else None
            self.items.append(new)
            await self.send(event("response.output_item.added", response_id=rid, output_index=0, item=new.describe()))
            await self.send(event("conversation.item.added", previous_item_id=before, item=new.describe()))
            await self.send(event("response.content_part.added", item_id=new.id, **where,
                                  part={"type": "text", "text": ""}))
            return new

        async def pieces() -> AsyncIterator[Piece]:
            async for piece in self.generate(job, rid):
                ids.extend(piece.ids)
                yield piece

        status, details = "completed", None
        try:
            async for text in deltas(pieces(), answer):
                item = item or await begin()
                item.parts[0].text += text
                await self.send(event("response.output_text.delta", item_id=item.id, delta=text, **where))
            if job.max_tokens is not None and answer.n_ids >= job.max_tokens:
                status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        except asyncio.CancelledError:
            status, details = "cancelled", {"type": "cancelled", "reason": self.cancel_reason}
            self.cancel_reason = "client_cancelled"
        except Exception as e:  # noqa: BLE001 - the session goes on; the client is told why this answer failed
            if not isinstance(e, APIError):
                log.exception("session %s: response %s failed", self.id, rid)
                e = APIError(500, f"internal error: {e}")
            status, details = "failed", {"type": "failed", "error": {"type": e.body()["error"]["type"],
                                                                     "code": e.code, "message": e.message}}
            await self.send(EventError(e.message, code=e.code or "response_failed",
                                       kind=e.body()["error"]["type"]).event())
        self.answers.append((rid, list(ids)))
        output = []
        if item is None and status in ("completed", "incomplete"):
            item = await begin()  # an empty answer is still an item
        if item is not None:
            item.status = "completed" if status == "completed" else "incomplete"
            await self.send(event("response.output_text.done", item_id=item.id, text=item.parts[0].text, **where))
            await self.send(event("response.content_part.done", item_id=item.id, **where,
                                  part={"type": "text", "text": item.parts[0].text}))
            await self.send(event("response.output_item.done", response_id=rid, output_index=0, item=item.describe()))
            await self.send(event("conversation.item.done", item=item.describe()))
            output = [item.describe()]
        await self.send(event("response.done", response={**head, "status": status, "status_details": details,
                                                         "output": output, "usage": self._usage(job, answer)}))

    def _usage(self, job: Job, answer: Answer) -> dict | None:
        if answer.prompt_tokens < 0:
            return None
        audio = sum(lengths.audio_tokens_for_samples(_samples16(c), self.max_windows) for c in job.audio)
        return {"total_tokens": answer.prompt_tokens + answer.n_ids, "input_tokens": answer.prompt_tokens,
                "output_tokens": answer.n_ids,
                "input_token_details": {"text_tokens": answer.prompt_tokens - audio, "audio_tokens": audio,
                                        "cached_tokens": 0},
                "output_token_details": {"text_tokens": answer.n_ids, "audio_tokens": 0}}

    async def _transcribe(self, item: Item) -> None:
        """conversation.item.input_audio_transcription.delta … .completed for one committed turn."""
        clip = item.parts[0].clip
        job = self.transcription_job(clip)
        answer, rid = Answer(), new_id("transcription")
        where = {"item_id": item.id, "content_index": 0}
        try:
            async for text in deltas(self.generate(job, rid), answer):
                await self.send(event("conversation.item.input_audio_transcription.delta", delta=text, **where))
        except APIError as e:
            await self.send(event("conversation.item.input_audio_transcription.failed", **where,
                                  error={"type": e.body()["error"]["type"], "code": e.code, "message": e.message,
                                         "param": None}))
            return
        item.parts[0].transcript, item.parts[0].clip = answer.text, None  # the clip is no longer needed
        prompt = max(answer.prompt_tokens, 0)
        audio_tokens = lengths.audio_tokens_for_samples(_samples16(clip), self.max_windows)
        usage = {"type": "tokens", "input_tokens": prompt, "output_tokens": answer.n_ids,
                 "total_tokens": prompt + answer.n_ids,
                 "input_token_details": {"audio_tokens": audio_tokens, "text_tokens": prompt - audio_tokens}}
        await self.send(event("conversation.item.input_audio_transcription.completed", transcript=answer.text,
                              usage=usage, **where))

    # ------------------------------------------------------------------------------------------ ahead

    def ahead_job(self, turn: live.Turn, windows: int) -> Job:
        """The request the commit of this turn will send, with the turn's first `windows` windows as its clip and
        max_tokens 1: what preprocess, the encoder and the decoder keep for the commit to find."""
        clip = turn.prefix(windows)
        if self.cfg.kind == "transcription":
            job = self.transcription_job(clip)
        else:
            part = Part(clip=clip, windows=windows)
            job = self.answer_job(ResponseParams(), self.items + [Item(self.turn_item, "user", [part])])
        job.max_tokens, job.stream = 1, False
        return job

    def _send_ahead(self) -> None:
        """Send the turn's complete windows ahead, one request at a time; the next starts when it ends."""
        turn = self.turn
        if (not self.limits.encode_ahead or turn is None or turn.windows <= self.ahead_windows
                or (self.ahead is not None and not self.ahead.done())):
            return
        try:
            job = self.ahead_job(turn, turn.windows)
        except EventError:
            return  # the commit will say what is wrong
        self.ahead_windows = turn.windows
        self.ahead = self._spawn(self._run_ahead(job))
        self.ahead.add_done_callback(lambda _: self._send_ahead())

    async def _run_ahead(self, job: Job) -> None:
        try:
            async for _ in self.generate(job, new_id("ahead")):
                pass
        except APIError as e:  # the commit's own request will meet the same error and report it
            log.info("session %s: encoding ahead failed: %s", self.id, e.message)


def _samples16(clip: bytes) -> int:
    """16-kHz samples of a WAV clip the session made (its header's length)."""
    info = sf.info(io.BytesIO(clip))
    return -(-info.frames * lengths.SAMPLE_RATE // info.samplerate)
