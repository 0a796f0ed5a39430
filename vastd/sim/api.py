"""A local stand-in for the vast.ai REST API (README: `vastd demo`), with fault injection.

`SimCloud` holds offers and instances in memory; `create_sim_app` serves them with
the official client's shapes (the `vastai` CLI works against it with `--url`).
Faults (`SimCloud.faults`) and a JSON control surface under `/_sim/` let tests,
in-process or from another process, inject 429/5xx, delays, malformed bodies and
instance failures at run time (`/_sim/instances/{id}/market`: the market's ways, a
freeze, an outbid, a price, an end date, revoked keys). Every API request is recorded in `SimCloud.calls`.

This module owns the HTTP side (routes, auth, the control surface); `SimCloud` is in
cloud.py, faults in faults.py, filter semantics in filters.py (all re-exported here).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

# Moved to faults.py, filters.py and cloud.py; re-exported so existing imports keep working.
from vastd.sim.cloud import HostProvider as HostProvider
from vastd.sim.cloud import SimCloud as SimCloud
from vastd.sim.cloud import unused_port as unused_port
from vastd.sim.faults import Fault as Fault
from vastd.sim.faults import Faults as Faults
from vastd.sim.faults import fault_response as fault_response
from vastd.sim.faults import json_response as json_response
from vastd.sim.filters import _cmp
from vastd.sim.filters import matches as matches
from vastd.sim.filters import sort_rows as sort_rows

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- HTTP ------------------------------------------------------------------------

CLOUD_KEY: Final = web.AppKey("sim_cloud", SimCloud)


def _error(status: int, error: str, msg: str) -> web.Response:
    return json_response({"success": False, "error": error, "msg": msg}, status)


def _encode_token(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps({"values": values}).encode()).decode()


def _decode_token(token: str) -> list[Any]:
    values = json.loads(base64.urlsafe_b64decode(token.encode()))["values"]
    if not isinstance(values, list):
        raise ValueError("bad token")
    return values


def _json_param(request: web.Request, name: str, default: Any) -> Any:
    raw = request.query.get(name)
    return default if raw is None or raw == "" else json.loads(raw)


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    data = await request.json()
    if not isinstance(data, dict):
        raise ValueError("body is not a JSON object")
    return data


def _cloud(request: web.Request) -> SimCloud:
    return request.app[CLOUD_KEY]


def _instance_id(request: web.Request) -> int:
    return int(request.match_info["id"])


@web.middleware
async def _record_auth_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    cloud = _cloud(request)
    if request.path.startswith("/_sim/"):
        return await handler(request)
    endpoint = request.match_info.route.name or "unknown"
    entry: dict[str, Any] = {
        "method": request.method,
        "path": request.path,
        "url": str(request.rel_url),
        "endpoint": endpoint,
        "status": None,
    }
    cloud.calls.append(entry)
    cloud.stats[f"{request.method} {endpoint}"] += 1
    if request.headers.get("Authorization") != f"Bearer {cloud.api_key}":
        entry["status"] = 401
        return _error(401, "auth_error", "Invalid user key")
    try:
        rule = cloud.faults.pick(endpoint, request.method)
        if rule is None:
            response = await handler(request)
        elif rule.after_effect:
            real = await handler(request)
            await asyncio.sleep(rule.delay_s)
            response = fault_response(rule) if rule.status is not None else real
        else:
            await asyncio.sleep(rule.delay_s)
            response = fault_response(rule) if rule.status is not None else await handler(request)
    except web.HTTPException as exc:
        entry["status"] = exc.status
        raise
    except (ValueError, KeyError, TypeError) as exc:
        response = _error(400, "bad_request", f"{type(exc).__name__}: {exc}")
    entry["status"] = response.status
    return response


_CURRENT_USER: Final[dict[str, Any]] = {
    "id": 1, "username": "sim", "email": "sim@example.invalid", "fullname": "vastd sim",
    "credit": 1000.0, "balance": 0.0, "can_pay": True, "host_agreement_accepted": False,
    "has_billing": True, "ssh_key": None, "user": "sim",
}  # fmt: skip


async def _current_user(request: web.Request) -> web.Response:
    return json_response(_CURRENT_USER)


async def _list_instances(request: web.Request) -> web.Response:
    cloud = _cloud(request)
    filters = _json_param(request, "select_filters", {})
    order_by = _json_param(request, "order_by", [{"col": "id", "dir": "asc"}])
    limit = max(1, min(int(request.query.get("limit", "25")), 25))
    order = [(str(o["col"]), str(o.get("dir", "asc"))) for o in order_by]
    if "id" not in [c for c, _ in order]:
        order.append(("id", "asc"))
    visible = cloud.stale.view("list_instances", cloud.instances)
    rows = sort_rows([r for r in visible.values() if matches(r, filters)], order)
    total = len(rows)
    token = request.query.get("after_token")
    if token:
        after = _decode_token(token)

        def is_after(row: dict[str, Any]) -> bool:
            for (col, direction), value in zip(order, after, strict=True):
                c = _cmp(row.get(col), value)
                if c:
                    return (c > 0) == (direction == "asc")
            return False

        rows = [r for r in rows if is_after(r)]
    page = rows[:limit]
    next_token = _encode_token([page[-1].get(c) for c, _ in order]) if len(rows) > limit else None
    return json_response(
        {
            "instances": [dict(r) for r in page],
            "next_token": next_token,
            "total_instances": total,
            "label_counts": dict(Counter(str(r.get("label")) for r in cloud.instances.values())),
        }
    )


async def _list_instances_v0(request: web.Request) -> web.Response:
    # Deprecated on the real API: since 2026 it answers an empty body (skypilot#10517).
    return web.Response(body=b"", status=200, content_type="application/json")


async def _show_instance(request: web.Request) -> web.Response:
    cloud, instance_id = _cloud(request), _instance_id(request)
    row = cloud.stale.view_one("show_instance", instance_id, cloud.instances.get(instance_id))
    return json_response({"instances": dict(row) if row is not None else None})


async def _update_instance(request: web.Request) -> web.Response:
    cloud, instance_id = _cloud(request), _instance_id(request)
    if instance_id not in cloud.instances:
        return _error(404, "no_such_instance", f"Instance {instance_id} not found.")
    body = await _body(request)
    if "label" in body:
        cloud.set_label(instance_id, body["label"])
    if "state" in body:
        await cloud.set_state(instance_id, str(body["state"]))
    return json_response({"success": True})


async def _destroy(request: web.Request) -> web.Response:
    instance_id = _instance_id(request)
    if not await _cloud(request).destroy(instance_id):
        return _error(404, "no_such_instance", f"Instance {instance_id} not found.")
    return json_response({"success": True})


async def _reboot(request: web.Request) -> web.Response:
    cloud, instance_id = _cloud(request), _instance_id(request)
    if instance_id not in cloud.instances:
        return _error(404, "no_such_instance", f"Instance {instance_id} not found.")
    await cloud.reboot(instance_id)
    return json_response({"success": True})


async def _set_bid(request: web.Request) -> web.Response:
    cloud, instance_id = _cloud(request), _instance_id(request)
    if instance_id not in cloud.instances:
        return _error(404, "no_such_instance", f"Instance {instance_id} not found.")
    body = await _body(request)
    if body.get("client_id") != "me":
        return _error(400, "invalid_args", 'client_id must be "me"')
    price = body.get("price")
    if isinstance(price, bool) or not isinstance(price, int | float) or not price >= 0:
        return _error(400, "invalid_args", "price must be a number >= 0")
    await cloud.set_bid(instance_id, float(price))
    return json_response({"success": True})


async def _attach_ssh(request: web.Request) -> web.Response:
    cloud, instance_id = _cloud(request), _instance_id(request)
    if instance_id not in cloud.instances:
        return _error(404, "no_such_instance", f"Instance {instance_id} not found.")
    key = str((await _body(request)).get("ssh_key") or "").strip()
    if not key:
        return _error(400, "invalid_args", "ssh_key is required")
    await cloud.attach_key(instance_id, key)
    return json_response({"success": True, "msg": "SSH key attached"})


async def _search_offers(request: web.Request) -> web.Response:
    return json_response({"offers": _cloud(request).search(await _body(request))})


async def _rent(request: web.Request) -> web.Response:
    cloud, offer_id = _cloud(request), _instance_id(request)
    body = await _body(request)
    if not body.get("image") and not body.get("template_hash_id"):
        return _error(400, "invalid_args", "an image or a template is required")
    try:
        instance_id = cloud.rent(offer_id, body)
    except KeyError:
        return _error(400, "no_such_ask", f"Offer {offer_id} is not available.")
    return json_response({"success": True, "new_contract": instance_id})


# -- control surface for tests (no auth: loopback only) --------------------------


async def _ctl_state(request: web.Request) -> web.Response:
    return json_response(_cloud(request).snapshot())


async def _ctl_calls(request: web.Request) -> web.Response:
    cloud = _cloud(request)
    if request.method == "DELETE":
        cloud.calls.clear()
    return json_response({"calls": cloud.calls})


async def _ctl_stats(request: web.Request) -> web.Response:
    return json_response(dict(_cloud(request).stats))


async def _ctl_faults(request: web.Request) -> web.Response:
    faults = _cloud(request).faults
    if request.method == "POST":
        try:
            fault_id = faults.add(**await _body(request))
        except (TypeError, ValueError) as exc:
            return _error(400, "bad_fault", str(exc))
        return json_response({"id": fault_id})
    if request.method == "DELETE":
        if "id" in request.match_info:
            faults.remove(int(request.match_info["id"]))
        else:
            faults.clear()
    return json_response({"faults": faults.list()})


async def _ctl_add_instance(request: web.Request) -> web.Response:
    instance_id = await _cloud(request).add_instance(**await _body(request))
    return json_response({"id": instance_id})


async def _ctl_add_offer(request: web.Request) -> web.Response:
    return json_response({"id": _cloud(request).add_offer(**await _body(request))})


async def _ctl_status(request: web.Request) -> web.Response:
    body = await _body(request)
    try:
        await _cloud(request).set_status(
            _instance_id(request), body.get("actual_status"), stop_host=body.get("stop_host")
        )
    except KeyError:
        return _error(404, "no_such_instance", "no such instance")
    return json_response({"success": True})


async def _ctl_stale(request: web.Request) -> web.Response:
    """{"kind": "hide" | "lag_destroy" | "ignore_destroy", "endpoint", "reads"} (stale.py)."""
    stale, instance_id = _cloud(request).stale, _instance_id(request)
    body = await _body(request)
    kind, reads = body.get("kind"), int(body.get("reads", 1))
    endpoint = str(body.get("endpoint", "list_instances"))
    if kind == "hide":
        stale.hide(instance_id, endpoint, reads)
    elif kind == "lag_destroy":
        stale.lag_destroy(instance_id, endpoint, reads)
    elif kind == "ignore_destroy":
        stale.ignore_destroy(instance_id, reads)
    else:
        return _error(400, "bad_stale", f"unknown kind {kind!r}")
    return json_response({"success": True})


async def _ctl_market(request: web.Request) -> web.Response:
    """`POST /_sim/instances/{id}/market` with one of {"freeze": true}, {"outbid": dph},
    {"price": dph}, {"end_date": epoch s or null}, {"revoke_keys": true}."""
    cloud, instance_id = _cloud(request), _instance_id(request)
    if instance_id not in cloud.instances:
        return _error(404, "no_such_instance", "no such instance")
    body = await _body(request)
    if body.get("freeze"):
        await cloud.freeze(instance_id)
    if "outbid" in body:
        await cloud.outbid(instance_id, float(body["outbid"]))
    if "price" in body:
        cloud.set_price(instance_id, float(body["price"]))
    if "end_date" in body:
        end = body["end_date"]
        cloud.set_end_date(instance_id, None if end is None else float(end))
    if body.get("revoke_keys"):
        cloud.revoke_keys(instance_id)
    return json_response({"success": True})


async def _ctl_vanish(request: web.Request) -> web.Response:
    await _cloud(request).vanish(_instance_id(request))
    return json_response({"success": True})


def create_sim_app(cloud: SimCloud) -> web.Application:
    """The simulator's aiohttp application serving `cloud`."""
    app = web.Application(middlewares=[_record_auth_faults])
    app[CLOUD_KEY] = cloud
    r = app.router
    r.add_get("/api/v0/users/current", _current_user, name="current_user")
    r.add_get("/api/v0/users/current/", _current_user)
    r.add_get("/api/v1/instances/", _list_instances, name="list_instances")
    r.add_get("/api/v0/instances/", _list_instances_v0, name="list_instances_v0")
    r.add_get(r"/api/v0/instances/{id:\d+}/", _show_instance, name="show_instance")
    r.add_put(r"/api/v0/instances/{id:\d+}/", _update_instance, name="update_instance")
    r.add_delete(r"/api/v0/instances/{id:\d+}/", _destroy, name="destroy")
    r.add_put(r"/api/v0/instances/reboot/{id:\d+}/", _reboot, name="reboot")
    r.add_post(r"/api/v0/instances/{id:\d+}/ssh/", _attach_ssh, name="attach_ssh")
    r.add_put(r"/api/v0/instances/bid_price/{id:\d+}/", _set_bid, name="set_bid")
    r.add_post("/api/v0/bundles/", _search_offers, name="search_offers")
    r.add_put(r"/api/v0/asks/{id:\d+}/", _rent, name="rent")
    r.add_get("/_sim/state", _ctl_state)
    r.add_route("*", "/_sim/calls", _ctl_calls)
    r.add_get("/_sim/stats", _ctl_stats)
    r.add_route("*", "/_sim/faults", _ctl_faults)
    r.add_delete(r"/_sim/faults/{id:\d+}", _ctl_faults)
    r.add_post("/_sim/instances", _ctl_add_instance)
    r.add_post("/_sim/offers", _ctl_add_offer)
    r.add_post(r"/_sim/instances/{id:\d+}/status", _ctl_status)
    r.add_post(r"/_sim/instances/{id:\d+}/vanish", _ctl_vanish)
    r.add_post(r"/_sim/instances/{id:\d+}/stale", _ctl_stale)
    r.add_post(r"/_sim/instances/{id:\d+}/market", _ctl_market)
    return app


async def start_sim_api(
    cloud: SimCloud, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve `cloud` on host:port (0: any free port); returns (runner, base URL).

    Stop with `await runner.cleanup()` and then `await cloud.aclose()`.
    """
    runner = web.AppRunner(
        create_sim_app(cloud), handler_cancellation=True, shutdown_timeout=1.0, access_log=None
    )
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound_port = int(runner.addresses[0][1])
    return runner, f"http://{host}:{bound_port}"
