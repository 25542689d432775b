"""Adaptation served by Ray Serve (platform/serve.py), for real: `python -m platform.serve` on the session
Ray head (a driver subprocess with the cluster's environment), a second application (two replicas,
for the task-id routing) added through the builder (`build_app`, what `serve run` and KubeRay's
serveConfigV2 call), HTTP on loopback. Models are
tiny and untrained (a Conv4 MAML classifier and a sinusoid MLP, built from their configs): what is
checked is that the service computes what the library computes, not what the model knows."""

import http.client
import json
import random
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from platform.algorithms import build
from platform.checkpoint import CheckpointStore
from platform.config import RunConfig
from platform.learner import load_learner
from platform.serve import ROUTING_HEADER

REPO = Path(__file__).resolve().parents[1]
CACHE, MAX_SUPPORT, MAX_QUERY, MAX_WAYS, MAX_BYTES = 4, 20, 10, 5, 1_000_000
CLASSIFIER = {
    "task": {"kind": "omniglot", "ways": 5, "shots": 1, "query": 1},
    "model": {"kind": "conv4", "width": 8},
    "algorithm": "maml",
    "optim": {"test_inner_steps": 2},
}
SINUSOID = {"optim": {"test_inner_steps": 5}}
# The sinusoid app, added to the running Serve instance through the builder (as serveConfigV2 would):
# two replicas of half a CPU each (the session head has 4), for the routing of task ids.
ADD_SINUSOID = """
import sys, ray
from ray import serve
from platform.serve import build_app
ray.init()
args = {"model": sys.argv[1], "min_replicas": 2, "max_replicas": 2, "num_cpus": 0.5}
serve.run(build_app(args), name="sinusoid", route_prefix="/sinusoid")
"""
# What the replicas report of the tasks they hold reaches the proxy's router within about this
# (a replica pushes its list every 0.1 s when it changed; the controller broadcasts it at once).
ROUTING_DELAY_S = 2.0


def checkpoint(folder: Path, values: dict) -> Path:
    config = RunConfig.model_validate(values)
    _, _, params = build(config)
    CheckpointStore(folder).save({"params": params, "config": config.model_dump(mode="json"), "iteration": 0}, 0)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-models")
    return {"classifier": checkpoint(root / "classifier", CLASSIFIER), "sinusoid": checkpoint(root / "sin", SINUSOID)}


def _wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"`{text}` not printed (exit {proc.poll()}):\n{log.read_text()[-5000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(ray_cluster, models, tmp_path_factory):
    """The base URL of Serve on the session head: the classifier at /, the sinusoid at /sinusoid.
    SIGTERM to the command shuts Serve down, so the head is clean for the tests after these."""
    from conftest import free_port

    port, log = free_port(), tmp_path_factory.mktemp("serve-log") / "serve.log"
    command = [sys.executable, "-m", "platform.serve", "--model", str(models["classifier"]), "--port", str(port)]
    limits = ["--cache-size", CACHE, "--max-support", MAX_SUPPORT, "--max-query", MAX_QUERY, "--max-ways", MAX_WAYS]
    limits += ["--max-request-bytes", MAX_BYTES]
    with open(log, "w") as out:  # a file, not a pipe: Ray forwards the replicas' logs to the driver
        proc = subprocess.Popen(
            [*command, *map(str, limits), "--max-replicas", "1"],
            env=ray_cluster.subprocess_env(),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_line(proc, log, "serving ")
        add = [sys.executable, "-c", ADD_SINUSOID, str(models["sinusoid"])]
        done = subprocess.run(
            add, check=False, env=ray_cluster.subprocess_env(), capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    assert "stopped" in log.read_text(), log.read_text()[-5000:]


@pytest.fixture(scope="module")
def learners(models):
    """The library's learners for the same checkpoints, on one thread as the replicas (num_cpus=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {name: load_learner(path) for name, path in models.items()}
    torch.set_num_threads(threads)


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def post_declaring(url: str, size: int) -> tuple[int, dict]:
    """A POST declaring a body of `size` bytes and sending none of it: refused from the header alone.
    (Sending such a body is a race: the server answers before reading it and closes the connection,
    and the client, still uploading, gets a broken pipe instead of the answer.)"""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        connection.putrequest("POST", parts.path or "/")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.load(response)
    finally:
        connection.close()


def info(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def image_task(seed: int, ways: int = 5, queries: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "support_x": rng.random((ways, 1, 28, 28), dtype=np.float32).tolist(),
        "support_y": [f"class-{c}" for c in rng.permutation(ways)],
        "query_x": rng.random((queries, 28, 28), dtype=np.float32).tolist(),  # (n, 28, 28): one channel implied
    }


def sinusoid_task(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-5, 5, 10).astype(np.float32)
    return {
        "support_x": x.tolist(),
        "support_y": (2 * np.sin(x + 1)).astype(np.float32).tolist(),
        "query_x": rng.uniform(-5, 5, (4, 1)).astype(np.float32).tolist(),
    }


def expected(learner, task: dict, steps=None) -> dict:
    """What the library answers for the same inputs (float32, as the server parses them)."""
    adapted = learner.adapt(np.float32(task["support_x"]), task["support_y"], steps)
    if not learner.classification:
        return {"values": adapted.predict(np.float32(task["query_x"])).tolist()}
    predictions = adapted.predict(np.float32(task["query_x"]))
    return {
        "classes": list(predictions.classes),
        "labels": predictions.labels,
        "probabilities": predictions.probabilities,
    }


def assert_answers(response: dict, want: dict) -> None:
    if "values" in want:
        assert np.array_equal(np.float32(response["values"]), np.float32(want["values"]))
        return
    assert response["classes"] == want["classes"] and response["labels"] == want["labels"]
    assert np.array_equal(np.float32(response["probabilities"]), want["probabilities"])


def test_predictions_are_the_librarys_for_a_classifier_and_a_regression(server, learners):
    for seed in range(3):
        task = image_task(seed) | {"steps": seed + 1}
        status, response = post(server, task)
        assert status == 200, response
        assert_answers(response, expected(learners["classifier"], task, seed + 1))
        task = sinusoid_task(seed)
        status, response = post(server + "/sinusoid", task)
        assert status == 200, response
        assert_answers(response, expected(learners["sinusoid"], task))
    assert info(server + "/sinusoid")["default_steps"] == 5 and info(server)["head_outputs"] == 5


def test_a_query_only_request_uses_the_cached_adaptation(server, learners):
    task = image_task(100)
    before = info(server)["adaptations"]
    status, first = post(server, task | {"task_id": "mine"})
    assert status == 200 and first["adapted"] and first["task_id"] == "mine"
    queries = image_task(101)["query_x"]
    status, second = post(server, {"task_id": "mine", "query_x": queries})
    assert status == 200 and not second["adapted"], second
    assert_answers(second, expected(learners["classifier"], task | {"query_x": queries}))
    assert info(server)["adaptations"] == before + 1
    # Without a task_id the key is the support set's SHA-256: the same support set again is a hit ...
    status, third = post(server, task)
    status, fourth = post(server, task | {"query_x": queries})
    assert not fourth["adapted"] and fourth["task_id"] == third["task_id"] and len(third["task_id"]) == 64
    assert third["adapted"]  # (a new key: the first request was stored under "mine")
    # ... other steps are another task, and a task_id sent with another support set is adapted again.
    assert post(server, task | {"steps": 1})[1]["adapted"]
    status, replaced = post(server, image_task(102) | {"task_id": "mine"})
    assert replaced["adapted"]
    assert_answers(
        post(server, {"task_id": "mine", "query_x": queries})[1],
        expected(learners["classifier"], image_task(102) | {"query_x": queries}),
    )


def test_the_cache_is_a_bounded_lru(server):
    ids = [f"lru-{i}" for i in range(CACHE + 3)]
    for i, task_id in enumerate(ids):
        assert post(server, image_task(200 + i) | {"task_id": task_id})[1]["adapted"]
        if i == CACHE - 1:
            post(server, {"task_id": ids[0], "query_x": image_task(0)["query_x"]})  # ids[0] most recent now
    assert info(server)["cache"] == {"tasks": CACHE, "capacity": CACHE}
    kept = {ids[0], *ids[-(CACHE - 1) :]}
    for task_id in ids:
        status, response = post(server, {"task_id": task_id, "query_x": image_task(0)["query_x"]})
        if task_id in kept:
            assert status == 200 and not response["adapted"], task_id
        else:
            assert status == 404 and f"task_id = '{task_id}'" in response["error"], response


def test_the_routing_header_names_the_task_as_the_body_s_task_id_does(server):
    task = image_task(500)
    status, answer = post(server, task, {ROUTING_HEADER: "by-header"})
    assert status == 200 and answer["adapted"] and answer["task_id"] == "by-header", answer
    both = {"task_id": "by-header", "query_x": task["query_x"]}
    status, answer = post(server, both, {ROUTING_HEADER: "by-header"})
    assert status == 200 and not answer["adapted"], answer
    status, answer = post(server, both | {"task_id": "other"}, {ROUTING_HEADER: "by-header"})
    assert status == 400, answer
    assert answer["problems"] == [
        f"task_id = 'other': differs from the {ROUTING_HEADER} header ('by-header'); send one task id"
    ]
    status, answer = post(server, task, {ROUTING_HEADER: "x" * 201})
    assert status == 400 and answer["error"].startswith(f"{ROUTING_HEADER} = 'xxx"), answer


def test_the_routing_header_sends_a_task_s_queries_to_the_replica_that_holds_it(server, learners):
    """Two sinusoid replicas, four tasks adapted once each (each held by one replica). Query-only
    requests carrying the header are all answered from the cache; the same requests without it
    reach the replica that lacks the task about half the time (404): the header is what routes."""
    url = server + "/sinusoid"
    tasks = {f"route-{i}": sinusoid_task(400 + i) for i in range(4)}
    for task_id, task in tasks.items():
        status, answer = post(url, task, {ROUTING_HEADER: task_id})
        assert status == 200 and answer["adapted"], answer
    time.sleep(ROUTING_DELAY_S)
    for task_id, task in [*tasks.items()] * 5:
        status, answer = post(url, {"query_x": task["query_x"]}, {ROUTING_HEADER: task_id})
        assert status == 200 and not answer["adapted"] and answer["task_id"] == task_id, answer
        assert_answers(answer, expected(learners["sinusoid"], task))
    unrouted = [
        post(url, {"task_id": task_id, "query_x": task["query_x"]})[0] for task_id, task in [*tasks.items()] * 5
    ]
    assert {200, 404} == set(unrouted), unrouted  # 20 requests, each to either replica: 2^-19 to see one kind


def bad_requests(seed: int) -> list[tuple[str, object, str]]:
    """(url suffix, body, the field the error must name): one of each kind a client gets wrong."""
    good, rng = image_task(seed), np.random.default_rng(seed)
    nan_support = json.dumps(good).replace(str(good["support_x"][0][0][0][0]), "NaN", 1).encode()
    sinusoid = sinusoid_task(seed)
    return [
        ("", {k: v for k, v in good.items() if k != "query_x"}, "query_x"),
        ("", {k: v for k, v in good.items() if k != "support_y"}, "support_y"),
        ("", good | {"support_y": good["support_y"][:-1]}, "support_y"),
        ("", good | {"query_x": rng.random((2, 27, 27)).tolist()}, "query_x"),
        ("", nan_support, "support_x"),
        ("", image_task(seed, ways=MAX_WAYS + 1), "support_y"),
        ("", image_task(seed, queries=MAX_QUERY + 1), "query_x"),
        ("", good | {"support_x": good["support_x"] * 5, "support_y": good["support_y"] * 5}, "support_x"),
        ("", {"task_id": f"never-{seed}", "query_x": good["query_x"]}, "task_id"),
        ("", good | {"steps": -1}, "steps"),
        ("", good | {"query_x": [good["query_x"][0], good["query_x"][0][:5]]}, "query_x"),
        ("", good | {"query_x": [["a"]]}, "query_x"),
        ("", good | {"shots": 1}, "shots"),
        ("", b"{not json", "body"),
        ("/sinusoid", json.dumps(sinusoid).replace(str(sinusoid["query_x"][0][0]), "NaN", 1).encode(), "query_x"),
        ("/sinusoid", sinusoid | {"support_y": sinusoid["support_y"][:3]}, "support_y"),
    ]


def test_bad_requests_get_4xx_naming_the_field_and_good_ones_are_answered(server, learners):
    """100 bad requests interleaved with good ones, 8 at a time: every bad one a 4xx whose message
    names the field, every good one the library's answer; then a body declared over the limit."""
    kinds = [bad for seed in range(7) for bad in bad_requests(seed)]
    bad = [("bad", *kinds[i]) for i in range(100)]
    good = [("good", "", image_task(300 + i) | {"steps": i % 3}, None) for i in range(20)]
    good += [("good", "/sinusoid", sinusoid_task(300 + i), None) for i in range(10)]
    requests = bad + good
    random.Random(0).shuffle(requests)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: post(server + r[1], r[2]), requests))
    for (kind, path, body, field), (status, response) in zip(requests, answers):
        if kind == "bad":
            assert 400 <= status < 500 and field in response["error"], (field, status, response)
            assert response["problems"], response
        else:
            assert status == 200, response
            learner = learners["sinusoid" if path else "classifier"]
            assert_answers(response, expected(learner, body, body.get("steps")))
    status, response = post_declaring(server, MAX_BYTES + 1)
    assert status == 413 and response["problems"] == [
        f"body: {MAX_BYTES + 1} bytes; this server takes at most {MAX_BYTES} (max_request_bytes)"
    ], response
    assert info(server)["model"]  # still serving


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--model", "{tmp}/nowhere"], "nowhere: no such checkpoint"),
        (["--model", "m", "--cache-size", "0"], "--cache-size"),
    ],
    ids=["no-model", "cache-size-0"],
)
def test_bad_arguments_are_a_usage_error_before_anything_starts(tmp_path, flags, message):
    proc = subprocess.run(
        [sys.executable, "-m", "platform.serve", *(f.format(tmp=tmp_path) for f in flags)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
