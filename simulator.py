"""A device simulator for fleetmon: telemetry sent to a running fleetmon over its HTTP API.

It stands in for the vendor's simulator binary. It sends every device of a devices file
a simulated day of heartbeats and uploads, from clients in parallel, then reads each
device's stats back and prints the table the vendor's simulator prints, checking the
vendor's five devices against their published results. With --live it sends telemetry
stamped with the current time instead, until Ctrl+C, one device now and then dropping out
for a while, for watching fleetmon follow a fleet.

    python simulator.py              the day, as fast as fleetmon takes it
    python simulator.py --pace 60    the day spread over a minute, to watch it arrive
    python simulator.py --live       telemetry from now on, until Ctrl+C

Standard library only, and no import of fleetmon: like a device, it knows fleetmon by its
API alone.
"""

import argparse
import csv
import http.client
import io
import json
import math
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from heapq import merge
from pathlib import Path
from random import Random
from time import monotonic, sleep
from typing import NamedTuple
from urllib.parse import quote, urlsplit

DEFAULT_URL = "http://127.0.0.1:6733"
DEFAULT_DEVICES_CSV = Path(__file__).resolve().parent / "devices.csv"
MAX_CLIENTS = 16
# fleetmon's answers are small: a larger one is not fleetmon's, and is not read to its end.
MAX_ANSWER_BYTES = 64 * 1024
ANSWER_TIMEOUT_SECONDS = 10
# fleetmon drops a connection left idle for a while, and an upload sent on a dropped one
# cannot be sent again (it may have been stored): a connection idle this long is replaced.
IDLE_SECONDS = 5
# Where stderr is no terminal (a log, a pipe), a progress line this often, not one in place.
PROGRESS_SECONDS = 10

# --- The simulated day --------------------------------------------------------------

SIMULATED_DAY_START = datetime(2024, 1, 1, 10, 0, tzinfo=UTC)
SIMULATED_DAY_MINUTES = 480
UPLOADS_A_DAY = 100


class PublishedDay(NamedTuple):
    """What the vendor's simulator publishes for one of its devices."""

    heartbeats: int  # over a 480-minute span
    uptime: str  # as it prints it, with five decimals
    avg_upload_time: str
    mean_ns: int  # the same mean, in nanoseconds


PUBLISHED_DAYS = {
    "60-6b-44-84-dc-64": PublishedDay(479, "99.79167", "3m7.893379134s", 187_893_379_134),
    "b4-45-52-a2-f1-3c": PublishedDay(480, "100.00000", "3m19.085533836s", 199_085_533_836),
    "26-9a-66-01-33-83": PublishedDay(446, "92.91667", "3m21.858747766s", 201_858_747_766),
    "18-b8-87-e7-1f-06": PublishedDay(474, "98.75000", "3m17.331667813s", 197_331_667_813),
    "38-4e-73-e0-33-59": PublishedDay(479, "99.79167", "3m29.226522788s", 209_226_522_788),
}


class Telemetry(NamedTuple):
    second: float  # of the simulated day, or of a live run, when the device sends it
    path: str
    body: dict


def device_path(device_id: str, endpoint: str) -> str:
    # Quoted: a devices file may hold ids with spaces or other characters a URL cannot carry.
    return f"/api/v1/devices/{quote(device_id, safe='')}/{endpoint}"


def simulated_day(device_id: str, seed: int = 0) -> list[Telemetry]:
    """A day of a device's telemetry, in the order it sends it.

    The vendor's devices get a day that gives exactly its published stats; any other
    device a day drawn from the seed and its id, most steady and some flaky. Heartbeats
    come once a minute, with a few retries within a minute and a few sent out of order;
    uploads about every five minutes.
    """
    random = Random(f"{seed}:{device_id}")
    published = PUBLISHED_DAYS.get(device_id)
    if published:
        missed = random.sample(range(1, SIMULATED_DAY_MINUTES), SIMULATED_DAY_MINUTES + 1 - published.heartbeats)
        mean, spread = published.mean_ns, 7_919_113
        # Half above the mean and half below, plus 99 ns: truncating division gives the
        # mean, rounding would give one more.
        uploads = [mean + sign * step * spread for step in range(UPLOADS_A_DAY // 2) for sign in (1, -1)]
        uploads[0] += 99
    else:
        miss_rate = random.choice([0.002, 0.005, 0.01, 0.01, 0.02, random.uniform(0.05, 0.3)])
        missed = [m for m in range(1, SIMULATED_DAY_MINUTES) if random.random() < miss_rate]
        mean = random.randint(60, 300) * 10**9
        uploads = [max(0, int(random.gauss(mean, mean / 5))) for _ in range(UPLOADS_A_DAY)]

    telemetry = []
    for minute in sorted(set(range(SIMULATED_DAY_MINUTES + 1)) - set(missed)):
        second = minute * 60 + random.uniform(0, 50)
        telemetry.append(Telemetry(second, device_path(device_id, "heartbeat"), {"sent_at": None}))
        if random.random() < 0.02:  # a retry, later in the same minute
            telemetry.append(Telemetry(second + 5, telemetry[-1].path, {"sent_at": None}))
    for number, upload_time in enumerate(uploads):
        second = number * SIMULATED_DAY_MINUTES * 60 / len(uploads) + random.uniform(0, 200)
        telemetry.append(Telemetry(second, device_path(device_id, "stats"), {"upload_time": upload_time}))
    telemetry.sort(key=lambda event: event.second)
    for event in telemetry:
        event.body["sent_at"] = rfc3339(SIMULATED_DAY_START + timedelta(seconds=event.second))
    for index in random.sample(range(len(telemetry) - 1), len(telemetry) // 100):
        telemetry[index], telemetry[index + 1] = telemetry[index + 1], telemetry[index]  # out of order
    return telemetry


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- Devices and fleetmon, as a client sees them ------------------------------------


class SimulatorError(Exception):
    """A problem that stops the simulator, told in one line."""


class Unreachable(SimulatorError):
    """No connection to fleetmon could be opened."""

    def __init__(self, url: str, error: OSError):
        refused = isinstance(error, ConnectionRefusedError)
        self.reason = "connection refused" if refused else error.strerror or str(error)
        super().__init__(f"nothing answers at {url} ({self.reason}); is fleetmon running?")


def read_device_ids(path: Path) -> list[str]:
    """The ids under the device_id column of a devices file, sorted, read as fleetmon
    reads them: a UTF-8 byte-order mark, spaces, blank lines, repeated ids, and a file
    separated by semicolons (a first line with one and no comma) are fine."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            text = file.read()
        first_line = text.partition("\n")[0]
        delimiter = ";" if ";" in first_line and "," not in first_line else ","
        rows = [[value.strip() for value in row] for row in csv.reader(io.StringIO(text), delimiter=delimiter)]
    except OSError as error:
        raise SimulatorError(f"cannot read devices file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise SimulatorError(f"devices file {path} is not UTF-8 text") from None
    if not rows or "device_id" not in rows[0]:
        raise SimulatorError(f"devices file {path} has no device_id column in its first line")
    column = rows[0].index("device_id")
    device_ids = {row[column] for row in rows[1:] if len(row) > column} - {""}
    if not device_ids:
        raise SimulatorError(f"devices file {path} lists no devices under device_id")
    return sorted(device_ids)


NO_ANSWER = 0  # the status of a request whose connection broke before it was answered


class Fleetmon:
    """fleetmon as its clients see it, through one keep-alive connection, each answer
    read within limits; whatever is wrong with one is a SimulatorError."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.url, self.address = url, (parts.hostname, parts.port or 80)
        self.connection: http.client.HTTPConnection | None = None
        self.answered = 0.0  # when the connection last answered

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def ask(self, method: str, path: str, body: dict | None = None, repeatable: bool = True) -> tuple[int, bytes]:
        """The status and body of the answer to one request.

        A request whose connection breaks before the answer is sent again on a fresh one if
        it is repeatable; an upload is not, as it may have been stored, and gets NO_ANSWER.
        """
        for _ in range(2 if repeatable else 1):
            try:
                return self._exchange(method, path, body)
            except ConnectionError:
                self.close()
        if not repeatable:
            return NO_ANSWER, b""
        raise SimulatorError(f"{self.url} closed the connection twice without answering {method} {path}")

    def _exchange(self, method: str, path: str, body: dict | None) -> tuple[int, bytes]:
        # A fresh connection rather than one idle for a while, which fleetmon may have closed,
        # or one an answer closed, which http.client would reopen unseen: a refusal would
        # then pass for a broken answer.
        if self.connection is not None and (self.connection.sock is None
                                            or monotonic() - self.answered > IDLE_SECONDS):
            self.close()
        if self.connection is None:
            self.connection = http.client.HTTPConnection(*self.address, timeout=ANSWER_TIMEOUT_SECONDS)
            try:
                self.connection.connect()
            except OSError as error:
                raise Unreachable(self.url, error) from None
        request = f"{method} {path}"
        try:
            self.connection.request(method, path, None if body is None else json.dumps(body),
                                    {"Accept": "application/json", "Content-Type": "application/json"})
            response = self.connection.getresponse()
            data = response.read(MAX_ANSWER_BYTES + 1)  # a byte more tells a body too long
        except ConnectionError:
            raise  # for ask(), which may send the request again
        except TimeoutError:
            raise SimulatorError(f"{self.url} did not answer {request} within {ANSWER_TIMEOUT_SECONDS} s") from None
        except http.client.HTTPException:
            raise SimulatorError(f"{self.url} answered {request} with something that is not HTTP") from None
        except OSError as error:
            raise SimulatorError(f"{self.url} failed on {request}: {error.strerror or error}") from None
        if len(data) > MAX_ANSWER_BYTES:
            too_long = f"a body of more than {MAX_ANSWER_BYTES // 1024} KiB"
            raise SimulatorError(f"{self.url} answered {request} with {too_long}")
        self.answered = monotonic()
        return response.status, data

    def check_it_is_fleetmon(self) -> None:
        status, body = self.ask("GET", "/")
        about = parse_json(body)
        if status == 401 and isinstance(about, dict) and "(user fleetmon)" in str(about.get("msg")):
            return  # a fleetmon whose operator's views need a password, which devices do not
        if status != 200 or not isinstance(about, dict) or about.get("name") != "fleetmon":
            raise SimulatorError(f"{self.url} answers, but not as fleetmon (HTTP {status})")

    def read_stats(self, device_id: str) -> tuple[int, tuple[float, str] | None]:
        """A device's stats: 200 and (uptime, avg_upload_time); or None and 204 (it has
        sent nothing) or 404 (fleetmon does not know it)."""
        path = device_path(device_id, "stats")
        status, body = self.ask("GET", path)
        if status in (204, 404):
            return status, None
        if status != 200:
            raise SimulatorError(f"{self.url} answered GET {path} with HTTP {status}")
        stats = parse_json(body)
        if not (isinstance(stats, dict) and type(stats.get("uptime")) in (int, float)
                and isinstance(stats.get("avg_upload_time"), str) and stats["avg_upload_time"].isprintable()):
            raise SimulatorError(f"{self.url} answered GET {path} with a body that is not a device's stats")
        return status, (stats["uptime"], stats["avg_upload_time"])

    def survey(self, device_ids: list[str]) -> tuple[list[str], list[str]]:
        """The devices fleetmon does not know, and those it already holds telemetry for."""
        statuses = {device_id: self.read_stats(device_id)[0] for device_id in device_ids}
        return ([device_id for device_id, status in statuses.items() if status == 404],
                [device_id for device_id, status in statuses.items() if status == 200])

    def post(self, event: Telemetry) -> int:
        # A heartbeat counts once however often it comes: it may be sent again.
        return self.ask("POST", event.path, event.body, repeatable=event.path.endswith("/heartbeat"))[0]


def parse_json(body: bytes) -> object:
    """The value of a JSON body, or None if it is none."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


# --- A day of a fleet ---------------------------------------------------------------


class Simulation:
    """Clients that send the simulated days of a fleet to a running fleetmon, in parallel."""

    def __init__(self, url: str, device_ids: list[str], seed: int, pace: float):
        self.url, self.device_ids, self.pace = url, device_ids, pace
        # Of the devices not the vendor's, the first sends nothing: a fleet has its silent one.
        silent = min(set(device_ids) - set(PUBLISHED_DAYS), default=None)
        self.days = {device_id: simulated_day(device_id, seed) if device_id != silent else []
                     for device_id in device_ids}
        self.total = sum(map(len, self.days.values()))
        self.sent = self.failed = 0
        self.started = self.shown = monotonic()
        self.terminal = sys.stderr.isatty()
        self.stop = threading.Event()
        self.error: SimulatorError | None = None  # the first that stopped a client
        self._lock = threading.Lock()

    def run(self) -> None:
        """Send every device's day, each client its share of devices in time order, until
        all is sent or a client meets an error; then raise that error."""
        clients = min(len(self.device_ids), MAX_CLIENTS)
        # merge() keeps each day's own order, out-of-order sends included.
        shares = [list(merge(*(self.days[device_id] for device_id in self.device_ids[i::clients]),
                             key=lambda event: event.second))
                  for i in range(clients)]
        threads = [threading.Thread(target=self.send, args=(share,)) for share in shares]
        self.started = self.shown = monotonic()
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.5)
                    self.show_progress(monotonic())
        finally:
            self.stop.set()
            for thread in threads:
                thread.join()
            self.show_progress(monotonic(), final=True)
        if isinstance(self.error, Unreachable):
            raise SimulatorError(f"fleetmon at {self.url} stopped answering ({self.error.reason}) "
                                 f"after {self.sent:,} of {self.total:,} requests")
        if self.error:
            raise self.error

    def send(self, telemetry: list[Telemetry]) -> None:
        with closing(Fleetmon(self.url)) as fleetmon:
            try:
                for event in telemetry:
                    due = self.started + event.second / (SIMULATED_DAY_MINUTES * 60) * self.pace
                    if self.stop.wait(max(0.0, due - monotonic())):
                        return
                    status = fleetmon.post(event)
                    with self._lock:
                        self.sent += 1
                        self.failed += status != 204
            except SimulatorError as error:
                with self._lock:
                    self.error = self.error or error
                self.stop.set()  # the other clients stop too

    def show_progress(self, now: float, final: bool = False) -> None:
        """On a terminal, one line rewritten in place, ended at the end. Elsewhere a line
        now and then, and none at the end: the summary that follows tells the same."""
        line = (f"simulator: {self.sent:,} of {self.total:,} requests sent, {self.failed:,} failed, "
                f"{self.sent / max(now - self.started, 1e-9):,.0f} requests/s")
        if self.terminal:
            print(f"\r{line}", end="\n" if final else "", file=sys.stderr, flush=True)
        elif not final and now - self.shown >= PROGRESS_SECONDS:
            print(line, file=sys.stderr, flush=True)
            self.shown = now

    def results(self, unchecked: Iterable[str]) -> list[tuple[str, str, str, str]]:
        """(device, uptime, average upload time, verdict) for every device: the vendor's
        simulator's table, its own devices checked against their published results
        but for those in `unchecked`."""
        table = []
        with closing(Fleetmon(self.url)) as fleetmon:
            for device_id in self.device_ids:
                _, stats = fleetmon.read_stats(device_id)
                uptime, average = (f"{stats[0]:.5f}", stats[1]) if stats else ("-", "-")
                published = PUBLISHED_DAYS.get(device_id)
                if not published:
                    verdict = ""
                elif device_id in unchecked:
                    verdict = "not checked"
                elif (uptime, average) == (published.uptime, published.avg_upload_time):
                    verdict = "PASS"
                else:
                    verdict = f"FAIL, expected {published.uptime} {published.avg_upload_time}"
                table.append((device_id, uptime, average, verdict))
        return table


def send_day(url: str, device_ids: list[str], seed: int, pace: float, held: list[str]) -> int:
    """Send the day and print the table: the exit status."""
    simulation = Simulation(url, device_ids, seed, pace)
    try:
        simulation.run()
    except KeyboardInterrupt:
        print(f"simulator: stopped; {simulation.sent:,} of {simulation.total:,} requests sent, "
              f"{simulation.failed:,} failed", file=sys.stderr)
        return 1
    table = simulation.results(unchecked=set(held))
    print(f"{'device_id':<20} {'uptime':>10}  {'avg_upload_time':<18} check")
    for device_id, uptime, average, verdict in table:
        print(f"{device_id:<20} {uptime:>10}  {average:<18} {verdict}".rstrip())
    verdicts = [verdict for *_, verdict in table if verdict]
    checked, passed = len(verdicts) - verdicts.count("not checked"), verdicts.count("PASS")
    summary = [f"{simulation.sent:,} requests sent, {simulation.failed:,} failed"]
    if checked:
        summary.append(f"{passed} of {checked} published results match")
    if checked < len(verdicts):
        summary.append(f"{len(verdicts) - checked} not checked: fleetmon held their telemetry before")
    print("simulator: " + "; ".join(summary))
    return 0 if simulation.failed == 0 and passed == checked else 1


# --- Live ---------------------------------------------------------------------------

UPLOAD_EVERY_HEARTBEATS = 6
# A first dropout soon after the start and longer than a short --down-after of fleetmon,
# so that a demo shows a device go down and come back within a few minutes; and long
# enough to hold at least two whole minutes with no heartbeat (one missed minute between
# two online ones still counts as the whole span online), so that its uptime and its strip
# show the outage that its page lists.
FIRST_DROPOUT_SECONDS = 20
DROPOUT_SECONDS = (180, 210)
BETWEEN_DROPOUTS_SECONDS = (120, 300)


class Dropout(NamedTuple):
    device_id: str
    start: float  # seconds from the start of the live run
    end: float


def live_dropouts(device_ids: list[str], seed: int) -> Iterator[Dropout]:
    """The devices that drop out of a live run and when: one at a time, for ever."""
    random = Random(f"{seed}:live")
    start = FIRST_DROPOUT_SECONDS
    while True:
        end = start + random.uniform(*DROPOUT_SECONDS)
        yield Dropout(random.choice(device_ids), start, end)
        start = end + random.uniform(*BETWEEN_DROPOUTS_SECONDS)


class LiveRun:
    """What a fleet sends live, worked out a step at a time from the time it is told:
    a heartbeat from each device every `every` seconds, and now and then an upload,
    but nothing from a device while it is dropped out."""

    def __init__(self, device_ids: list[str], every: float, seed: int, start: datetime,
                 dropouts: Iterable[Dropout] | None = None):
        self.every, self.start = every, start
        # Spread over the interval, so that the devices do not all send at once.
        self.due = {device_id: i * every / len(device_ids) for i, device_id in enumerate(device_ids)}
        self.heartbeats = dict.fromkeys(device_ids, 0)
        self.dropouts = iter(live_dropouts(device_ids, seed) if dropouts is None else dropouts)
        self.dropout = next(self.dropouts, None)
        self.out: str | None = None  # the device dropped out now
        self.random = Random(seed)

    def step(self, now: datetime) -> tuple[list[str], list[Telemetry]]:
        """The lines to print and the telemetry to send at `now`."""
        second = (now - self.start).total_seconds()
        lines = []
        if self.out is not None and second >= self.dropout.end:
            lines.append(f"simulator: {self.out} is back after {self.dropout.end - self.dropout.start:.0f} s")
            self.out, self.dropout = None, next(self.dropouts, None)
        if self.out is None and self.dropout is not None and second >= self.dropout.start:
            self.out = self.dropout.device_id
            lines.append(f"simulator: {self.out} drops out for {self.dropout.end - self.dropout.start:.0f} s")
        telemetry = []
        for device_id in self.due:
            if self.due[device_id] > second:
                continue
            while self.due[device_id] <= second:  # a step late skips the heartbeats missed
                self.due[device_id] += self.every
            if device_id == self.out:
                continue
            sent_at = rfc3339(now)
            telemetry.append(Telemetry(second, device_path(device_id, "heartbeat"), {"sent_at": sent_at}))
            if self.heartbeats[device_id] % UPLOAD_EVERY_HEARTBEATS == 0:
                upload_time = self.random.randint(60_000, 300_000) * 10**6
                telemetry.append(Telemetry(second, device_path(device_id, "stats"),
                                           {"sent_at": sent_at, "upload_time": upload_time}))
            self.heartbeats[device_id] += 1
        return lines, telemetry

    def next_step(self) -> datetime:
        """When the next step has something to do."""
        second = min(self.due.values())
        if self.dropout is not None:
            second = min(second, self.dropout.start if self.out is None else self.dropout.end)
        return self.start + timedelta(seconds=second)


def send_live(url: str, device_ids: list[str], every: float, seed: int) -> int:
    """Send telemetry stamped with the time until Ctrl+C: the exit status. A fleetmon
    that stops answering (restarted during a demo, say) is told once, and once more when
    it answers again; the fleet goes on meanwhile, and what it sent then is lost, as a
    real device's would be."""
    run = LiveRun(device_ids, every, seed, start=datetime.now(UTC))
    sent = failed = 0
    gone = False
    print(f"simulator: live to {url}, a heartbeat every {every:g} s from each of {devices(len(device_ids))}; "
          "Ctrl+C stops", flush=True)
    with closing(Fleetmon(url)) as fleetmon:
        try:
            while True:
                lines, telemetry = run.step(datetime.now(UTC))
                for line in lines:
                    print(line, flush=True)
                for event in telemetry:
                    try:
                        status = fleetmon.post(event)
                    except SimulatorError as error:
                        fleetmon.close()
                        if not gone:
                            print(f"simulator: fleetmon stopped answering ({error}); the fleet goes on "
                                  "and tries it at every send", flush=True)
                            gone = True
                        break  # the rest of this step is lost with it
                    if gone:
                        print(f"simulator: fleetmon at {url} answers again", flush=True)
                        gone = False
                    failed += status != 204
                    sent += 1
                sleep(max(0.0, (run.next_step() - datetime.now(UTC)).total_seconds()))
        except KeyboardInterrupt:
            print(f"simulator: stopped; {sent:,} requests sent, {failed:,} failed", flush=True)
            return 0


# --- Entry point --------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a wrong option is told in one line, as every other error here."""

    def error(self, message: str):
        raise SimulatorError(message)


def fleetmon_url(text: str) -> str:
    parts = urlsplit(text)
    try:
        port = parts.port  # None if the URL names none
    except ValueError:  # a port that is no number, or past 65535
        port = 0
    if parts.scheme != "http" or not parts.hostname or port == 0:
        raise argparse.ArgumentTypeError(f"must be an http:// URL with a valid port, not {text!r}")
    return text.rstrip("/")


def devices(count: int) -> str:
    return f"{count:,} device{'' if count == 1 else 's'}"


def seconds(text: str, least: float = 0.0) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= least):  # NaN fails here too
        raise argparse.ArgumentTypeError(f"must be a number of seconds, {least:g} or more, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    # Whatever the console or file takes, a device id prints: escaped if it must be.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = OneLineParser(
        prog="simulator.py", description=__doc__.splitlines()[0],
        epilog="Exit status: 0 when everything was sent and every published result matches (or --live "
               "was stopped with Ctrl+C), 1 when not, 2 with one line when it cannot go on.")
    parser.add_argument("--url", type=fleetmon_url, default=DEFAULT_URL,
                        help="fleetmon's address (default %(default)s)")
    parser.add_argument("--devices", type=Path, default=DEFAULT_DEVICES_CSV, metavar="CSV",
                        help="devices file (default: devices.csv beside simulator.py)")
    parser.add_argument("--seed", type=int, default=0,
                        help="draws the days of devices other than the vendor's (default 0)")
    parser.add_argument("--pace", type=seconds, default=0.0, metavar="SECONDS",
                        help="spread the day over this long (default 0: as fast as it goes)")
    parser.add_argument("--again", action="store_true",
                        help="send the day even to a fleetmon that holds telemetry for these devices already")
    parser.add_argument("--live", action="store_true", help="send telemetry stamped with the time, until Ctrl+C")
    parser.add_argument("--every", type=lambda text: seconds(text, least=0.01), default=10.0, metavar="SECONDS",
                        help="with --live, a heartbeat from each device this often (default 10)")
    try:
        args = parser.parse_args(argv)
        device_ids = read_device_ids(args.devices)
        with closing(Fleetmon(args.url)) as fleetmon:
            fleetmon.check_it_is_fleetmon()
            unknown, held = fleetmon.survey(device_ids)
        of_ours = f"of the {devices(len(device_ids))} in {args.devices}"
        if unknown:
            raise SimulatorError(f"fleetmon at {args.url} does not know {len(unknown):,} {of_ours} "
                                 "(started with another devices file?)")
        if args.live:
            return send_live(args.url, device_ids, args.every, args.seed)
        held_already = f"fleetmon at {args.url} already holds telemetry for {len(held):,} {of_ours}"
        if held and not args.again:
            raise SimulatorError(f"{held_already}: sent again, their uploads would count twice; "
                                 "start fleetmon with a fresh --db, or give --again to send anyway")
        if held:
            print(f"simulator: {held_already}; sending again (--again), so their published results "
                  "cannot be checked", file=sys.stderr)
        return send_day(args.url, device_ids, args.seed, args.pace, held)
    except SimulatorError as error:
        print(f"simulator: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
