"""The HTTP judge against a real loopback server that plays the judge with scripted replies.

The server reads which sample and order a request is from the answers in the prompt (the fixture
answers start with "[<model> #<id>]"), answers with a scripted action, and counts every request, so
the tests can check retries, caching and resume by what the judge was actually asked.
"""
import collections
import http.server
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from judge_fixtures import fixture_config

from medcg.judge import launch, prompts
from medcg.judge.clients import HttpJudge, JudgeRequest
from medcg.judge.data import load_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "data", "judge")
KEY_ENV = "MEDCG_TEST_JUDGE_KEY"
SECRET = "sk-test-7f3c9e-DO-NOT-LEAK-41d2"
A1, A2, U1, U2 = prompts.LABELS
_ANSWER1_RE = re.compile(r"~~~Answer1\n\[(\S+) #(\d+)\]")

# Scripted votes for cand-a vs ref, one pair of (order 1, order 2) labels per sample, and the verdict
# the combination rule must give. Order 1 shows the reference as Answer1.
VOTES = {0: (A2, A1), 1: (A2, U1), 2: (A1, A1), 3: (U1, U1), 4: (U1, U2), 5: (A1, A2), 6: (U2, U2)}
VERDICTS = {0: "win", 1: "win", 2: "tie", 3: "unable_one", 4: "unable", 5: "lose", 6: "unable_two"}


class ScriptedJudge:
  """A loopback OpenAI-compatible chat endpoint. `script[(sid, order)]` is a list of actions used
  one per request before falling back to the vote in VOTES:
  ("status", code, retry_after) | ("sleep", seconds) | ("raw", body) | ("text", reply) | ("block",)."""

  def __init__(self, script=None, reference="ref", delay=0.0):
    self.script = collections.defaultdict(list, {k: list(v) for k, v in (script or {}).items()})
    self.reference, self.delay = reference, delay
    self.lock = threading.Lock()
    self.requests = collections.Counter()
    self.times = collections.defaultdict(list)
    self.auth, self.api_key_headers = set(), set()
    self.in_flight = self.max_in_flight = 0
    self.unblock = threading.Event()
    judge = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        judge.handle(self, body)

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/chat/completions"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  @property
  def total(self):
    return sum(self.requests.values())

  def handle(self, h, body):
    user = body["messages"][1]["content"][0]["text"]
    image_url = body["messages"][1]["content"][1]["image_url"]["url"]
    assert image_url.startswith("data:image/png;base64,")
    model1, sid = _ANSWER1_RE.search(user).groups()
    key = (int(sid), 1 if model1 == self.reference else 2)
    with self.lock:
      self.requests[key] += 1
      self.times[key].append(time.monotonic())
      self.auth.add(h.headers.get("Authorization"))
      self.api_key_headers.add(h.headers.get("api-key"))
      action = self.script[key].pop(0) if self.script[key] else ("text", VOTES.get(key[0], (A1, A1))[key[1] - 1])
      self.in_flight += 1
      self.max_in_flight = max(self.max_in_flight, self.in_flight)
    try:
      time.sleep(self.delay)
      self._reply(h, body, action)
    except (BrokenPipeError, ConnectionResetError):
      pass  # the client timed out and hung up
    finally:
      with self.lock:
        self.in_flight -= 1

  def _reply(self, h, body, action):
    kind = action[0]
    if kind == "block":
      self.unblock.wait(30)
      action = ("text", A1)
    if kind == "sleep":
      time.sleep(action[1])
      action = ("text", A1)
    if kind == "status":
      # Echo the Authorization header back, as some proxies do: the client must scrub it.
      payload = f"error {action[1]} for {h.headers.get('Authorization')}".encode()
      h.send_response(action[1])
      if action[2] is not None:
        h.send_header("Retry-After", str(action[2]))
    elif kind == "raw":
      payload = action[1]
      h.send_response(200)
    else:
      payload = json.dumps({"id": "x", "model": body["model"], "choices": [
          {"index": 0, "message": {"role": "assistant", "content": action[1]}}]}).encode()
      h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(payload)))
    h.end_headers()
    h.wfile.write(payload)

  def close(self):
    self.unblock.set()
    self.server.shutdown()
    self.server.server_close()


@pytest.fixture
def server_factory():
  servers = []

  def make(*args, **kw):
    servers.append(ScriptedJudge(*args, **kw))
    return servers[-1]
  yield make
  for s in servers:
    s.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)


def _cli_command(workdir, url, *extra):
  """`python -m medcg.judge` on the fixtures against the fake endpoint at `url`."""
  return [sys.executable, "-m", "medcg.judge", "--config", os.path.join(REPO, "configs", "judge.py"),
          f"--config.workdir={workdir}", f"--config.data.path={FIXTURES}/questions.json",
          f"--config.data.criteria_path={FIXTURES}/criteria.json",
          f"--config.answers.reference={FIXTURES}/answers_ref.jsonl",
          f"--config.answers.candidates={FIXTURES}/answers_a.jsonl",
          f"--config.judge.url={url}", "--config.judge.model=judge-x", f"--config.judge.api_key_env={KEY_ENV}",
          "--config.protocol.elo_rounds=10", *extra]


def _config(workdir, url, candidates=("answers_a.jsonl",), **judge):
  c = fixture_config(workdir, candidates=candidates, elo_rounds=20)
  c.judge.update(dict(url=url, model="judge-x", api_key_env=KEY_ENV, timeout_s=1.5, max_retries=2,
                      backoff_initial_s=0.01, backoff_max_s=0.5, concurrency=4))
  c.judge.update(judge)
  return c


def _records(workdir):
  with open(os.path.join(workdir, "judgements.jsonl")) as f:
    return [json.loads(line) for line in f]


def _cache_rows(workdir):
  db = sqlite3.connect(os.path.join(workdir, "judge_cache.sqlite"))
  try:
    return db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
  finally:
    db.close()


def _assert_no_secret(folder):
  for root, _, files in os.walk(folder):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        assert SECRET.encode() not in f.read(), f"API key written to {name}"


def test_aggregation_with_retries_on_429_5xx_and_timeouts(tmp_path, server_factory):
  srv = server_factory(script={
      (0, 1): [("status", 429, 0.2)],      # Retry-After: 0.2 s
      (1, 2): [("status", 503, None)],
      (2, 1): [("sleep", 3.0)],            # longer than the 1.5 s client timeout (generous: CI is busy)
  })
  launch.run_config(_config(tmp_path, srv.url))
  recs = {r["sample_id"]: r for r in _records(tmp_path)}
  assert {int(k): r["verdict"] for k, r in recs.items()} == VERDICTS
  assert srv.requests[(0, 1)] == srv.requests[(1, 2)] == srv.requests[(2, 1)] == 2  # one retry each
  assert srv.total == 14 + 3
  assert srv.times[(0, 1)][1] - srv.times[(0, 1)][0] >= 0.2  # Retry-After honoured
  assert srv.auth == {f"Bearer {SECRET}"}
  first = recs["0"]["orders"][0]
  assert (first["answer1"], first["answer2"], first["raw"], first["label"]) == ("ref", "cand-a", A2, A2)
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  (m,) = results["leaderboard"]
  assert (m["win"], m["tie"], m["lose"], m["n_judged"]) == (2, 4, 1, 7)
  assert m["win_rate"] == pytest.approx(2 / 7)
  assert m["position_consistency"] == pytest.approx(4 / 7)  # samples 0, 3, 5, 6
  assert m["by_level"]["Creating"] == {"win": 0, "tie": 1, "lose": 1, "n": 2, "win_rate": 0.0}
  assert results["stats"]["parse_failure_rate"] == 0.0
  assert results["judge"]["identity"] == f"http:127.0.0.1:{srv.server.server_address[1]}/v1/chat/completions|judge-x"
  assert "cand-a" in results["elo"] and "ref" in results["elo"]
  board = (tmp_path / "leaderboard.md").read_text()
  assert "| 1 | cand-a | ref | 2 | 4 | 1 | 28.6 | 57.1 | 7 | 0 |" in board
  assert _cache_rows(tmp_path) == 14
  _assert_no_secret(tmp_path)

  # Everything is cached: a rerun sends nothing; --no-cache sends everything again.
  launch.run_config(_config(tmp_path, srv.url))
  assert srv.total == 17
  launch.run_config(_config(tmp_path, srv.url), read_cache=False)
  assert srv.total == 17 + 14


def test_failures_are_reported_not_cached_and_retried_next_run(tmp_path, server_factory):
  srv = server_factory(script={
      (0, 1): [("raw", b"<html>gateway hiccup</html>")],          # malformed reply: not retried
      (1, 2): [("text", "I prefer the second.\nAnswer3")],        # names a label that does not exist
      (2, 1): [("status", 500, None)] * 3,                        # retried until max_retries runs out
      (3, 2): [("status", 400, None)],                            # client error: not retried
  })
  launch.run_config(_config(tmp_path, srv.url))
  recs = {int(r["sample_id"]): r for r in _records(tmp_path)}
  assert [k for k, r in recs.items() if r["verdict"] is None] == [0, 1, 2, 3]
  errors = {k: [o["error"] for o in r["orders"] if o["error"]][0] for k, r in recs.items() if r["verdict"] is None}
  assert errors[0].startswith("malformed reply") and errors[2].startswith("HTTP 500")
  assert errors[1].startswith("unparsed") and recs[1]["orders"][1]["raw"].endswith("Answer3")
  assert errors[3].startswith("HTTP 400") and "***" in errors[3] and SECRET not in errors[3]
  assert srv.requests[(2, 1)] == 3 and srv.requests[(3, 2)] == 1 and srv.requests[(0, 1)] == 1
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  assert results["stats"]["failed_calls"] == 3 and results["stats"]["unparsed"] == 1
  assert results["stats"]["parse_failure_rate"] == pytest.approx(1 / 11)
  assert {r["sample_id"] for r in results["incomplete"]} == {"0", "1", "2", "3"}
  (m,) = results["leaderboard"]
  assert (m["n_judged"], m["n_incomplete"]) == (3, 4)
  assert _cache_rows(tmp_path) == 10
  _assert_no_secret(tmp_path)

  # The next run sends exactly the four calls that failed and completes every sample.
  before = srv.total
  launch.run_config(_config(tmp_path, srv.url))
  assert srv.total - before == 4
  assert {int(r["sample_id"]): r["verdict"] for r in _records(tmp_path)} == VERDICTS
  _assert_no_secret(tmp_path)


def test_concurrency_limit(server_factory):
  srv = server_factory(delay=0.05)
  judge = HttpJudge(srv.url, "judge-x", api_key_env=KEY_ENV, concurrency=3, timeout_s=2.0)
  image = load_image(os.path.join(FIXTURES, "images", "0.png"))
  reqs = [JudgeRequest(prompts.system_prompt(), prompts.item_prompt("q", "open-ended", f"[ref #{i}] a",
                                                                    f"[x #{i}] b", None), image)
          for i in range(7)]
  out = dict(judge.run(reqs))
  assert sorted(out) == list(range(7))
  assert [out[i] for i in range(7)] == [VOTES[i][0] for i in range(7)]
  assert 1 < srv.max_in_flight <= 3


def test_http_judge_config_errors(monkeypatch):
  with pytest.raises(ValueError, match="MEDCG_MISSING_KEY"):
    HttpJudge("http://127.0.0.1:1/v1/chat/completions", "m", api_key_env="MEDCG_MISSING_KEY")
  with pytest.raises(ValueError, match="credentials"):
    HttpJudge(f"http://user:{SECRET}@127.0.0.1:1/x", "m")
  with pytest.raises(ValueError, match="credentials") as e:
    HttpJudge(f"http://127.0.0.1:1/x?api-version=1&api_key={SECRET}", "m")
  assert SECRET not in str(e.value)
  azure = HttpJudge("https://r.example.org/openai/deployments/d/chat/completions?api-version=2024-02-01", "gpt-4o",
                    api_key_env=KEY_ENV, auth_header="api-key")
  assert azure.identity == "http:r.example.org:443/openai/deployments/d/chat/completions?api-version=2024-02-01|gpt-4o"


def test_bare_key_header(server_factory):
  srv = server_factory()
  judge = HttpJudge(srv.url, "judge-x", api_key_env=KEY_ENV, auth_header="api-key", timeout_s=2.0)
  image = load_image(os.path.join(FIXTURES, "images", "0.png"))
  req = JudgeRequest("s", prompts.item_prompt("q", "open-ended", "[ref #0] a", "[x #0] b", None), image)
  assert dict(judge.run([req])) == {0: VOTES[0][0]}
  assert srv.api_key_headers == {SECRET} and srv.auth == {None}
  with pytest.raises(ValueError, match="http"):
    HttpJudge("ftp://example.org/x", "m")


def test_killed_run_resumes_without_repeating_cached_calls(tmp_path, server_factory):
  # The 6th request hangs until released; the CLI process is SIGKILLed while it waits.
  script = {(i, o): [("block",)] for i in range(7) for o in (1, 2)}
  srv = server_factory(script=script)
  for key in list(script)[:5]:
    srv.script[key] = []
  # Calls go out in sample order with concurrency 1: (0,1) (0,2) (1,1) ... so five answered, then block.
  cmd = _cli_command(tmp_path, srv.url, "--config.judge.concurrency=1", "--config.judge.timeout_s=20")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 60
    while srv.total < 6 and time.monotonic() < deadline and proc.poll() is None:
      time.sleep(0.05)
    assert srv.total == 6, proc.stdout.read().decode() if proc.poll() is not None else "timed out"
    # The fifth reply is cached by the main thread while the sixth call is already out: wait for it.
    while _cache_rows(tmp_path) < 5 and time.monotonic() < deadline:
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert _cache_rows(tmp_path) == 5
  assert not (tmp_path / "results.json").exists()
  for key in script:
    srv.script[key] = []
  srv.unblock.set()
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert srv.total == 6 + 9  # the 5 cached calls were not repeated; the one in flight was
  assert all(srv.requests[k] == 1 for k in list(script)[:5])
  assert {int(r["sample_id"]): r["verdict"] for r in _records(tmp_path)} == VERDICTS
  assert "| cand-a | ref |" in done.stdout
  fresh = subprocess.run(cmd + ["--no-cache"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert fresh.returncode == 0, fresh.stderr[-2000:]
  assert srv.total == 15 + 14
  _assert_no_secret(tmp_path)


def test_cli_label_policy_flag(tmp_path, server_factory):
  # Sample 0, order 1 replies with two different label lines: --label_policy=strict leaves it unparsed.
  srv = server_factory(script={(0, 1): [("text", "Answer2\nOn reflection:\nAnswer1")] * 2})
  cmd = _cli_command(tmp_path, srv.url)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  bad = subprocess.run(cmd + ["--label_policy=first"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
  assert "error: --label_policy must be one of 'last_line', 'strict', got 'first'" in bad.stderr
  assert srv.total == 0
  done = subprocess.run(cmd + ["--label_policy=strict"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  stats = results["stats"]
  assert (stats["label_policy"], stats["unparsed"], stats["conflicting_label_replies"]) == ("strict", 1, 1)
  assert [r["sample_id"] for r in results["incomplete"]] == ["0"]
  assert "Label policy `strict`: 1 replies had several label lines, 1 of them with different labels." in done.stdout
  # The default reads the same (retried) reply by its last line, Answer1 in order 1: the reference wins it.
  default = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert default.returncode == 0, default.stderr[-2000:]
  assert srv.requests[(0, 1)] == 2 and srv.total == 15
  recs = {r["sample_id"]: r for r in _records(tmp_path)}
  assert recs["0"]["orders"][0]["label"] == A1 and recs["0"]["verdict"] == "tie"  # with A1 in order 2


def test_retry_after_header_forms():
  import email.utils
  parse = HttpJudge._retry_after
  assert parse({"Retry-After": "2.5"}) == 2.5 and parse({"Retry-After": "-3"}) == 0.0
  soon = email.utils.formatdate(time.time() + 30, usegmt=True)
  assert 25 < parse({"Retry-After": soon}) <= 30
  assert parse({"Retry-After": "soon-ish"}) is None and parse({}) is None and parse(None) is None
