"""FakeLLMProvider: a real HTTP server speaking OpenAI's and Ollama's chat APIs, breakable live."""

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from bastion.testing import FakeLLMProvider, ProviderRequest

OPENAI = "/v1/chat/completions"
OLLAMA = "/api/chat"
QUESTION = {"model": "llama3.2", "messages": [{"role": "user", "content": "What is bastion?"}]}


@pytest.fixture
def llm():
    with FakeLLMProvider(reply="A production layer.") as provider:
        yield provider


def ask(provider: FakeLLMProvider, path: str = OPENAI, **options) -> httpx.Response:
    body = options.pop("json", QUESTION)
    return httpx.post(f"{provider.url}{path}", json=body, timeout=options.pop("timeout", 5))


class TestOpenAI:
    def test_chat_completion_has_the_openai_shape(self, llm):
        """A chat completion answers with the reply in choices[0].message and usage counts."""
        body = ask(llm).json()
        assert "chat.completion" == body["object"]
        assert "llama3.2" == body["model"]
        assert body["id"].startswith("chatcmpl-")
        assert isinstance(body["created"], int)
        assert [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A production layer."},
                "finish_reason": "stop",
            }
        ] == body["choices"]
        usage = body["usage"]
        assert (3, 3, 6) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
            usage["total_tokens"],
        )

    def test_reply_function_receives_the_messages(self):
        """A reply function is called with the request's messages and its result is the answer."""
        seen = []

        def reply(messages):
            seen.append(messages)
            return f"You asked: {messages[-1]['content']}"

        with FakeLLMProvider(reply=reply) as provider:
            body = ask(provider).json()
        assert "You asked: What is bastion?" == body["choices"][0]["message"]["content"]
        assert [QUESTION["messages"]] == seen

    def test_streaming_request_gets_server_sent_events(self, llm):
        """With stream true the reply arrives as SSE chunks ending with [DONE]."""
        response = ask(llm, json={**QUESTION, "stream": True})
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        assert "[DONE]" == events[-1]
        chunks = [json.loads(event) for event in events[:-1]]
        assert "A production layer." == chunks[0]["choices"][0]["delta"]["content"]
        assert "stop" == chunks[-1]["choices"][0]["finish_reason"]

    def test_model_listing(self, llm):
        """GET /v1/models lists one model, for clients that probe it."""
        response = httpx.get(f"{llm.url}/v1/models")
        assert (200, "list") == (response.status_code, response.json()["object"])


class TestOllama:
    def test_chat_has_the_ollama_shape(self, llm):
        """/api/chat with stream false answers one object with message and done."""
        body = ask(llm, OLLAMA, json={**QUESTION, "stream": False}).json()
        assert {"role": "assistant", "content": "A production layer."} == body["message"]
        assert (True, "llama3.2") == (body["done"], body["model"])
        assert body["created_at"].endswith("Z")

    def test_chat_streams_ndjson_by_default(self, llm):
        """Without "stream": false, Ollama's default, the reply comes as NDJSON lines."""
        response = ask(llm, OLLAMA)
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert response.headers["content-type"] == "application/x-ndjson"
        assert [False, True] == [line["done"] for line in lines]
        assert "A production layer." == "".join(line["message"]["content"] for line in lines)

    def test_failure_uses_ollamas_error_shape(self, llm):
        """An Ollama failure body is {"error": "..."}, as Ollama sends it."""
        llm.behave("fail", status=500)
        response = ask(llm, OLLAMA)
        assert 500 == response.status_code
        assert isinstance(response.json()["error"], str)


class TestRecording:
    def test_requests_records_every_body_in_order(self, llm):
        """requests lists each JSON body received, in order, including failed ones."""
        llm.fail_next(1)
        first = {**QUESTION, "messages": [{"role": "user", "content": "one"}]}
        second = {**QUESTION, "messages": [{"role": "user", "content": "two"}]}
        ask(llm, json=first)
        ask(llm, json=second)
        assert [first, second] == llm.requests
        assert 2 == llm.request_count

    def test_received_keeps_method_path_and_headers(self, llm):
        """received has each request's method, path and lower-cased headers (traceparent...)."""
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        httpx.post(f"{llm.url}{OPENAI}?x=1", json=QUESTION, headers={"Traceparent": traceparent})
        [request] = llm.received
        assert isinstance(request, ProviderRequest)
        assert ("POST", OPENAI, QUESTION) == (request.method, request.path, request.body)
        assert traceparent == request.headers["traceparent"]

    def test_clear_forgets_requests(self, llm):
        """clear() empties the record."""
        ask(llm)
        llm.clear()
        assert ([], 0) == (llm.requests, llm.request_count)

    def test_request_count_is_safe_to_read_from_many_threads(self, llm):
        """Concurrent requests from several threads are all counted, none lost."""
        threads = [threading.Thread(target=ask, args=(llm,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert 8 == llm.request_count


class TestBehaviour:
    def test_slow_answers_after_the_delay(self, llm):
        """ "slow" delays the answer by at least `delay`, then answers normally."""
        llm.behave("slow", delay=0.3)
        started = time.perf_counter()
        response = ask(llm)
        elapsed = time.perf_counter() - started
        assert 200 == response.status_code
        assert 0.3 <= elapsed < 3.0

    async def test_slow_requests_are_served_concurrently(self, llm):
        """Five slow requests at once take about one delay, not five."""
        llm.behave("slow", delay=0.4)
        async with httpx.AsyncClient(base_url=llm.url, timeout=5) as client:
            started = time.perf_counter()
            responses = await asyncio.gather(
                *(client.post(OPENAI, json=QUESTION) for _ in range(5))
            )
            elapsed = time.perf_counter() - started
        assert [200] * 5 == [r.status_code for r in responses]
        assert elapsed < 1.6

    def test_fail_answers_the_status_with_an_openai_error(self, llm):
        """ "fail" answers the status with an OpenAI-shaped error, no Retry-After by default."""
        llm.behave("fail", status=502)
        response = ask(llm)
        assert 502 == response.status_code
        assert {"message", "type", "param", "code"} == set(response.json()["error"])
        assert "retry-after" not in response.headers

    @pytest.mark.parametrize(("retry_after", "header"), [(2, "2"), (0.5, "0.5")])
    def test_fail_sends_retry_after(self, llm, retry_after, header):
        """retry_after is sent as Retry-After: whole seconds as an integer, else a decimal."""
        llm.behave("fail", status=429, retry_after=retry_after)
        response = ask(llm)
        assert (429, header) == (response.status_code, response.headers["retry-after"])

    def test_fail_with_delay_is_a_slow_failure(self, llm):
        """ "fail" with a delay answers the failure only after the delay."""
        llm.behave("fail", delay=0.3)
        started = time.perf_counter()
        assert 503 == ask(llm).status_code
        assert time.perf_counter() - started >= 0.3

    def test_fail_next_fails_that_many_then_resumes_the_mode(self, llm):
        """fail_next(2) fails exactly the next two requests; the third gets the normal answer."""
        llm.fail_next(2, status=500)
        assert [500, 500, 200] == [ask(llm).status_code for _ in range(3)]

    def test_back_to_ok_recovers(self, llm):
        """behave("ok") after "fail" answers normally again."""
        llm.behave("fail")
        assert 503 == ask(llm).status_code
        llm.behave("ok")
        assert 200 == ask(llm).status_code

    def test_hang_reads_the_request_and_never_answers(self, llm):
        """ "hang" records the request but sends nothing: the client's read times out."""
        llm.behave("hang")
        started = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            ask(llm, timeout=0.3)
        assert time.perf_counter() - started < 2.0
        assert QUESTION == llm.requests[-1]

    async def test_hung_request_is_answered_when_the_mode_changes(self, llm):
        """A request hung by "hang" is answered under the new mode once behave() changes it."""
        llm.behave("hang")
        async with httpx.AsyncClient(base_url=llm.url, timeout=5) as client:
            pending = asyncio.create_task(client.post(OPENAI, json=QUESTION))
            await asyncio.to_thread(llm.wait_for_requests, 1)
            await asyncio.sleep(0.05)
            assert not pending.done()
            llm.behave("fail", status=500)
            response = await asyncio.wait_for(pending, 3)
        assert 500 == response.status_code

    def test_fail_next_also_fails_while_hung(self, llm):
        """fail_next answers at once even when the mode is "hang"."""
        llm.behave("hang")
        llm.fail_next(1)
        assert 503 == ask(llm, timeout=3).status_code

    async def test_stop_returns_quickly_with_hung_requests(self):
        """stop() does not wait for hung requests: it returns fast, their clients see an error."""
        provider = FakeLLMProvider().start()
        provider.behave("hang")
        async with httpx.AsyncClient(base_url=provider.url, timeout=10) as client:
            pending = [asyncio.create_task(client.post(OPENAI, json=QUESTION)) for _ in range(3)]
            await asyncio.to_thread(provider.wait_for_requests, 3)
            started = time.perf_counter()
            await asyncio.to_thread(provider.stop)
            assert time.perf_counter() - started < 1.0
            results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 3)
        assert all(isinstance(result, httpx.TransportError) for result in results)


class TestLifecycle:
    def test_stop_refuses_and_start_serves_again_on_the_same_port(self):
        """Between stop() and start() connecting is refused; start() comes back on the same URL."""
        provider = FakeLLMProvider().start()
        try:
            url = provider.url
            provider.stop()
            with pytest.raises(httpx.ConnectError):
                httpx.post(f"{url}{OPENAI}", json=QUESTION, timeout=2)
            provider.start()
            assert url == provider.url
            assert 200 == ask(provider).status_code
        finally:
            provider.stop()

    async def test_async_context_manager(self):
        """`async with` starts and stops it without blocking the test's loop."""
        async with httpx.AsyncClient(timeout=2) as client:
            async with FakeLLMProvider(reply="hi") as provider:
                response = await client.post(f"{provider.url}{OPENAI}", json=QUESTION)
            assert "hi" == response.json()["choices"][0]["message"]["content"]
            with pytest.raises(httpx.ConnectError):
                await client.post(f"{provider.url}{OPENAI}", json=QUESTION)

    def test_another_process_can_call_it(self, llm):
        """A separate process (like a `bastion serve` under test) gets answers over the socket."""
        script = (
            "import json, sys, urllib.request\n"
            "req = urllib.request.Request(sys.argv[1], data=json.dumps("
            "{'model': 'm', 'messages': [{'role': 'user', 'content': 'hi'}], 'stream': False}"
            ").encode(), headers={'Content-Type': 'application/json'})\n"
            "print(json.load(urllib.request.urlopen(req, timeout=5))['message']['content'])\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script, f"{llm.url}{OLLAMA}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert "A production layer." == result.stdout.strip()

    def test_url_before_start_is_a_clear_error(self):
        """url before the first start() (free port) raises, naming start()."""
        with pytest.raises(RuntimeError, match="start"):
            _ = FakeLLMProvider().url

    def test_start_twice_is_an_error(self, llm):
        """start() on a running provider raises instead of leaking a second server."""
        with pytest.raises(RuntimeError, match="already running"):
            llm.start()


class TestBadInput:
    @pytest.mark.parametrize(
        ("path", "body", "status"),
        [
            (OPENAI, {"model": "m"}, 400),
            (OPENAI, {"model": "m", "messages": "hello"}, 400),
            (OLLAMA, {"model": "m", "messages": [{"content": "no role"}]}, 400),
            ("/v1/embeddings", QUESTION, 404),
        ],
    )
    def test_malformed_requests_get_client_errors(self, llm, path, body, status):
        """A body without a messages list is 400, an unknown endpoint 404, as a provider answers."""
        assert status == ask(llm, path, json=body).status_code

    def test_wrong_method_is_405(self, llm):
        """GET on the chat endpoint is 405."""
        assert 405 == httpx.get(f"{llm.url}{OPENAI}").status_code

    def test_broken_reply_function_is_a_500(self):
        """A reply function that raises gives a 500 naming the error, not a dropped connection."""

        def reply(messages):
            raise KeyError("oops")

        with FakeLLMProvider(reply=reply) as provider:
            response = ask(provider)
        assert 500 == response.status_code
        assert "KeyError" in response.json()["error"]["message"]

    @pytest.mark.parametrize(
        ("mode", "options"),
        [
            ("broken", {}),
            ("slow", {}),
            ("ok", {"delay": 1.0}),
            ("hang", {"delay": 1.0}),
            ("fail", {"status": 200}),
            ("fail", {"delay": -1.0}),
            ("fail", {"retry_after": -1.0}),
        ],
    )
    def test_behave_rejects_misuse(self, mode, options):
        """behave() raises ValueError for an unknown mode or arguments that do not fit it."""
        with pytest.raises(ValueError, match=r"mode|delay|status|retry_after"):
            FakeLLMProvider().behave(mode, **options)

    def test_fail_next_rejects_misuse(self):
        """fail_next() rejects a negative count and a non-error status."""
        provider = FakeLLMProvider()
        with pytest.raises(ValueError, match="count"):
            provider.fail_next(-1)
        with pytest.raises(ValueError, match="status"):
            provider.fail_next(1, status=302)


class TestHttp:
    def test_chunked_request_body_is_read(self, llm):
        """A body sent with Transfer-Encoding: chunked is decoded like a sized one."""

        def body():
            text = json.dumps(QUESTION).encode()
            yield text[:10]
            yield text[10:]

        response = httpx.post(f"{llm.url}{OPENAI}", content=body())
        assert 200 == response.status_code
        assert [QUESTION] == llm.requests

    def test_non_json_body_is_a_400(self, llm):
        """A body that is not JSON is a 400 in the API's error shape, and is recorded as None."""
        response = httpx.post(f"{llm.url}{OPENAI}", content=b"not json")
        assert 400 == response.status_code
        assert [None] == [request.body for request in llm.received]

    def test_connection_close_is_honoured(self, llm):
        """A request with Connection: close gets its answer and then the connection closes."""
        with socket.create_connection((llm.host, llm.port), timeout=3) as sock:
            sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Connection: close" in received

    @pytest.mark.parametrize(
        "garbage",
        [b"HELLO\r\n\r\n", b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", b"GET / HTTP/1.1\r\nHo"],
    )
    def test_malformed_requests_get_a_400_and_a_close(self, llm, garbage):
        """Bytes that are not an HTTP/1.1 request get 400 and the connection is closed."""
        with socket.create_connection((llm.host, llm.port), timeout=3) as sock:
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
