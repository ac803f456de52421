"""Container health probe: GET http://127.0.0.1:$PORT<PATH>, exit 0 on a 2xx, else 1.

    python /app/docker/healthcheck.py /healthz     # liveness (the image's HEALTHCHECK)
    python /app/docker/healthcheck.py /readyz      # readiness (docker-compose's api service)

The image has no curl: this is the standard library only, with a short timeout so a hung
service fails the check instead of stalling it. The port is ``PORT`` (default 8000, the port
the image serves on), for a container whose command serves on another one.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    if not path.startswith("/"):
        print(f"healthcheck: path must start with '/', got {path!r}", file=sys.stderr)
        return 2
    url = f"http://127.0.0.1:{os.environ.get('PORT', '8000')}{path}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            ok = 200 <= response.status < 300
            print(f"{url}: {response.status}")
    except urllib.error.HTTPError as exc:  # 503 from /readyz: not ready yet
        print(f"{url}: {exc.code} {exc.read(500).decode('utf-8', 'replace')}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
