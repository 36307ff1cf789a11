"""Drives the real openai SDK through keygate's OpenAI-compatible paths (against the Rust mock).

Run by tests/sdk.rs with KEYGATE_URL, KEYGATE_TOKEN and EXPECT_TEXT set.
"""
import os

from openai import OpenAI

# OPENAI_BASE_PATH: "/v1beta/openai/" (Google's own path) or "/v1" (what OpenAI-style tools use).
client = OpenAI(
    api_key=os.environ["KEYGATE_TOKEN"],
    base_url=os.environ["KEYGATE_URL"] + os.environ.get("OPENAI_BASE_PATH", "/v1beta/openai/"),
    max_retries=0,  # a 429 reaching the SDK must fail the test, not be retried away
)
messages = [{"role": "user", "content": "hi"}]
# MODEL: the model to ask for (a keygate model alias, say).
model = os.environ.get("MODEL", "gemini-2.5-flash")

reply = client.chat.completions.create(model=model, messages=messages)
content = reply.choices[0].message.content
assert content == os.environ["EXPECT_TEXT"], f"chat completion: {content!r}"

stream = client.chat.completions.create(model=model, messages=messages, stream=True)
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
assert text == "chunk 0 chunk 1 chunk 2 chunk 3 ", f"streamed chat completion: {text!r}"

if os.environ.get("LIST_MODELS"):
    models = list(client.models.list())
    print(f"models listed: {len(models)}")
    # EXPECT_LISTED: a model id the listing must offer (a model alias, say).
    listed = os.environ.get("EXPECT_LISTED")
    if listed:
        ids = [m.id for m in models]
        assert listed in ids, f"{listed} not listed: {ids!r}"

print("openai ok")
