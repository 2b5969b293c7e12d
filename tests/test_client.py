"""The client (runtime/client/library.py) and `af3trt ask`: errors people can act on (no server, a server that never
answers, a model that is not ready), strip_prefix giving the same answer streamed and whole over gRPC, and one
connection per client object however many requests it sends (tritonserver 2.51 keeps memory per connection)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from af3trt.runtime.client import ask
from af3trt.runtime.client.library import AF3Client, AF3ConnectionError, Request
from af3trt.runtime.stages.detok import strip_transcription_prefix
from af3trt.runtime.stages.errors import ErrorCode
from helpers import peer_ports
from reference import MAX_TOKENS


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def silent_server():
    """A TCP listener that accepts connections and never speaks (no HTTP/2 handshake)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    conns, stop = [], threading.Event()

    def accept():
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(s.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"127.0.0.1:{s.getsockname()[1]}"
    stop.set()
    t.join(5)
    for c in conns:
        c.close()
    s.close()


def test_no_server_is_one_clear_error(closed_port):
    url = f"127.0.0.1:{closed_port}"
    with pytest.raises(AF3ConnectionError) as e:
        AF3Client(url, timeout=30).ask("hi")
    assert e.value.cause == "connection refused" and e.value.url == url
    assert str(e.value).startswith(f"tritonserver at {url}: connection refused")


def test_ask_without_server_prints_one_line_and_fails(closed_port, capsys):
    with pytest.raises(SystemExit) as e:
        ask.main(["hi", "--url", f"127.0.0.1:{closed_port}"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith(f"error: tritonserver at 127.0.0.1:{closed_port}: connection refused")


@pytest.mark.slow
def test_silent_server_times_out(silent_server):
    with pytest.raises(AF3ConnectionError) as e:
        AF3Client(silent_server, timeout=2).ask("hi")
    assert e.value.cause == "timeout" and silent_server in str(e.value)


def test_request_inputs():
    ins = {i.name(): i for i in Request(messages=[{"role": "user", "content": "hé"}], audio=[b"x", b"y"],
                                        max_tokens=4, stream=False).inputs()}
    assert set(ins) == {"messages", "audio", "max_tokens", "stream"}
    assert ins["audio"].shape() == [2] and ins["messages"].datatype() == "BYTES"
    short = {i.name() for i in Request("hi", system_prompt="s").inputs()}
    assert short == {"text_input", "system_prompt", "stream"}


@pytest.mark.integration
def test_model_not_ready_names_the_model(server):
    with pytest.raises(AF3ConnectionError) as e:
        AF3Client(server.grpc_url, model="nope", timeout=30).ask("hi")
    assert e.value.cause == "model not ready" and "nope" in str(e.value)


@pytest.mark.integration
@pytest.mark.parametrize("prompt", ["Transcribe the input speech.", "What is said?"])
def test_strip_prefix_streamed_equals_whole(client, speech_bytes, prompt):
    whole = client.ask(prompt, [speech_bytes], max_tokens=MAX_TOKENS, stream=False, strip_prefix=True)
    plain = client.ask(prompt, [speech_bytes], max_tokens=MAX_TOKENS, stream=False)
    chunks = list(client.stream(prompt, [speech_bytes], max_tokens=MAX_TOKENS, stream=True, strip_prefix=True))
    assert len(chunks) > 2
    assert "".join(c.text for c in chunks) == whole.text == strip_transcription_prefix(plain.text)
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids == plain.token_ids


@pytest.mark.integration
def test_ask_stream_strip_prefix_prints_the_whole_answer(server, tmp_path, speech_bytes, capsys):
    clip = tmp_path / "speech.flac"
    clip.write_bytes(speech_bytes)
    args = ["Transcribe the input speech.", "--audio", str(clip), "--url", server.grpc_url, "--strip-prefix",
            "--max-tokens", str(MAX_TOKENS)]
    ask.main(args)
    whole = capsys.readouterr().out
    ask.main(args + ["--stream"])
    streamed = capsys.readouterr().out
    assert streamed == whole and len(whole.strip()) > 5


@pytest.mark.integration
def test_closing_the_iterator_cancels_and_the_server_goes_on(client, speech_bytes):
    it = client.responses(Request("What is said?", [speech_bytes], max_tokens=MAX_TOKENS, stream=True))
    first = next(it)
    it.close()  # stop_stream(cancel_requests=True)
    assert len(first.token_ids) == 1
    again = client.ask("What is said?", [speech_bytes], max_tokens=MAX_TOKENS, stream=True)
    assert len(again.token_ids) == MAX_TOKENS


def test_async_client_no_server(closed_port):
    from af3trt.runtime.client.library import AsyncAF3Client

    with pytest.raises(AF3ConnectionError) as e:
        asyncio.run(AsyncAF3Client(f"127.0.0.1:{closed_port}", timeout=30).complete(Request("hi")))
    assert e.value.cause == "connection refused"


@pytest.mark.integration
def test_async_client_equals_sync_and_cancels(server, client, speech_bytes):
    """AsyncAF3Client (for asyncio front ends): the same answers as AF3Client, server errors as AF3Error, and a
    stream left early is cancelled without disturbing the next request."""
    from af3trt.runtime.client.library import AF3Error, AsyncAF3Client

    aclient = AsyncAF3Client(server.grpc_url, timeout=120)
    messages = [{"role": "user", "content": [{"type": "audio", "audio_index": 0}, {"type": "text", "text": "What?"}]}]

    async def run():
        whole = await aclient.complete(Request(messages=messages, audio=[speech_bytes], max_tokens=MAX_TOKENS,
                                               stream=False))
        streamed = await aclient.complete(Request(messages=messages, audio=[speech_bytes], max_tokens=MAX_TOKENS))
        it = aclient.responses(Request("What is said?", [speech_bytes], max_tokens=MAX_TOKENS))
        first = await it.__anext__()
        await it.aclose()
        with pytest.raises(AF3Error, match="never referenced") as bad:
            await aclient.complete(Request(messages=[{"role": "user", "content": "x"}], audio=[speech_bytes]))
        # the code fusion raised it with, and its message as written there (no Triton or class-name prefix)
        assert bad.value.code is ErrorCode.INVALID_ARGUMENT and str(bad.value).startswith("audio clip 0 "), bad.value
        return whole, streamed, first

    whole, streamed, first = asyncio.run(run())
    want = client.ask(messages=messages, audio=[speech_bytes], max_tokens=MAX_TOKENS, stream=False)
    assert whole.token_ids == streamed.token_ids == want.token_ids and whole.text == streamed.text == want.text
    # a stream's first token comes alone; later ones may share a response (the CPU decoder coalesces tokens that come
    # faster than one per --stream-interval-ms: runtime/stages/coalesce.py)
    assert whole.chunks == 1 and streamed.chunks >= 2 and len(first.token_ids) == 1
    assert client.ask("What is said?", [speech_bytes], max_tokens=4).token_ids


@pytest.mark.integration
@pytest.mark.parametrize("private", [False, True])
def test_one_client_object_is_one_connection_for_every_request(server, speech_bytes, private):
    """Sequential, concurrent and cancelled requests of one AF3Client run as streams of one connection: the server
    holds at most one connection more while they are in flight (a connection per request was 6 more here). Without
    private_connection, the client shares the connection of the session's `client` (same url, gRPC's subchannel
    pool); with it, it has exactly one of its own."""
    port = int(server.grpc_url.rsplit(":", 1)[1])
    others = peer_ports(port)  # other clients of the session's server (the `client` fixture keeps its connection)
    seen: set[int] = set()
    with AF3Client(server.grpc_url, timeout=120, private_connection=private) as c:
        for k in range(2):  # one after another, streamed and whole
            for chunk in c.stream("What is said?", [speech_bytes], max_tokens=MAX_TOKENS, stream=k == 0):
                seen |= peer_ports(port)  # the request is in flight here: its connection is open
        its = [c.stream("What is said?", [speech_bytes], max_tokens=MAX_TOKENS) for _ in range(4)]
        firsts = [next(it) for it in its]  # four requests in flight at once
        seen |= peer_ports(port)
        during = peer_ports(port) - others
        its[0].close()  # cancels that request's stream only
        rest = [sum(len(ch.token_ids) for ch in it) for it in its[1:]]
        assert [len(f.token_ids) for f in firsts] == [1] * 4 and rest == [MAX_TOKENS - 1] * 3
        seen |= peer_ports(port)
    seen -= others
    assert len(during) == len(seen) == (1 if private else len(seen)) <= 1, f"new client ports: {sorted(seen)}"


@pytest.mark.integration
def test_per_connection_clients_open_one_connection_each(server, speech_bytes):
    """What `af3trt soak --client per-connection` relies on: a private AF3Client per request is a new connection."""
    port = int(server.grpc_url.rsplit(":", 1)[1])
    others, seen = peer_ports(port), set()
    for _ in range(3):
        with AF3Client(server.grpc_url, timeout=120, private_connection=True) as c:
            for chunk in c.stream("What is said?", [speech_bytes], max_tokens=2):
                seen |= peer_ports(port) - others
    assert len(seen) == 3, sorted(seen)


@pytest.mark.integration
def test_a_request_whose_channel_another_thread_closed_goes_on_the_new_one(server, speech_bytes):
    """One AF3Client shared by threads: a thread that replaces a failed connection closes the channel another thread
    has just taken for its call; grpcio then refuses the call (ValueError "Channel closed!", nothing sent). That
    request goes on the new channel; before, the ValueError escaped (seen in test_reliability's load threads)."""
    c = AF3Client(server.grpc_url, timeout=120)
    service, handed = c._service, []

    def closed_under_us():  # what the other thread does between our _service() and the call, made deterministic
        stub = service()
        if not handed:
            handed.append(stub)
            c.close()
        return stub

    c._service = closed_under_us
    answer = c.ask("What is said?", [speech_bytes], max_tokens=2)
    assert answer.token_ids and len(handed) == 1
    c.close()


@pytest.mark.parametrize("args", [[], ["hi", "--messages", "conv.json"]])
def test_ask_wants_a_prompt_or_messages(args, capsys):
    with pytest.raises(SystemExit) as e:
        ask.main(args)
    assert e.value.code == 2 and "give a prompt or --messages" in capsys.readouterr().err


def test_ask_names_an_unreadable_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ask.main(["hi", "--audio", str(tmp_path / "missing.wav")])
    assert e.value.code == 2 and f"cannot read {tmp_path / 'missing.wav'}: No such file" in capsys.readouterr().err


@pytest.mark.integration
def test_a_client_answers_after_the_server_restarted_on_its_ports(repo, speech_bytes):
    """One AF3Client keeps its connection; when tritonserver goes away and comes back on the same ports (the
    watchdog's restart, a rolling pod), gRPC waits out a reconnect backoff on the dropped connection and fails every
    call at once with "connection refused" meanwhile. The next request after the server is ready must be answered:
    it goes on a new connection (the request never reached the server, so sending it there is exact). A client
    with nothing to reach still gets the connection error."""
    from af3trt.runtime.client.library import AF3ConnectionError
    from af3trt.runtime.serve.server import TritonServer

    first = TritonServer(repo / "model_repository", log_path=repo / "restart-1.log").start(timeout=300)
    ports = dict(grpc_port=first.grpc_port, http_port=first.http_port, metrics_port=first.metrics_port)
    with AF3Client(first.grpc_url, timeout=120) as c:
        try:
            want = c.ask("What is said?", [speech_bytes], max_tokens=4).token_ids
        finally:
            first.stop()
        with pytest.raises(AF3ConnectionError):  # nothing listens: the error is still raised
            c.ask("What is said?", [speech_bytes], max_tokens=4)
        second = TritonServer(repo / "model_repository", log_path=repo / "restart-2.log", **ports).start(timeout=300)
        try:
            assert c.ask("What is said?", [speech_bytes], max_tokens=4).token_ids == want
        finally:
            second.stop()


@pytest.mark.integration
def test_a_finished_request_ends_its_stream_with_the_status_not_a_cancellation(repo, speech_bytes):
    """tritonserver 2.51 keeps memory for every decoupled stream cancelled after its last response: 4-22 KB when the
    client closes its connection right after the last response, before the stream's status (docs/memory.md). So
    AF3Client, AsyncAF3Client and the OpenAI front's Triton wait for that status once a request is done and cancel
    only a request left early.
    The server's verbose log names every stream cancellation ("Cancellation notification received", grpc frontend of
    server r24.10, src/grpc/infer_handler.h HandleCancellation): none for finished requests, whether each has a
    connection of its own closed right after it or they share one; a request left early is still cancelled."""
    from af3trt.runtime.client.library import AsyncAF3Client
    from af3trt.runtime.openai.triton import Triton
    from af3trt.runtime.serve.server import TritonServer

    log = repo / "status-not-cancel.log"
    srv = TritonServer(repo / "model_repository", log_path=log, log_verbose=1).start(timeout=300)

    def cancelled() -> int:
        return log.read_text(errors="replace").count("Cancellation notification received")

    async def async_requests() -> None:
        a = AsyncAF3Client(srv.grpc_url, timeout=120)
        for k in range(4):
            await a.complete(Request("What is said?", [speech_bytes], max_tokens=2, stream=k % 2 == 0))
        await a.close()
        front = Triton(srv.grpc_url)  # the OpenAI front's side of Triton
        for k in range(4):
            pieces = [p async for p in front.generate(Request("What is said?", [speech_bytes], max_tokens=2,
                                                              stream=k % 2 == 0), f"front-{k}")]
            assert sum(len(p.ids) for p in pieces) == 2
        await front.close()

    try:
        for k in range(6):  # a connection per request, closed as soon as the request is over
            with AF3Client(srv.grpc_url, timeout=120, private_connection=True) as c:
                assert c.ask("What is said?", [speech_bytes], max_tokens=2, stream=k % 2 == 0).token_ids
        with AF3Client(srv.grpc_url, timeout=120, private_connection=True) as c:
            for k in range(4):
                assert c.ask("What is said?", [speech_bytes], max_tokens=2, stream=k % 2 == 0).token_ids
        asyncio.run(async_requests())
        assert cancelled() == 0
        with AF3Client(srv.grpc_url, timeout=120, private_connection=True) as c:
            it = c.stream("What is said?", [speech_bytes], max_tokens=MAX_TOKENS)
            next(it)
            it.close()  # left early: this one is cancelled
            assert c.ask("What is said?", [speech_bytes], max_tokens=2).token_ids
    finally:
        srv.stop()
    assert cancelled() > 0  # read once the server has stopped: its log holds every notification by then


@pytest.mark.integration
def test_clients_that_go_out_of_scope_release_their_threads_and_connections(server, speech_bytes):
    """A client per request, never closed (`AF3Client(url).ask(...)`): each left a thread behind after `del` and
    garbage collection (300 clients → 301 threads; under load the caller reached 1,700 threads at 100 % CPU). A
    client that goes out of scope now releases its channel, its threads and its connection; so do AsyncAF3Client and
    the OpenAI front's Triton channel."""
    import gc
    import time

    from af3trt.runtime.client.library import AsyncAF3Client
    from af3trt.runtime.openai.triton import Triton

    port = int(server.grpc_url.rsplit(":", 1)[1])

    def settled() -> tuple[int, set[int]]:
        gc.collect()
        time.sleep(0.5)  # a closed connection leaves the kernel's table
        return threading.active_count(), peer_ports(port)

    threads0, peers0 = settled()
    for _ in range(20):
        assert AF3Client(server.grpc_url, timeout=120, private_connection=True).ask(
            "What is said?", [speech_bytes], max_tokens=1).token_ids
    threads1, peers1 = settled()

    async def per_request():
        for _ in range(10):
            assert (await AsyncAF3Client(server.grpc_url, timeout=120).complete(
                Request("What is said?", [speech_bytes], max_tokens=1))).token_ids
            assert (await Triton(server.grpc_url).ready())[0]

    asyncio.run(per_request())
    threads2, peers2 = settled()
    print(f"\nthreads {threads0} → {threads1} after 20 AF3Clients → {threads2} after 10 AsyncAF3Clients and Tritons; "
          f"connections {len(peers0)} → {len(peers1)} → {len(peers2)}")
    assert threads1 <= threads0 + 1 and threads2 <= threads0 + 1  # before: one more thread per AF3Client
    assert peers1 <= peers0 and peers2 <= peers0
