"""Holds a conversation with the real google-genai SDK's Interactions API: a first turn, then
follow-ups naming the previous turn in `previous_interaction_id` (one of them streamed), and a
read of the last turn.

Run with KEYGATE_URL, KEYGATE_TOKEN and EXPECT_TEXT set. Prints `interactions ok` after every
turn answered with EXPECT_TEXT; exits non-zero (with the reason) on any error.
"""
import os
import sys

from google import genai
from google.genai import types

base_url = os.environ["KEYGATE_URL"]
token = os.environ["KEYGATE_TOKEN"]
expect = os.environ["EXPECT_TEXT"]

client = genai.Client(
    api_key=token,
    http_options=types.HttpOptions(
        base_url=base_url,
        # One attempt: an error reaching the SDK must fail the test, not be retried away.
        retry_options=types.HttpRetryOptions(attempts=1),
    ),
)


def check(text, turn):
    if expect not in text:
        raise AssertionError(f"turn {turn}: {text!r} lacks {expect!r}")


try:
    first = client.interactions.create(model="gemini-2.5-flash", input="hi")
    check(str(first), 0)
    previous = first.id
    for turn in range(1, 5):
        if turn == 2:
            stream = client.interactions.create(
                model="gemini-2.5-flash", input="and?", previous_interaction_id=previous, stream=True
            )
            events = list(stream)
            check(repr(events), turn)
            previous = next(e.interaction.id for e in events if e.event_type == "interaction.created")
        else:
            reply = client.interactions.create(
                model="gemini-2.5-flash", input="and?", previous_interaction_id=previous
            )
            check(str(reply), turn)
            previous = reply.id
    read = client.interactions.get(previous)
    check(str(read), "read")
    print("interactions ok", flush=True)
except Exception as e:  # noqa: BLE001 - any failure fails the test, with its reason
    print(f"genai_interactions failed: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
