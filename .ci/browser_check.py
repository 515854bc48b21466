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


def strip_titles(driver, device_id):
    runs = driver.find_elements(By.XPATH, f"//tbody/tr[.//*[normalize-space()='{device_id}']]//div[@class='strip']/span")
    return [run.get_attribute("title") for run in runs]


def post(url, body):  # urllib raises on an error status
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


def wait_for(driver, condition, what):
    try:
        WebDriverWait(driver, 10, ignored_exceptions=[StaleElementReferenceException]).until(condition)
    except TimeoutException:
        raise AssertionError(f"not within 10 s: {what}") from None


def checks(driver, base):
    """Yields the name of each check as it passes; each builds on the one before. The
    server runs with --down-after 3s."""
    driver.get(base + "/")
    heading = driver.find_element(By.TAG_NAME, "h1").text
    assert (driver.title, heading) == ("fleetmon", "fleetmon"), f"title {driver.title!r}, heading {heading!r}"
    yield "the fleet page is titled fleetmon"
    for device_id in DEVICES:
        text = row_text(driver, device_id)
        assert "never heard" in text and "%" not in text, f"{device_id} is not a device never heard: {text!r}"
    yield f"all {len(DEVICES)} devices are listed, never heard"
    driver.execute_script("window.notReloaded = true")  # a reload would drop it
    for minute in ("10:02", "10:03", "10:04"):
        post(f"{base}/api/v1/devices/{DEVICE}/heartbeat", {"sent_at": f"2024-01-01T{minute}:00Z"})
    post(f"{base}/api/v1/devices/{DEVICE}/stats", {"sent_at": "2024-01-01T10:04:00Z", "upload_time": 1_500_000_000})
    # Every minute of its span online: 100 %; one upload of 1.5 s: its average.
    wait_for(driver, lambda driver: all(part in row_text(driver, DEVICE) for part in ("up", "100.000 %", "1.5 s")),
             f"{DEVICE} up at 100.000 % and 1.5 s: {row_text(driver, DEVICE)!r}")
    yield f"{DEVICE}'s heartbeats and upload show up without a reload"
    meter = driver.execute_script(
        "return document.querySelector('.meter [data-percent]').getBoundingClientRect().width")
    assert meter > 0, "the uptime meter was not drawn"
    yield "the script draws the uptime meter under the page's Content-Security-Policy"
    for minute in ("10:00", "10:30"):
        post(f"{base}/api/v1/devices/{DEVICES[1]}/heartbeat", {"sent_at": f"2024-01-01T{minute}:00Z"})
    for minute in range(41):  # 23:50 to 00:30, across midnight
        sent_at = f"2024-01-0{1 + (minute + 50) // 60}T{23 if minute < 10 else 0:02d}:{(minute + 50) % 60:02d}:00Z"
        post(f"{base}/api/v1/devices/{DEVICES[2]}/heartbeat", {"sent_at": sent_at})
    drawn = {
        DEVICES[1]: ["2024-01-01 10:00–10:14 UTC: 1 of 15 min online", "missed 2024-01-01 10:15–10:29 UTC (15 min)",
                     "online 2024-01-01 10:30 UTC (1 min)"],
        DEVICES[2]: ["online 2024-01-01 23:50–2024-01-02 00:30 UTC (41 min)"],  # four quarter hours, one run
    }
    wait_for(driver, lambda driver: {device_id: strip_titles(driver, device_id) for device_id in drawn} == drawn,
             f"strips drawn as {drawn}: {[strip_titles(driver, device_id) for device_id in drawn]}")
    yield "the page's script draws each strip from its quarter hours, each run titled"
    wait_for(driver, lambda driver: "down for" in row_text(driver, DEVICE),
             f"{DEVICE} down: {row_text(driver, DEVICE)!r}")
    assert driver.execute_script("return window.notReloaded") is True, "the page was reloaded"
    yield f"{DEVICE} shows as down once it has gone quiet, without a reload"
    driver.find_element(By.LINK_TEXT, DEVICE).click()
    wait_for(driver, lambda driver: driver.find_element(By.TAG_NAME, "h1").text == DEVICE, "the device's page")
    outages = driver.find_elements(By.XPATH, "//table/tbody/tr")
    assert len(outages) == 1 and "still down" in outages[0].text, f"outages: {[o.text for o in outages]}"
    runs = [run.get_attribute("title") for run in driver.find_elements(By.XPATH, "//div[@class='strip']/span")]
    assert runs == ["online 2024-01-01 10:02–10:04 UTC (3 min)"], f"the device page's strip: {runs}"
    yield "its id opens its page, with its outage and its strip"
    flaky = DEVICES[3]  # a day online every other minute: a gap in every quarter hour
    for minute in range(0, 24 * 60, 2):
        post(f"{base}/api/v1/devices/{flaky}/heartbeat", {"sent_at": f"2024-01-01T{minute // 60:02d}:{minute % 60:02d}:00Z"})
    driver.set_window_size(390, 844)
    for page in ("/", f"/devices/{flaky}"):
        driver.get(base + page)
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{page} scrolls sideways by {overflow} px at 390 px wide"
    yield "at 390 px wide nothing scrolls sideways, not even a flaky device's strip"
    driver.set_window_size(1280, 900)
    driver.get(base + "/docs/")
    wait_for(driver, lambda driver: driver.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"),
             "Swagger UI drawn on /docs/")
    yield "the docs page runs Swagger UI under its Content-Security-Policy"
    violations = [entry["message"] for entry in driver.get_log("browser") if "Content Security Policy" in entry["message"]]
    assert not violations, f"the console shows CSP violations: {violations}"
    yield "the console shows no Content-Security-Policy violation on any page"


def main():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # for the CSP check
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
