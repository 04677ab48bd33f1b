"""A Hugging Face Hub and a file mirror on 127.0.0.1, for rehearsing a user's first run without a network.

Real clients talk to them unchanged: huggingface_hub's hf_hub_download through HF_ENDPOINT, tinyqa's own
downloader through the URLs of TINYQA_MRQA_SPLITS.

- `Hub`: HEAD and GET /{repo_id}/resolve/{revision}/{filename}, answered as the real Hub answers
  huggingface_hub 2.x (file_download.get_hf_file_metadata reads the headers): every answer carries
  X-Repo-Commit; a small file is served in place with its git blob sha1 as ETag; a large ("LFS") file is a
  302 to the CDN, another origin, so the client stops there and takes the file's identity from
  X-Linked-Etag (its sha256) and X-Linked-Size. The revision is "main" or the commit hash. Errors carry the
  Hub's X-Error-Code, from which huggingface_hub raises its exception types: RepoNotFound, RevisionNotFound,
  EntryNotFound, GatedRepo. Also GET /api/agent-harnesses, the registry huggingface_hub fetches once a day
  for its user agent (served empty). Anything else is answered 404, and logged, for the tests to refuse.
- `Files`: static files with Range requests (206 and Content-Range): the Hub's CDN and the MRQA mirror.

Faults a test turns on: `Hub.fail[repo_id] = status` (401 gated, 404 missing, 500); `Hub.on_get[repo_id,
filename]`, a function called once when that file is served (a push while a client downloads);
`Files.cut` (paths whose next GET stops halfway and drops the connection), `Files.stall` (path -> Event:
its GET sends half, then waits for the event), `Files.ranges = False` (a server that ignores Range).
`requests` logs (method, path, Range header, status) of every request, for the tests to say what went over
the wire (a Hub and its CDN share one log).
"""
import hashlib
import http.server
import re
import threading
import urllib.parse


class _Server:
    """A threading HTTP server on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, handler):
        self.requests = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real servers: every answer has a Content-Length

    def log_message(self, *args):
        pass

    def reply(self, status, headers=(), body=b"", send_body=True):
        self.server.owner.requests.append((self.command, urllib.parse.urlsplit(self.path).path,
                                           self.headers.get("Range"), status))
        self.send_response(status)
        for k, v in dict(headers).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body and self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()


class Files(_Server):
    """Static files by path, with Range requests and the faults above."""

    def __init__(self):
        self.files, self.cut, self.stall, self.ranges = {}, set(), {}, True
        super().__init__(_FilesHandler)

    def add(self, path: str, data: bytes) -> str:
        """Serve data at path; returns its URL."""
        self.files[path] = data
        return self.url + path


class _FilesHandler(_Handler):
    def do_GET(self):
        files = self.server.owner
        path = urllib.parse.urlsplit(self.path).path
        if path not in files.files:
            return self.reply(404)
        data = files.files[path]
        start = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(start[1]) if start and files.ranges else 0
        if start >= len(data) > 0:
            return self.reply(416, {"Content-Range": f"bytes */{len(data)}"})
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if self.command == "GET" and (path in files.cut or path in files.stall):
            self.reply(206 if start else 200, headers, body, send_body=False)  # promises len(body) bytes
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            files.cut.discard(path)
            if path in files.stall:
                files.stall.pop(path).wait(60)
            self.close_connection = True  # the client sees the connection drop halfway through
            return
        self.reply(206 if start else 200, headers, body)


class Hub(_Server):
    """Repos with their history of commits; files of at least LFS_MIN bytes are served as LFS through `cdn`."""
    LFS_MIN = 1 << 16

    def __init__(self, cdn: Files):
        self.cdn, self.commits, self.main, self.fail, self.on_get = cdn, {}, {}, {}, {}
        super().__init__(_HubHandler)
        self.requests = cdn.requests  # one log of both, in the order they came

    def push(self, repo_id: str, files: dict) -> str:
        """A new commit of repo_id holding exactly `files` (name -> bytes), now its main; returns its hash.
        Earlier commits stay readable by their hash, as on the Hub."""
        commit = hashlib.sha1(repo_id.encode() + self.main.get(repo_id, "").encode() + b"".join(
            name.encode() + hashlib.sha1(data).digest() for name, data in sorted(files.items()))).hexdigest()
        self.commits[repo_id, commit], self.main[repo_id] = dict(files), commit
        for data in files.values():
            if len(data) >= self.LFS_MIN:
                self.cdn.add(f"/lfs/{hashlib.sha256(data).hexdigest()}", data)
        return commit


ERRORS = {  # status -> the real Hub's headers when a repo is gated (401), missing (404) or the Hub is down (500)
    401: {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model {repo} is restricted. You must have "
          "access to it and be authenticated to access it. Please log in."},
    404: {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
    500: {"X-Error-Message": "Internal Error - We're working hard to fix this as soon as possible!",
          "Retry-After": "0"},  # huggingface_hub's backoff then waits 1 s per retry instead of 1, 2, 4, 8, 8 s
}


class _HubHandler(_Handler):
    def do_GET(self):
        hub = self.server.owner
        if self.path == "/api/agent-harnesses":
            return self.reply(200, {"Content-Type": "application/json"}, b'{"standardEnvVars": [], "harnesses": {}}')
        m = re.fullmatch(r"/([\w.-]+/[\w.-]+)/resolve/([\w.-]+)/(.+)", urllib.parse.urlsplit(self.path).path)
        if not m:
            return self.reply(404)
        repo, revision, filename = m.group(1), m.group(2), urllib.parse.unquote(m.group(3))
        if repo in hub.fail:
            status = hub.fail[repo]
            return self.reply(status, {k: v.format(repo=repo) for k, v in ERRORS[status].items()})
        if repo not in hub.main:
            return self.reply(404, ERRORS[404])
        commit = hub.main[repo] if revision == "main" else revision
        if (repo, commit) not in hub.commits:
            return self.reply(404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
        data = hub.commits[repo, commit].get(filename)
        if data is None:
            return self.reply(404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                                    "X-Repo-Commit": commit})
        if self.command == "GET" and (repo, filename) in hub.on_get:
            hub.on_get.pop((repo, filename))()  # e.g. a push to the repo while a client downloads it
        if len(data) >= hub.LFS_MIN:
            sha256 = hashlib.sha256(data).hexdigest()
            return self.reply(302, {"Location": f"{hub.cdn.url}/lfs/{sha256}", "X-Repo-Commit": commit,
                                    "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": len(data),
                                    "ETag": f'"{git_blob_sha1(data)}"'})
        self.reply(200, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}, data)


def git_blob_sha1(data: bytes) -> str:
    """The ETag the Hub gives a file kept in git itself: its git blob id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
