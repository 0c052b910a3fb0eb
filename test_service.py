"""End-to-end tests of the running recommendation service over HTTP (unittest).

``python -m unittest test_service -v`` (pytest collects it too). The class set-up builds
artefacts from the ``tiny`` preset with the real command line in a temporary folder — or uses
the folder named by ``MUSICREC_TEST_PARQUET_DIR`` — starts ``uvicorn recommendation_service:app``
on a free port with a fresh history file, and checks every endpoint and every case of
MISSION.md and API.md. Each check and its result goes to ``test_service.log`` beside this
file; the log is printed at the end.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path
from typing import Any, ClassVar, cast

import pandas as pd
import requests

HERE = Path(__file__).resolve().parent
LOG_PATH = HERE / "test_service.log"
PYTHON = sys.executable
STARTUP_TIMEOUT = 120.0
BUILD_TIMEOUT = 1800.0

log = logging.getLogger("test_service")


def _setup_log() -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(LOG_PATH, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: list[str], what: str) -> None:
    log.info("build: %s", " ".join(args))
    started = time.perf_counter()
    done = subprocess.run(
        [PYTHON, "-m", "musicrec", *args],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    if done.returncode != 0:
        log.error("%s failed:\n%s\n%s", what, done.stdout[-3000:], done.stderr[-3000:])
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {done.stderr[-1000:]}")
    log.info("build: %s done in %.1f s", what, time.perf_counter() - started)


class Server:
    """``uvicorn recommendation_service:app`` in a subprocess."""

    def __init__(self, parquet_dir: Path, history_db: Path, workdir: Path) -> None:
        self.parquet_dir = parquet_dir
        self.history_db = history_db
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.output: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = _free_port()
        env = {
            **os.environ,
            "MUSICREC_PARQUET_DIR": str(self.parquet_dir),
            "MUSICREC_HISTORY_URL": f"sqlite:///{self.history_db}",
            "MUSICREC_DEFAULT_K": "25",
            "MUSICREC_MAX_K": "100",
            # the lists checked here are the similar-tracks blend, uncapped (still selectable);
            # the default fold-in and artist cap are tested in tests/test_online.py
            "MUSICREC_ONLINE_METHOD": "similar",
            "MUSICREC_ARTIST_CAP": "0",
        }
        self.output = open(self.workdir / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "uvicorn",
                "recommendation_service:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            cwd=HERE,
            env=env,
            stdout=self.output,
            stderr=subprocess.STDOUT,
        )
        started = time.perf_counter()
        while time.perf_counter() - started < STARTUP_TIMEOUT:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the service exited with {self.proc.returncode}:\n" + self.server_log()[-3000:]
                )
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    log.info(
                        "service up on %s (pid %d) in %.1f s",
                        self.url,
                        self.proc.pid,
                        time.perf_counter() - started,
                    )
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the service did not become healthy in time:\n" + self.server_log())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            log.info("service stopped (exit %s)", self.proc.returncode)
        self.proc = None
        if self.output is not None:
            self.output.close()
            self.output = None

    def server_log(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


class ServiceTest(unittest.TestCase):
    """The running service, checked over HTTP in a fixed order (test_NN_ names)."""

    tmp: ClassVar[tempfile.TemporaryDirectory[str]]
    server: ClassVar[Server]
    parquet: ClassVar[Path]
    recs: ClassVar[dict[int, list[int]]]
    similar: ClassVar[dict[int, list[tuple[int, float]]]]
    popular: ClassVar[list[int]]
    catalogue: ClassVar[list[int]]
    names: ClassVar[dict[int, str]]
    k: ClassVar[int] = 25

    # -- set-up -------------------------------------------------------------------------------

    @classmethod
    def setUpClass(cls) -> None:
        _setup_log()
        log.info("=== test_service: end-to-end checks of recommendation_service over HTTP ===")
        cls.tmp = tempfile.TemporaryDirectory(prefix="test_service_")
        try:
            cls._build_and_start(Path(cls.tmp.name))
        except Exception:
            log.exception("set-up failed")
            cls._finish()
            raise

    @classmethod
    def _build_and_start(cls, work: Path) -> None:
        ready = os.environ.get("MUSICREC_TEST_PARQUET_DIR")
        if ready:
            cls.parquet = Path(ready).resolve()
            log.info("artefacts: %s (MUSICREC_TEST_PARQUET_DIR)", cls.parquet)
        else:
            data, cls.parquet = work / "data", work / "parquet"
            _run(["generate", "--preset", "tiny", "--out", str(data)], "generate")
            _run(["prepare", "--data-dir", str(data), "--parquet-dir", str(cls.parquet)], "prepare")
            _run(["run", "--data-dir", str(data), "--parquet-dir", str(cls.parquet)], "run")
        cls._read_artefacts()
        cls.server = Server(cls.parquet, work / "history.db", work)
        cls.server.start()

    @classmethod
    def _read_artefacts(cls) -> None:
        """The expected answers come straight from the parquet files."""
        recs = pd.read_parquet(
            cls.parquet / "recommendations.parquet", columns=["user_id", "track_id", "rank"]
        )
        recs = recs.sort_values(["user_id", "rank"], kind="stable")
        cls.recs = {int(cast(int, u)): g.tolist() for u, g in recs.groupby("user_id")["track_id"]}
        sim = pd.read_parquet(cls.parquet / "similar.parquet").sort_values(
            ["track_id", "rank"], kind="stable"
        )
        cls.similar = {
            int(cast(int, t)): list(
                zip(g["similar_track_id"].astype(int), g["score"].astype(float), strict=True)
            )
            for t, g in sim.groupby("track_id")
        }
        pop = pd.read_parquet(cls.parquet / "top_popular.parquet").sort_values("rank")
        cls.popular = pop["track_id"].astype(int).tolist()
        items = pd.read_parquet(cls.parquet / "items.parquet", columns=["track_id", "name"])
        cls.catalogue = sorted(items["track_id"].astype(int).tolist())
        cls.names = dict(zip(items["track_id"].astype(int), items["name"], strict=True))
        log.info(
            "artefacts: %d users with offline lists, %d tracks with similar lists, "
            "%d popular, %d in the catalogue",
            len(cls.recs),
            len(cls.similar),
            len(cls.popular),
            len(cls.catalogue),
        )

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()
        cls._finish()

    @classmethod
    def _finish(cls) -> None:
        log.info("=== end ===")
        for handler in log.handlers:
            handler.flush()
        cls.tmp.cleanup()
        print("\n" + LOG_PATH.read_text(encoding="utf-8"))

    # -- helpers ------------------------------------------------------------------------------

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        response = requests.request(method, self.server.url + path, timeout=30, **kwargs)
        shown = kwargs.get("json", kwargs.get("params", ""))
        log.info("%s %s %s -> %d", method, path, shown if shown != "" else "", response.status_code)
        return response

    def check(self, what: str, ok: bool, detail: Any = "") -> None:
        """Log one check and its result, then assert it."""
        log.info("  %s  %s%s", "PASS" if ok else "FAIL", what, f"  [{detail}]" if detail else "")
        self.assertTrue(ok, f"{what} {detail}")

    def check_list(self, response: requests.Response, length: int, what: str) -> list[Any]:
        body = response.json()
        self.check(f"{what}: status 200", response.status_code == 200, response.status_code)
        self.check(f"{what}: a list", isinstance(body, list), type(body).__name__)
        self.check(f"{what}: {length} items", len(body) == length, len(body))
        keys = [x["track_id"] if isinstance(x, dict) else x for x in body]
        self.check(f"{what}: no duplicates", len(set(keys)) == len(keys))
        return body

    def fill(self, tracks: list[int], heard: set[int], k: int) -> list[int]:
        """API.md: a short list is filled from the top popular tracks not yet in it."""
        out: list[int] = []
        for t in [*tracks, *self.popular, *self.catalogue]:
            if len(out) >= k:
                break
            if t not in heard and t not in out:
                out.append(t)
        return out

    def online_list(self, history: list[int], window: int = 10) -> list[int]:
        """Similar to the latest distinct online events, weight 1 / (1 + age), summed."""
        recent: list[int] = []
        for t in reversed(history):
            if t not in recent:
                recent.append(t)
            if len(recent) == window:
                break
        scores: dict[int, float] = {}
        for age, t in enumerate(recent):
            for s, score in self.similar.get(t, []):
                scores[s] = scores.get(s, 0.0) + score / (1 + age)
        ranked = sorted(scores, key=lambda s: (-scores[s], s))
        return [s for s in ranked if s not in set(history)]

    @staticmethod
    def strict_blend(online: list[int], offline: list[int]) -> list[int]:
        out: list[int] = []
        queues, turn = [list(online), list(offline)], 0
        while queues[0] or queues[1]:
            side = turn if queues[turn] else 1 - turn
            while queues[side]:
                t = queues[side].pop(0)
                if t not in out:
                    out.append(t)
                    break
            turn = 1 - turn
        return out

    def stats(self) -> dict[str, int]:
        return self.call("GET", "/stats").json()

    def tracks_with_similar(self, n: int, skip: int = 0) -> list[int]:
        ids = [t for t, lst in self.similar.items() if len(lst) >= 5]
        self.assertGreaterEqual(len(ids), n + skip, "similar.parquet has too few tracks")
        return ids[skip : skip + n]

    @property
    def new_user(self) -> int:
        return max(self.recs, default=0) + 1_000

    @property
    def online_user(self) -> int:
        return max(self.recs, default=0) + 2_000

    @property
    def offline_user(self) -> int:
        return sorted(self.recs)[0]

    @property
    def both_user(self) -> int:
        return sorted(self.recs)[1]

    # -- the checks ---------------------------------------------------------------------------

    def test_01_root_and_health(self) -> None:
        response = self.call("GET", "/")
        body = response.json()
        self.check(
            "root: status 200, a dict", response.status_code == 200 and isinstance(body, dict)
        )
        self.check("root: status ok", body.get("status") == "ok", body.get("status"))
        self.check(
            "root: users with offline lists as in recommendations.parquet",
            body.get("users_with_recommendations") == len(self.recs),
            body.get("users_with_recommendations"),
        )
        self.check("root: tracks as in items.parquet", body.get("tracks") == len(self.catalogue))
        self.check("root: built_at given", bool(body.get("built_at")), body.get("built_at"))
        health = self.call("GET", "/health")
        self.check("health: 200", health.status_code == 200, health.json())

    def test_02_top_popular(self) -> None:
        default = self.check_list(self.call("GET", "/top_popular"), self.k, "top popular")
        self.check(
            "top popular: most popular first", default == self.fill(self.popular, set(), self.k)
        )
        ten = self.check_list(self.call("GET", "/top_popular/10"), 10, "top popular k=10")
        self.check("top popular k=10: the head of the default list", ten == default[:10])

    def test_03_similar(self) -> None:
        track = self.tracks_with_similar(1)[0]
        own = [s for s, _ in self.similar[track]]
        k = min(5, len(own))
        got = self.check_list(
            self.call("GET", "/similar/5", params={"track_id": track}), k, f"similar to {track}"
        )
        self.check("similar: all from similar.parquet of the track", set(got) <= set(own))
        scores = dict(self.similar[track])
        self.check(
            "similar: best score first",
            [scores[s] for s in got] == sorted((scores[s] for s in got), reverse=True),
        )
        posted = self.check_list(self.call("POST", "/similar/5", json=[track]), k, "similar POST")
        self.check("similar: POST equals GET", posted == got)
        pair = self.tracks_with_similar(2, skip=1)
        both = self.call("GET", "/similar/10", params={"track_id": pair}).json()
        union = {s for t in pair for s, _ in self.similar[t]} - set(pair)
        self.check(
            "similar to two tracks: from their lists, neither given one in it",
            set(both) <= union and not set(both) & set(pair) and len(both) > 0,
        )

    def test_04_history_of_unknown_user(self) -> None:
        response = self.call("GET", f"/history/{self.online_user}")
        self.check(
            "history of an unknown user: 200 and []",
            response.status_code == 200 and response.json() == [],
            response.json(),
        )

    def test_05_add_history(self) -> None:
        tracks = self.tracks_with_similar(3, skip=3)
        first = self.call("POST", f"/history/{self.online_user}", json=tracks[:2])
        body = first.json()
        self.check("add history: 200, a dict", first.status_code == 200 and isinstance(body, dict))
        self.check(
            "add history: user_id, added, history_length",
            body == {"user_id": self.online_user, "added": 2, "history_length": 2},
            body,
        )
        second = self.call("POST", f"/history/{self.online_user}", json=tracks[2:])
        self.check(
            "add one more event: history_length 3",
            second.json().get("history_length") == 3,
            second.json(),
        )

    def test_06_history_of_known_user(self) -> None:
        tracks = self.tracks_with_similar(3, skip=3)
        got = self.check_list(
            self.call("GET", f"/history/{self.online_user}"), 3, "history of a known user"
        )
        self.check("history: in the order it was added", got == tracks, got)

    def test_07_new_user_gets_top_popular(self) -> None:
        response = self.call("GET", f"/recommendations/{self.new_user}")
        got = self.check_list(response, self.k, "new user")
        self.check(
            "new user: the top popular tracks", got == self.fill(self.popular, set(), self.k)
        )
        self.check(
            "new user: counted as default",
            response.headers.get("X-Recommendation-Source") == "default",
        )

    def test_08_offline_user_gets_offline_list(self) -> None:
        user = self.offline_user
        response = self.call("GET", f"/recommendations/{user}")
        got = self.check_list(response, self.k, f"offline-only user {user}")
        expected = self.fill(self.recs[user], set(), self.k)
        self.check(
            "offline-only: the head of the user's row in recommendations.parquet",
            got == expected,
            f"got {got[:5]}..., expected {expected[:5]}...",
        )
        self.check(
            "offline-only: counted as personal",
            response.headers.get("X-Recommendation-Source") == "personal",
        )

    def test_09_online_user_gets_similar(self) -> None:
        user = self.online_user
        history = self.call("GET", f"/history/{user}").json()
        response = self.call("GET", f"/recommendations/{user}")
        got = self.check_list(response, self.k, f"online-only user {user}")
        similar = {s for t in history for s, _ in self.similar.get(t, [])} - set(history)
        self.check("online-only: none of the heard tracks", not set(got) & set(history))
        n_similar = min(len(similar), self.k)
        self.check(
            "online-only: made of tracks similar to the history",
            set(got[:n_similar]) <= similar,
            f"{n_similar} similar available",
        )
        self.check(
            "online-only: filled from popular only if short",
            got[n_similar:]
            == [t for t in self.fill([], set(history) | similar, self.k)][: self.k - n_similar],
        )
        self.check(
            "online-only: recent events weigh more (expected order)",
            got == self.fill(self.online_list(history), set(history), self.k),
        )
        self.check(
            "online-only: counted as similar",
            response.headers.get("X-Recommendation-Source") == "similar",
        )

    def test_10_both_user_gets_a_blend(self) -> None:
        user = self.both_user
        heard = self.tracks_with_similar(2, skip=6)
        self.call("POST", f"/history/{user}", json=heard)
        online = self.online_list(heard)
        offline = [t for t in self.recs[user] if t not in heard]
        strict = self.call("GET", f"/recommendations/{user}", params={"blend": "strict"})
        got = self.check_list(strict, self.k, f"user {user} with both")
        expected = self.fill(self.strict_blend(online, offline), set(heard), self.k)
        self.check(
            "blend strict: online head, offline head, in turn",
            got == expected,
            f"got {got[:6]}, expected {expected[:6]}",
        )
        self.check(
            "blend: counted as personal and similar",
            strict.headers.get("X-Recommendation-Source") == "personal+similar",
        )
        p0 = self.call(
            "GET", f"/recommendations/{user}", params={"blend": "probability", "p": 0}
        ).json()
        p1 = self.call(
            "GET", f"/recommendations/{user}", params={"blend": "probability", "p": 1}
        ).json()
        self.check(
            "blend probability p=0: the offline list first",
            p0 == self.fill(offline + online, set(heard), self.k),
        )
        self.check(
            "blend probability p=1: the online list first",
            p1 == self.fill(online + offline, set(heard), self.k),
        )
        half = [
            self.call(
                "GET", f"/recommendations/{user}", params={"blend": "probability", "p": 0.5}
            ).json()
            for _ in range(2)
        ]
        self.check("blend probability p=0.5: the same request, the same answer", half[0] == half[1])
        pool = set(online) | set(offline)
        self.check(
            "blend probability p=0.5: k tracks from the two lists",
            len(half[0]) == self.k and set(half[0]) <= pool | set(self.popular),
        )
        posted = self.call(
            "POST", "/recommendations", json={"user_id": user, "blend": "probability", "p": 0.5}
        ).json()
        self.check("POST /recommendations equals GET", posted == half[0])

    def test_11_stats_counters_increase(self) -> None:
        before = self.stats()
        self.check(
            "stats: a dict with personal, similar, default",
            all(isinstance(before.get(key), int) for key in ("personal", "similar", "default")),
            before,
        )
        for user in (self.new_user, self.offline_user, self.online_user, self.both_user):
            self.call("GET", f"/recommendations/{user}")
        after = self.stats()
        delta = {key: after[key] - before[key] for key in ("personal", "similar", "default")}
        self.check(
            "stats: one of each kind, a blend counted as personal and similar",
            delta == {"personal": 2, "similar": 2, "default": 1},
            delta,
        )

    def test_12_details(self) -> None:
        got = self.call("GET", "/top_popular/3", params={"details": "true"}).json()
        self.check(
            "details: objects with track_id, name, artists, albums, genres",
            all(set(x) == {"track_id", "name", "artists", "albums", "genres"} for x in got),
            got[:1],
        )
        self.check(
            "details: names from items.parquet",
            [x["name"] for x in got] == [self.names[t] for t in self.popular[:3]],
        )
        recs = self.call(
            "GET", f"/recommendations/{self.offline_user}", params={"details": "true", "k": 5}
        ).json()
        self.check(
            "details on recommendations: 5 objects",
            len(recs) == 5 and all(isinstance(x["name"], str) for x in recs),
        )

    def test_13_bad_input(self) -> None:
        user = self.online_user
        unknown = max(self.catalogue) + 1
        known = self.catalogue[0]
        cases: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", "/recommendations/abc", {}),
            ("GET", "/recommendations/-5", {}),
            ("GET", f"/recommendations/{user}", {"params": {"k": 0}}),
            ("GET", f"/recommendations/{user}", {"params": {"k": 101}}),
            ("GET", f"/recommendations/{user}", {"params": {"p": 1.5}}),
            ("GET", f"/recommendations/{user}", {"params": {"blend": "random"}}),
            ("POST", "/recommendations", {"json": {"user_id": "x"}}),
            ("POST", "/recommendations", {"data": "{not json"}),
            ("GET", "/top_popular/0", {}),
            ("GET", "/top_popular/1000", {}),
            ("GET", "/similar/5", {}),
            ("GET", "/similar/5", {"params": {"track_id": unknown}}),
            ("POST", f"/history/{user}", {"json": []}),
            ("POST", f"/history/{user}", {"json": [known, unknown]}),
            ("POST", f"/history/{user}", {"json": [known, -1]}),
            ("POST", f"/history/{user}", {"json": [known, 1.5]}),
            ("POST", f"/history/{user}", {"json": {"track_id": known}}),
            ("POST", "/history/x", {"json": [known]}),
        ]
        history_before = self.call("GET", f"/history/{user}").json()
        stats_before = self.stats()
        for method, path, kwargs in cases:
            response = self.call(method, path, **kwargs)
            try:
                message = response.json().get("message", "")
            except ValueError:
                message = ""
            self.check(
                f"bad input {method} {path} {kwargs}: 4xx with a message",
                400 <= response.status_code < 500 and bool(message),
                f"{response.status_code}: {message}",
            )
        rejected = self.call("POST", f"/history/{user}", json=[known, unknown]).json()
        self.check(
            "unknown track ids are listed in the answer",
            rejected.get("unknown_track_ids") == [unknown],
            rejected,
        )
        self.check(
            "bad input: history unchanged",
            self.call("GET", f"/history/{user}").json() == history_before,
        )
        self.check("bad input: counters unchanged", self.stats() == stats_before)

    def test_14_restart_keeps_history(self) -> None:
        history = self.call("GET", f"/history/{self.online_user}").json()
        before = self.call("GET", f"/recommendations/{self.online_user}").json()
        log.info("restarting the service")
        self.server.stop()
        self.server.start()
        self.check(
            "after a restart: the history is still there",
            self.call("GET", f"/history/{self.online_user}").json() == history,
            history,
        )
        self.check(
            "after a restart: the same recommendations",
            self.call("GET", f"/recommendations/{self.online_user}").json() == before,
        )
        added = self.call("POST", f"/history/{self.online_user}", json=[self.catalogue[0]])
        self.check(
            "after a restart: history keeps growing",
            added.json().get("history_length") == len(history) + 1,
            added.json(),
        )

    def test_15_every_answer_is_a_list_of_ints(self) -> None:
        for path in (
            "/top_popular",
            f"/recommendations/{self.both_user}",
            f"/history/{self.online_user}",
        ):
            body = self.call("GET", path).json()
            self.check(f"{path}: integers", all(isinstance(x, int) for x in body))
            self.check(f"{path}: ids of the catalogue", set(body) <= set(self.catalogue))


if __name__ == "__main__":
    unittest.main(verbosity=2)
