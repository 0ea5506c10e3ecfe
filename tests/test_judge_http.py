"""`dst judge`'s HTTP backend (eval/judge_backends.py HttpJudge) against an OpenAI-compatible server this file
starts on 127.0.0.1 (canned answers, counted requests): the request, resuming from the cache, servers that ignore
n, fail or answer garbage, an unreachable endpoint, the report's section, and the CLI with an endpoint."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_judge import CAKE, SILENT, TRUCK, cli, s, write_predictions

from core.errors import InputError
from eval.judge import SYSTEM_PROMPT, JudgeConfig, JudgeError, judge_messages, run, transcripts
from eval.protocol import cut_to_protocol
from eval.report import with_judge

ANSWERS = {  # per dialogue, in the order the server hands them out
    "truck": [
        'Both give the steps.\n---\n{"correctness": 4, "promptness": 3, "efficiency": 5, "overall": 4}',
        "I cannot rate this dialogue.",
        'Late twice.\n---\n{"correctness": 2, "promptness": 5, "efficiency": 3, "overall": 2}',
    ],
    "cake": [
        '---\n{"correctness": 6, "promptness": 3, "efficiency": 3, "overall": 3}',
        '{"correctness": 5, "promptness": 4, "efficiency": 4, "overall": 5}',
        'Fine.\n---\n{"correctness": 3, "promptness": 2, "efficiency": 2, "overall": 3}',
    ],
}


class FakeServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 with canned answers. `cap`: the most choices one
    answer holds (1: a server that ignores n); `fail`: the dialogue whose requests get a 500."""

    def __init__(self, cap: int | None = None):
        self.cap, self.fail, self.requests, self.served = cap, None, [], {k: 0 for k in ANSWERS}
        self.raw: bytes | None = None  # a body to send instead of a chat completion
        self.delay = 0.0  # seconds before answering
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, reply = server.answer(self.path, body)
                time.sleep(server.delay)
                data = server.raw or json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.requests.append(body)
            if path != "/v1/chat/completions":
                return 404, {"error": {"message": f"no route {path}"}}
            name = next(
                k
                for k in ANSWERS
                if f"build the {k}" in body["messages"][1]["content"] or f"bake a {k}" in body["messages"][1]["content"]
            )
            if name == self.fail:
                return 500, {"error": {"message": "the GPU fell over"}}
            count = body.get("n", 1) if self.cap is None else min(body.get("n", 1), self.cap)
            texts = [ANSWERS[name][(self.served[name] + i) % 3] for i in range(count)]
            self.served[name] += count
        return 200, {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": t}}
                for i, t in enumerate(texts)
            ],
        }


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def http_config(tmp_path: Path, url: str, **kw) -> JudgeConfig:
    predictions = write_predictions(tmp_path / "predictions.jsonl", [TRUCK, CAKE, SILENT])
    settings = {"retries": 0, "timeout_s": 20.0, "concurrency": 2, **kw}
    return JudgeConfig(
        predictions=predictions, out=tmp_path / "eval", judge_model="fake-judge", judge_url=url, **settings
    )


def test_http_backend_against_a_local_server(tmp_path, server):
    cfg = http_config(tmp_path, server.url)
    server.fail = "cake"  # a run that dies half-way keeps its answers and writes no judge.json
    with pytest.raises(
        JudgeError,
        match=rf"the judge endpoint {server.url} answered 500 for ego4d/cake "
        r"conversation 0: .*the GPU fell over",
    ):
        run(cfg)
    assert not (cfg.out / "judge.json").exists()
    assert len((cfg.out / "judge_cache.jsonl").read_text().splitlines()) == 3  # truck's three answers

    server.fail, server.requests = None, []
    judge = run(cfg)
    assert [r["messages"][1]["content"] for r in server.requests] == [
        judge_messages(*transcripts(cut_to_protocol([CAKE], "proassist")[0]))[1]["content"]
    ]  # only cake again
    (body,) = server.requests
    assert (body["model"], body["n"], body["temperature"], body["top_p"], "max_tokens" in body) == (
        "fake-judge",
        3,
        0.5,
        0.95,
        False,
    )
    assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}

    assert judge["datasets"] == {
        "ego4d": {
            **s(4.0, 3.0, 3.0, 4.0),
            "dialogues": 1,
            "dialogues_scored": 1,
            "valid_samples": 2,
            "skipped_samples": 1,
        },
        "wtag": {
            **s(3.0, 4.0, 4.0, 3.0),
            "dialogues": 1,
            "dialogues_scored": 1,
            "valid_samples": 2,
            "skipped_samples": 1,
        },
    }
    assert judge["mean"] == s(3.5, 3.5, 3.5, 3.5)
    assert judge["samples"] == {
        "requested": 6,
        "valid": 4,
        "skipped": 2,
        "from_cache": 3,
        "skipped_by_reason": {"no_json_object": 1, "out_of_range": 1},
    }
    assert (judge["num_dialogues"], judge["dialogues_judged"], judge["dialogues_without_reference"]) == (3, 2, 1)
    assert judge["judge"] == {"model": "fake-judge", "backend": "http", "url": server.url}
    assert judge["settings"]["n"] == 3 and judge["settings"]["predictions"] == str(cfg.predictions)
    assert judge["proassist_settings"] is False and "llm_eval.py" in judge["rubric_source"]
    assert json.loads((cfg.out / "judge.json").read_text()) == judge

    server.requests = []  # a third run: every answer is cached, nothing is asked
    again = run(cfg)
    assert server.requests == [] and again["samples"]["from_cache"] == 6
    assert {k: v for k, v in again.items() if k != "samples"} == {k: v for k, v in judge.items() if k != "samples"}


def test_report_gains_the_judge_section(tmp_path, server):
    """In dst eval's folder, report.html gets the judge's section (replaced, not added, on a rerun); a report of
    other predictions is left alone."""
    out = tmp_path / "eval"
    out.mkdir()
    page = '<html><body><section id="summary">S</section><section id="dialogues">D</section></body></html>'
    (out / "report.html").write_text(page)
    write_predictions(out / "predictions.jsonl", [TRUCK, CAKE, SILENT])
    cfg = JudgeConfig(
        predictions=out / "predictions.jsonl", out=out, judge_model="fake-judge", judge_url=server.url, retries=0
    )
    judge = run(cfg)
    html = (out / "report.html").read_text()
    assert html.startswith('<html><body><section id="summary">S</section><section id="judge"><h2>LLM judge</h2>')
    assert html.endswith('</section><section id="dialogues">D</section></body></html>')
    assert "fake-judge (http, " + server.url in html and "Not ProAssist's judge and settings" in html
    assert (
        '<tr><td>mean over datasets</td><td class="num">3.50</td><td class="num">3.50</td><td class="num">3.50'
        '</td><td class="num">3.50</td><td class="num"></td></tr><tr><td>ego4d</td><td class="num">4.00</td>'
        '<td class="num">3.00</td><td class="num">3.00</td><td class="num">4.00</td><td class="num">1 of 1</td>'
        "</tr>"
    ) in html
    assert "Skipped samples (no score object, or a score missing or outside 1-5): 2 of 6." in html
    run(cfg)
    assert (out / "report.html").read_text() == html  # the same section, once
    assert with_judge("<p>no anchors</p>", judge).startswith('<p>no anchors</p><section id="judge">')

    elsewhere = JudgeConfig(
        predictions=out / "predictions.jsonl",
        out=tmp_path / "other",
        judge_model="fake-judge",
        judge_url=server.url,
        retries=0,
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.html").write_text(page)
    run(elsewhere)
    assert (tmp_path / "other" / "report.html").read_text() == page


def test_http_server_that_ignores_n(tmp_path):
    fake = FakeServer(cap=1)
    try:
        judge = run(http_config(tmp_path, fake.url))
    finally:
        fake.httpd.shutdown()
        fake.httpd.server_close()
    assert sorted(r["n"] for r in fake.requests) == [1, 1, 2, 2, 3, 3]  # asked again for the missing samples
    assert judge["mean"] == {m: 3.5 for m in ("correctness", "promptness", "efficiency", "overall")}


def test_endpoint_too_slow_writes_nothing(tmp_path, server):
    server.delay = 1.0
    cfg = http_config(tmp_path, server.url, max_dialogues=1, timeout_s=0.2)
    with pytest.raises(
        JudgeError,
        match=rf"the judge endpoint {server.url} gave no answer within 0.2 s \(0 retries\) "
        r"for wtag/truck conversation 0",
    ):
        run(cfg)
    assert not cfg.out.exists()


def test_endpoint_answering_non_json_writes_nothing(tmp_path, server):
    server.raw = b"<html>busy</html>"
    cfg = http_config(tmp_path, server.url)
    with pytest.raises(JudgeError, match=rf"the judge endpoint {server.url} answered with a body that is not JSON"):
        run(cfg)
    assert not cfg.out.exists()


def test_unreachable_endpoint_writes_nothing(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = http_config(tmp_path, f"http://127.0.0.1:{port}/v1")
    with pytest.raises(
        JudgeError,
        match=rf"cannot reach the judge endpoint http://127\.0\.0\.1:{port}/v1 after 0 "
        r"retries",
    ) as caught:
        run(cfg)
    assert isinstance(caught.value, InputError) and not cfg.out.exists()


def test_cli_with_an_endpoint_and_its_refusals(tmp_path, server):
    predictions = write_predictions(tmp_path / "predictions.jsonl", [TRUCK, CAKE, SILENT])
    result = cli(
        "--predictions",
        str(predictions),
        "--judge-url",
        server.url,
        "--judge-model",
        "fake-judge",
        "--out",
        str(tmp_path / "ok"),
        "--retries",
        "0",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ok" / "judge.json").read_text())["mean"] == s(3.5, 3.5, 3.5, 3.5)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = cli("--predictions", str(empty), "--judge-model", "smollm2-135m", "--out", str(tmp_path / "e"))
    assert (result.exit_code, "no dialogue records (empty file)" in result.output) == (2, True)
    silent = write_predictions(tmp_path / "silent.jsonl", [SILENT])
    result = cli("--predictions", str(silent), "--judge-model", "smollm2-135m", "--out", str(tmp_path / "s"))
    assert (result.exit_code, "no dialogue has a reference assistant turn" in result.output) == (1, True)
    result = cli(
        "--predictions",
        str(predictions),
        "--judge-model",
        "m",
        "--judge-url",
        "localhost:8000",
        "--out",
        str(tmp_path / "u"),
    )
    assert (result.exit_code, "judge_url must be an http(s) URL" in result.output) == (2, True)
    result = cli(
        "--predictions", str(predictions), "--judge-model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")
    )
    assert (result.exit_code, "is not a model folder (no config.json)" in result.output) == (2, True)
    assert not any((tmp_path / name).exists() for name in ("e", "s", "u", "m"))
