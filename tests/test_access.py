"""Who may do what: devices reach the contract with no credentials; operators reach the
rest, beyond loopback with the password; a browser acting for another site can neither
write nor read through a rebound name; secrets stay secret."""

import argparse
import json
import re

import pytest

import access
import alerts
import fleetmon
from conftest import DEVICE, HTML, SENT_AT, open_app

PASSWORD = "correct horse"
CREDENTIALS = {"Authorization": "Basic ZmxlZXRtb246Y29ycmVjdCBob3JzZQ=="}  # fleetmon:correct horse
WRONG = {"Authorization": "Basic ZmxlZXRtb246d3Jvbmc="}  # fleetmon:wrong
BEYOND_LOOPBACK = {"OPERATOR_PASSWORD": PASSWORD, "ALLOWED_HOSTS": ["0.0.0.0"]}


@pytest.fixture
def guarded_app(tmp_path):
    with open_app(tmp_path / "fleetmon.db", **BEYOND_LOOPBACK) as app:
        yield app


def every_route(app):
    """(method, url, endpoint) for every rule url_map has, so that a route added later is
    held to the same rule without anyone remembering to add it here."""
    for rule in app.url_map.iter_rules():
        arguments = {"device_id": DEVICE, "filename": "swagger-ui.css"}
        url = rule.build({name: arguments[name] for name in rule.arguments})[1]
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield method, url, rule.endpoint


def test_beyond_loopback_every_operator_route_needs_the_password_and_the_contract_none(guarded_app):
    client = guarded_app.test_client()
    body = {"sent_at": SENT_AT, "upload_time": 1}
    routes = list(every_route(guarded_app))
    assert {endpoint for _, _, endpoint in routes} >= access.CONTRACT | {"fleet.index", "metrics.metrics_view"}
    for method, url, endpoint in routes:
        anonymous = client.open(url, method=method, json=body if method == "POST" else None)
        if endpoint in access.CONTRACT:
            assert anonymous.status_code in (200, 204), (method, url)
            continue
        assert anonymous.status_code == 401, (method, url)
        assert anonymous.headers["WWW-Authenticate"] == "Basic realm=fleetmon, charset=UTF-8"
        assert anonymous.json == {"msg": "the operator's password is needed (user fleetmon)"}
        with client.open(url, method=method, headers=CREDENTIALS) as allowed:  # a static file: closed after
            assert allowed.status_code in (200, 204), (method, url)


def test_on_loopback_the_operator_views_are_open(tmp_path):
    with open_app(tmp_path / "fleetmon.db") as app:
        client = app.test_client()
        assert [client.get(url).status_code for url in ("/", "/metrics", "/api/v1/devices", "/docs/")] == [200] * 4


def test_failed_passwords_turn_into_429_for_that_address_alone(guarded_app):
    client = guarded_app.test_client()
    attacker, operator = {"REMOTE_ADDR": "192.0.2.7"}, {"REMOTE_ADDR": "192.0.2.8"}
    answers = [client.get("/metrics", headers=WRONG, environ_base=attacker).status_code
               for _ in range(access.FAILURES_ALLOWED)]
    assert answers == [401] * access.FAILURES_ALLOWED
    locked = client.get("/metrics", headers=CREDENTIALS, environ_base=attacker)
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) <= access.LOCKED_OUT_SECONDS + 1
    assert locked.json["msg"].startswith("too many failed passwords from this address: try again in ")
    # Other addresses, and the same address's devices, are answered as ever.
    assert client.get("/metrics", headers=CREDENTIALS, environ_base=operator).status_code == 200
    heartbeat = client.post(f"/api/v1/devices/{DEVICE}/heartbeat", json={"sent_at": SENT_AT}, environ_base=attacker)
    assert heartbeat.status_code == 204


def test_a_lockout_ends_after_its_time():
    lockout = access.Lockout()
    for _ in range(access.FAILURES_ALLOWED):
        lockout.failed("192.0.2.7", now=100.0)
    assert lockout.locked_out("192.0.2.7", now=100.0) == access.LOCKED_OUT_SECONDS
    assert lockout.locked_out("192.0.2.7", now=100.0 + access.LOCKED_OUT_SECONDS) == 0
    assert lockout.locked_out("192.0.2.9", now=100.0) == 0


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:6734"])
def test_a_write_from_a_browser_acting_for_another_site_is_403_and_stores_nothing(app, client, origin):
    for path, body in ((f"/api/v1/devices/{DEVICE}/heartbeat", {"sent_at": SENT_AT}),
                       (f"/api/v1/devices/{DEVICE}/stats", {"sent_at": SENT_AT, "upload_time": 5})):
        response = client.post(path, data=json.dumps(body), headers={"Origin": origin, "Content-Type": "text/plain"})
        assert response.status_code == 403
        assert response.json == {"msg": "a browser acting for another site may not write here; nothing was stored"}
    assert client.get(f"/api/v1/devices/{DEVICE}/stats").status_code == 204


def test_a_write_with_fleetmons_own_origin_or_none_is_taken(client):
    for headers in ({"Origin": "http://localhost"}, {"Origin": "https://localhost"}, {}):  # https: behind a proxy
        assert client.post(f"/api/v1/devices/{DEVICE}/heartbeat", json={"sent_at": SENT_AT},
                           headers=headers).status_code == 204


@pytest.mark.parametrize("host, status", [
    ("attacker.example", 400), ("127.0.0.1.nip.io", 400),
    ("localhost:6733", 200), ("127.0.0.1:6733", 200), ("[::1]:6733", 200), ("192.0.2.1", 200),
    ("fleet.example.org", 200),  # listed with --allowed-host
])
def test_only_the_names_fleetmon_is_reached_by_are_answered(tmp_path, host, status):
    with open_app(tmp_path / "fleetmon.db", ALLOWED_HOSTS=["127.0.0.1", "fleet.example.org"]) as app:
        client = app.test_client()
        for path in ("/", f"/api/v1/devices/{DEVICE}/stats"):
            response = client.get(path, headers={"Host": host})
            assert response.status_code == (status if status == 400 else response.status_code)
            if status == 400:
                assert response.json["msg"] == (f"this fleetmon is not reached by the name {host!r} "
                                                "(--allowed-host adds one)")


@pytest.mark.parametrize("path", ["/", f"/devices/{DEVICE}", "/docs/"])
def test_pages_carry_a_content_security_policy_whose_nonce_their_own_script_and_style_carry(client, path):
    response = client.get(path, headers=HTML)
    assert response.status_code == 200 and response.mimetype == "text/html"
    policy = response.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([\w-]+)'", policy)[1]
    assert f"script-src 'self' 'nonce-{nonce}'" in policy and f"style-src 'self' 'nonce-{nonce}'" in policy
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
    page = response.text
    inline = re.findall(r"<(script|style)( nonce=\"[^\"]*\")?>", page)
    assert inline and all(attribute == f' nonce="{nonce}"' for _, attribute in inline)
    assert "style=" not in page  # the policy allows no style attribute
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert client.get(path, headers=HTML).headers["Content-Security-Policy"] != policy  # a nonce an answer


def namespace(host, password_file=None, open_to_all=False):
    return argparse.Namespace(host=host, password_file=password_file, open_to_all=open_to_all, allowed_host=[])


def test_beyond_loopback_with_no_password_the_start_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(access.PASSWORD_VARIABLE, raising=False)
    assert fleetmon.main(["--host", "0.0.0.0", "--port", "0", "--db", str(tmp_path / "fleetmon.db")]) == 1
    assert capsys.readouterr().err == (
        "fleetmon: listening on 0.0.0.0, beyond loopback, the operator's views need a password: give "
        "--password-file PATH or set FLEETMON_PASSWORD, or pass --open-to-all to leave them open to anyone "
        "who reaches the port\n")
    assert list(tmp_path.iterdir()) == []  # and nothing was made


def test_the_password_comes_from_a_file_or_the_environment_and_the_start_line_says_which(tmp_path, monkeypatch):
    monkeypatch.delenv(access.PASSWORD_VARIABLE, raising=False)
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n", encoding="utf-8")
    assert access.operator_settings(namespace("0.0.0.0", password_file))["OPERATOR_PASSWORD"] == PASSWORD
    monkeypatch.setenv(access.PASSWORD_VARIABLE, "from the environment")
    assert access.operator_settings(namespace("0.0.0.0"))["OPERATOR_PASSWORD"] == "from the environment"
    monkeypatch.delenv(access.PASSWORD_VARIABLE)
    assert access.operator_settings(namespace("0.0.0.0", open_to_all=True))["OPERATOR_PASSWORD"] is None
    password_file.write_text("", encoding="utf-8")
    with pytest.raises(fleetmon.StartupError, match="is empty$"):
        access.operator_settings(namespace("0.0.0.0", password_file))
    lines = []
    for settings in ({"OPERATOR_PASSWORD": PASSWORD, "ALLOWED_HOSTS": ["0.0.0.0"]},
                     {"OPERATOR_PASSWORD": None, "ALLOWED_HOSTS": ["127.0.0.1"]},
                     {"OPERATOR_PASSWORD": None, "ALLOWED_HOSTS": ["0.0.0.0"]}):
        with open_app(tmp_path / "fleetmon.db", **settings) as app, access.telling(app, lines.append):
            pass
    assert lines == ["fleetmon: the operator's views need the password (user fleetmon); devices need none",
                     "fleetmon: the operator's views are open to this machine alone (loopback)",
                     "fleetmon: the operator's views are OPEN to anyone who reaches the port (--open-to-all)"]
    assert all(PASSWORD not in line for line in lines)


def test_the_alert_url_is_shown_as_scheme_and_host_alone():
    assert alerts.shown_url("https://hooks.slack.com/services/T000/B000/XXXXSECRET") == "https://hooks.slack.com/…"
    assert alerts.shown_url("http://user:secret@receiver.example:8080/hook?token=x") == "http://receiver.example:8080/…"


def test_an_alert_for_any_device_id_is_text_to_slack_and_mattermost():
    alert = {"id": 1, "device_id": "<!channel> [click](http://x.example)", "status": "up",
             "at_ms": 61_000, "last_heard_ms": 1_000}
    assert alerts.chat_text(alert) == ("fleetmon: `&lt;!channel&gt; [click](http://x.example)` is up again after 1 min")
    assert alerts.payload(alert)["silent_since"] == "1970-01-01T00:00:01.000Z"


@pytest.mark.parametrize(("host", "loopback"), [
    ("localhost", True), ("LocalHost", True), ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", False), ("::", False), ("192.0.2.1", False), ("fleet.example.org", False),
])
def test_loopback_is_localhost_or_a_loopback_address(host, loopback):
    assert access.is_loopback(host) is loopback


def test_an_origin_that_is_no_url_at_all_is_a_foreign_one(client):
    response = client.post(f"/api/v1/devices/{DEVICE}/heartbeat", json={"sent_at": SENT_AT},
                           headers={"Origin": "http://[::1"})
    assert response.status_code == 403


def test_the_failed_passwords_remembered_are_bounded_whatever_the_addresses(monkeypatch):
    monkeypatch.setattr(access, "ADDRESSES_REMEMBERED", 3)
    lockout = access.Lockout()
    for number in range(10):
        lockout.failed(f"192.0.2.{number}", now=100.0)
    assert len(lockout._failures) <= access.ADDRESSES_REMEMBERED
