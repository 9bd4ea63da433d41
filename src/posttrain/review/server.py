"""The review page's server: a Starlette app (served by uvicorn) over one run or a directory of runs.

Read endpoints (JSON): ``/api/runs``; ``/api/state?run=`` (last step, doctor events, evaluations,
plots, label counts, reward functions); ``/api/samples?run=&<filter>&offset=&limit=``;
``/api/group?run=&step=&group=`` (the K completions of one prompt); ``/api/prompt?run=&id=`` (one
prompt's completions across steps). ``/plots/<run>/<file>.png``: the report's plots
(``posttrain.doctrine.report.render_plots``), drawn again when the run's logs change. The page
polls ``/api/state``, so a running run's new steps appear without a reload.

Writes: ``POST /api/label`` with ``{"run", "id", "label", "note"}`` is accepted only with the header
``X-Review-Token`` equal to this server's per-session token (a random value put in the page it
serves) and, when the browser sends one, an ``Origin`` equal to the server's own; anything else is
refused with 403 before the body is read. Bound to a loopback address, the app answers only requests
whose Host is a loopback name (a DNS-rebinding page gets 400). Every response carries a Content-Security-Policy that
allows only the page's own scripts, and the page writes sample text with ``textContent``: a
completion holding ``<script>`` is shown, never run.

Why Starlette and uvicorn: the small, well-kept ASGI pair (Starlette is what FastAPI is built on;
both were already in the environment through llm-katan), with routing, static files, request
parsing and a production server, and no templating or ORM we would not use. No asset comes from a
network: the page's HTML, JS and CSS ship in ``posttrain/review/static``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
import typing
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from posttrain.review import labels as lab
from posttrain.review.samples import FLAGS, LABELS, Filter, Sample, SampleLog, apply, group, same_prompt
from posttrain.runtime.tracking import read_jsonl

STATIC = Path(__file__).parent / "static"
RUN_LOGS = ("metrics.jsonl", "samples.jsonl")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_LIMIT = 200
PLOT_EVERY_S = 10.0
"""A running run's plots are drawn again at most this often (drawing them takes a second or two)."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ORDERS = {"newest": lambda xs: sorted(xs, key=lambda s: (-s.step, s.group, s.index)), "oldest": lambda xs: xs}
"""How the sample list is ordered: the latest step first (a live run's new samples on top), or as logged."""


def find_runs(path: Path) -> dict[str, Path]:
    """``path`` itself when it is a run (it has metrics.jsonl or samples.jsonl), else its sub-directories
    that are runs, by name."""
    if any((path / f).is_file() for f in RUN_LOGS):
        return {path.name: path}
    return {p.name: p for p in sorted(path.iterdir()) if p.is_dir() and any((p / f).is_file() for f in RUN_LOGS)}


def _running(run_dir: Path) -> bool:
    """Whether the process named in run.lock is alive (a finished run's lock names a dead process)."""
    try:
        pid = int((run_dir / "run.lock").read_text().strip() or 0)
        if pid <= 0:
            return False
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


def _stamp(run_dir: Path) -> tuple:
    return tuple((f, (run_dir / f).stat().st_mtime_ns, (run_dir / f).stat().st_size)
                 for f in ("metrics.jsonl", "evals.jsonl", "doctor.jsonl", lab.REVIEWS) if (run_dir / f).is_file())


class Review:
    """The state the endpoints share: the runs, the token, the plots drawn (cached by the logs' stamps)."""

    def __init__(self, path: Path, token: str | None = None):
        self.path = path
        self.token = token or secrets.token_urlsafe(24)
        self.origins: set[str] = set()  # set by `serve` once the port is known
        self._plots_dir = Path(tempfile.mkdtemp(prefix="posttrain-review-"))
        self._plots: dict[str, tuple[tuple, float, Path, list[tuple[str, str]]]] = {}
        self._drawn = 0
        self._samples: dict[str, SampleLog] = {}
        self._events: dict[str, tuple[tuple, list[dict]]] = {}
        self._lock = threading.Lock()

    def runs(self) -> dict[str, Path]:
        return find_runs(self.path)

    def run(self, request: Request) -> Path:
        runs = self.runs()
        name = request.query_params.get("run") or next(iter(runs), "")
        if name not in runs:
            raise _NotFound(f"no run {name!r}")
        return runs[name]

    def plots(self, run_dir: Path, events: list[dict]) -> list[tuple[str, str]]:
        """(title, file name) of the run's plots, drawn again only when its logs changed."""
        from posttrain.doctrine.report import render_plots

        stamp = _stamp(run_dir)
        with self._lock:
            cached = self._plots.get(run_dir.name)
            if cached and (cached[0] == stamp or time.monotonic() - cached[1] < PLOT_EVERY_S):
                return cached[3]
            self._drawn += 1  # a fresh directory per drawing: a PNG being served is never rewritten in place
            out = self._plots_dir / str(self._drawn)
            out.mkdir()
            drawn = render_plots(out, read_jsonl(run_dir / "metrics.jsonl"), events,
                                 read_jsonl(run_dir / "evals.jsonl"))
            names = [(title, p.name) for title, p in drawn]
            if cached:  # a response still sending an old PNG holds it open: removing it is safe
                shutil.rmtree(cached[2], ignore_errors=True)
            self._plots[run_dir.name] = (stamp, time.monotonic(), out, names)
            return names

    def samples(self, run_dir: Path) -> list[Sample]:
        """The run's samples: samples.jsonl read as it grows (``SampleLog``)."""
        path = run_dir / "samples.jsonl"
        with self._lock:
            log = self._samples.get(run_dir.name)
            if log is None or log.path != path:
                log = self._samples[run_dir.name] = SampleLog(path)
        return log.read()

    def events(self, run_dir: Path) -> list[dict]:
        """The doctor's events of the run (``run_events``: doctor.jsonl, else a replay, and the
        reviewers' flags), computed again only when its logs changed."""
        from posttrain.doctrine.doctor import run_events

        samples = run_dir / "samples.jsonl"
        stamp = _stamp(run_dir) + (samples.stat().st_size if samples.is_file() else 0,)
        with self._lock:
            cached = self._events.get(run_dir.name)
            if cached and cached[0] == stamp:
                return cached[1]
        found = [e.to_dict() if hasattr(e, "to_dict") else e for e in run_events(run_dir)] \
            if (run_dir / "metrics.jsonl").is_file() else []
        with self._lock:
            self._events[run_dir.name] = (stamp, found)
        return found

    def plot_file(self, run: str, name: str) -> Path | None:
        with self._lock:
            cached = self._plots.get(run)
        if cached is None or name not in {n for _, n in cached[3]}:
            return None
        return cached[2] / name


class _NotFound(Exception):
    pass


def _labelled(samples: list[Sample], labels: dict[str, dict]) -> list[dict]:
    out = []
    for s in samples:
        d = s.to_dict()
        rec = labels.get(s.id)
        d["label"], d["note"] = (rec["label"], rec.get("note", "")) if rec else (None, "")
        out.append(d)
    return out


_FILTER_TYPES = {name: next(t for t in typing.get_args(hint) if t is not type(None))
                 for name, hint in typing.get_type_hints(Filter).items()}
"""Each filter field's type (int, float or str), which parses its query parameter."""


def _filter(request: Request) -> Filter:
    q = request.query_params
    return Filter(**{name: parse(q[name]) for name, parse in _FILTER_TYPES.items() if q.get(name, "") != ""})


def create_app(review: Review, hosts: tuple[str, ...] = LOOPBACK) -> Starlette:
    """The app; ``hosts``: the Host names it answers (loopback names by default: a page of another
    site that rebinds its name to 127.0.0.1 gets 400, so it cannot read the samples or the token)."""
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    def index(request: Request) -> Response:
        return HTMLResponse(page.replace("__TOKEN__", review.token))

    def runs(request: Request) -> Response:
        return JSONResponse([{"name": n, "running": _running(p), "steps": len(read_jsonl(p / "metrics.jsonl"))}
                             for n, p in review.runs().items()])

    def state(request: Request) -> Response:
        run_dir = review.run(request)
        history = read_jsonl(run_dir / "metrics.jsonl")
        events = review.events(run_dir)
        samples = review.samples(run_dir)
        current = lab.current(lab.history(run_dir))
        counts = {k: sum(1 for r in current.values() if r["label"] == k) for k in LABELS}
        return JSONResponse({
            "run": run_dir.name, "running": _running(run_dir),
            "step": history[-1].get("step", len(history)) if history else 0,
            "events": events, "evals": read_jsonl(run_dir / "evals.jsonl"), "samples": len(samples),
            "plots": [{"title": t, "url": f"/plots/{run_dir.name}/{n}"} for t, n in review.plots(run_dir, events)],
            "labels": counts, "reward_fns": sorted({k for s in samples for k in s.parts}),
            "flags": list(FLAGS), "label_names": list(LABELS)})

    def sample_list(request: Request) -> Response:
        run_dir = review.run(request)
        current = lab.current(lab.history(run_dir))
        kept = apply(review.samples(run_dir), _filter(request), current)
        order = request.query_params.get("order", "newest")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}")
        kept = ORDERS[order](kept)
        offset = int(request.query_params.get("offset", 0))
        limit = min(PAGE_LIMIT, int(request.query_params.get("limit", 50)))
        return JSONResponse({"total": len(kept), "offset": offset,
                             "samples": _labelled(kept[offset:offset + limit], current)})

    def group_view(request: Request) -> Response:
        run_dir = review.run(request)
        q = request.query_params
        current = lab.current(lab.history(run_dir))
        found = group(review.samples(run_dir), int(q["step"]), int(q["group"]))
        return JSONResponse({"samples": _labelled(found, current)})

    def prompt_view(request: Request) -> Response:
        run_dir = review.run(request)
        all_samples = review.samples(run_dir)
        one = next((s for s in all_samples if s.id == request.query_params.get("id")), None)
        if one is None:
            raise _NotFound("no such sample")
        current = lab.current(lab.history(run_dir))
        return JSONResponse({"prompt": one.prompt, "samples": _labelled(same_prompt(all_samples, one.prompt), current)})

    def plot(request: Request) -> Response:
        path = review.plot_file(request.path_params["run"], request.path_params["name"])
        if path is None or not path.is_file():
            return Response("no such plot", status_code=404)
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})

    async def label(request: Request) -> Response:
        origin = request.headers.get("origin")
        if not secrets.compare_digest(request.headers.get("x-review-token", ""), review.token):
            return JSONResponse({"error": "missing or wrong review token"}, status_code=403)
        if origin is not None and origin not in review.origins:
            return JSONResponse({"error": f"origin {origin} is not this page's"}, status_code=403)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body must be JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        runs_ = review.runs()
        run_dir = runs_.get(str(body.get("run", "")))
        if run_dir is None:
            return JSONResponse({"error": f"no run {body.get('run')!r}"}, status_code=404)
        sample = next((s for s in review.samples(run_dir) if s.id == body.get("id")), None)
        if sample is None:
            return JSONResponse({"error": f"no sample {body.get('id')!r} in {run_dir.name}"}, status_code=404)
        try:
            record = lab.add_label(run_dir, sample, str(body.get("label")), body.get("note", "") or "")
        except lab.LabelError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse({"ok": True, "label": record})

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=404)

    async def bad_query(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"bad query: {exc}"}, status_code=400)

    async def secure_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    app = Starlette(routes=[
        Route("/", index), Route("/api/runs", runs), Route("/api/state", state), Route("/api/samples", sample_list),
        Route("/api/group", group_view), Route("/api/prompt", prompt_view), Route("/plots/{run}/{name}", plot),
        Route("/api/label", label, methods=["POST"]), Mount("/static", StaticFiles(directory=STATIC)),
    ], middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(hosts)),
                   Middleware(BaseHTTPMiddleware, dispatch=secure_headers)],
        exception_handlers={_NotFound: not_found, ValueError: bad_query, KeyError: bad_query})
    return app


def serve(path: Path, host: str = "127.0.0.1", port: int = 8765, ready=None) -> None:
    """Serve the page until interrupted. ``ready(url)`` is called once the socket listens (port 0: a free one)."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)  # connections made once `ready` has printed the address wait in the backlog
    bound = sock.getsockname()[1]
    review = Review(path)  # after the bind: a port in use leaves no temporary directory behind
    shown = f"[{host}]" if ":" in host else host
    review.origins = {f"http://{shown}:{bound}"}
    if host in LOOPBACK:
        review.origins.add(f"http://localhost:{bound}")
    hosts = LOOPBACK if host in LOOPBACK else ("*",)
    server = uvicorn.Server(uvicorn.Config(create_app(review, hosts), log_level="warning", access_log=False))
    if ready is not None:
        ready(f"http://{shown}:{bound}/")
    try:
        server.run(sockets=[sock])
    finally:
        shutil.rmtree(review._plots_dir, ignore_errors=True)


__all__ = ["Review", "create_app", "find_runs", "serve"]
