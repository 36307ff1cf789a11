"""Uploads a file with the real google-genai SDK and uses it in generate_content.

Run with KEYGATE_URL and KEYGATE_TOKEN set. Prints `file <name>` and `reply <text>`; exits
non-zero (with the reason) on any error.
"""
import os
import sys
import tempfile

from google import genai
from google.genai import types

base_url = os.environ["KEYGATE_URL"]
token = os.environ["KEYGATE_TOKEN"]

client = genai.Client(
    api_key=token,
    http_options=types.HttpOptions(
        base_url=base_url,
        # One attempt: an error reaching the SDK must fail the test, not be retried away.
        retry_options=types.HttpRetryOptions(attempts=1),
    ),
)

try:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "notes.txt")
        with open(path, "w") as out:
            out.write("keygate test file: the quick brown fox.\n")
        f = client.files.upload(file=path, config=types.UploadFileConfig(mime_type="text/plain"))
    print(f"file {f.name}", flush=True)
    reply = client.models.generate_content(model="gemini-2.5-flash", contents=[f, "summarize"])
    print(f"reply {reply.text}", flush=True)
except Exception as e:  # noqa: BLE001 - any failure fails the test, with its reason
    print(f"genai_files failed: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
