"""Judges: an OpenAI-compatible HTTP chat endpoint, or a local generate function (a medcg model).

A judge has an `identity` (what goes into cache keys: URL host + model name, or a checkpoint
fingerprint; never a secret), `decoding` (its sampling settings, also keyed) and
`run(requests)`, which yields (request index, reply text or JudgeFailure) as replies arrive so the
caller can cache each one at once.

The HTTP judge reads its API key from the environment variable named in the config and keeps it out
of everything it returns: identities, failures and raw texts are scrubbed of it.
"""
from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import email.utils
import http.client
import io
import json
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from medcg.judge.data import LoadedImage

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_SECRET_WORDS = ("key", "token", "secret", "sig", "password", "code")


@dataclasses.dataclass(frozen=True)
class JudgeRequest:
  """One judge call: the system text, the item text and the image."""
  system: str
  user: str
  image: LoadedImage


@dataclasses.dataclass(frozen=True)
class JudgeFailure:
  """A call that gave no usable reply after its retries; `message` never holds the API key."""
  message: str
  attempts: int


class HttpJudge:
  """OpenAI-compatible `/chat/completions` judge with retries, backoff and a concurrency limit.

  Retries (up to `max_retries` more attempts) on 408/409/425/429/5xx, timeouts and connection errors,
  waiting `backoff_initial_s * 2**attempt` (x a 0-25 % jitter, at most `backoff_max_s`) or the
  server's Retry-After when it sends one (also capped at `backoff_max_s`). Other HTTP errors and
  malformed replies fail at once; failures are returned, not raised, so one bad sample never stops a run.
  """

  def __init__(self, url: str, model: str, api_key_env: str = "", timeout_s: float = 60.0,
               max_retries: int = 5, backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0,
               concurrency: int = 8, temperature: float = 0.0, max_tokens: int = 32,
               seed: int | None = 0, auth_header: str = "Authorization",
               sleep: Callable[[float], None] = time.sleep):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
      raise ValueError(f"judge.url must be an http(s) URL of a chat completions endpoint, got {url!r}")
    secret_params = [k for k, _ in urllib.parse.parse_qsl(parts.query)
                     if any(w in k.lower() for w in _SECRET_WORDS)]
    if parts.username or parts.password or secret_params:
      raise ValueError("judge.url must not carry credentials (user info or a key-like query parameter); "
                       "put the API key in the environment variable named by judge.api_key_env")
    if not model:
      raise ValueError("judge.model is empty: name the judge model the endpoint should run")
    if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
      raise ValueError("judge.concurrency >= 1, judge.max_retries >= 0 and judge.timeout_s > 0 are required")
    self._api_key = ""
    if api_key_env:
      self._api_key = os.environ.get(api_key_env, "")
      if not self._api_key:
        raise ValueError(f"environment variable {api_key_env} (judge.api_key_env) is not set or empty")
    self.url, self.model = url, model
    self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
    self.backoff_initial_s, self.backoff_max_s = float(backoff_initial_s), float(backoff_max_s)
    self.concurrency = int(concurrency)
    self.decoding = {"temperature": float(temperature), "max_tokens": int(max_tokens), "seed": seed}
    port = parts.port or (443 if parts.scheme == "https" else 80)
    query = f"?{parts.query}" if parts.query else ""  # e.g. Azure's api-version
    self.identity = f"http:{parts.hostname}:{port}{parts.path}{query}|{model}"
    self.auth_header = auth_header
    self._sleep = sleep

  def scrub(self, text: str) -> str:
    """Removes the API key from text that may leave this object."""
    return text.replace(self._api_key, "***") if self._api_key else text

  def _body(self, req: JudgeRequest) -> bytes:
    data_url = f"data:{req.image.mime};base64," + base64.b64encode(req.image.data).decode("ascii")
    body = {
        "model": self.model,
        "messages": [
            {"role": "system", "content": req.system},
            {"role": "user", "content": [{"type": "text", "text": req.user},
                                         {"type": "image_url", "image_url": {"url": data_url}}]},
        ],
        "temperature": self.decoding["temperature"],
        "max_tokens": self.decoding["max_tokens"],
    }
    if self.decoding["seed"] is not None:
      body["seed"] = self.decoding["seed"]
    return json.dumps(body).encode("utf-8")

  @staticmethod
  def _retry_after(headers) -> float | None:
    """Seconds to wait from a Retry-After header (delay seconds or an HTTP date); None if absent or bad."""
    value = headers.get("Retry-After") if headers else None
    if not value:
      return None
    try:
      return max(0.0, float(value))
    except ValueError:
      pass
    try:
      return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
      return None

  def _attempt(self, body: bytes) -> tuple[str | None, str, bool, float | None]:
    """One POST: (text, error message, retryable, retry-after seconds)."""
    headers = {"Content-Type": "application/json"}
    if self._api_key:
      # OpenAI-style "Authorization: Bearer <key>", or the bare key in another header (Azure: api-key).
      bearer = self.auth_header.lower() == "authorization"
      headers[self.auth_header] = f"Bearer {self._api_key}" if bearer else self._api_key
    request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
        raw = resp.read()
    except urllib.error.HTTPError as e:
      detail = e.read(300).decode("utf-8", "replace") if e.fp else ""
      return (None, f"HTTP {e.code}: {detail.strip()}", e.code in _RETRY_STATUS,
              self._retry_after(e.headers))
    except (TimeoutError, socket.timeout):
      return None, f"timed out after {self.timeout_s:g} s", True, None
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as e:
      reason = getattr(e, "reason", e)
      if isinstance(reason, (TimeoutError, socket.timeout)):
        return None, f"timed out after {self.timeout_s:g} s", True, None
      return None, f"connection error: {reason}", True, None
    try:
      content = json.loads(raw)["choices"][0]["message"]["content"]
      if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
      if not isinstance(content, str):
        raise TypeError(f"content is {type(content).__name__}")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
      snippet = raw[:200].decode("utf-8", "replace")
      return None, f"malformed reply ({type(e).__name__}: {e}): {snippet!r}", False, None
    return content, "", False, None

  def complete(self, req: JudgeRequest) -> str | JudgeFailure:
    """One judged call with retries: the reply text, or a JudgeFailure."""
    body = self._body(req)
    for attempt in range(self.max_retries + 1):
      text, error, retryable, retry_after = self._attempt(body)
      if text is not None:
        return self.scrub(text)
      if not retryable or attempt == self.max_retries:
        return JudgeFailure(self.scrub(error), attempts=attempt + 1)
      if retry_after is None:
        retry_after = self.backoff_initial_s * 2 ** attempt * random.uniform(1.0, 1.25)
      self._sleep(min(retry_after, self.backoff_max_s))
    raise AssertionError("unreachable")

  def run(self, requests: Sequence[JudgeRequest]) -> Iterator[tuple[int, str | JudgeFailure]]:
    """Yields (index, reply or failure) as calls finish, at most `concurrency` in flight."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency,
                                                 thread_name_prefix="medcg-judge")
    try:
      futures = {pool.submit(self.complete, r): i for i, r in enumerate(requests)}
      for fut in concurrent.futures.as_completed(futures):
        yield futures[fut], fut.result()
    finally:
      # On an error (or the caller stopping early) drop queued calls instead of paying for them.
      pool.shutdown(wait=True, cancel_futures=True)


def decode_image(image: LoadedImage) -> np.ndarray:
  """uint8 RGB array (H, W, 3) of a loaded image, for local judges."""
  with Image.open(io.BytesIO(image.data)) as img:
    return np.asarray(img.convert("RGB"))


class LocalJudge:
  """A judge backed by `generate_fn(prompts, images) -> texts` (e.g. a medcg VLM, greedy).

  `identity` must fingerprint the model (checkpoint digest and config) and `decoding` its settings,
  since both go into cache keys. The prompt is the system text, a blank line, then the item text.
  Exceptions from `generate_fn` propagate: a local model failing is a bug, not a transient error.
  """

  def __init__(self, generate_fn: Callable[[list[str], list[np.ndarray]], Sequence[str]],
               identity: str, decoding: dict, batch_size: int = 8):
    if batch_size < 1:
      raise ValueError(f"judge.batch_size must be >= 1, got {batch_size}")
    self.generate_fn, self.identity, self.decoding = generate_fn, identity, dict(decoding)
    self.batch_size = int(batch_size)

  def run(self, requests: Sequence[JudgeRequest]) -> Iterator[tuple[int, str | JudgeFailure]]:
    """Yields (index, reply) batch by batch."""
    for start in range(0, len(requests), self.batch_size):
      chunk = requests[start:start + self.batch_size]
      prompts = [f"{r.system}\n\n{r.user}" for r in chunk]
      texts = list(self.generate_fn(prompts, [decode_image(r.image) for r in chunk]))
      if len(texts) != len(chunk):
        raise ValueError(f"local judge generate_fn returned {len(texts)} texts for {len(chunk)} prompts")
      for i, text in enumerate(texts):
        yield start + i, str(text)
