"""Opens a Live API session with the real google-genai SDK through keygate (against the mock).

Run by tests/sdk.rs with KEYGATE_URL (https://localhost:PORT: the SDK always connects with
wss://), KEYGATE_TOKEN and SSL_CERT_FILE (the test CA) set. Prints `reply <text>` for each text
the model sends; exits non-zero (with the reason) on any error.
"""
import asyncio
import os
import sys

from google import genai
from google.genai import types

client = genai.Client(
    api_key=os.environ["KEYGATE_TOKEN"],
    http_options=types.HttpOptions(base_url=os.environ["KEYGATE_URL"]),
)


async def main():
    config = types.LiveConnectConfig(response_modalities=["TEXT"])
    async with client.aio.live.connect(model="gemini-live-test", config=config) as session:
        await session.send_client_content(
            turns=types.Content(role="user", parts=[types.Part(text="ping")]),
            turn_complete=True,
        )
        async for message in session.receive():
            if message.text:
                print(f"reply {message.text}", flush=True)
            if message.server_content and message.server_content.turn_complete:
                break


try:
    asyncio.run(asyncio.wait_for(main(), timeout=20))
except Exception as e:  # noqa: BLE001 - any failure fails the test, with its reason
    print(f"genai_live failed: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
