"""keel's Grafana dashboards, written as code: `python3 dashboards.py dashboards` writes the JSON
files Grafana provisions (deploy/observability/grafana/dashboards). Edit this, not the JSON; the
suite checks that the JSON is what this writes, that every query parses as PromQL and that every
metric it names is one keel exports."""
import json, sys
DS = {"type": "prometheus", "uid": "prometheus"}
R = "$__rate_interval"
SERVER_FAIL = 'grpc_code=~"Unknown|Internal|Unavailable|DataLoss|DeadlineExceeded"'

def panel(pid, title, exprs, x, y, unit="short", w=12, h=8, description=None):
    p = {
        "id": pid, "type": "timeseries", "title": title, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": l}
                    for i, (e, l) in enumerate(exprs)],
    }
    if description:
        p["description"] = description
    return p

def row(pid, title, y):
    return {"id": pid, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}

def variable(name, label, query, multi=True):
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": "StandardVariableQuery"},
            "definition": query, "refresh": 2, "includeAll": True, "multi": multi,
            "current": {"text": "All", "value": "$__all"}, "sort": 1}

def dashboard(uid, title, description, panels, variables):
    return {"uid": uid, "title": title, "description": description, "tags": ["keel"],
            "schemaVersion": 39, "version": 1, "editable": True, "timezone": "browser",
            "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
            "templating": {"list": variables}, "annotations": {"list": []}, "panels": panels}

def layout(sections):
    panels, pid, y = [], 1, 0
    for title, items in sections:
        panels.append(row(pid, title, y)); pid += 1; y += 1
        for i, (t, exprs, unit, *desc) in enumerate(items):
            panels.append(panel(pid, t, exprs, (i % 2) * 12, y + (i // 2) * 8, unit,
                                description=desc[0] if desc else None))
            pid += 1
        y += ((len(items) + 1) // 2) * 8
    return panels

svc = 'grpc_service=~"$service"'
golden = dashboard("keel-golden-signals", "keel / golden signals",
    "Traffic, errors and latency per service and method, as each server sees them; the REST gateway per route.",
    layout([
        ("gRPC services", [
            ("Calls per second by method", [(f'sum by (grpc_service, grpc_method) (rate(grpc_server_handled_total{{{svc}}}[{R}]))', "{{grpc_service}}/{{grpc_method}}")], "reqps"),
            ("Server failures by method", [(f'sum by (grpc_service, grpc_method) (rate(grpc_server_handled_total{{{svc},{SERVER_FAIL}}}[{R}])) / sum by (grpc_service, grpc_method) (rate(grpc_server_handled_total{{{svc}}}[{R}]))', "{{grpc_service}}/{{grpc_method}}")], "percentunit",
             "Answers a client could not have caused (Unknown, Internal, Unavailable, DataLoss, DeadlineExceeded) over all answers."),
            ("Answers by code", [(f'sum by (grpc_code) (rate(grpc_server_handled_total{{{svc}}}[{R}]))', "{{grpc_code}}")], "reqps"),
            ("Latency p50 and p99 by method (unary)", [
                (f'histogram_quantile(0.5, sum by (grpc_service, grpc_method, le) (rate(grpc_server_handling_seconds_bucket{{{svc},grpc_type="unary"}}[{R}])))', "p50 {{grpc_service}}/{{grpc_method}}"),
                (f'histogram_quantile(0.99, sum by (grpc_service, grpc_method, le) (rate(grpc_server_handling_seconds_bucket{{{svc},grpc_type="unary"}}[{R}])))', "p99 {{grpc_service}}/{{grpc_method}}")], "s"),
            ("Calls refused before running, by reason", [(f'sum by (grpc_service, reason) (rate(keel_server_shed_total{{{svc}}}[{R}]))', "{{grpc_service}} {{reason}}")], "reqps",
             "limit: too many calls in flight; deadline: the caller's deadline was shorter than the method takes."),
            ("Concurrency limit", [(f'max by (grpc_service) (keel_server_concurrency_limit{{{svc}}})', "{{grpc_service}}")], "short",
             "Each service's limit per replica: adaptive (a gradient on latency), under KEEL_MAX_CONCURRENT_CALLS."),
            ("Calls in flight", [(f'sum by (grpc_service) (grpc_server_started_total{{{svc}}}) - sum by (grpc_service) (grpc_server_handled_total{{{svc}}})', "{{grpc_service}}")], "short",
             "Started but not yet answered, streams included (Watch streams stay open)."),
        ]),
        ("REST gateway", [
            ("Requests per second by route", [(f'sum by (method, route) (rate(http_requests_total[{R}]))', "{{method}} {{route}}")], "reqps"),
            ("Responses by status", [(f'sum by (status) (rate(http_requests_total[{R}]))', "{{status}}")], "reqps"),
            ("5xx ratio", [(f'sum(rate(http_requests_total{{status=~"5.."}}[{R}])) / sum(rate(http_requests_total[{R}]))', "5xx")], "percentunit"),
            ("Latency p99 by route", [(f'histogram_quantile(0.99, sum by (method, route, le) (rate(http_request_duration_seconds_bucket[{R}])))', "{{method}} {{route}}")], "s"),
        ]),
        ("Database", [
            ("Statements per second", [(f'sum by (result) (rate(keel_db_statements_total[{R}]))', "{{result}}")], "ops"),
            ("Statement latency p99", [(f'histogram_quantile(0.99, sum by (le) (rate(keel_db_statement_duration_seconds_bucket[{R}])))', "p99")], "s"),
        ]),
    ]),
    [variable("service", "Service", "label_values(grpc_server_handled_total, grpc_service)")])

peer = 'peer=~"$peer"'
mesh = dashboard("keel-mesh", "keel / mesh",
    "The mesh as each calling process's balancer sees it: endpoints by state, attempts per endpoint, retries, the retry budget and ejections.",
    layout([
        ("Endpoints", [
            ("Endpoints by state", [(f'sum by (peer, state) (keel_mesh_endpoints{{{peer}}})', "{{peer}} {{state}}")], "short",
             "admitted: in the pick; not_serving: its health says NOT_SERVING; ejected: out for failing."),
            ("Attempts per endpoint", [(f'sum by (peer, endpoint, outcome) (rate(keel_mesh_endpoint_attempts_total{{{peer}}}[{R}]))', "{{peer}} {{endpoint}} {{outcome}}")], "reqps"),
            ("Ejections per endpoint", [(f'sum by (peer, endpoint) (increase(keel_mesh_ejections_total{{{peer}}}[{R}]))', "{{peer}} {{endpoint}}")], "short"),
        ]),
        ("Calls", [
            ("Calls vs attempts", [
                (f'sum by (peer) (rate(grpc_client_started_total{{{peer}}}[{R}]))', "calls {{peer}}"),
                (f'sum by (peer) (rate(keel_mesh_endpoint_attempts_total{{{peer}}}[{R}]))', "attempts {{peer}}")], "reqps",
             "What callers asked for against what was sent, retries and hedges included."),
            ("Effective vs actual by method", [
                (f'sum by (peer, grpc_method) (rate(grpc_client_started_total{{{peer}}}[{R}]))', "effective {{peer}}/{{grpc_method}}"),
                (f'sum by (peer, grpc_method) (rate(grpc_client_started_total{{{peer}}}[{R}])) + sum by (peer, grpc_method) (rate(keel_mesh_retries_total{{{peer}}}[{R}]))', "sent {{peer}}/{{grpc_method}}"),
                (f'sum by (peer, grpc_method) (rate(keel_mesh_hedges_total{{{peer}}}[{R}]))', "hedged {{peer}}/{{grpc_method}}")], "reqps",
             "Calls callers made against calls sent (retries added) and hedges sent (KEEL_HEDGED_READS)."),
            ("Success ratio by method: effective vs actual", [
                (f'sum by (peer, grpc_method) (rate(grpc_client_handled_total{{{peer},grpc_code="OK"}}[{R}])) / sum by (peer, grpc_method) (rate(grpc_client_handled_total{{{peer}}}[{R}]))', "effective {{peer}}/{{grpc_method}}"),
                (f'sum by (peer, grpc_method) (rate(grpc_client_handled_total{{{peer},grpc_code="OK"}}[{R}])) / (sum by (peer, grpc_method) (rate(grpc_client_started_total{{{peer}}}[{R}])) + sum by (peer, grpc_method) (rate(keel_mesh_retries_total{{{peer}}}[{R}])))', "actual {{peer}}/{{grpc_method}}")], "percentunit",
             "Effective: what callers saw succeed. Actual: successful attempts over attempts sent (a call that succeeds does so in exactly one attempt; retries counted, hedges apart)."),
            ("Retries by method", [(f'sum by (peer, grpc_method) (rate(keel_mesh_retries_total{{{peer}}}[{R}]))', "{{peer}}/{{grpc_method}}")], "reqps"),
            ("Hedges by method", [(f'sum by (peer, grpc_method) (rate(keel_mesh_hedges_total{{{peer}}}[{R}]))', "{{peer}}/{{grpc_method}}")], "reqps",
             "Reads sent again to another endpoint because the first attempt was slower than the method's p95 (KEEL_HEDGED_READS)."),
            ("Hedges a budget refused", [(f'sum by (peer, grpc_method, budget) (rate(keel_mesh_hedges_refused_total{{{peer}}}[{R}]))', "{{peer}}/{{grpc_method}} {{budget}}")], "reqps",
             "Slow reads left unhedged: hedges' own share of calls (budget=hedge) or the peer's retry budget (budget=retry) was spent. The calls stay slow; none fails for it."),
            ("Retries the budget refused", [(f'sum by (peer) (rate(keel_mesh_retry_budget_exhausted_total{{{peer}}}[{R}]))', "{{peer}}")], "reqps",
             "Above zero, failures reach callers: more than 20% of calls (plus 10/s) needed a retry."),
            ("Client failures by code", [(f'sum by (peer, grpc_code) (rate(grpc_client_handled_total{{{peer},grpc_code!="OK"}}[{R}]))', "{{peer}} {{grpc_code}}")], "reqps"),
            ("Client latency p99 by method", [(f'histogram_quantile(0.99, sum by (peer, grpc_method, le) (rate(grpc_client_handling_seconds_bucket{{{peer}}}[{R}])))', "{{peer}}/{{grpc_method}}")], "s"),
        ]),
    ]),
    [variable("peer", "Peer", "label_values(keel_mesh_endpoints, peer)")])

kind = 'kind=~"$kind"'
stores = dashboard("keel-cache-queue", "keel / cache and queue",
    "Cache hit ratio and errors per cache; the job queue's depth, age and outcomes per kind.",
    layout([
        ("Cache", [
            ("Hit ratio by cache", [(f'sum by (cache) (rate(keel_cache_requests_total{{result="hit"}}[{R}])) / sum by (cache) (rate(keel_cache_requests_total[{R}]))', "{{cache}}")], "percentunit"),
            ("Reads by result", [(f'sum by (cache, result) (rate(keel_cache_requests_total[{R}]))', "{{cache}} {{result}}")], "ops"),
            ("Invalidations by result", [(f'sum by (cache, result) (rate(keel_cache_invalidations_total[{R}]))', "{{cache}} {{result}}")], "ops"),
        ]),
        ("Queue", [
            ("Jobs waiting", [(f'max by (kind) (keel_queue_depth{{{kind}}})', "{{kind}}")], "short",
             "Every process samples the same queue: max, not sum."),
            ("Oldest due job's wait", [(f'max by (kind) (keel_queue_oldest_age_seconds{{{kind}}})', "{{kind}}")], "s"),
            ("Attempts by outcome", [
                (f'sum by (kind) (rate(keel_queue_jobs_started_total{{{kind}}}[{R}]))', "started {{kind}}"),
                (f'sum by (kind) (rate(keel_queue_jobs_succeeded_total{{{kind}}}[{R}]))', "succeeded {{kind}}"),
                (f'sum by (kind) (rate(keel_queue_jobs_failed_total{{{kind}}}[{R}]))', "failed {{kind}}"),
                (f'sum by (kind) (rate(keel_queue_jobs_retried_total{{{kind}}}[{R}]))', "retried {{kind}}")], "ops"),
            ("Dead jobs", [(f'sum by (kind) (increase(keel_queue_jobs_dead_total{{{kind}}}[{R}]))', "{{kind}}")], "short"),
            ("Table fallbacks", [(f'sum(increase(keel_queue_table_fallbacks_total[{R}]))', "fallbacks")], "short",
             "Times Redis Streams did not answer and workers claimed from the table."),
        ]),
    ]),
    [variable("kind", "Job kind", "label_values(keel_queue_depth, kind)")])

out = sys.argv[1]
for name, d in [("golden-signals", golden), ("mesh", mesh), ("cache-queue", stores)]:
    with open(f"{out}/keel-{name}.json", "w") as f:
        json.dump(d, f, indent=2)
        f.write("\n")
