"""The README's curl examples, run with real curl against a live server."""
import json
import subprocess
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"
MARKER = "<!-- the test tests/test_api_curl.py runs this block against a live server -->"


def readme_curl() -> str:
    """The curl block that follows MARKER in the README, exactly as a reader copies it."""
    text = README.read_text()
    block = text[text.index(MARKER):].split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.startswith("curl "), block
    return block


CURL_CHAT = readme_curl()
CURL_STREAM = """\
curl -N http://localhost:8000/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}],
       "temperature": 0, "max_tokens": 32, "stream": true}'
"""


def run_curl(example: str, live_server) -> str:
    command = example.replace("http://localhost:8000", live_server.url)
    done = subprocess.run(["bash", "-c", command + " --silent --show-error --fail-with-body"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def test_curl_chat(live_server):
    answer = json.loads(run_curl(CURL_CHAT.rstrip(), live_server))
    assert answer["object"] == "chat.completion"
    assert "Paris" in answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] <= 32


def test_curl_stream(live_server):
    lines = [line for line in run_curl(CURL_STREAM.rstrip(), live_server).splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert "Paris" in "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
