"""A small OpenAI-compatible Files + Batches server on loopback, for the Batch API path.

Each batch runs in a background task that sends its lines, one after the other, to the upstream
server's ``/v1/chat/completions`` and writes an output file in OpenAI's batch output format
(non-200 answers and transport errors go to the error file). Status goes validating ->
in_progress -> completed, with request_counts. ``/v1/chat/completions`` itself is proxied to the
upstream, so the client's per-request fallback works against the same base URL. With
``--state-dir`` files and batches are also kept on disk, so a restarted server still knows them.
``GET /_stats`` returns {batches_created, files_uploaded, lines_executed, chat_proxied}.

    python -m tests.servers.batch_server --upstream http://127.0.0.1:8080 --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, Response

COUNTERS = ("batches_created", "files_uploaded", "lines_executed", "chat_proxied")


def build_app(upstream: str, state_dir: Path | None = None, line_delay_s: float = 0.0):
    upstream = upstream.rstrip("/").removesuffix("/v1")
    client = httpx.AsyncClient(base_url=upstream, timeout=600)
    files: dict[str, dict[str, Any]] = {}
    contents: dict[str, bytes] = {}
    batches: dict[str, dict[str, Any]] = {}
    stats = {k: 0 for k in COUNTERS}
    tasks: set[asyncio.Task] = set()  # strong references to running batches

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        for bid, batch in batches.items():  # batches a restarted server had not finished
            if batch["status"] in ("validating", "in_progress", "cancelling"):
                launch(bid)
        yield
        await client.aclose()

    def launch(bid: str) -> None:
        task = asyncio.create_task(execute(bid))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    app = FastAPI(title="cogumi test batch server", lifespan=lifespan)

    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        if (state_dir / "state.json").exists():
            saved = json.loads((state_dir / "state.json").read_text())
            files.update(saved["files"])
            batches.update(saved["batches"])
            for fid in files:
                contents[fid] = (state_dir / fid).read_bytes()

    def save() -> None:
        if state_dir is not None:
            tmp = state_dir / "state.json.tmp"
            tmp.write_text(json.dumps({"files": files, "batches": batches}))
            tmp.replace(state_dir / "state.json")

    def add_file(name: str, purpose: str, data: bytes) -> dict:
        fid = f"file-{uuid.uuid4().hex[:24]}"
        meta = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": name, "purpose": purpose, "status": "processed"}
        files[fid], contents[fid] = meta, data
        if state_dir is not None:
            (state_dir / fid).write_bytes(data)
        save()
        return meta

    async def execute(bid: str) -> None:
        batch = batches[bid]
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        save()
        lines = [json.loads(x) for x in contents[batch["input_file_id"]].decode().splitlines() if x.strip()]
        out, err = [], []
        for line in lines:
            if batch["status"] == "cancelling":
                break
            await asyncio.sleep(line_delay_s)
            row: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex[:20]}", "custom_id": line["custom_id"]}
            try:
                resp = await client.post(line["url"], json=line["body"])
                stats["lines_executed"] += 1
                try:
                    body = resp.json()
                except ValueError:
                    body = {"raw": resp.text[:200]}
                row.update(response={"status_code": resp.status_code, "request_id": uuid.uuid4().hex,
                                     "body": body}, error=None)
                (out if resp.status_code == 200 else err).append(row)
            except httpx.HTTPError as exc:
                row.update(response=None, error={"code": "upstream_error", "message": str(exc)})
                err.append(row)
            batch["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
        now = int(time.time())
        if out:
            batch["output_file_id"] = add_file(f"{bid}_output.jsonl", "batch_output",
                                               "".join(json.dumps(r) + "\n" for r in out).encode())["id"]
        if err:
            batch["error_file_id"] = add_file(f"{bid}_error.jsonl", "batch_output",
                                              "".join(json.dumps(r) + "\n" for r in err).encode())["id"]
        if batch["status"] == "cancelling":
            batch.update(status="cancelled", cancelled_at=now)
        else:
            batch.update(status="completed", finalizing_at=now, completed_at=now)
        save()

    @app.get("/_stats")
    async def get_stats() -> dict:
        return stats

    @app.post("/_reset")
    async def reset() -> dict:
        stats.update({k: 0 for k in COUNTERS})
        return stats

    @app.post("/v1/files")
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)) -> dict:  # noqa: B008
        if purpose != "batch":
            raise HTTPException(400, f"purpose must be 'batch', got {purpose!r}")
        stats["files_uploaded"] += 1
        return add_file(file.filename or "upload.jsonl", purpose, await file.read())

    @app.get("/v1/files/{fid}")
    async def file_meta(fid: str) -> dict:
        if fid not in files:
            raise HTTPException(404, f"no file {fid}")
        return files[fid]

    @app.get("/v1/files/{fid}/content")
    async def file_content(fid: str) -> Response:
        if fid not in contents:
            raise HTTPException(404, f"no file {fid}")
        return Response(contents[fid], media_type="application/octet-stream")

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> dict:
        params = await request.json()
        if params.get("input_file_id") not in files:
            raise HTTPException(400, f"no input file {params.get('input_file_id')!r}")
        if params.get("endpoint") != "/v1/chat/completions":
            raise HTTPException(400, "only /v1/chat/completions is supported")
        bid = f"batch_{uuid.uuid4().hex[:24]}"
        batches[bid] = {
            "id": bid, "object": "batch", "endpoint": params["endpoint"], "input_file_id": params["input_file_id"],
            "completion_window": params.get("completion_window", "24h"), "status": "validating",
            "created_at": int(time.time()), "output_file_id": None, "error_file_id": None,
            "metadata": params.get("metadata"), "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        stats["batches_created"] += 1
        save()
        launch(bid)
        return batches[bid]

    @app.get("/v1/batches/{bid}")
    async def get_batch(bid: str) -> dict:
        if bid not in batches:
            raise HTTPException(404, f"no batch {bid}")
        return batches[bid]

    @app.post("/v1/batches/{bid}/cancel")
    async def cancel_batch(bid: str) -> dict:
        if bid not in batches:
            raise HTTPException(404, f"no batch {bid}")
        if batches[bid]["status"] in ("validating", "in_progress"):
            batches[bid]["status"] = "cancelling"
            save()
        return batches[bid]

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        stats["chat_proxied"] += 1
        resp = await client.post("/v1/chat/completions", content=await request.body(),
                                 headers={"content-type": "application/json"})
        return JSONResponse(resp.json(), resp.status_code) if resp.headers.get("content-type", "").startswith(
            "application/json") else Response(resp.content, resp.status_code)

    return app


def start_batch_server(upstream: str, port: int, log_path: Path, state_dir: Path | None = None,
                       line_delay_s: float = 0.0):
    """Start the batch server as a detached process on 127.0.0.1:port and wait until it answers."""
    from tests.servers.procs import start_test_server

    args = ["--upstream", upstream, "--line-delay-s", str(line_delay_s)]
    if state_dir is not None:
        args += ["--state-dir", str(state_dir)]
    return start_test_server("tests.servers.batch_server", port, args, Path(log_path))


def batch_stats(base: str) -> dict:
    """``GET /_stats`` of a batch server at ``base`` (``http://127.0.0.1:PORT``)."""
    from tests.servers.procs import server_stats

    return server_stats(base)


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--upstream", required=True, help="the chat server, e.g. http://127.0.0.1:8080")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--line-delay-s", type=float, default=0.0, help="pause before each line (slow batches)")
    a = p.parse_args()
    uvicorn.run(build_app(a.upstream, a.state_dir, a.line_delay_s), host="127.0.0.1", port=a.port,
                log_level="warning")


if __name__ == "__main__":
    main()
