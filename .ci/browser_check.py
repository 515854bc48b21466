"""The fleet page in headless Chromium, against a live fleetmon on a fresh database with
the shipped devices.csv: `python .ci/browser_check.py http://127.0.0.1:PORT`.
The suite checks the page's HTML; this checks that a browser runs its script."""

import json
import sys
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import (
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

DEVICES = ["60-6b-44-84-dc-64", "b4-45-52-a2-f1-3c", "26-9a-66-01-33-83", "18-b8-87-e7-1f-06", "38-4e-73-e0-33-59"]
DEVICE = DEVICES[0]


def row_text(driver, device_id):
    # Found by the id, not by column: new columns, badges or links change nothing here.
    rows = driver.find_elements(By.XPATH, f"//tbody/tr[.//*[normalize-space()='{device_id}']]")
    assert len(rows) == 1, f"{len(rows)} rows for {device_id}, not 1"
    return rows[0].text


def post(url, body):  # urllib raises on an error status
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


def checks(driver, base):
    """Yields the name of each check as it passes; each builds on the one before."""
    driver.get(base + "/")
    heading = driver.find_element(By.TAG_NAME, "h1").text
    assert (driver.title, heading) == ("fleetmon", "fleetmon"), f"title {driver.title!r}, heading {heading!r}"
    yield "the fleet page is titled fleetmon"
    for device_id in DEVICES:
        assert "%" not in (text := row_text(driver, device_id)), f"{device_id} has an uptime already: {text!r}"
    yield f"all {len(DEVICES)} devices are listed, none with an uptime"
    driver.execute_script("window.notReloaded = true")  # a reload would drop it
    for minute in ("10:02", "10:03", "10:04"):
        post(f"{base}/api/v1/devices/{DEVICE}/heartbeat", {"sent_at": f"2024-01-01T{minute}:00Z"})
    post(f"{base}/api/v1/devices/{DEVICE}/stats", {"sent_at": "2024-01-01T10:04:00Z", "upload_time": 1_500_000_000})
    try:  # every minute of its span online: 100 %; one upload of 1.5 s: its average
        WebDriverWait(driver, 10, ignored_exceptions=[StaleElementReferenceException]).until(
            lambda driver: "100.000%" in (text := row_text(driver, DEVICE)) and "1.5s" in text)
    except TimeoutException:
        raise AssertionError(f"{DEVICE} not at 100.000% and 1.5s after 10 s: {row_text(driver, DEVICE)!r}") from None
    assert driver.execute_script("return window.notReloaded") is True, "the page was reloaded"
    yield f"{DEVICE}'s heartbeats and upload show up without a reload"


def main():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    passed = failed = 0
    try:
        for name in checks(driver, sys.argv[1].rstrip("/")):
            print(f"ok   {name}")
            passed += 1
    except (AssertionError, WebDriverException, OSError) as error:  # OSError: urllib's
        print(f"FAIL {type(error).__name__}: {next(iter(str(error).splitlines()), '')}")
        failed = 1
    finally:
        driver.quit()
    print(f"browser-check: {passed} passed, {failed} failed")
    return failed


if __name__ == "__main__":
    sys.exit(main())
