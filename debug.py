"""Debug views: the telemetry behind each device's stats, as stored."""

from flask import Blueprint, Flask

from fleet import history_kept_from, listed_page
from fleetmon import (
    aggregates_of,
    device_stats,
    get_db,
    has_sent,
    minute_to_rfc3339,
    read_device,
)

debug = Blueprint("debug", __name__)


@debug.get("/debug/devices")
def debug_devices():
    """The listed devices in id order, a page at a time: `next` continues the list."""
    rows, next_url = listed_page(".debug_devices")
    return {
        "devices": [
            {
                "device_id": row["device_id"],
                "has_sent": has_sent(aggregates_of(row)),
                "online_minutes": row["online_minutes"],
                "upload_count": row["upload_count"],
                "history_kept_from": history_kept_from(row),
            }
            for row in rows
        ],
        "next": next_url,
    }


@debug.get("/debug/stats/<device_id>")
def debug_stats(device_id: str):
    db = get_db()
    row = read_device(db, device_id)
    has_heartbeats = row["online_minutes"] > 0
    stored = db.execute(
        "SELECT (SELECT count(*) FROM online_hours WHERE device_key = :key),"
        " (SELECT count(*) FROM uploads WHERE device_key = :key)", {"key": row["device_key"]}).fetchone()
    return {
        "device_id": device_id,
        "online_minutes": row["online_minutes"],
        "first_online_minute": minute_to_rfc3339(row["first_minute"]) if has_heartbeats else None,
        "last_online_minute": minute_to_rfc3339(row["last_minute"]) if has_heartbeats else None,
        "upload_count": row["upload_count"],
        "upload_total_ns": row["upload_total_ns"],
        "history_kept_from": history_kept_from(row),
        "stored_hours": stored[0],
        "stored_uploads": stored[1],
        "stats": device_stats(aggregates_of(row)),
    }


def init_app(app: Flask) -> None:
    app.register_blueprint(debug)
