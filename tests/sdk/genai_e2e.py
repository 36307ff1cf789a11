"""Drives the real google-genai SDK through keygate (against the Rust mock).

Run by tests/sdk.rs with KEYGATE_URL, KEYGATE_TOKEN and EXPECT_TEXT set. Exits non-zero
(with the reason) on any mismatch.
"""
import os

from google import genai
from google.genai import types

base_url = os.environ["KEYGATE_URL"]
token = os.environ["KEYGATE_TOKEN"]
expect_text = os.environ["EXPECT_TEXT"]

client = genai.Client(
    api_key=token,
    http_options=types.HttpOptions(
        base_url=base_url,
        # One attempt: a 429 reaching the SDK must fail the test, not be retried away.
        retry_options=types.HttpRetryOptions(attempts=1),
    ),
)

reply = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
assert reply.text == expect_text, f"generate_content: {reply.text!r}"

chunks = [c.text for c in client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi")]
assert chunks == ["chunk 0 ", "chunk 1 ", "chunk 2 ", "chunk 3 "], f"generate_content_stream: {chunks!r}"

print("genai ok")
