"""The aiohttp client of the vast.ai REST API; the only caller of vast.ai (the endpoints the official `vastai` client uses).

Endpoints and shapes follow the official client (`vastai` 1.9.1). Retries: 429/502/503/504
and transport errors, full-jitter backoff, `Retry-After` honoured. vast.ai's 429s carry
no `Retry-After`: then the wait is jittered with a floor (never an immediate retry), and
calls to each endpoint are spaced: after a 429 no caller sends to that endpoint before
the wait is over, and an endpoint may have a minimum interval (the listing's, set by
the daemon). A rent is never retried once the request may have reached the server: the
caller reconciles by label.
The CLI's offer query syntax is parsed in offer_query.py (re-exported here).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote_plus

import aiohttp
from yarl import URL

from vastd.utils import metrics
from vastd.utils.exceptions import APIShapeError, VastAIError
from vastd.utils.logging import get_logger, register_secret

# Moved to offer_query.py; re-exported so existing imports keep working.
from vastd.utils.offer_query import OFFER_ALIASES as OFFER_ALIASES
from vastd.utils.offer_query import OFFER_FIELDS as OFFER_FIELDS
from vastd.utils.offer_query import OFFER_MULTIPLIERS as OFFER_MULTIPLIERS
from vastd.utils.offer_query import parse_offer_query as parse_offer_query
from vastd.utils.offer_query import parse_order as parse_order
from vastd.utils.supervise import Backoff
from vastd.utils.text import scrub

log = get_logger(__name__)

RETRYABLE_STATUS: Final = frozenset({429, 502, 503, 504})
MAX_RETRY_AFTER_S: Final = 60.0
PAGE_LIMIT: Final = 25
LIST_INSTANCES: Final = "GET /api/v1/instances/"  # the listing's endpoint key
_MAX_PAGES: Final = 10_000
# What json.loads raises on a body it cannot read: not JSON, not UTF-8 (both ValueErrors),
# an integer past Python's 4300-digit limit (a plain ValueError), nesting too deep.
UNDECODABLE: Final = (ValueError, RecursionError)

# Official client defaults for `POST /bundles/` (vastai/api/offers.py: search_offers).
DEFAULT_OFFER_FILTERS: Final[dict[str, dict[str, Any]]] = {
    "verified": {"eq": True},
    "external": {"eq": False},
    "rentable": {"eq": True},
    "rented": {"eq": False},
}


def encode_query(params: Mapping[str, Any]) -> str:
    """Like the official client: strings as they are, the rest JSON; then URL-quoted."""
    return "&".join(
        f"{k}={quote_plus(v if isinstance(v, str) else json.dumps(v))}" for k, v in params.items()
    )


def endpoint_key(method: str, path: str) -> str:
    """`GET /api/v0/instances/{id}/`: one key per endpoint, whatever the instance id."""
    return f"{method} {re.sub(r'/[0-9]+(?=/|$)', '/{id}', path)}"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds or HTTP date), capped at 60 s."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class VastClient:
    """Async client of the vast.ai REST API. Use `async with` or call `aclose()`."""

    def __init__(
        self,
        api_url: str,
        api_key: str,
        *,
        timeout_s: float = 30,
        max_retries: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        session: aiohttp.ClientSession | None = None,
        connection_limit: int = 16,
        min_interval_s: Mapping[str, float] | None = None,
    ) -> None:
        if not api_url.startswith(("http://", "https://")):
            raise ValueError("api_url must start with http:// or https://")
        self._api_url = api_url.rstrip("/")
        self._api_key = api_key
        register_secret(api_key)
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_s, connect=min(10.0, timeout_s), sock_read=min(20.0, timeout_s)
        )
        self._max_retries = max_retries
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._session = session
        self._owns_session = session is None
        self._connection_limit = connection_limit
        self._rng = random.Random()
        # endpoint_key -> the least time between two requests to it (e.g. LIST_INSTANCES)
        self._min_interval_s = dict(min_interval_s or {})
        # endpoint_key -> monotonic time of its next slot (min_interval_s), and the time
        # before which nothing goes to it after a 429
        self._next_at: dict[str, float] = {}
        self._held_until: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"VastClient(api_url={self._api_url!r})"

    async def __aenter__(self) -> VastClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session if this client created it."""
        session, self._session = self._session, None
        if session is not None and self._owns_session and not session.closed:
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            if not self._owns_session:
                raise VastAIError("the session passed to VastClient is closed")
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(
                    limit=self._connection_limit,
                    limit_per_host=max(1, self._connection_limit // 2),
                ),
                headers={"User-Agent": "vastd"},
            )
        return self._session

    # -- transport -----------------------------------------------------------------

    def _safe(self, text: str) -> str:
        return text.replace(self._api_key, "**********") if self._api_key else text

    def _backoff_s(self, attempt: int) -> float:
        return Backoff(self._backoff_base_s, self._backoff_max_s).delay_s(attempt, rng=self._rng)

    def _rate_limited_s(self, attempt: int) -> float:
        """The wait after a 429 without `Retry-After`: jittered, but at least the base and
        half the cap (full jitter alone may retry at once, into the same limit)."""
        backoff = Backoff(self._backoff_base_s, self._backoff_max_s)
        floor = max(self._backoff_base_s, backoff.cap_s(attempt) / 2)
        return min(max(floor, backoff.delay_s(attempt, rng=self._rng)), self._backoff_max_s)

    def _reserve(self, key: str, *, spaced: bool = True) -> float:
        """Seconds to wait before sending to `key`; its next slot is taken at once, so
        concurrent callers are spaced too. `spaced=False` (the next page of one listing)
        takes no interval but still waits out a 429's hold."""
        now = time.monotonic()
        slot = max(self._held_until.get(key, 0.0), now)
        if spaced:
            slot = max(slot, self._next_at.get(key, 0.0))
            self._next_at[key] = slot + self._min_interval_s.get(key, 0.0)
        return slot - now

    def _hold(self, key: str, delay_s: float) -> None:
        """After a 429: no caller sends to `key` before `delay_s` from now."""
        until = time.monotonic() + delay_s
        self._held_until[key] = max(self._held_until.get(key, 0.0), until)

    async def _retry_wait(
        self, method: str, path: str, attempt: int, delay_s: float, status: int | str
    ) -> None:
        log.warning(
            "api_retry",
            method=method,
            path=path,
            status=status,
            attempt=attempt + 1,
            delay_s=round(delay_s, 3),
        )
        metrics.API_RETRY.inc()
        await self._sleep(delay_s)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        idempotent: bool = True,
        not_found_ok: bool = False,
        spaced: bool = True,
    ) -> Any:
        """Send one request with retries; return the decoded JSON body (None on 404 if ok).

        Counted in `vastd_api_requests_total`: ok or error once per call, retry per retry.
        """
        try:
            data = await self._send(
                method,
                path,
                params=params,
                body=body,
                idempotent=idempotent,
                not_found_ok=not_found_ok,
                spaced=spaced,
            )
        except Exception:
            metrics.API_ERROR.inc()
            raise
        metrics.API_OK.inc()
        return data

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None,
        body: Any,
        idempotent: bool,
        not_found_ok: bool,
        spaced: bool = True,
    ) -> Any:
        url = self._api_url + path + (f"?{encode_query(params)}" if params else "")
        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}
        session = self._get_session()
        key = endpoint_key(method, path)
        wait = self._reserve(key, spaced=spaced)
        if wait > 0:
            log.debug("api_spaced", endpoint=key, wait_s=round(wait, 3))
            await self._sleep(wait)
        attempt = 0
        while True:
            try:
                async with session.request(
                    method, URL(url, encoded=True), headers=headers, json=body
                ) as resp:
                    status = resp.status
                    if status in RETRYABLE_STATUS:
                        raw = await resp.read()
                        resp.release()
                        quota = status == 429 and _json_error(raw) == "search_quota_exceeded"
                        # A 429 comes from the rate limiter: nothing was created. A 5xx
                        # from a gateway may have reached the backend: only idempotent.
                        retryable = not quota and (idempotent or status == 429)
                        delay = parse_retry_after(resp.headers.get("Retry-After"))
                        if delay is None:
                            if status == 429:
                                delay = self._rate_limited_s(attempt)
                            else:
                                delay = self._backoff_s(attempt)
                        if status == 429 and not quota:
                            self._hold(key, delay)  # the other callers of it wait too
                        if retryable and attempt < self._max_retries:
                            await self._retry_wait(method, path, attempt, delay, status)
                            attempt += 1
                            continue
                        what = "search quota exceeded" if quota else _msg(raw)
                        raise VastAIError(
                            self._safe(f"{method} {path}: HTTP {status}: {what}"), status=status
                        )
                    raw = await resp.read()
                    if status == 404 and not_found_ok:
                        return None
                    if status >= 400:
                        raise VastAIError(
                            self._safe(f"{method} {path}: HTTP {status}: {_msg(raw)}"),
                            status=status,
                        )
                    return self._decode(method, path, status, raw)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Never connected: the request did not leave; safe to retry even a rent.
                err: BaseException = exc
                sent = False
            except (aiohttp.ClientError, TimeoutError) as exc:
                err, sent = exc, True
            if (sent and not idempotent) or attempt >= self._max_retries:
                detail = type(err).__name__
                if sent and not idempotent:
                    detail += " (the request may have reached the server)"
                raise VastAIError(self._safe(f"{method} {path}: {detail}: {err}")) from None
            await self._retry_wait(
                method, path, attempt, self._backoff_s(attempt), type(err).__name__
            )
            attempt += 1

    def _decode(self, method: str, path: str, status: int, raw: bytes) -> Any:
        if not raw.strip():
            raise APIShapeError(f"{method} {path}: HTTP {status} with an empty body", status=status)
        try:
            data = json.loads(raw)
        except UNDECODABLE:
            start = self._safe(raw[:60].decode("utf-8", "replace"))
            raise APIShapeError(
                f"{method} {path}: HTTP {status}: not JSON vastd can read: {start!r}",
                status=status,
            ) from None
        # A lone surrogate escape ("\\udcff") decodes to a str no UTF-8 JSON can hold:
        # kept in a record, it made every save of the snapshot fail.
        return scrub(data) if _SURROGATE_ESCAPE.search(raw) else data

    # -- account -------------------------------------------------------------------

    async def current_user(self) -> dict[str, Any]:
        """GET /users/current: the account the API key belongs to (a key check)."""
        path = "/api/v0/users/current/"
        data = await self._request("GET", path)
        if not isinstance(data, dict):
            raise APIShapeError(f"GET {path}: expected an object")
        return data

    # -- instances -----------------------------------------------------------------

    async def list_instances(self, label: str | None = None) -> list[dict[str, Any]]:
        """Every own instance (all pages), only those labelled `label` when given."""
        path = "/api/v1/instances/"
        params: dict[str, Any] = {
            "select_filters": {"label": {"eq": label}} if label is not None else {},
            "order_by": [{"col": "id", "dir": "asc"}],
            "limit": PAGE_LIMIT,
        }
        rows: list[dict[str, Any]] = []
        seen_tokens: set[str] = set()
        for page_no in range(_MAX_PAGES):
            # one listing is spaced from the next, not its pages from each other
            data = await self._request("GET", path, params=params, spaced=page_no == 0)
            if not isinstance(data, dict) or not isinstance(data.get("instances"), list):
                raise APIShapeError(f"GET {path}: expected {{'instances': [...]}}")
            page = data["instances"]
            if not all(isinstance(r, dict) for r in page):
                raise APIShapeError(f"GET {path}: an instance is not an object")
            rows.extend(page)
            token = data.get("next_token")
            if token is None or token == "":
                break
            if not isinstance(token, str | int) or isinstance(token, bool):
                raise APIShapeError(f"GET {path}: next_token of type {type(token).__name__}")
            token = str(token)
            if token in seen_tokens:
                raise APIShapeError(f"GET {path}: next_token repeats; pagination loops")
            seen_tokens.add(token)
            params["after_token"] = token
        else:
            raise APIShapeError(f"GET {path}: more than {_MAX_PAGES} pages")
        if label is not None:
            if rows and not any("label" in r for r in rows):
                # Asked for a label, got rows that carry none: the shape drifted. Reading
                # that as "none of ours" would declare every instance lost.
                raise APIShapeError(f"GET {path}: instances without a label field")
            rows = [r for r in rows if r.get("label") == label]
        return rows

    async def show_instance(self, instance_id: int) -> dict[str, Any] | None:
        """One own instance, or None when it does not exist."""
        path = f"/api/v0/instances/{int(instance_id)}/"
        data = await self._request("GET", path, params={"owner": "me"}, not_found_ok=True)
        if data is None:
            return None
        if not isinstance(data, dict) or "instances" not in data:
            raise APIShapeError(f"GET {path}: expected {{'instances': ...}}")
        row = data["instances"]
        if row is None:
            return None
        if not isinstance(row, dict):
            raise APIShapeError(f"GET {path}: 'instances' is not an object")
        return row

    async def _simple(
        self, method: str, path: str, body: Any, *, not_found_ok: bool = False
    ) -> dict[str, Any] | None:
        data = await self._request(method, path, body=body, not_found_ok=not_found_ok)
        if data is None:
            return None
        if not isinstance(data, dict):
            raise APIShapeError(f"{method} {path}: expected a JSON object")
        if data.get("success") is False:
            raise VastAIError(self._safe(f"{method} {path}: refused: {_msg_of(data)}"))
        return data

    async def destroy_instance(self, instance_id: int) -> bool:
        """Destroy an instance; False when it was already gone (404). Confirm by listing."""
        path = f"/api/v0/instances/{int(instance_id)}/"
        return await self._simple("DELETE", path, {}, not_found_ok=True) is not None

    async def set_label(self, instance_id: int, label: str) -> None:
        """Set an instance's label."""
        await self._simple("PUT", f"/api/v0/instances/{int(instance_id)}/", {"label": label})

    async def start_instance(self, instance_id: int) -> None:
        """Ask a stopped instance to run again."""
        await self._simple("PUT", f"/api/v0/instances/{int(instance_id)}/", {"state": "running"})

    async def stop_instance(self, instance_id: int) -> None:
        """Stop an instance (its disk is still billed)."""
        await self._simple("PUT", f"/api/v0/instances/{int(instance_id)}/", {"state": "stopped"})

    async def reboot_instance(self, instance_id: int) -> None:
        """Restart an instance's container."""
        await self._simple("PUT", f"/api/v0/instances/reboot/{int(instance_id)}/", {})

    async def attach_ssh_key(self, instance_id: int, public_key: str) -> None:
        """Register an SSH public key on an instance through the API."""
        path = f"/api/v0/instances/{int(instance_id)}/ssh/"
        await self._simple("POST", path, {"ssh_key": public_key.strip()})

    # -- offers and renting --------------------------------------------------------

    async def search_offers(
        self,
        query: str | Mapping[str, Mapping[str, Any]],
        *,
        order: str = "dph_total",
        limit: int = 64,
        disk_gb: float | None = None,
        offer_type: str = "on-demand",
    ) -> list[dict[str, Any]]:
        """Offers matching `query` (CLI syntax or a filter dict), in `order` (`-f` = desc)."""
        filters = parse_offer_query(query) if isinstance(query, str) else dict(query)
        body: dict[str, Any] = {k: dict(v) for k, v in DEFAULT_OFFER_FILTERS.items()}
        body.update(filters)
        body["order"] = parse_order(order)
        body["type"] = "bid" if offer_type == "interruptible" else offer_type
        body["limit"] = int(limit)
        body["allocated_storage"] = float(disk_gb) if disk_gb is not None else 5.0
        path = "/api/v0/bundles/"
        data = await self._request("POST", path, body=body)
        if not isinstance(data, dict) or not isinstance(data.get("offers"), list):
            raise APIShapeError(f"POST {path}: expected {{'offers': [...]}}")
        offers: list[dict[str, Any]] = data["offers"]
        if not all(isinstance(o, dict) and isinstance(o.get("id"), int) for o in offers):
            raise APIShapeError(f"POST {path}: an offer is not an object with an int id")
        return offers

    async def rent(
        self,
        offer_id: int,
        *,
        image: str,
        disk_gb: float,
        label: str,
        env: dict[str, str] | None = None,
        onstart: str | None = None,
        price: float | None = None,
        runtype: str = "ssh_direc ssh_proxy",
    ) -> int:
        """Rent an offer; return the new instance id.

        Never retried once the request may have reached the server: any ambiguous
        failure raises VastAIError and the caller must reconcile by listing `label`.
        """
        path = f"/api/v0/asks/{int(offer_id)}/"
        body = {
            "client_id": "me",
            "image": image,
            "env": dict(env or {}),
            "price": price,
            "disk": disk_gb,
            "label": label,
            "extra": None,
            "onstart": onstart,
            "image_login": None,
            "python_utf8": False,
            "lang_utf8": False,
            "use_jupyter_lab": False,
            "jupyter_dir": None,
            "force": False,
            # Fail rather than leave a stopped (still billed) instance behind.
            "cancel_unavail": True,
            "template_hash_id": None,
            "user": None,
            "runtype": runtype,
        }
        data = await self._request("PUT", path, body=body, idempotent=False)
        if not isinstance(data, dict):
            raise APIShapeError(f"PUT {path}: expected a JSON object")
        if data.get("success") is False:
            raise VastAIError(self._safe(f"PUT {path}: refused: {_msg_of(data)}"))
        contract = data.get("new_contract")
        if not isinstance(contract, int) or isinstance(contract, bool):
            raise APIShapeError(f"PUT {path}: no integer 'new_contract' in the answer")
        return contract


def _json_error(raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except UNDECODABLE:
        return None
    return data.get("error") if isinstance(data, dict) else None


def _msg_of(data: dict[str, Any]) -> str:
    for key in ("msg", "error", "message"):
        if isinstance(data.get(key), str):
            return str(data[key])[:200]
    return "no detail"


def _msg(raw: bytes) -> str:
    try:
        data = json.loads(raw)
    except UNDECODABLE:
        return "(no detail)"
    return _msg_of(data) if isinstance(data, dict) else "(no detail)"
