"""HTTP requests from inside a Pod, answers as JSON (one line).

    python3 client.py '[{"url": "http://svc.ns/x", "method": "POST",
                         "headers": {"x-a": "1"}, "repeat": 3, "timeout": 5}]'

Each answer: {"status", "headers" (lower-case names), "body"}; a request that
gets no answer has status 0 and "error". One connection per request, so every
request is balanced and routed on its own.
"""

import http.client
import json
import sys
import urllib.parse


def one(spec):
    url = urllib.parse.urlsplit(spec["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=spec.get("timeout", 5))
    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    try:
        conn.request(
            spec.get("method", "GET"),
            target,
            body=spec.get("body"),
            headers=spec.get("headers", {}),
        )
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return {"status": resp.status, "headers": headers, "body": body}
    except (OSError, http.client.HTTPException) as exc:
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()


def main():
    answers = []
    for spec in json.loads(sys.argv[1]):
        answers.extend(one(spec) for _ in range(spec.get("repeat", 1)))
    print(json.dumps(answers))


main()
