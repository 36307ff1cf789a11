"""The real SDKs served from keygate's response cache (against the Rust mock): each call is made
twice, the second answer must be a hit (`x-keygate-cache: hit`) that the SDK reads like the
first, streams included (a hit replays the events at once, with a content-length).

Run by tests/sdk.rs with KEYGATE_URL, KEYGATE_TOKEN and EXPECT_TEXT set.
"""
import os

from google import genai
from google.genai import types
from openai import OpenAI

base_url = os.environ["KEYGATE_URL"]
token = os.environ["KEYGATE_TOKEN"]
expect_text = os.environ["EXPECT_TEXT"]
stream_text = "chunk 0 chunk 1 chunk 2 chunk 3 "

openai = OpenAI(api_key=token, base_url=base_url + "/v1", max_retries=0)
messages = [{"role": "user", "content": "hi"}]
seen = []
for _ in range(2):
    raw = openai.chat.completions.with_raw_response.create(model="gemini-2.5-flash", messages=messages)
    seen.append(raw.headers.get("x-keygate-cache"))
    content = raw.parse().choices[0].message.content
    assert content == expect_text, f"chat completion: {content!r}"
    with openai.chat.completions.with_streaming_response.create(
        model="gemini-2.5-flash", messages=messages, stream=True
    ) as response:
        seen.append(response.headers.get("x-keygate-cache"))
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
        assert text == stream_text, f"streamed chat completion: {text!r}"
assert seen == ["miss", "miss", "hit", "hit"], f"openai: {seen!r}"

client = genai.Client(
    api_key=token,
    http_options=types.HttpOptions(base_url=base_url, retry_options=types.HttpRetryOptions(attempts=1)),
)
for _ in range(2):
    reply = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert reply.text == expect_text, f"generate_content: {reply.text!r}"
    chunks = [c.text for c in client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi")]
    assert "".join(chunks) == stream_text, f"generate_content_stream: {chunks!r}"

print("cache ok")
