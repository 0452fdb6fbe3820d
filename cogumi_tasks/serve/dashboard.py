"""The Grafana dashboard of the serving gateway, built in code with ``grafana-foundation-sdk``.

Every panel queries the Prometheus metrics the gateway exports (:mod:`cogumi_tasks.serve.metrics`).
The committed JSON (``monitoring/grafana/dashboards/cogumi.json``, provisioned by docker-compose) is
this module's output; regenerate it after a change with::

    python -m cogumi_tasks.serve.dashboard monitoring/grafana/dashboards/cogumi.json

tests/unit/test_monitoring.py checks that the file equals :func:`dashboard_json` and that every
panel's PromQL parses (``promtool check rules``) and names only exported metrics.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

UID = "cogumi-serving"
DATASOURCE_UID = "cogumi-prometheus"  # monitoring/grafana/provisioning/datasources/prometheus.yml
RATE = "5m"  # fixed windows: the same text is valid PromQL for promtool and for Grafana


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    kind: str  # "timeseries" | "stat"
    unit: str
    queries: tuple[Query, ...]
    description: str = ""
    width: int = 12
    height: int = 8
    stacked: bool = False
    show_name: bool = False  # a stat that shows the series name (a label) instead of its value


def _quantiles(metric: str, what: str) -> tuple[Query, ...]:
    return tuple(
        Query(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[{RATE}])))", f"{what} p{int(q * 100)}")
        for q in (0.5, 0.99)
    )


_UP = 'sum(increase(cogumi_feedback_total{value="up"}[1h]))'
_VOTES = 'sum(increase(cogumi_feedback_total{value=~"up|down"}[1h]))'

OVERVIEW: tuple[PanelSpec, ...] = (
    PanelSpec("Requests/s", "stat", "reqps", (Query(f"sum(rate(cogumi_requests_total[{RATE}]))", "requests/s"),),
              width=6, height=4),
    PanelSpec("5xx share", "stat", "percentunit", (Query(
        f'sum(rate(cogumi_requests_total{{status=~"5.."}}[{RATE}])) / sum(rate(cogumi_requests_total[{RATE}]))',
        "5xx share"),), width=6, height=4),
    PanelSpec("Thumbs up (1h)", "stat", "percentunit", (Query(f"{_UP} / {_VOTES}", "up share"),),
              "Share of thumbs up among thumbs up + down in the last hour (POST /v1/feedback).", width=6, height=4),
    PanelSpec("Release", "stat", "none", (Query("max by (release) (cogumi_release_info)", "{{release}}"),),
              "The release the gateway serves (cogumi_release_info).", width=6, height=4, show_name=True),
)

PANELS: tuple[PanelSpec, ...] = (
    PanelSpec("Query volume", "timeseries", "reqps", (
        Query(f"sum by (model) (rate(cogumi_requests_total[{RATE}]))", "{{model}}"),),
        "Requests per second by requested model (cogumi-auto or a manual override).", stacked=True),
    PanelSpec("Route mix", "timeseries", "reqps", (
        Query(f"sum by (route) (rate(cogumi_routes_total[{RATE}]))", "{{route}}"),),
        "Answers per second by the route taken (base or a modifier).", stacked=True),
    PanelSpec("Routing reasons", "timeseries", "reqps", (
        Query(f"sum by (reason) (rate(cogumi_routes_total[{RATE}]))", "{{reason}}"),),
        "Why each route was taken: confident, router, override or escalation.", stacked=True),
    PanelSpec("Quality from feedback", "timeseries", "percentunit", (
        Query(f"{_UP} / {_VOTES}", "all routes"),
        Query('sum by (route) (increase(cogumi_feedback_total{value="up"}[1h])) / '
              'sum by (route) (increase(cogumi_feedback_total{value=~"up|down"}[1h]))', "{{route}}"),
        ), "Share of thumbs up among up + down over the last hour."),
    PanelSpec("Request latency", "timeseries", "s", _quantiles("cogumi_request_seconds", "request"),
              "Whole request, p50 and p99."),
    PanelSpec("Time to first token", "timeseries", "s", _quantiles("cogumi_ttft_seconds", "first token"),
              "Time to the first content token, p50 and p99."),
    PanelSpec("Tokens/s", "timeseries", "none", (
        Query(f"histogram_quantile(0.5, sum by (le, route) (rate(cogumi_decode_tokens_per_second_bucket[{RATE}])))",
              "decode p50 {{route}}"),
        Query(f"sum(rate(cogumi_completion_tokens_total[{RATE}]))", "generated, all requests"),
        ), "Decode speed per request (median by route) and total completion tokens per second."),
    PanelSpec("Escalations", "timeseries", "reqps", (
        Query(f"sum by (from_route, to_route) (rate(cogumi_escalations_total[{RATE}]))",
              "{{from_route}} -> {{to_route}}"),),
        "Follow-ups where a detected dissatisfaction re-routed the answer."),
    PanelSpec("Cost", "timeseries", "currencyUSD", (
        Query("sum by (route) (increase(cogumi_cost_usd_total[1h]))", "{{route}}"),),
        "Estimated cost per hour by route (configured per-model cost).", stacked=True),
    PanelSpec("Errors by kind", "timeseries", "reqps", (
        Query(f"sum by (kind) (rate(cogumi_errors_total[{RATE}]))", "{{kind}}"),),
        "auth, limit, rate, bad_request, engine, internal.", stacked=True),
)


def _panel(spec: PanelSpec, panel_id: int):
    from grafana_foundation_sdk.builders import common as common_b
    from grafana_foundation_sdk.builders import prometheus, stat, timeseries
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    if spec.kind == "stat":
        panel = stat.Panel().reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]))
        if spec.show_name:
            panel = panel.text_mode(common.BigValueTextMode.NAME)
    else:
        panel = timeseries.Panel().fill_opacity(10).legend(
            common_b.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM).show_legend(True))
        if spec.stacked:
            panel = panel.stacking(common_b.StackingConfig().mode(common.StackingMode.NORMAL))
    panel = (panel.id(panel_id).title(spec.title).unit(spec.unit).span(spec.width).height(spec.height)
             .datasource(DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)))
    if spec.description:
        panel = panel.description(spec.description)
    for i, q in enumerate(spec.queries):
        panel = panel.with_target(prometheus.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(chr(65 + i)))
    return panel


def build() -> dict:
    """The dashboard as Grafana's JSON model (a dict)."""
    from grafana_foundation_sdk.builders import dashboard
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    dash = (dashboard.Dashboard("Cogumi serving").uid(UID).tags(["cogumi", "serving"]).refresh("30s")
            .time("now-6h", "now").timezone("utc").readonly()
            .description("Phase 5 serving gateway: volume, route mix, feedback quality, latency, tokens/s, "
                         "escalations, cost and errors (built by cogumi_tasks.serve.dashboard)."))
    for i, spec in enumerate(OVERVIEW, start=1):
        dash = dash.with_panel(_panel(spec, i))
    dash = dash.with_row(dashboard.Row("Traffic and quality").id(len(OVERVIEW) + 1))
    for i, spec in enumerate(PANELS, start=len(OVERVIEW) + 2):
        dash = dash.with_panel(_panel(spec, i))
    return json.loads(json.dumps(dash.build(), cls=JSONEncoder))


def dashboard_json() -> str:
    """The exact text of the committed dashboard file."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def expressions() -> list[str]:
    """Every PromQL expression of the dashboard, in panel order."""
    return [q.expr for spec in (*OVERVIEW, *PANELS) for q in spec.queries]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the dashboard JSON")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dashboard_json())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
