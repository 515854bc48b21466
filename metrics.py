"""/metrics, for Prometheus: the requests answered, the devices by status, the alerts,
and, in a small fleet, each device's status and uptime. A scrape reads counts kept as
things happen and the few rows of the indexes it walks, never the history."""

import threading
from collections import Counter

import prometheus_client
from flask import Blueprint, Flask, current_app, request
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import alerts
from fleet import count_by_status
from fleetmon import aggregates_of, device_stats, get_db
from status import STATUSES, status_of

# Per-device series only for a fleet this small: a scrape of a larger one would be
# large, and every device a series of its own in the time-series database.
PER_DEVICE_UP_TO = 1000

metrics = Blueprint("metrics", __name__)


class FleetCollector:
    """Read at each scrape. The requests are what the app counted (the server window's
    activity line reads them too); the alerts, what this process queued and delivered."""

    def __init__(self, app: Flask):
        self.app = app
        self.answered: Counter[tuple[str, int]] = Counter()  # (endpoint, status): requests
        self._lock = threading.Lock()

    def count(self, response):
        """An after_request hook. A plain count, not a prometheus_client counter's
        labels() on every request: this runs for every heartbeat."""
        with self._lock:
            self.answered[request.endpoint or "none", response.status_code] += 1
        return response

    def answers(self) -> Counter[tuple[str, int]]:
        """The requests answered so far, by (endpoint, status)."""
        with self._lock:
            return Counter(self.answered)

    def collect(self):
        answered = self.answers()
        requests = CounterMetricFamily("fleetmon_requests", "Requests answered, by endpoint and status",
                                       labels=["endpoint", "status"])
        for (endpoint, status), count in sorted(answered.items()):
            requests.add_metric([endpoint, str(status)], count)
        yield requests
        telemetry = CounterMetricFamily("fleetmon_telemetry", "Telemetry accepted, by kind", labels=["kind"])
        for kind, endpoint in (("heartbeat", "api.post_heartbeat"), ("upload", "api.post_stats")):
            telemetry.add_metric([kind], answered.get((endpoint, 204), 0))
        yield telemetry
        outcomes = self.app.extensions["fleetmon.alert_outcomes"]
        alerted = CounterMetricFamily("fleetmon_alerts", "Changes of status told since the start, by the new status",
                                      labels=["status"])
        for status in ("down", "up"):
            alerted.add_metric([status], outcomes[status])
        yield alerted
        sent = CounterMetricFamily("fleetmon_alerts_sent", "Alerts sent to the alert URL since the start, by outcome",
                                   labels=["outcome"])
        for outcome in ("delivered", "refused"):
            sent.add_metric([outcome], outcomes[outcome])
        yield sent
        with self.app.app_context():
            db = get_db()
            waiting = GaugeMetricFamily("fleetmon_alerts_waiting", "Alerts not yet delivered")
            waiting.add_metric([], alerts.count_waiting(db))
            yield waiting
            counts = count_by_status(db)
            devices = GaugeMetricFamily("fleetmon_devices", "Devices of the devices file, by status", labels=["status"])
            for status in STATUSES:
                devices.add_metric([status], counts[status])
            yield devices
            if counts["devices"] <= PER_DEVICE_UP_TO:
                up = GaugeMetricFamily("fleetmon_device_up", "1 if the device is up, 0 if down or never heard",
                                       labels=["device_id"])
                uptime = GaugeMetricFamily("fleetmon_device_uptime_percent", "The device's uptime, as GET stats has "
                                           "it; none for a device that has sent nothing", labels=["device_id"])
                for device in db.execute("SELECT * FROM devices WHERE listed ORDER BY device_id"):
                    up.add_metric([device["device_id"]], status_of(device) == "up")
                    stats = device_stats(aggregates_of(device))
                    if stats is not None:
                        uptime.add_metric([device["device_id"]], stats["uptime"])
                yield up
                yield uptime


@metrics.get("/metrics")
def metrics_view():
    registry = current_app.extensions["fleetmon.metrics"]
    return prometheus_client.generate_latest(registry), 200, {"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}


def init_app(app: Flask) -> None:
    collector = FleetCollector(app)
    registry = prometheus_client.CollectorRegistry()
    registry.register(collector)
    app.extensions["fleetmon.metrics"] = registry
    app.extensions["fleetmon.answers"] = collector.answers
    app.after_request(collector.count)
    app.register_blueprint(metrics)
