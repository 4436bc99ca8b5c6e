"""Web console, routes: a small server-rendered Starlette app over the node's context.

``/`` dashboard (refreshes itself from ``/partials/series``), ``/series/<id>`` one series with
its label form, ``/performance`` local performance, ``/classify`` upload and analyse,
``/metrics`` Prometheus text, ``/model`` the loaded model's card and figures.  Optional HTTP
basic auth guards every route when ``web.password`` is set; the user name signed in with is who
labels a series (labelling needs it).  POST forms are refused from another origin, and the label
form carries a token bound to the user and the series.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import json
import logging
import secrets
import shutil
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from markdown_it import MarkdownIt
from markupsafe import Markup
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from node import jobs, metrics
from node.assess import CATEGORY_TEXT
from node.db import utcnow
from node.labels import label_history, set_series_label
from node.model_spec import SPEC_FILE
from node.pipeline import Context
from node.status import STATE_HELP, STATES
from node.web import dashboard
from node.web.classify import Outcome, ReportStore, UploadError, classify_upload
from node.web.render import bar_chart, score_curve
from node.web.review import (
    LabelFormError,
    csrf_token,
    parse_label_form,
    performance_context,
    performance_key,
    rule_text,
)

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
REFRESH_S = 3
DRIFT_CACHE_S = 30.0


class BasicAuth:
    """ASGI middleware: HTTP basic auth with one password.  Any user name is let in and kept in
    ``scope["user"]``: it is who labels a series."""

    def __init__(self, app: ASGIApp, password: str) -> None:
        self.app = app
        self.password = password.encode()

    def _user(self, scope: Scope) -> str | None:
        """The user name when the password is right, else None."""
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            user, _, password = base64.b64decode(value, validate=True).partition(b":")
            name = user.decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        return name if hmac.compare_digest(password, self.password) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        user = self._user(scope)
        if user is not None:
            await self.app({**scope, "user": user}, receive, send)
            return
        response = PlainTextResponse(
            "authentication required", 401, {"WWW-Authenticate": 'Basic realm="triage-node"'}
        )
        await response(scope, receive, send)


def _age(then: dt.datetime | None) -> str:
    if then is None:
        return "-"
    return _duration((utcnow() - then).total_seconds()) + " ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _study_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 else value or "-"


class Console:
    """The app's handlers, bound to one node context."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.reports = ReportStore()
        self.csrf_secret = secrets.token_bytes(32)  # per process: a restart voids open forms
        self.labelling = ctx.settings.web.password is not None
        self._drift: tuple[float, str | None] = (-DRIFT_CACHE_S, None)
        self._performance_cache: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._performance_lock = threading.Lock()
        self.templates = Jinja2Templates(directory=HERE / "templates")
        env = self.templates.env
        env.filters.update(
            age=_age,
            duration=_duration,
            study_date=_study_date,
            zip=lambda a, b: zip(a, b, strict=True),
        )
        env.globals.update(
            bar_chart=bar_chart,
            category_text=CATEGORY_TEXT,
            score_curve=score_curve,
            model=ctx.model.spec,
            node=ctx.settings.node,
            results=ctx.settings.results,
            refresh_s=REFRESH_S,
            states=STATES,
            state_help=STATE_HELP,
            rule_text=rule_text(ctx.model.spec),
            drift_warning=self.drift_warning,
        )
        self.collector = metrics.StateCollector(
            ctx.sessions, (ctx.model.spec.name, ctx.model.spec.version)
        )

    def drift_warning(self) -> str | None:
        """``node.drift.current_warning`` (cached a few seconds), for the banner on every page;
        None while that module is absent."""
        checked_at, warning = self._drift
        if time.monotonic() - checked_at < DRIFT_CACHE_S:
            return warning
        try:
            from node.drift import current_warning
        except ImportError:
            warning = None
        else:
            try:
                warning = current_warning(self.ctx.sessions)
            except Exception as exc:  # the banner must not take the page down
                logger.exception("drift warning could not be read")
                warning = f"the drift check could not be read ({type(exc).__name__}): see the log"
        self._drift = (time.monotonic(), warning)
        return warning

    # -- dashboard ---------------------------------------------------------------------------
    def _series_context(self) -> dict[str, Any]:
        rows = dashboard.recent_series(self.ctx.sessions)
        return {"rows": rows, "summary": dashboard.summary(rows)}

    async def index(self, request: Request) -> Response:
        context = await run_in_threadpool(self._series_context)
        context["message"] = request.query_params.get("msg", "")
        try:  # ?refresh=N: refresh every N seconds (1..600)
            context["refresh_s"] = min(600.0, max(1.0, float(request.query_params["refresh"])))
        except (KeyError, ValueError):
            context["refresh_s"] = REFRESH_S
        return self.templates.TemplateResponse(request, "dashboard.html", context)

    async def series_partial(self, request: Request) -> Response:
        context = await run_in_threadpool(self._series_context)
        return self.templates.TemplateResponse(request, "_series.html", context)

    async def series_json(self, request: Request) -> Response:
        rows = await run_in_threadpool(dashboard.recent_series, self.ctx.sessions)
        return JSONResponse([dashboard.row_json(row) for row in rows])

    def _same_origin(self, request: Request) -> bool:
        origin = request.headers.get("origin") or request.headers.get("referer")
        return origin is None or urlsplit(origin).netloc == request.headers.get("host")

    def _back(self, message: str) -> Response:
        return RedirectResponse(f"/?msg={quote(message)}", status_code=303)

    async def retry_job(self, request: Request) -> Response:
        if not self._same_origin(request):
            return PlainTextResponse("cross-origin request refused", 403)
        job_id = int(request.path_params["job_id"])
        done = await run_in_threadpool(jobs.retry, self.ctx.sessions, job_id)
        logger.info("web console: retry job %d: %s", job_id, "requeued" if done else "not failed")
        return self._back(
            f"job {job_id} requeued" if done else f"job {job_id} is not failed: nothing to retry"
        )

    async def rerun_series(self, request: Request) -> Response:
        if not self._same_origin(request):
            return PlainTextResponse("cross-origin request refused", 403)
        series_id = int(request.path_params["series_id"])
        try:
            job_id = await run_in_threadpool(jobs.rerun, self.ctx.sessions, series_id)
        except ValueError as exc:
            return self._back(f"cannot re-run: {exc}")
        return self._back(f"re-run queued as job {job_id} with model {self.ctx.model.spec.version}")

    # -- one series and its label ------------------------------------------------------------
    def _series_page(self, series_id: int, user: str) -> dict[str, Any] | None:
        row = dashboard.one_series(self.ctx.sessions, series_id)
        if row is None:
            return None
        keys = [("series", row.series_instance_uid), ("study", row.study_instance_uid)]
        with self.ctx.sessions() as session:
            history = label_history(session, keys)
        return {
            "r": row,
            "history": history,
            "labelling": self.labelling,
            "user": user,
            "csrf": csrf_token(self.csrf_secret, user, series_id),
        }

    async def series_page(self, request: Request) -> Response:
        series_id = int(request.path_params["series_id"])
        user = str(request.scope.get("user") or "")
        context = await run_in_threadpool(self._series_page, series_id, user)
        if context is None:
            return PlainTextResponse(f"no series with id {series_id}", 404)
        context["message"] = request.query_params.get("msg", "")
        return self.templates.TemplateResponse(request, "series.html", context)

    async def label_series(self, request: Request) -> Response:
        if not self._same_origin(request):
            return PlainTextResponse("cross-origin request refused", 403)
        if not self.labelling:
            return PlainTextResponse(
                "labelling needs the console's sign-in: set web.password in config.yaml "
                "(the user name signed in with is recorded as who labelled)",
                403,
            )
        user = str(request.scope.get("user") or "").strip()
        if not user:
            return PlainTextResponse(
                "labelling needs your name: sign in with it as the user name", 403
            )
        series_id = int(request.path_params["series_id"])
        async with request.form(max_files=0, max_fields=8) as form:
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
        expected = csrf_token(self.csrf_secret, user, series_id)
        if not hmac.compare_digest(fields.get("csrf", ""), expected):
            return PlainTextResponse(
                "form token missing or stale: reload the series page and submit again", 403
            )
        context = await run_in_threadpool(self._series_page, series_id, user)
        if context is None:
            return PlainTextResponse(f"no series with id {series_id}", 404)
        row = context["r"]
        try:
            choice = parse_label_form(fields, row)
            outcome = await run_in_threadpool(
                partial(
                    set_series_label,
                    self.ctx.sessions,
                    row.series_instance_uid,
                    pneumonia=choice.pneumonia,
                    covid=choice.covid,
                    who=user,
                    source=choice.source(row),
                )
            )
        except (LabelFormError, ValueError) as exc:
            context["error"] = str(exc)
            return self.templates.TemplateResponse(request, "series.html", context, 422)
        logger.info("web console: series id %d label %s (job %s)", series_id, outcome, row.job_id)
        message = f"label {outcome}: " + ("pneumonia" if choice.pneumonia else "no pneumonia")
        return RedirectResponse(f"/series/{series_id}?msg={quote(message)}#label", status_code=303)

    # -- performance -------------------------------------------------------------------------
    def _performance(self) -> dict[str, Any]:
        """``performance_context``, recomputed only when its inputs changed."""
        key = performance_key(self.ctx.sessions)
        with self._performance_lock:
            if self._performance_cache is not None and self._performance_cache[0] == key:
                return self._performance_cache[1]
            challenger = self.ctx.challenger.spec if self.ctx.challenger is not None else None
            context = performance_context(self.ctx.sessions, self.ctx.model.spec, challenger)
            self._performance_cache = (key, context)
            return context

    async def performance(self, request: Request) -> Response:
        context = await run_in_threadpool(self._performance)
        return self.templates.TemplateResponse(request, "performance.html", context)

    async def performance_json(self, request: Request) -> Response:
        context = await run_in_threadpool(self._performance)
        return JSONResponse(context["report"])

    # -- classify ----------------------------------------------------------------------------
    async def classify_form(self, request: Request) -> Response:
        return self.templates.TemplateResponse(
            request, "classify.html", {"limit_mb": self.ctx.settings.web.max_upload_mb}
        )

    async def classify(self, request: Request) -> Response:
        if not self._same_origin(request):
            return PlainTextResponse("cross-origin request refused", 403)
        limit = int(self.ctx.settings.web.max_upload_mb * 2**20)
        context: dict[str, Any] = {"limit_mb": self.ctx.settings.web.max_upload_mb}
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit + 2**16:
            context["error"] = (
                f"the upload is {declared / 2**20:.0f} MiB; this node accepts at most "
                f"{self.ctx.settings.web.max_upload_mb:g} MiB (web.max_upload_mb)"
            )
            return self.templates.TemplateResponse(request, "classify.html", context, 413)
        async with request.form(max_files=1, max_fields=5) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile) or not upload.filename:
                context["error"] = "choose a file to upload"
                return self.templates.TemplateResponse(request, "classify.html", context, 400)
            name = Path(upload.filename).name[:200]
            try:
                context["outcome"] = await run_in_threadpool(
                    self._classify_file, upload, name, limit
                )
            except UploadError as exc:
                context["error"] = str(exc)
                return self.templates.TemplateResponse(request, "classify.html", context, 422)
        return self.templates.TemplateResponse(request, "classify.html", context)

    def _classify_file(self, upload: UploadFile, name: str, limit: int) -> Outcome:
        with tempfile.TemporaryDirectory(prefix="triage-web-") as tmp:
            path = Path(tmp) / "upload"
            with open(path, "wb") as out:
                shutil.copyfileobj(upload.file, out)
            if path.stat().st_size > limit:
                raise UploadError(f"{name}: larger than web.max_upload_mb")
            if path.stat().st_size == 0:
                raise UploadError(f"{name}: the file is empty")
            outcome = classify_upload(path, name, self.ctx, self.reports)
        logger.info(
            "web console classified %s: %d slice(s), %d series",
            name,
            len(outcome.slices),
            len(outcome.series),
        )
        return outcome

    async def download_sr(self, request: Request) -> Response:
        item = self.reports.get(request.path_params["token"])
        if item is None:
            return PlainTextResponse("this SR is no longer kept: classify the series again", 404)
        filename, data = item
        return Response(
            data,
            media_type="application/dicom",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    # -- metrics, model ----------------------------------------------------------------------
    async def metrics(self, request: Request) -> Response:
        body = await run_in_threadpool(metrics.render, self.collector)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    def _model_files(self) -> list[str]:
        folder = self.ctx.model.directory
        return sorted(p.name for p in folder.glob("*.png") if p.is_file())

    async def model(self, request: Request) -> Response:
        folder = self.ctx.model.directory
        spec_text = (folder / SPEC_FILE).read_text(encoding="utf-8")
        card = folder / "MODEL_CARD.md"
        card_html = None
        if card.is_file():
            renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
            card_html = Markup(renderer.render(card.read_text(encoding="utf-8")))
        evaluation = folder / "evaluation.json"
        context = {
            "directory": str(folder),
            "spec_json": json.dumps(json.loads(spec_text), indent=2),
            "card_html": card_html,
            "figures": self._model_files(),
            "evaluation": evaluation.read_text(encoding="utf-8") if evaluation.is_file() else None,
        }
        return self.templates.TemplateResponse(request, "model.html", context)

    async def model_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self._model_files():
            return PlainTextResponse("no such figure", 404)
        return FileResponse(self.ctx.model.directory / name, media_type="image/png")


def create_app(ctx: Context) -> ASGIApp:
    console = Console(ctx)
    routes = [
        Route("/", console.index),
        Route("/partials/series", console.series_partial),
        Route("/api/series", console.series_json),
        Route("/jobs/{job_id:int}/retry", console.retry_job, methods=["POST"]),
        Route("/series/{series_id:int}/rerun", console.rerun_series, methods=["POST"]),
        Route("/series/{series_id:int}", console.series_page),
        Route("/series/{series_id:int}/label", console.label_series, methods=["POST"]),
        Route("/performance", console.performance),
        Route("/api/performance", console.performance_json),
        Route("/classify", console.classify_form, methods=["GET"]),
        Route("/classify", console.classify, methods=["POST"]),
        Route("/classify/sr/{token}", console.download_sr),
        Route("/metrics", console.metrics),
        Route("/model", console.model),
        Route("/model/files/{name}", console.model_file),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app: ASGIApp = Starlette(routes=routes)
    password = ctx.settings.web.password
    if password is not None:
        app = BasicAuth(app, password.get_secret_value())
    return app
